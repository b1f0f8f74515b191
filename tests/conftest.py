"""Test setup: 8 virtual CPU devices (set before any test imports a JAX backend), and one small
synthetic LUNA16-format dataset, preprocessed once per session, for the tests that train."""

import atexit
import os
import shutil
import sys
import tempfile

# Must happen before the backend starts: tests never change the device count mid-run.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One XLA compilation cache for this session, inherited by every subprocess the tests start:
# the same programs (same model, mesh and shapes) compile once, not once per process.
_CACHE = tempfile.mkdtemp(prefix='jaxmed-test-xla-cache-')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A dataset and model small enough for a 2-core CPU, with the production code path.
TINY = {
    'data.synthetic.num_scans': 10,
    'data.synthetic.shape_xyz': (64, 64, 40),
    'data.synthetic.nodules_per_scan': (2, 3),
    'data.synthetic.nodule_diameter_mm': (4.0, 12.0),
    'data.synthetic.negatives_per_scan': 16,
    'data.stored_crop_size': 20,
    'data.crop_size': 16,
    'data.preprocess_workers': 1,
    'model.name': 'resnet3d',
    'model.depth': 10,
    'model.width': 4,
    'model.dtype': 'float32',
    'train.global_batch_size': 16,
    'train.eval_batch_size': 32,
    'train.steps': 5,
    'train.warmup_steps': 2,
    'train.log_every_steps': 1,
    'train.eval_every_steps': 0,
    'checkpoint.every_steps': 1000,
}


def apply_overrides(config, overrides):
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_overrides(overrides):
  """The same overrides as --config.key=value flags for `python -m jaxmed.main`."""
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
  """{'data.raw_dir': ..., 'data.crops_file': ...} of a synthesized + preprocessed dataset."""
  from configs import default
  from jaxmed.data import preprocess
  from jaxmed.scans import synthetic
  root = tmp_path_factory.mktemp('tiny_dataset')
  paths = {'data.raw_dir': str(root / 'raw'), 'data.crops_file': str(root / 'crops.h5')}
  config = apply_overrides(default.get_config(), {**TINY, **paths})
  synthetic.synthesize(config)
  preprocess.preprocess(config)
  return paths


@pytest.fixture
def tiny_config(tiny_dataset):
  """Factory: the default config shrunk to TINY on the session dataset, plus overrides."""
  from configs import default

  def make(**overrides):
    config = apply_overrides(default.get_config(), {**TINY, **tiny_dataset})
    return apply_overrides(config, {k.replace('__', '.'): v for k, v in overrides.items()})
  return make


def run_main(args, workdir, env_extra=None, timeout=600, check=True):
  """Runs `python -m jaxmed.main` in a subprocess from the repo root; returns CompletedProcess."""
  import subprocess
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXMED_')}
  env.update({'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}, **(env_extra or {}))
  cmd = [sys.executable, '-m', 'jaxmed.main', f'--workdir={workdir}', *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def train_losses(workdir):
  """{step: loss} of the train records in workdir/metrics.jsonl."""
  import json
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in records if r['split'] == 'train'}


def complete_steps(workdir):
  """The checkpoint steps in workdir/checkpoints that Orbax finished writing."""
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


@pytest.fixture(scope='session')
def tiny_volumes(tiny_dataset, tmp_path_factory):
  """{'data.raw_dir': ..., 'data.volumes_file': ...}: the session dataset's scans resampled
  whole into a volumes file (task 'detect')."""
  from configs import default
  from jaxmed.data import preprocess_volumes
  paths = {'data.raw_dir': tiny_dataset['data.raw_dir'],
           'data.volumes_file': str(tmp_path_factory.mktemp('tiny_volumes') / 'volumes.h5')}
  config = apply_overrides(default.get_config(), {**TINY, **paths,
                                                  'data.preprocess_workers': 0})
  preprocess_volumes.preprocess_volumes(config)
  return paths
