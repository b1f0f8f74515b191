"""SIGTERM outside a training loop: end cleanly, not by the default handler.

Python's default SIGTERM action ends the process at once: no `finally`, no finaliser, so Grain
workers are left to their watchdog and shared-memory files to the next run's sweep. Modes that
have nothing to resume (eval, predict; crossval between its folds' training) instead raise
Terminated in the main thread, which unwinds like any error: iterators close, temporaries are
removed, and since every output is written atomically nothing half-written appears. Training
installs its own handler inside (jaxmed/checkpointing.py: save, then stop with exit status 0),
and puts this one back when its last save has committed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from jaxmed.errors import UserError


class Terminated(UserError):
  """SIGTERM arrived where there is nothing to save: stop, writing nothing half-done."""

  exit_status = 128 + signal.SIGTERM  # What a shell reports for a process SIGTERM ended.


@contextlib.contextmanager
def sigterm_raises(mode: str) -> Iterator[None]:
  """Within the block, SIGTERM raises Terminated (in the main thread) naming `mode`.

  Does nothing off the main thread (Python delivers signals there only). A second SIGTERM while
  the first unwinds is ignored, so clean-up is not cut short.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_sigterm(signum, frame):
    del signum, frame
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f'stopped by SIGTERM during --mode={mode}; nothing was written half-done '
                     '(outputs are written whole or not at all); run the same command again')

  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
