"""Nothing left behind after a kill: temporary files named by their owner, swept once the owner
is dead, and worker processes that end with their parent.

A `kill -9` (the OOM killer, a node agent past its grace period) runs no finaliser: the batch
ring and the host crops cache stay in /dev/shm (RAM), and Grain's workers, which hold the
multiprocessing resource tracker's pipe open, keep running with parent pid 1. So:
  - every temporary jaxmed creates carries `owner_tag()` (pid and the process's start time, so
    a pid reused after a container restart is not mistaken for the owner) in its name;
  - `sweep(directory)` removes those whose owner is no longer running: jaxmed calls it before it
    creates such a file, and a worker calls it when it finds its parent gone;
  - `exit_with_parent` (a worker initialiser) ends a worker within a second of its parent's
    death; once the workers are gone the resource tracker sees its pipe close and exits too.
Grain workers ignore SIGTERM: a scheduler sends it to the whole process group, and the parent,
which saves a checkpoint first, stops them itself (Grain asks them to stop, then SIGKILLs them).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import tempfile
import threading
import time

# Temporary names: <prefix><pid>.<start ticks>-<random>[suffix], e.g.
# jaxmed-batches-1234.5678-abcd1234 or .predictions.csv.1234.5678-abcd1234.tmp
_TAG = re.compile(r'(?P<pid>\d+)\.(?P<start>\d+)-')
PREFIXES = ('jaxmed-batches-', 'jaxmed-crops-')
_PARENT_POLL_S = 0.5


def _start_ticks(pid: int) -> int | None:
  """The start time of process `pid` (clock ticks since boot; /proc), None if not running."""
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      stat = f.read()
  except (FileNotFoundError, ProcessLookupError):
    return None
  except OSError:  # No /proc here: 0 = "running, start unknown", decided by os.kill below.
    return 0 if _pid_running(pid) else None
  # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
  fields = stat[stat.rindex(b')') + 2:].split()
  if fields[0] in (b'Z', b'X'):  # A zombie runs nothing and owns nothing.
    return None
  return int(fields[19])


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process: running.
    return True
  return True


def owner_tag(pid: int | None = None) -> str:
  """'<pid>.<start ticks>-' of this process (or `pid`): put it in a temporary's name."""
  pid = os.getpid() if pid is None else pid
  return f'{pid}.{_start_ticks(pid) or 0}-'


def owner_alive(name: str) -> bool | None:
  """Whether the owner named in temporary file `name` runs; None if `name` carries no tag."""
  match = _TAG.search(name)
  if match is None:
    return None
  pid, start = int(match['pid']), int(match['start'])
  ticks = _start_ticks(pid)
  return ticks is not None and (start == 0 or ticks == 0 or ticks == start)


def mkstemp(prefix: str, directory: str, suffix: str = '') -> tuple[int, str]:
  """tempfile.mkstemp with this process's owner tag after `prefix`, after sweeping `directory`
  of the same kind of file left by dead owners."""
  sweep(directory, (prefix,))
  return tempfile.mkstemp(prefix=prefix + owner_tag(), suffix=suffix, dir=directory)


def sweep(directory: str, prefixes: tuple[str, ...] = PREFIXES) -> list[str]:
  """Removes the files in `directory` named `<prefix><tag>...` whose owner is dead; returns them."""
  removed = []
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    prefix = next((p for p in prefixes if name.startswith(p)), None)
    if prefix is None or not _TAG.match(name, len(prefix)) or owner_alive(name[len(prefix):]):
      continue
    try:
      os.unlink(os.path.join(directory, name))
      removed.append(name)
    except OSError:  # Gone already (another sweeper), or not ours to remove.
      pass
  return removed


def shared_memory_dirs() -> tuple[str, ...]:
  """Where jaxmed puts shared-memory files: /dev/shm and the temporary directory."""
  return tuple(d for d in ('/dev/shm', tempfile.gettempdir()) if os.path.isdir(d))


def exit_with_parent(worker_index: int = 0, worker_count: int = 1,
                     ignore_sigterm: bool = True) -> None:
  """Worker initialiser (Grain's worker_init_fn, a process pool's initializer): this process
  exits within about a second once its parent process is gone, after sweeping the
  shared-memory files of dead owners (its parent's among them). With `ignore_sigterm` it leaves
  SIGTERM to its parent (Grain stops its workers with an event, then SIGKILL; a process pool
  terminates a broken pool's workers with SIGTERM, so its workers keep the default).

  A watchdog on the parent pid rather than the kernel's parent-death signal: Grain starts its
  workers from a thread pool, and PR_SET_PDEATHSIG fires when that THREAD ends.
  """
  del worker_index, worker_count
  if ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  # The pid the parent passed down, not getppid(): the parent may have died while this process
  # was still starting (then getppid() is already 1, or a subreaper's).
  spawned_by = multiprocessing.parent_process()
  parent = spawned_by.pid if spawned_by is not None else os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(_PARENT_POLL_S)
    for directory in shared_memory_dirs():
      sweep(directory)
    os._exit(1)  # No clean-up of a half-done batch: nobody will read it.

  threading.Thread(target=watch, name='jaxmed-exit-with-parent', daemon=True).start()
