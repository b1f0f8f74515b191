"""Mistakes on the command line end in one `jaxmed: error:` line and exit status 1.

Each case runs `python -m jaxmed.main` in a subprocess; none gets as far as starting JAX.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=REPO):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXMED_')}
  env['PYTHONPATH'] = REPO
  return subprocess.run([sys.executable, '-m', 'jaxmed.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args, fragments', [
    (['--config=configs/nope.py'], ['config file configs/nope.py not found']),
    (['--config', 'configs/nope.py'], ['config file configs/nope.py not found']),
    (['--config=README.md'], ['config file README.md could not be loaded', 'SyntaxError']),
    (['--config.train.stepz=3'], ['--config.train.stepz', 'no key stepz',
                                  'did you mean steps']),
    (['--config.train.steps=abc'], ['--config.train.steps=abc', 'configs/default.py']),
    (['--mode=bogus'], ['--mode=bogus', 'train|eval']),
    (['stray'], ['unexpected arguments: stray']),
    (['--mode=preprocess', '--config.data.preprocess_workers=-1'],
     ['data.preprocess_workers is -1, must be >= 0', '--config.data.preprocess_workers']),
])
def test_command_line_mistakes_end_in_one_line(args, fragments):
  proc = run_main(*args)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jaxmed: error: ') and 'Traceback' not in proc.stderr, proc.stderr
  for fragment in fragments:
    assert fragment in last, last


def test_default_config_missing_outside_the_repository(tmp_path):
  proc = run_main(cwd=tmp_path)  # configs/default.py is relative to the repository root
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'jaxmed: error: config file configs/default.py not found; pass --config=<file>.py, e.g. '
      'one of configs/*.py, from the repository root')


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'file').write_text('x')
  proc = run_main(f'--workdir={tmp_path / "file"}', '--mode=eval')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f'jaxmed: error: workdir {tmp_path / "file"} is a file, not a folder; pass another --workdir')
