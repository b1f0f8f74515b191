"""Multi-host training with real processes on 127.0.0.1, started by launch/local_multiprocess.sh.

2 processes x 4 CPU devices (jax.distributed, gloo collectives) compute the losses of 1 process x
8 devices on the 2x4, 8x1 and 1x8 meshes (dcn axes across the processes); only process 0 writes
metrics; checkpoints move between process counts and continue exactly; a SIGTERM saves one step
through Orbax's preemption check and the run resumes exactly; a process killed with
SIGKILL (or silent, SIGSTOP) ends the run within jax.distributed's heartbeat timeout, named.

Each training run is a whole `python -m jaxmed.main` (about 10-30 s on two CPU cores, mostly XLA
compilation); runs are module fixtures shared between tests. The whole file: about 2 minutes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY, cli_overrides, run_main

pytestmark = pytest.mark.slow

LAUNCHER = os.path.join(REPO, 'launch', 'local_multiprocess.sh')
STEPS = 6
# The tiny model's compile time dominates every run here; XLA's CPU backend at optimisation
# level 0 halves it. Every run, 1 or 2 processes, uses it, so nothing compared depends on it.
XLA_FLAGS = '--xla_backend_optimization_level=0'
COMMON = {'model.name': 'cnn3d', 'train.steps': STEPS, 'train.log_every_steps': 1,
          'train.eval_every_steps': 0}

# 1 process x 8 devices.
ONE_2X4 = {'mesh.ici_data': 2, 'mesh.ici_model': 4}
ONE_8X1 = {'mesh.ici_data': 8}
# 2 processes x 4 devices: the dcn part of an axis spans the processes, the ici part each one.
TWO = {
    '2x4': {'mesh.dcn_data': 2, 'mesh.ici_data': 1, 'mesh.ici_model': 4},
    '8x1': {'mesh.dcn_data': 2, 'mesh.ici_data': 4},
    '1x8': {'mesh.dcn_model': 2, 'mesh.ici_model': 4, 'mesh.ici_data': 1},
    # Depth halos are exchanged inside each process, gradients summed across both.
    'spatial': {'mesh.dcn_data': 2, 'mesh.ici_data': 1, 'mesh.ici_spatial': 4},
}
DESCRIBED = {'2x4': 'data=2 x fsdp=1 x model=4 x spatial=1',
             '8x1': 'data=8 x fsdp=1 x model=1 x spatial=1',
             '1x8': 'data=1 x fsdp=1 x model=8 x spatial=1',
             'spatial': 'data=2 x fsdp=1 x model=1 x spatial=4'}


def _args(tiny_dataset, *overrides):
  merged = {**TINY, **tiny_dataset, **COMMON}
  for o in overrides:
    merged.update(o)
  return ['--config=configs/default.py', *cli_overrides(merged)]


def _env():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAXMED_', 'SLURM_', 'OMPI_', 'TPU_'))}
  env.update(XLA_FLAGS=XLA_FLAGS, PYTHONUNBUFFERED='1')
  return env


def _launch_cmd(args, workdir, timeout_s, grace_s=5):
  return ['bash', LAUNCHER, '-n', '2', '-d', '4', '-t', str(timeout_s), '-g', str(grace_s),
          '-l', f'{workdir}_logs', '--', sys.executable, '-m', 'jaxmed.main',
          f'--workdir={workdir}', *args]


def _log(workdir, i):
  with open(os.path.join(f'{workdir}_logs', f'process_{i}.log')) as f:
    return f.read()


def two_processes(args, workdir, timeout_s=300):
  """Runs jaxmed.main as 2 processes x 4 devices through the launcher; returns the workdir."""
  proc = subprocess.run(_launch_cmd(args, workdir, timeout_s), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout_s + 60)
  if proc.returncode != 0:
    raise AssertionError(f'launcher exited {proc.returncode}:\n{proc.stderr[-3000:]}\n'
                         f'process 1:\n{_log(workdir, 1)[-3000:]}')
  assert 'all 2 processes exited 0' in proc.stderr
  return workdir


def one_process(args, workdir):
  """Runs jaxmed.main as 1 process x 8 devices; returns its stderr."""
  return run_main([*args, '--config.distributed.cpu_devices=8'], workdir,
                  env_extra={'XLA_FLAGS': XLA_FLAGS}).stderr


def records(workdir, split='train'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def losses(workdir):
  """{step: loss} of the train records in metrics.jsonl (written by process 0 alone)."""
  return {r['step']: r['loss'] for r in records(workdir)}


def assert_losses_match(got, reference, steps):
  assert sorted(got) == list(steps), sorted(got)
  np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)


def with_checkpoint(source_workdir, step, workdir):
  """A fresh workdir holding only checkpoint `step` of source_workdir."""
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  shutil.copytree(os.path.join(source_workdir, 'checkpoints', str(step)),
                  os.path.join(workdir, 'checkpoints', str(step)))
  return workdir


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


# ---- the runs (module fixtures: each runs once) ------------------------------------------------

@pytest.fixture(scope='module')
def reference(tiny_dataset, tmp_path_factory):
  """1 process x 8 devices, mesh 2x4, 6 steps, a checkpoint after every step."""
  workdir = str(tmp_path_factory.mktemp('one_process') / 'run')
  one_process(_args(tiny_dataset, ONE_2X4, {'checkpoint.every_steps': 1,
                                            'checkpoint.keep': STEPS}), workdir)
  assert checkpoint_steps(workdir) == list(range(1, STEPS + 1))
  return workdir


@pytest.fixture(scope='module')
def two_2x4(tiny_dataset, tmp_path_factory):
  """2 processes, mesh 2x4 (dcn_data=2, ici_model=4), 6 steps, checkpoints at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('two_2x4') / 'run')
  return two_processes(_args(tiny_dataset, TWO['2x4'], {'checkpoint.every_steps': 3}), workdir)


@pytest.fixture(scope='module')
def two_8x1(tiny_dataset, tmp_path_factory):
  """2 processes, mesh 8x1 (dcn_data=2, ici_data=4), 6 steps."""
  workdir = str(tmp_path_factory.mktemp('two_8x1') / 'run')
  return two_processes(_args(tiny_dataset, TWO['8x1']), workdir)


@pytest.fixture(scope='module')
def two_spatial(tiny_dataset, tmp_path_factory):
  """2 processes, mesh data 2 x spatial 4 (dcn_data=2, ici_spatial=4), 6 steps."""
  workdir = str(tmp_path_factory.mktemp('two_spatial') / 'run')
  return two_processes(_args(tiny_dataset, TWO['spatial']), workdir)


# ---- same numbers on any number of processes ---------------------------------------------------

@pytest.mark.parametrize('mesh', ['2x4', '8x1', 'spatial'])
def test_two_processes_train_like_one_process(mesh, reference, request):
  workdir = request.getfixturevalue(f'two_{mesh}')
  assert_losses_match(losses(workdir), losses(reference), range(1, STEPS + 1))
  log0 = _log(workdir, 0)
  assert f'mesh {DESCRIBED[mesh]} on 8 cpu devices, 2 process(es)' in log0
  # Every process says once who it is and which devices it has.
  for i in range(2):
    assert len(re.findall(rf'process {i} of 2 \(pid \d+ on .*\): 4 local devices .*, '
                          r'8 global devices', _log(workdir, i))) == 1
  # Only process 0 writes metrics and TensorBoard: one record per step, one event file.
  assert [r['step'] for r in records(workdir)] == list(range(1, STEPS + 1))
  assert [r['step'] for r in records(workdir, 'val')] == [STEPS]
  assert len(os.listdir(os.path.join(workdir, 'tensorboard'))) == 1
  assert 'reporting.py' not in _log(workdir, 1)  # No progress lines from process 1.


# ---- checkpoints across process counts ---------------------------------------------------------

def test_checkpoint_of_one_process_continues_in_two_processes_on_1x8(reference, tiny_dataset,
                                                                    tmp_path):
  # Steps 2-6 (five steps) on the 1x8 mesh across 2 processes, from the 1-process step 1.
  workdir = with_checkpoint(reference, 1, str(tmp_path / 'run'))
  two_processes(_args(tiny_dataset, TWO['1x8']), workdir)
  assert 'resumed from step 1' in _log(workdir, 0)
  assert f'mesh {DESCRIBED["1x8"]} on 8 cpu devices, 2 process(es)' in _log(workdir, 0)
  assert_losses_match(losses(workdir), losses(reference), range(2, STEPS + 1))


def test_checkpoint_of_two_processes_continues_in_one_process(two_2x4, reference, tiny_dataset,
                                                              tmp_path):
  # Both processes called save; Orbax wrote each step once, complete (renamed when done).
  assert checkpoint_steps(two_2x4) == [3, STEPS]
  workdir = with_checkpoint(two_2x4, 3, str(tmp_path / 'run'))
  stderr = one_process(_args(tiny_dataset, ONE_8X1), workdir)
  assert 'resumed from step 3' in stderr
  assert_losses_match(losses(workdir), losses(reference), range(4, STEPS + 1))


def test_sigterm_in_two_processes_saves_one_step_through_orbax_and_resumes(reference,
                                                                          tiny_dataset, tmp_path):
  # The hook raises SIGTERM in each process at step 2. XLA's preemption notifier catches it;
  # Orbax's preemption check has both processes save the same step, then both exit 0.
  workdir = str(tmp_path / 'run')
  args = _args(tiny_dataset, TWO['2x4'], {'train.sigterm_at_step': 2,
                                          'checkpoint.every_steps': 1000})
  two_processes(args, workdir)
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
  for i in range(2):
    assert f'saved step {saved[0]}' in _log(workdir, i)
  two_processes(args, workdir)  # The same command resumes.
  assert f'resumed from step {saved[0]}' in _log(workdir, 0)
  assert_losses_match(losses(workdir), losses(reference), range(1, STEPS + 1))


# ---- a lost process ----------------------------------------------------------------------------

def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _complete_train_records(workdir):
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return sum(line.endswith('\n') and '"train"' in line for line in f)
  except FileNotFoundError:
    return 0


_UNHEALTHY = re.compile(r'The following tasks are unhealthy \(stopped sending heartbeats\):\s*'
                        r'(?:\[process 0\] )?1\s')


def test_killed_process_ends_the_run_naming_it(tiny_dataset, tmp_path):
  heartbeat_timeout_s = 10
  workdir = str(tmp_path / 'run')
  args = _args(tiny_dataset, TWO['8x1'], {'train.steps': 1000,
                                          'distributed.heartbeat_timeout_s': heartbeat_timeout_s})
  # A long grace: process 0 must end by itself, not by the launcher's SIGKILL.
  proc = subprocess.Popen(_launch_cmd(args, workdir, timeout_s=300, grace_s=60), cwd=REPO,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while _complete_train_records(workdir) < 2:
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.monotonic() < deadline, 'training never started'
      time.sleep(0.1)
    pids = [int(re.search(rf'process {i} of 2 \(pid (\d+)', _log(workdir, i)).group(1))
            for i in range(2)]
    os.kill(pids[1], signal.SIGKILL)  # Mid-training.
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - killed
  finally:
    if proc.poll() is None:
      proc.terminate()  # The launcher stops its processes.
      proc.communicate(timeout=120)

  # The launcher exits with the lost process's status and names it; JAX's heartbeat check named
  # process 1 and ended process 0 within the heartbeat timeout (plus the seconds JAX takes to
  # act). Process 0 waited in a collective inside the step, which on CPU hangs rather than fails:
  # jaxmed's own line comes when one fails (test_failed_collective_gives_one_line).
  assert proc.returncode == 128 + signal.SIGKILL, stderr[-3000:]
  assert re.search(r'local_multiprocess: process 1 was killed by signal 9', stderr), stderr
  assert 'ignored SIGTERM' not in stderr, stderr[-3000:]
  assert elapsed < heartbeat_timeout_s + 15, f'{elapsed:.1f} s after the kill'
  assert _UNHEALTHY.search(_log(workdir, 0)), _log(workdir, 0)[-3000:]
  assert not any(_alive(p) for p in pids)


_SILENT_PEER = """
import os, signal, sys
import numpy as np
from configs import default
from jaxmed.parallel import distributed
config = default.get_config()
config.distributed.cpu_devices = 1
config.distributed.heartbeat_timeout_s = 10
distributed.initialize(config)
import jax
from jax.experimental import multihost_utils
for i in range(10**6):
  multihost_utils.process_allgather(np.array([i]))
  if jax.process_index() == 1 and i == 20:
    print('stopping myself', flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # Alive, sockets open, silent: collectives hang.
"""


_KILLED_PEER = """
import os, signal
import numpy as np
from absl import app

def main(argv):
  from configs import default
  from jaxmed.parallel import distributed
  config = default.get_config()
  config.distributed.cpu_devices = 1
  config.distributed.heartbeat_timeout_s = 10
  distributed.initialize(config)
  import jax
  from jax.experimental import multihost_utils
  for i in range(10**6):
    multihost_utils.process_allgather(np.array([i]))
    if jax.process_index() == 1 and i == 20:
      os.kill(os.getpid(), signal.SIGKILL)

app.run(main)
"""


def test_failed_collective_gives_one_line(tmp_path):
  # Process 1 dies; process 0's next gloo collective fails at once: one jaxmed line, then JAX's
  # heartbeat check names process 1 and ends process 0.
  cmd = ['bash', LAUNCHER, '-n', '2', '-d', '0', '-t', '120', '-g', '60', '-l',
         str(tmp_path / 'logs'), '--', sys.executable, '-c', _KILLED_PEER]
  start = time.monotonic()
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
  elapsed = time.monotonic() - start
  log0 = (tmp_path / 'logs' / 'process_0.log').read_text()
  assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
  assert re.search(r'^jaxmed: error: process 0 of 2: a collective with another process failed '
                   r'\(.*Gloo.*\), .*heartbeat_timeout_s = 10 s: .*resume from the last checkpoint$',
                   log0, re.M), log0[-3000:]
  assert _UNHEALTHY.search(log0), log0[-3000:]
  assert elapsed < 60, elapsed


def test_silent_process_is_named_by_the_heartbeat(tmp_path):
  # A peer that hangs rather than dies: the survivor's collective never fails; JAX's heartbeat
  # check (heartbeat_timeout_s = 10 s) names it and ends the survivor (exit status 134).
  cmd = ['bash', LAUNCHER, '-n', '2', '-d', '0', '-t', '120', '-g', '1', '-l',
         str(tmp_path / 'logs'), '--', sys.executable, '-c', _SILENT_PEER]
  start = time.monotonic()
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
  elapsed = time.monotonic() - start
  log0 = (tmp_path / 'logs' / 'process_0.log').read_text()
  assert proc.returncode == 134, proc.stderr[-3000:] + log0[-3000:]
  assert 'local_multiprocess: process 0 was killed by signal 6' in proc.stderr  # SIGABRT.
  assert _UNHEALTHY.search(log0), log0[-3000:]
  assert elapsed < 60, elapsed


# ---- every host checks its own crops file ------------------------------------------------------

_OWN_CROPS_FILE = """
import os, socket, sys
from configs import default
from jaxmed.errors import exit_with_one_line
from jaxmed.parallel import distributed
config = default.get_config()
config.distributed.cpu_devices = 1
config.data.auto_prepare = False
with exit_with_one_line():
  distributed.initialize(config)
  import jax
  from jaxmed.data import prepare
  # Each process's own path, as if process 1's host had no copy of the file.
  config.data.crops_file = sys.argv[1 + jax.process_index()]
  print('crops:', prepare.ensure_crops_file(config), 'on', socket.gethostname(), flush=True)
"""


def test_a_host_without_the_crops_file_is_named(tiny_dataset, tmp_path):
  import socket
  missing = str(tmp_path / 'not_copied_here' / 'crops.h5')
  cmd = ['bash', LAUNCHER, '-n', '2', '-d', '0', '-t', '120', '-g', '5', '-l',
         str(tmp_path / 'logs'), '--', sys.executable, '-c', _OWN_CROPS_FILE,
         tiny_dataset['data.crops_file'], missing]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = (f'jaxmed: error: crops file {missing} does not exist on host {socket.gethostname()} '
          '(process 1 of 2); every process reads its own copy: put the same file at that path on '
          "every host's local disk, or on storage every host shares (see launch/README.md)")
  for i in range(2):  # Both stop, with the same line: process 0 has its copy but never trains.
    log = (tmp_path / 'logs' / f'process_{i}.log').read_text()
    assert log.rstrip().splitlines()[-1] == line, log[-3000:]
    assert 'crops:' not in log

  # With a copy on both "hosts", each process checks its own and goes on.
  both = [tiny_dataset['data.crops_file'], str(tmp_path / 'copy.h5')]
  shutil.copy(both[0], both[1])
  cmd[cmd.index(missing)] = both[1]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for i in range(2):
    assert 'crops: ' in (tmp_path / 'logs' / f'process_{i}.log').read_text()


def test_processes_with_different_workdirs_stop_in_one_line_naming_the_hosts(tiny_dataset,
                                                                             tmp_path):
  import socket
  # Each process its own workdir (as with a workdir on each host's local disk); process 0's
  # holds a checkpoint step, process 1's none. Without the check they would decide differently
  # whether to restore and hang in different collectives.
  (tmp_path / 'run_0' / 'checkpoints' / '4').mkdir(parents=True)
  base = str(tmp_path / 'run_')
  args = _args(tiny_dataset, TWO['2x4'])
  own_workdir = f'exec "$0" -m jaxmed.main --workdir={base}"$JAXMED_PROCESS_ID" "$@"'
  cmd = ['bash', LAUNCHER, '-n', '2', '-d', '4', '-t', '150', '-g', '5', '-l',
         str(tmp_path / 'logs'), '--', 'bash', '-c', own_workdir, sys.executable, *args]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=210)
  assert proc.returncode == 1, proc.stderr[-3000:]  # Not a hang (the launcher's timeout: 124).
  host = socket.gethostname()
  line = (f'jaxmed: error: the processes see different checkpoint folders: process 0 on host '
          f'{host} sees 4 in {base}0/checkpoints; process 1 on host {host} sees no step in '
          f'{base}1/checkpoints (not the workdir process 0 writes to); give every process the '
          'same --workdir on storage they all share (see launch/README.md)')
  for i in range(2):
    log = (tmp_path / 'logs' / f'process_{i}.log').read_text()
    assert log.rstrip().splitlines()[-1] == line, log[-3000:]
    assert 'compiled the train step' not in log


# ---- SLURM: one task per node owns every GPU of the node ---------------------------------------

def test_slurm_one_task_per_node_takes_every_visible_gpu(monkeypatch):
  from configs import default
  from jaxmed.parallel import distributed
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0',
           'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_STEP_NUM_NODES': '2'}
  ids = distributed.slurm_local_device_ids
  assert ids({**slurm, 'SLURM_STEP_TASKS_PER_NODE': '1(x2)', 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
             ) == [0, 1, 2, 3]
  assert ids({**slurm, 'SLURM_GPUS_ON_NODE': '8'}) == list(range(8))  # NTASKS == nodes.
  assert ids({**slurm, 'SLURM_STEP_TASKS_PER_NODE': '4(x2)', 'SLURM_GPUS_ON_NODE': '4'}) is None
  assert ids({**slurm, 'SLURM_STEP_TASKS_PER_NODE': '1(x2)', 'SLURM_GPUS_ON_NODE': '8',
              'JAX_LOCAL_DEVICE_IDS': '0'}) is None
  assert ids({'SLURM_GPUS_ON_NODE': '8'}) is None  # Not under SLURM.

  # initialize() hands them to jax.distributed.initialize in the auto-detected branch.
  for key in [k for k in os.environ if k.startswith(('JAXMED_', 'SLURM_', 'OMPI_', 'TPU_',
                                                     'JAX_LOCAL_DEVICE_IDS'))]:
    monkeypatch.delenv(key)
  for key, value in {**slurm, 'SLURM_STEP_TASKS_PER_NODE': '1(x2)',
                     'CUDA_VISIBLE_DEVICES': '0,1'}.items():
    monkeypatch.setenv(key, value)
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda *a, **kw: calls.append((a, kw)))
  config = default.get_config()
  config.distributed.cpu_devices = 8  # This test process already has 8.
  distributed.initialize(config)
  assert len(calls) == 1 and calls[0][1]['local_device_ids'] == [0, 1]
  assert calls[0][1]['heartbeat_timeout_seconds'] == config.distributed.heartbeat_timeout_s
