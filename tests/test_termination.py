"""SIGTERM outside training (eval, predict, crossval's scoring): an exception that unwinds (so
clean-up runs), one line, exit status 143, and the previous handler back afterwards."""

import signal
import subprocess
import sys

import pytest

from conftest import REPO
from jaxmed import termination


def test_sigterm_raises_inside_the_block_and_the_handler_comes_back():
  before = signal.getsignal(signal.SIGTERM)
  cleaned = []
  with pytest.raises(termination.Terminated, match=r'^stopped by SIGTERM during --mode=eval;'):
    with termination.sigterm_raises('eval'):
      try:
        signal.raise_signal(signal.SIGTERM)
      finally:
        cleaned.append(True)  # A `finally` (an iterator's close) runs: not the default action.
  assert cleaned == [True]
  assert signal.getsignal(signal.SIGTERM) is before


_PROGRAM = """
import os, signal, tempfile, time
from jaxmed import files, termination
from jaxmed.errors import exit_with_one_line
with exit_with_one_line(), termination.sigterm_raises('predict'):
  with files.atomic_write(os.path.join({out!r}, 'predictions.csv')) as f:
    f.write('half')
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


def test_a_terminated_mode_exits_143_in_one_line_leaving_no_file(tmp_path):
  proc = subprocess.run([sys.executable, '-c', _PROGRAM.format(out=str(tmp_path))], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 143, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'jaxmed: error: stopped by SIGTERM during --mode=predict; nothing was written half-done')
  assert list(tmp_path.iterdir()) == []  # Neither the output nor its temporary.


def test_the_training_sigterm_handler_stays_until_the_last_save_has_committed(tiny_config,
                                                                              tmp_path):
  import jax.numpy as jnp
  from jaxmed import checkpointing
  before = signal.getsignal(signal.SIGTERM)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), tiny_config(), training=True)
  ours = signal.getsignal(signal.SIGTERM)
  assert ours != before
  checkpointer.save(1, {'w': jnp.ones((256, 256))})  # Asynchronous: returns while it writes.
  handlers_while_waiting = []
  wait = checkpointer._manager.wait_until_finished

  def recording_wait():
    handlers_while_waiting.append(signal.getsignal(signal.SIGTERM))
    wait()
  checkpointer._manager.wait_until_finished = recording_wait
  checkpointer.close()
  # While close() waited for the save, a second SIGTERM still only set the flag.
  assert handlers_while_waiting and all(h == ours for h in handlers_while_waiting)
  assert signal.getsignal(signal.SIGTERM) is before
  assert checkpointer.latest_step() == 1
