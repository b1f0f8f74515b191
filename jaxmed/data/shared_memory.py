"""Files in shared memory (/dev/shm) that the batch ring and the host crops cache live in:
allocated in full when created, named by their owner (jaxmed/leftovers.py), and the host memory
a process may really use (the container's cgroup limit, not only the host's free RAM).
"""

from __future__ import annotations

import errno
import os
import tempfile

from jaxmed import leftovers
from jaxmed.errors import UserError


class SharedMemoryError(UserError):
  """Shared memory (/dev/shm or host RAM) too small for what was asked of it."""


def fmt_bytes(n: float) -> str:
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None  # cgroup v2 writes 'max' for no limit.


def cgroup_available_bytes(root: str = '/sys/fs/cgroup') -> int | None:
  """Memory this container may still use: its cgroup limit minus its use (v2 memory.max and
  memory.current, or v1 memory.limit_in_bytes and memory.usage_in_bytes); None if unlimited.
  tmpfs pages (/dev/shm) count against the cgroup that touched them."""
  for limit_file, usage_file in (('memory.max', 'memory.current'),
                                 ('memory/memory.limit_in_bytes', 'memory/memory.usage_in_bytes')):
    limit = _read_int(os.path.join(root, limit_file))
    if limit is not None and limit < 2**60:  # v1 spells "no limit" as a huge number.
      return max(0, limit - (_read_int(os.path.join(root, usage_file)) or 0))
  return None


def available_host_bytes() -> int | None:
  """Host memory this process may use: min(MemAvailable, the cgroup's room); None if unknown."""
  available = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
  except OSError:
    pass
  cgroup = cgroup_available_bytes()
  known = [b for b in (available, cgroup) if b is not None]
  return min(known) if known else None


def shared_memory_dir(nbytes: int) -> str:
  """/dev/shm (RAM) when it has room for `nbytes`, else the temporary directory."""
  if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK):
    stat = os.statvfs('/dev/shm')  # Containers often mount a small one (Docker: 64 MB).
    if stat.f_bavail * stat.f_frsize > nbytes:
      return '/dev/shm'
  return tempfile.gettempdir()


def allocate(path: str, nbytes: int, what: str) -> None:
  """Gives file `path` all of its `nbytes` now (posix_fallocate), or removes it and raises
  SharedMemoryError: a sparse file in a full /dev/shm would end in SIGBUS at the first write."""
  fd = os.open(path, os.O_RDWR)
  try:
    if hasattr(os, 'posix_fallocate'):
      os.posix_fallocate(fd, 0, nbytes)
    else:
      os.ftruncate(fd, nbytes)
  except OSError as e:
    os.close(fd)
    fd = None
    remove(path)
    if e.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
      raise
    directory = os.path.dirname(path)
    free = os.statvfs(directory)
    raise SharedMemoryError(
        f'{what} needs {fmt_bytes(nbytes)} in {directory}, which has '
        f'{fmt_bytes(free.f_bavail * free.f_frsize)} free; enlarge it (docker --shm-size, a '
        'Kubernetes emptyDir with medium: Memory and a sizeLimit on /dev/shm) or lower '
        'config.data.workers / prefetch, or use --config.data.cache=none') from None
  finally:
    if fd is not None:
      os.close(fd)


def create(prefix: str, nbytes: int, what: str, suffix: str = '') -> str:
  """A new file of `nbytes` (allocated) in shared memory, named by this process; its path."""
  fd, path = leftovers.mkstemp(prefix, shared_memory_dir(nbytes), suffix)
  os.close(fd)
  allocate(path, nbytes, what)
  return path


def remove(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass
