"""A ring of shared-memory batch slots, named by batch number: Grain workers read crops straight
into slot `number % slots`, and the main process takes each batch out once. The crops cross
the process boundary without being pickled or copied into a fresh shared-memory block.
"""

from __future__ import annotations

import math
import os
import weakref

import numpy as np

from jaxmed import leftovers
from jaxmed.data import shared_memory

_ALIGNMENT = 64  # Bytes; XLA:CPU aliases host arrays aligned like this instead of copying them.
_HEADER = 64  # Bytes before each slot: the number of the batch it holds (int64; -1 = writing).


def aligned_empty(shape: tuple[int, ...], dtype=np.int16) -> np.ndarray:
  """np.empty aligned to 64 bytes, so that CPU devices take the array without copying it."""
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
  offset = -raw.ctypes.data % _ALIGNMENT
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def slots_needed(workers: int, per_worker_buffer: int) -> int:
  """Slots that no worker can lap: batches a worker may hold ahead of the consumer.

  Per worker, Grain holds up to per_worker_buffer batches in its queue and as many in the main
  process's interleave buffer, plus the one being written and one in hand: 2b + 2, and batch
  numbers of one worker are `workers` apart. One extra round is margin.
  """
  return workers * (2 * per_worker_buffer + 3) + 1


class BatchRing:
  """`num_slots` int16 slots of `slot_shape` in one file in shared memory (/dev/shm), allocated
  in full and named by its owner (a kill -9 leaves it for the next run's sweep to remove).

  Workers: `write(number)` gives the slot's array to fill, `written(number)` publishes it.
  Main process: `take(number)` copies the batch out (into a fresh 64-byte aligned array that JAX
  may alias) and checks that no worker overwrote it meanwhile. Picklable: other processes map
  the same file; only the creating process removes it.
  """

  def __init__(self, num_slots: int, slot_shape: tuple[int, ...], directory: str | None = None):
    self.num_slots = num_slots
    self.slot_shape = tuple(slot_shape)
    slot_bytes = math.prod(self.slot_shape) * 2
    self._stride = _HEADER + -(-slot_bytes // _ALIGNMENT) * _ALIGNMENT
    nbytes = num_slots * self._stride
    what = f'the batch ring ({num_slots} batches of {"x".join(map(str, self.slot_shape))} int16)'
    if directory is None:
      self.path = shared_memory.create('jaxmed-batches-', nbytes, what)
    else:
      fd, self.path = leftovers.mkstemp('jaxmed-batches-', directory)
      os.close(fd)
      shared_memory.allocate(self.path, nbytes, what)
    self._remove = weakref.finalize(self, shared_memory.remove, self.path)
    self._mapped = None  # (pid, uint8 memmap of the whole file), per process.
    for slot in range(num_slots):
      self._number(slot)[0] = -1

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_mapped'] = None
    state['_remove'] = None
    return state

  def _file(self) -> np.ndarray:
    if self._mapped is None or self._mapped[0] != os.getpid():
      self._mapped = (os.getpid(), np.memmap(self.path, np.uint8, 'r+'))
    return self._mapped[1]

  def _number(self, slot: int) -> np.ndarray:
    start = slot * self._stride
    return self._file()[start:start + 8].view(np.int64)

  def _slot(self, slot: int) -> np.ndarray:
    start = slot * self._stride + _HEADER
    size = math.prod(self.slot_shape) * 2
    return self._file()[start:start + size].view(np.int16).reshape(self.slot_shape)

  def write(self, number: int) -> np.ndarray:
    """The slot array for batch `number` (a worker fills it, then calls written)."""
    slot = number % self.num_slots
    self._number(slot)[0] = -1
    return self._slot(slot)

  def written(self, number: int) -> None:
    self._number(number % self.num_slots)[0] = number

  def take(self, number: int) -> np.ndarray:
    """A copy of batch `number`, owned by the caller; the slot is free for reuse afterwards."""
    slot = number % self.num_slots
    number_slot = self._number(slot)
    before = int(number_slot[0])
    out = aligned_empty(self.slot_shape)
    np.copyto(out, self._slot(slot))
    if before != number or int(number_slot[0]) != number:
      raise RuntimeError(f'batch ring slot {slot} held batch {before}/{int(number_slot[0])}, '
                         f'expected {number}: a worker lapped the ring of {self.num_slots} slots')
    return out

  def close(self) -> None:
    self._mapped = None
    if self._remove is not None:
      self._remove()
