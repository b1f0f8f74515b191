"""Checkpoints and fault tolerance, with real processes: resume, kill -9, SIGTERM, NaN guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY, cli_overrides, complete_steps, run_main, train_losses

pytestmark = pytest.mark.slow

MESH_2X4 = {'mesh.ici_data': 2, 'mesh.ici_model': 4}
RUN = {'train.steps': 12, 'checkpoint.every_steps': 6}


def args_for(tiny_dataset, **overrides):
  merged = {**TINY, **tiny_dataset, **RUN, **MESH_2X4}
  merged.update({k.replace('__', '.'): v for k, v in overrides.items()})
  return ['--config=configs/default.py', *cli_overrides(merged)]


@pytest.fixture(scope='module')
def uninterrupted(tiny_dataset, tmp_path_factory):
  """12 steps on a 2x4 mesh in one go; checkpoints at steps 6 and 12."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  run_main(args_for(tiny_dataset), workdir)
  return workdir


def resume_from_step_6(uninterrupted, workdir, args):
  """A workdir holding only the step-6 checkpoint of the uninterrupted run, resumed to 12."""
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  shutil.copytree(os.path.join(uninterrupted, 'checkpoints', '6'),
                  os.path.join(workdir, 'checkpoints', '6'))
  proc = run_main(args, workdir)
  assert 'resumed from step 6' in proc.stderr
  return train_losses(workdir)


def test_uninterrupted_run_writes_checkpoints(uninterrupted):
  assert complete_steps(uninterrupted) == [6, 12]
  assert sorted(train_losses(uninterrupted)) == list(range(1, 13))


def test_resume_on_the_same_mesh_is_bitwise_identical(uninterrupted, tiny_dataset, tmp_path):
  resumed = resume_from_step_6(uninterrupted, str(tmp_path), args_for(tiny_dataset))
  expected = train_losses(uninterrupted)
  assert sorted(resumed) == list(range(7, 13))
  assert all(resumed[s] == expected[s] for s in resumed), (resumed, expected)


@pytest.mark.parametrize('mesh', [{'mesh.ici_data': 8, 'mesh.ici_model': 1},
                                  {'mesh.ici_data': 1, 'mesh.ici_model': 1}],
                         ids=['8x1', 'one_device'])
def test_resume_onto_another_mesh(uninterrupted, tiny_dataset, tmp_path, mesh):
  args = args_for(tiny_dataset, **{k.replace('.', '__'): v for k, v in mesh.items()})
  resumed = resume_from_step_6(uninterrupted, str(tmp_path), args)
  expected = train_losses(uninterrupted)
  got = np.array([resumed[s] for s in range(7, 13)])
  want = np.array([expected[s] for s in range(7, 13)])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _start(args, workdir):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXMED_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, '-m', 'jaxmed.main', f'--workdir={workdir}', *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait_for(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.002)
  raise TimeoutError('condition not reached')


def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(uninterrupted, tiny_dataset,
                                                                    tmp_path):
  workdir = str(tmp_path)
  args = args_for(tiny_dataset)
  proc = _start(args, workdir)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGTERM)  # A second one during the save must not corrupt it.
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  stopped = max(train_losses(workdir))
  assert stopped < 12, 'the run finished before SIGTERM arrived; make it longer'
  assert f'saved step {stopped}' in stderr
  assert complete_steps(workdir)[-1] == stopped

  run_main(args, workdir)  # The same command resumes.
  resumed, expected = train_losses(workdir), train_losses(uninterrupted)
  assert sorted(resumed) == list(range(1, 13))
  assert all(resumed[s] == expected[s] for s in resumed)


def test_kill_9_during_an_async_save_resumes_from_the_latest_complete_step(tiny_dataset, tmp_path):
  workdir = str(tmp_path)
  args = args_for(tiny_dataset, checkpoint__every_steps=1,
                  checkpoint__keep=100)
  proc = _start(args, workdir)
  ckpts = os.path.join(workdir, 'checkpoints')

  def saving_after_a_complete_one():
    if not os.path.isdir(ckpts):
      return False
    names = os.listdir(ckpts)
    return any(n.isdigit() for n in names) and any('tmp' in n for n in names)

  assert _wait_for(saving_after_a_complete_one, proc), 'never caught a save in progress'
  proc.kill()
  proc.wait()
  complete = complete_steps(workdir)
  partial = [n for n in os.listdir(ckpts) if not n.isdigit() and 'tmp' in n]
  assert complete and partial, os.listdir(ckpts)
  killed_losses = train_losses(workdir)

  proc = run_main(args, workdir)
  assert f'resumed from step {complete[-1]}' in proc.stderr
  resumed = train_losses(workdir)
  assert max(resumed) == 12
  # Steps the killed run had already logged are recomputed identically after the resume.
  for s in killed_losses:
    assert resumed[s] == killed_losses[s]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
  workdir = str(tmp_path)
  proc = run_main(args_for(tiny_dataset, train__nan_at_step=8, checkpoint__every_steps=3),
                  workdir, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jaxmed: error: loss') and 'at step 8' in last, last
  assert 'last good checkpoint: step 6' in last
  assert complete_steps(workdir) == [3, 6]


def test_restoring_a_different_model_names_the_differing_keys(uninterrupted, tiny_dataset,
                                                              tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(uninterrupted, workdir)
  proc = run_main(args_for(tiny_dataset, model__width=8), workdir, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert 'model.width (checkpoint 4, config 8)' in last, last


def test_resuming_with_another_data_stream_names_each_change(uninterrupted, tiny_dataset,
                                                             tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(uninterrupted, workdir)
  changed = args_for(tiny_dataset, seed=1, train__global_batch_size=32)
  proc = run_main(changed, workdir, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f'jaxmed: error: checkpoint in {workdir} was written with a different data stream: '
      'seed 0 -> 1, train.global_batch_size 16 -> 32; start a new --workdir, or pass '
      '--config.checkpoint.allow_changed_data_stream=True to continue anyway')

  proc = run_main(changed + ['--config.checkpoint.allow_changed_data_stream=True'], workdir)
  assert ('with a different data stream, as checkpoint.allow_changed_data_stream allows: '
          'seed 0 -> 1, train.global_batch_size 16 -> 32') in proc.stderr
  assert 'resumed from step 12' in proc.stderr


def test_the_data_stream_names_the_crops_file_by_its_sources_not_the_mesh(tiny_config, tmp_path):
  import h5py

  from jaxmed import checkpointing
  config = tiny_config()
  copy = str(tmp_path / 'crops.h5')
  shutil.copy(config.data.crops_file, copy)
  with h5py.File(copy, 'r+') as f:
    f.attrs['sources'] = json.dumps({'candidates_V2.csv': '0' * 64})
  stream = checkpointing.data_stream(config)
  # Another mesh, log cadence or eval batch: the same stream; another crops file: named.
  same = tiny_config(mesh__ici_data=2, mesh__ici_model=4, train__log_every_steps=7,
                     train__eval_batch_size=64)
  assert checkpointing.differing_data_stream(stream, checkpointing.data_stream(same)) == []
  other = checkpointing.data_stream(tiny_config(data__crops_file=copy))
  diffs = checkpointing.differing_data_stream(stream, other)
  assert len(diffs) == 1 and diffs[0].startswith('crops_file.sources_sha256 '), diffs


def metrics_rows(workdir):
  """{(split, step): record} of workdir/metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {(r['split'], r['step']): r for r in records}


# Logs at 4, 8, 12, validation at 6 and 12, checkpoints at 6 and 12: step 5 is none of them.
BETWEEN_LOGS = dict(train__log_every_steps=4, train__eval_every_steps=6)


def test_sigterm_between_log_steps_leaves_every_metrics_row_as_if_never_stopped(tiny_dataset,
                                                                                 tmp_path):
  expected_dir, workdir = str(tmp_path / 'uninterrupted'), str(tmp_path / 'stopped')
  run_main(args_for(tiny_dataset, **BETWEEN_LOGS), expected_dir)
  stop = run_main(args_for(tiny_dataset, **BETWEEN_LOGS, train__sigterm_at_step=5), workdir)
  assert 'saved step 5' in stop.stderr and complete_steps(workdir) == [5]
  assert sorted(metrics_rows(workdir)) == [('train', 4)]

  resume = run_main(args_for(tiny_dataset, **BETWEEN_LOGS), workdir)  # The same command.
  assert 'resumed from step 5' in resume.stderr
  got, expected = metrics_rows(workdir), metrics_rows(expected_dir)
  assert sorted(got) == sorted(expected) == [('train', 4), ('train', 8), ('train', 12),
                                             ('val', 6), ('val', 12)]
  for key, want in expected.items():
    names = (('loss', 'grad_norm', 'learning_rate') if key[0] == 'train'
             else [k for k, v in want.items() if isinstance(v, float)])
    assert names, want
    np.testing.assert_allclose([got[key][k] for k in names], [want[k] for k in names],
                               rtol=1e-6, err_msg=f'{key}: {names}')


def test_a_checkpoint_without_logged_sums_resumes_from_zero_sums(tiny_config, tmp_path, caplog):
  import jax
  import jax.numpy as jnp

  from jaxmed import checkpointing
  from jaxmed import train
  config = tiny_config()
  checkpointer = checkpointing.Checkpointer(str(tmp_path), config, training=True)
  try:
    state = {'kernel': jnp.arange(3.0)}  # The sums are an item of their own, beside any state.
    checkpointer.save(3, state)  # As before the sums were saved.
    checkpointer.save(4, state, {'count': 1, 'loss': 0.5, 'grad_norm': 2.0,
                                 'learning_rate': 1e-3})
    checkpointer.wait()
    assert checkpointer.logged_sums(0) is None  # A new run: no note.
    assert 'holds no logged-metric sums' not in caplog.text
    assert checkpointer.logged_sums(3) is None
    assert 'checkpoint step 3' in caplog.text and 'holds no logged-metric sums' in caplog.text
    assert checkpointer.logged_sums(4) == {'count': 1, 'loss': 0.5, 'grad_norm': 2.0,
                                           'learning_rate': 1e-3}
  finally:
    checkpointer.close()
  mesh = jax.sharding.Mesh(jax.devices()[:1], ('data',))
  stats = jax.device_get(train.new_loop_stats(mesh, 4, {'count': 1, 'loss': 0.5,
                                                        'grad_norm': 2.0,
                                                        'learning_rate': 1e-3}))
  assert (stats['step'], stats['count'], stats['loss']) == (4, 1, np.float32(0.5))
  stats = jax.device_get(train.new_loop_stats(mesh, 3, None))
  assert (stats['count'], stats['loss'], stats['grad_norm']) == (0, 0.0, 0.0)


# ---- SIGTERM to the whole process group (as SLURM and Kubernetes send it), Grain workers on ---

GROUP_RUN = {'train.steps': 6, 'checkpoint.every_steps': 2, 'train.eval_every_steps': 3,
             'data.workers': 1, 'model.name': 'cnn3d'}
FAST_COMPILE = {'XLA_FLAGS': '--xla_backend_optimization_level=0'}


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  # Rates (steps_per_s, examples_per_s) are wall-clock; everything else must be equal.
  return {(r['split'], r['step']): {k: v for k, v in r.items() if not k.endswith('_per_s')}
          for r in records}


@pytest.mark.heavy  # Four training runs with a Grain worker: several minutes on 2 cores.
def test_sigterm_to_the_process_group_with_workers_saves_stops_and_resumes_exactly(
    tiny_dataset, tmp_path):
  from test_leftovers import _group_alive
  base = {**TINY, **tiny_dataset, **GROUP_RUN}
  reference = str(tmp_path / 'reference')
  run_main(['--config=configs/default.py', *cli_overrides(base)], reference,
           env_extra=FAST_COMPILE)

  workdir = str(tmp_path / 'interrupted')
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXMED_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', **FAST_COMPILE)
  # A checkpoint step; during validation (after its first batch); a step between checkpoints.
  for at_step, during_eval in ((2, False), (3, True), (5, False)):
    hook = {'train.sigterm_at_step': at_step, 'train.sigterm_during_eval': during_eval,
            'train.sigterm_to_group': True}
    proc = subprocess.Popen(
        [sys.executable, '-m', 'jaxmed.main', f'--workdir={workdir}', '--config=configs/default.py',
         *cli_overrides({**base, **hook})], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert f'saved step {at_step}' in stderr, stderr[-3000:]
    assert complete_steps(workdir)[-1] == at_step
    deadline = time.time() + 5
    while _group_alive(proc.pid) and time.time() < deadline:
      time.sleep(0.1)
    assert _group_alive(proc.pid) == []  # The workers ended with the run.
  run_main(['--config=configs/default.py', *cli_overrides(base)], workdir, env_extra=FAST_COMPILE)
  assert _records(workdir) == _records(reference)
  assert complete_steps(workdir)[-1] == 6
