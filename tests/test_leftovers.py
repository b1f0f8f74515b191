"""Nothing of a run outlives it: after a kill -9 of the main process (what the OOM killer does)
its Grain workers and the resource tracker end, and its shared-memory files go; temporaries of
dead owners are swept, those of live ones kept; a full /dev/shm is one line, not SIGBUS."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, cli_overrides, run_main
from jaxmed import leftovers
from jaxmed.data import batch_ring
from jaxmed.data import shared_memory
from jaxmed import files


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _dead_tag() -> str:
  """The owner tag of a process that has ended (its pid, with a start time it never had)."""
  return f'{_dead_pid()}.1-'


def test_the_sweep_removes_files_of_dead_owners_and_keeps_the_living(tmp_path):
  dead = tmp_path / f'jaxmed-batches-{_dead_tag()}x1'
  # Our pid with another start time: a pid reused after a container restart is not the owner.
  reused = tmp_path / f'jaxmed-crops-{os.getpid()}.7-x2.int16'
  mine = tmp_path / f'jaxmed-crops-{leftovers.owner_tag()}x3.int16'
  other = tmp_path / 'jaxmed-crops-notag.int16'  # Not named by jaxmed's scheme: not ours.
  for path in (dead, reused, mine, other):
    path.write_bytes(b'x')
  assert sorted(leftovers.sweep(str(tmp_path))) == sorted([dead.name, reused.name])
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


def test_a_new_ring_sweeps_rings_of_dead_owners_and_names_itself(tmp_path):
  left = tmp_path / f'jaxmed-batches-{_dead_tag()}abc'
  left.write_bytes(b'\0' * 64)
  ring = batch_ring.BatchRing(2, (2, 3), directory=str(tmp_path))
  assert not left.exists()
  assert os.path.basename(ring.path).startswith('jaxmed-batches-' + leftovers.owner_tag())
  assert os.stat(ring.path).st_blocks * 512 >= 2 * (64 + 64)  # Allocated, not sparse.
  ring.close()
  assert not list(tmp_path.iterdir())


def test_an_atomic_write_sweeps_temporaries_a_kill_left_beside_its_target(tmp_path):
  left = tmp_path / f'.predictions.csv.{_dead_tag()}abc.tmp'
  left.write_text('half')
  with files.atomic_write(tmp_path / 'predictions.csv') as f:
    f.write('whole')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['predictions.csv']


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='no /dev/shm')
def test_shared_memory_that_does_not_fit_is_one_line():
  # A small tmpfs would need root; a file larger than the free space of /dev/shm is the same.
  free = os.statvfs('/dev/shm').f_bavail * os.statvfs('/dev/shm').f_frsize
  fd, path = leftovers.mkstemp('jaxmed-batches-', '/dev/shm')
  os.close(fd)
  with pytest.raises(shared_memory.SharedMemoryError) as error:
    shared_memory.allocate(path, free + 2**30, 'the batch ring')
  message = str(error.value)
  assert '\n' not in message and message.startswith('the batch ring needs')
  assert 'in /dev/shm' in message and 'sizeLimit' in message
  assert not os.path.exists(path)


def test_free_host_memory_is_the_container_limit_when_that_is_lower(tmp_path):
  (tmp_path / 'memory.max').write_text('1073741824\n')
  (tmp_path / 'memory.current').write_text('268435456\n')
  assert shared_memory.cgroup_available_bytes(str(tmp_path)) == 768 * 2**20
  (tmp_path / 'memory.max').write_text('max\n')
  assert shared_memory.cgroup_available_bytes(str(tmp_path)) is None
  v1 = tmp_path / 'v1'
  (v1 / 'memory').mkdir(parents=True)
  (v1 / 'memory' / 'memory.limit_in_bytes').write_text(str(2**30))
  (v1 / 'memory' / 'memory.usage_in_bytes').write_text(str(2**29))
  assert shared_memory.cgroup_available_bytes(str(v1)) == 2**29


# ---- kill -9 of a whole run ------------------------------------------------------------------


def _group_alive(pgid: int) -> list[str]:
  """'pid comm' of every running (not zombie) process in process group `pgid`."""
  alive = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat', 'rb') as f:
        stat = f.read()
    except OSError:
      continue
    comm = stat[stat.index(b'(') + 1:stat.rindex(b')')].decode()
    fields = stat[stat.rindex(b')') + 2:].split()
    if int(fields[2]) == pgid and fields[0] not in (b'Z', b'X'):
      alive.append(f'{pid} {comm}')
  return alive


def _owned_files(pids) -> list[str]:
  """jaxmed files in /dev/shm and the temporary directory named by one of `pids`."""
  found = []
  for directory in leftovers.shared_memory_dirs():
    for name in os.listdir(directory):
      if name.startswith(leftovers.PREFIXES) and any(f'-{pid}.' in name for pid in pids):
        found.append(os.path.join(directory, name))
  return found


FAST_COMPILE = '--xla_backend_optimization_level=0'


def _ring_written(pid: int) -> bool:
  import numpy as np
  for path in _owned_files([pid]):
    if os.path.basename(path).startswith('jaxmed-batches-') and os.path.getsize(path) >= 8:
      if int(np.fromfile(path, np.int64, count=1)[0]) >= 0:
        return True
  return False


def _args(tiny_dataset, workers, steps):
  overrides = {**TINY, **tiny_dataset, 'data.cache': 'host', 'data.workers': workers,
               'train.steps': steps, 'checkpoint.every_steps': 1000, 'model.name': 'cnn3d'}
  return ['--config=configs/default.py', *cli_overrides(overrides)]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads process groups from /proc')
def test_kill_9_of_the_main_process_leaves_no_process_and_no_shared_memory(tiny_dataset,
                                                                           tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXMED_')}
  # Compilation dominates these runs on a small CPU: XLA's optimisation level 0 halves it.
  env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', XLA_FLAGS=FAST_COMPILE)
  killed = []
  for workers in (1, 2):
    workdir = tmp_path / f'workers{workers}'
    # Its own process group, as a batch scheduler starts a job: the group is the run.
    proc = subprocess.Popen(
        [sys.executable, '-m', 'jaxmed.main', f'--workdir={workdir}',
         *_args(tiny_dataset, workers, 100000)], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Killed once its workers have read a batch into the ring (the crops cache is in shared
    # memory too): the batch ring's first slot header holds a batch number >= 0.
    deadline = time.time() + 300
    while not _ring_written(proc.pid):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.time() < deadline, 'the workers never wrote a batch'
      time.sleep(0.05)
    assert len(_group_alive(proc.pid)) >= 1 + workers
    assert len(_owned_files([proc.pid])) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # Reaped: a zombie main process is not "alive".
    proc.stderr.close()
    deadline = time.time() + 5
    while (_group_alive(proc.pid) or _owned_files([proc.pid])) and time.time() < deadline:
      time.sleep(0.1)
    alive = _group_alive(proc.pid)
    assert alive == [], f'{workers} worker(s): {alive} still running 5 s after kill -9'
    assert _owned_files([proc.pid]) == []
    killed.append(proc.pid)

  # The next run (short) finishes and leaves nothing of its own or of the killed runs.
  done = run_main(_args(tiny_dataset, 2, 1), str(tmp_path / 'next'),
                  env_extra={'XLA_FLAGS': FAST_COMPILE})
  assert 'Traceback' not in done.stderr
  assert _owned_files(killed) == []
  leftover = [name for d in leftovers.shared_memory_dirs() for name in os.listdir(d)
              if name.startswith(leftovers.PREFIXES) and leftovers.owner_alive(
                  name.split('-', 2)[2]) is False]
  assert leftover == [], leftover
