"""Files that appear complete or not at all: write to a temporary name beside, then rename."""

from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator

from jaxmed import leftovers


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'w', **open_kwargs) -> Iterator[IO]:
  """Opens a temporary file next to `path`; on success it replaces `path` (readable by all).

  If the block raises, the temporary file is removed and an existing `path` stays untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Named by this process: one a kill -9 left behind is swept by the next write of `path`.
  fd, tmp = leftovers.mkstemp('.' + os.path.basename(path) + '.', directory, '.tmp')
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for sharing.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
