"""Grain wiring: crops file -> class-balanced, host-sharded global jax.Arrays of int16 HU crops.

Each process reads only the rows of each global batch that its devices hold (`process_batch_rows`,
following the batch sharding's mesh) and assembles them into global jax.Arrays for the mesh.
Grain elements are whole per-process batches (one element per step): a worker reads a batch with
one Python call instead of B, and Grain's worker slicing (worker w takes steps w, w + W, ...) plus
its round-robin interleave keeps the order independent of the worker count. Workers read crops
straight into a shared-memory ring (jaxmed/data/batch_ring.py); only small arrays are pickled.
With config.data.cache = 'host' or 'device' the crops come from a cache (jaxmed/data/cache.py).

Batches leave the host as int16 crops; normalisation and augmentation run on the device
(jaxmed/data/augment.py).
"""

from __future__ import annotations

import atexit
import sys
import weakref
from collections.abc import Iterable

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from jaxmed import leftovers
from jaxmed.data import cache as cache_lib
from jaxmed.data.batch_ring import BatchRing, aligned_empty, slots_needed
from jaxmed.data.batches import GlobalBatches, batch_axis_sharding, to_global
from jaxmed.data.sampling import train_batch_rows
from jaxmed.data.source import CropsSource, split_by_label, split_rows

# Training iterators run "forever": Grain needs a length, any step a run reaches is below this.
_LAST_STEP = 2**62
# Crops travel through the ring; Grain's own shared memory (a new block per array) stays off.
_NO_GRAIN_SHARED_MEMORY = 2**62


# ---- which rows of a global batch this process holds -------------------------------------------


def _check_divisible(global_batch_size: int, num_shards: int, axes) -> None:
  if global_batch_size % num_shards:
    raise ValueError(
        f'batch size {global_batch_size} is not divisible by the {num_shards} shards the mesh '
        f'splits the batch into (axes {axes}): set config.train.global_batch_size / '
        f'eval_batch_size to a multiple of {num_shards}')


def process_batch_rows(batch_sharding: jax.sharding.Sharding,
                       global_batch_size: int) -> np.ndarray:
  """Positions in the global batch (int64, increasing) held by this process's devices.

  Read from batch_sharding.addressable_devices_indices_map, in the order
  jax.make_array_from_process_local_data expects the process-local rows.
  """
  sharding = batch_axis_sharding(batch_sharding, 1)
  if isinstance(sharding, NamedSharding) and sharding.spec and sharding.spec[0] is not None:
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    _check_divisible(global_batch_size, int(np.prod([sharding.mesh.shape[a] for a in axes])),
                     axes)
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  ranges = sorted({(index[0].start or 0, global_batch_size if index[0].stop is None
                    else index[0].stop) for index in index_map.values()})
  return np.concatenate([np.arange(start, stop) for start, stop in ranges]).astype(np.int64)


# ---- Grain datasets -> global batches --------------------------------------------------------


class _TrainBatchLoader:
  """Picklable map: step -> this process's rows of global training batch `step` (numpy)."""

  def __init__(self, source: CropsSource, seed: int, global_batch_size: int,
               positions: np.ndarray, positive_rows: np.ndarray, negative_rows: np.ndarray,
               positive_fraction: float):
    self.source = source
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.positions = positions
    self.positive_rows = positive_rows
    self.negative_rows = negative_rows
    self.positive_fraction = positive_fraction
    self.ring: BatchRing | None = None  # Set when workers read: crops go into its slots.

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    rows = train_batch_rows(self.seed, step, self.global_batch_size, self.positive_rows,
                            self.negative_rows, self.positive_fraction)[self.positions]
    if self.ring is None:
      crops = self.source.read_crops(rows, aligned_empty((len(rows),) + self.source.crop_shape))
    else:
      self.source.read_crops(rows, self.ring.write(step))
      self.ring.written(step)
      crops = np.int64(step)  # The main process takes the crops out of the ring.
    # int32 wraps past 2**31 examples; it only seeds augmentation keys, so that stays exact.
    index = (step * self.global_batch_size + self.positions).astype(np.int32)
    return {'crops': crops, 'label': self.source.labels(rows), 'index': index,
            'row': rows.astype(np.int32)}


class _EvalBatchLoader:
  """Picklable map: batch number -> this process's rows of that eval batch, zero padded."""

  def __init__(self, source: CropsSource, rows: np.ndarray, eval_batch_size: int,
               positions: np.ndarray):
    self.source = source
    self.rows = rows
    self.eval_batch_size = eval_batch_size
    self.positions = positions
    self.ring: BatchRing | None = None  # Set when workers read: crops go into its slots.

  def __call__(self, batch_number: int) -> dict[str, np.ndarray]:
    batch_number = int(batch_number)
    wanted = batch_number * self.eval_batch_size + self.positions
    mask = wanted < len(self.rows)  # A prefix: positions increase. The rest is padding.
    num_valid = int(mask.sum())
    rows = np.full(len(wanted), -1, np.int64)
    rows[:num_valid] = self.rows[wanted[:num_valid]]
    shape = (len(wanted),) + self.source.crop_shape
    crops = aligned_empty(shape) if self.ring is None else self.ring.write(batch_number)
    self.source.read_crops(rows[:num_valid], crops[:num_valid])
    crops[num_valid:] = 0
    if self.ring is not None:
      self.ring.written(batch_number)
      crops = np.int64(batch_number)
    label = np.zeros(len(wanted), np.int32)
    label[:num_valid] = self.source.labels(rows[:num_valid])
    return {'crops': crops, 'label': label, 'row': rows.astype(np.int32), 'mask': mask}


def _ensure_absl_flags_parsed() -> None:
  # Starting workers, Grain reads one of its absl flags (worker profiling) in this process;
  # outside absl.app.run (tests, notebooks) nothing parsed them: parse the program name alone,
  # which gives every flag its default and leaves the command line to its owner.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1] or ['jaxmed'])


def prefetched(dataset: grain.MapDataset, workers: int, prefetch: int) -> grain.IterDataset:
  """One Grain element per batch: `workers` processes (0 = a reader thread in this process)."""
  if workers == 0:
    return dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch))
  _ensure_absl_flags_parsed()
  # Inside a worker the process queue is the prefetch buffer: no extra reader threads.
  batches = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  batches = grain.experimental.WithOptionsIterDataset(
      batches, grain.experimental.DatasetOptions(min_shm_size=_NO_GRAIN_SHARED_MEMORY))
  # Workers end with this process, even after a kill -9 of it (jaxmed/leftovers.py).
  return batches.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch)),
      worker_init_fn=leftovers.exit_with_parent)


def ring_for(loader, config, slot_shape: tuple[int, ...],
             num_batches: int | None = None) -> BatchRing | None:
  """The shared-memory ring workers read a batch's images (`slot_shape` int16) into, set as
  loader.ring (None when reading in this process); no more slots than a pass of `num_batches`
  batches can fill."""
  workers, prefetch = config.data.workers, config.data.prefetch
  if workers < 0 or prefetch < 0:
    raise ValueError(f'config.data.workers ({workers}) and prefetch ({prefetch}) must be >= 0')
  if workers == 0:
    return None
  slots = slots_needed(workers, max(1, prefetch))
  if num_batches is not None:  # Batch n goes to slot n % slots: n < num_batches never laps.
    slots = max(1, min(slots, num_batches))
  loader.ring = BatchRing(slots, slot_shape)
  return loader.ring


# Iterators still open at exit are closed while their modules still exist (Grain's own __del__
# at interpreter teardown fails noisily and may leave workers behind).
_open_iterators = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for iterator in list(_open_iterators):
    iterator.close()


class BatchIterator(GlobalBatches):
  """Iterator of dicts of global jax.Arrays, assembled from this process's numpy batches.

  close() (or leaving a `with` block, or running out, or exiting) stops Grain's worker processes.
  """

  def __init__(self, dataset: grain.IterDataset, batch_sharding: jax.sharding.Sharding,
               global_batch_size: int, num_batches: int | None = None,
               ring: BatchRing | None = None, ring_key: str = 'crops',
               layouts: dict[str, tuple[jax.sharding.Sharding, tuple[int, ...]]] | None = None):
    """ring_key: the element the ring carries (the element holds its batch number instead);
    layouts: name -> (sharding, global shape) for elements that are not just this process's
    rows sharded like batch_sharding (e.g. patches also split along depth)."""
    self._iterator = iter(dataset)
    self._batch_sharding = batch_sharding
    self._global_batch_size = global_batch_size
    self._ring = ring
    self._ring_key = ring_key
    self._layouts = layouts or {}
    self.num_batches = num_batches
    self._closed = False
    _open_iterators.add(self)

  def __next__(self) -> dict[str, jax.Array]:
    if self._closed:
      raise StopIteration
    try:
      local = next(self._iterator)
    except StopIteration:
      self.close()
      raise
    if self._ring is not None:
      # One copy out of the ring, into memory this batch owns (JAX may alias it on CPU).
      local[self._ring_key] = self._ring.take(int(local[self._ring_key]))
    batch = {}
    for name, value in local.items():
      sharding, global_shape = self._layouts.get(name, (self._batch_sharding, None))
      batch[name] = to_global(value, sharding, self._global_batch_size, global_shape)
    return batch

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._iterator.close()
      self._iterator = None  # Drops buffered batches.
      if self._ring is not None:
        self._ring.close()


def make_train_iterator(config, batch_sharding: jax.sharding.Sharding,
                        start_step: int = 0, reserved_bytes: int = 0):
  """Global training batches for steps start_step, start_step + 1, ... (never ends; close it).

  Each batch: 'crops' int16 (B, S, S, S) HU, 'label' int32 (B,), 'index' int32 (B,) = the global
  example position step * B + i (augmentation keys fold it), 'row' int32 (B,) file rows.
  B = config.train.global_batch_size, sharded over its first axis by `batch_sharding`.
  Starting at start_step is O(1): the step range is sliced, nothing is replayed.
  config.data.cache picks where crops come from: 'none' (the file, through Grain), 'host' (a
  shared-memory copy, through Grain) or 'device' (gathered on the devices, refused unless
  `reserved_bytes` per device stay free for the train step's temporaries); same batches.
  """
  mode = cache_lib.cache_mode(config)
  path = config.data.crops_file
  global_batch_size = config.train.global_batch_size
  positions = process_batch_rows(batch_sharding, global_batch_size)
  if mode == 'device':
    return cache_lib.device_train_iterator(config, batch_sharding, start_step, positions,
                                           reserved_bytes)
  positive_rows, negative_rows = split_by_label(
      path, split_rows(path, config.data.train_subsets, skip_excluded=True))
  source = (cache_lib.host_crops(config, np.union1d(positive_rows, negative_rows))
            if mode == 'host' else CropsSource(path))
  loader = _TrainBatchLoader(source, config.seed, global_batch_size, positions,
                             positive_rows, negative_rows, config.data.positive_fraction)
  loader(start_step)  # Fail here, with a clear message, rather than inside a worker.
  ring = ring_for(loader, config, (len(positions),) + source.crop_shape)
  steps = grain.MapDataset.range(start_step, _LAST_STEP).map(loader)
  return BatchIterator(prefetched(steps, config.data.workers, config.data.prefetch),
                       batch_sharding, global_batch_size, ring=ring)


def make_eval_iterator(config, subsets: Iterable[int], batch_sharding: jax.sharding.Sharding,
                       skip_excluded: bool = False):
  """One pass over every example of `subsets` (excluded negatives left out if asked), in file
  order; len() = number of batches.

  Each batch: 'crops' int16 (E, S, S, S) HU, 'label' int32 (E,), 'row' int32 (E,) file row
  (-1 for padding), 'mask' bool (E,) False for padding; E = config.train.eval_batch_size.
  The last batch is padded, never dropped. config.data.cache as for make_train_iterator.
  """
  mode = cache_lib.cache_mode(config)
  path = config.data.crops_file
  rows = split_rows(path, subsets, skip_excluded=skip_excluded)
  eval_batch_size = config.train.eval_batch_size
  positions = process_batch_rows(batch_sharding, eval_batch_size)
  if mode == 'device':
    return cache_lib.device_eval_iterator(config, rows, batch_sharding, positions)
  num_batches = -(-len(rows) // eval_batch_size)
  source = cache_lib.host_crops(config, rows) if mode == 'host' else CropsSource(path)
  loader = _EvalBatchLoader(source, rows, eval_batch_size, positions)
  ring = ring_for(loader, config, (len(positions),) + source.crop_shape, num_batches)
  batches = grain.MapDataset.range(num_batches).map(loader)
  return BatchIterator(prefetched(batches, config.data.workers, config.data.prefetch),
                       batch_sharding, eval_batch_size, num_batches, ring=ring)


def eval_num_batches(config, subsets: Iterable[int], skip_excluded: bool = False) -> int:
  """Batches of make_eval_iterator(config, subsets, ...): ceil(examples / eval_batch_size)."""
  rows = split_rows(config.data.crops_file, subsets, skip_excluded=skip_excluded)
  return -(-len(rows) // config.train.eval_batch_size)
