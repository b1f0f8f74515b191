"""Grain input pipeline: HDF5 crops -> class-balanced, host-sharded global batches of int16 HU.

Which examples form global training batch `step` is a pure function of (seed, step) and the row
lists (`train_batch_rows`); each process reads only the rows of that batch its devices hold
(`process_batch_rows`, following the batch sharding's mesh), so the stream is the same for any
number of hosts, devices or Grain workers, and resuming at a step is O(1).

Grain elements are whole per-process batches (one element per step): a worker reads a batch with
one Python call instead of B, and Grain's worker slicing (worker w takes steps w, w + W, ...) plus
its round-robin interleave keeps the order independent of the worker count.

Batches leave the host as int16 crops; normalisation and augmentation run on the device
(jaxmed/data/augment.py).
"""

from __future__ import annotations

import atexit
import functools
import os
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence

import grain
import h5py
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from jaxmed.data import augment as augment_lib
from jaxmed.data import crops_file
from jaxmed.errors import ConfigError

try:  # Grain's shared-memory array: workers write batches straight into it (optional speed-up).
  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray as _SharedMemoryArray
except ImportError:  # Another Grain version: workers copy batches into shared memory instead.
  _SharedMemoryArray = None

# Seed streams of the training order (folded with config.seed; each stream is independent).
_POSITIVE_STREAM, _NEGATIVE_STREAM, _ORDER_STREAM = 0, 1, 2
# Training iterators run "forever": Grain needs a length, any step a run reaches is below this.
_LAST_STEP = 2**62
_MIN_SHARED_MEMORY_BYTES = 1 << 16
_ALIGNMENT = 64  # Bytes; XLA:CPU aliases host arrays aligned like this instead of copying them.


# ---- source ----------------------------------------------------------------------------------


class CropsSource:
  """Grain random-access source over a schema-v1 crops file.

  Item `row` is {'crops': int16 (S, S, S) HU, 'label': int32 (), 'index': int64 () = row}.
  Picklable: the HDF5 file is opened lazily by the process that reads (again after a fork),
  because h5py handles cannot cross process boundaries.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._length = crops_file.check_crops_file(self.path)
    with h5py.File(self.path, 'r') as f:
      self.crop_shape = tuple(int(s) for s in f['crops'].shape[1:])
    self._handle = None  # (pid, h5py.File, crops, labels int32 (N,), direct), per process.

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_handle'] = None
    return state

  def _open(self):
    if self._handle is None or self._handle[0] != os.getpid():
      f = h5py.File(self.path, 'r')
      crops = f['crops']
      # One unfiltered chunk per crop: read its bytes straight into the output (no selection).
      direct = (crops.chunks == (1,) + self.crop_shape
                and crops.id.get_create_plist().get_nfilters() == 0)
      self._handle = (os.getpid(), f, crops, f['label'][:].astype(np.int32), direct)
    return self._handle

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    row = int(row)
    if not 0 <= row < self._length:
      raise IndexError(f'row {row} outside crops file {self.path} of {self._length} crops')
    crop = self.read_crops(np.array([row]))[0]
    return {'crops': crop, 'label': self.labels(row), 'index': np.int64(row)}

  def read(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """`rows` in order: {'crops': int16 (n, S, S, S), 'label': int32 (n,), 'index': int64 (n,)}."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    return {'crops': self.read_crops(rows), 'label': self.labels(rows), 'index': rows}

  def labels(self, rows: np.ndarray) -> np.ndarray:
    """int32 labels of `rows` (1 = nodule)."""
    return self._open()[3][np.asarray(rows, np.int64)]

  def read_crops(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int16 (n, S, S, S) crops of `rows` in the given order, written into `out` if given.

    Runs of consecutive rows are read with one HDF5 call (evaluation reads in file order).
    """
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= self._length):
      raise IndexError(f'rows outside crops file {self.path} of {self._length} crops')
    _, _, crops, _, direct = self._open()
    if out is None:
      out = np.empty((rows.size,) + self.crop_shape, np.int16)
    elif (out.shape != (rows.size,) + self.crop_shape or out.dtype != np.int16
          or not out.flags.c_contiguous):
      raise ValueError(f'out must be a C-contiguous int16 array of shape '
                       f'{(rows.size,) + self.crop_shape}, got {out.dtype} {out.shape}')
    run_starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)
    run_stops = np.append(run_starts[1:], rows.size)
    for start, stop in zip(run_starts.tolist(), run_stops.tolist()):
      first = int(rows[start])
      if direct and stop - start == 1:
        crops.id.read_direct_chunk((first, 0, 0, 0), out=out[start].reshape(-1).view(np.uint8))
      else:
        file_space = crops.id.get_space()
        file_space.select_hyperslab((first, 0, 0, 0), (stop - start,) + self.crop_shape)
        memory_space = h5py.h5s.create_simple((stop - start,) + self.crop_shape)
        crops.id.read(memory_space, file_space, out[start:stop])
    return out

  def close(self) -> None:
    if self._handle is not None and self._handle[0] == os.getpid():
      self._handle[1].close()
    self._handle = None

  def __repr__(self) -> str:
    return f'CropsSource(path={self.path!r}, crops={self._length}, crop_shape={self.crop_shape})'


# ---- splits ----------------------------------------------------------------------------------


def _read_columns(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
  crops_file.check_crops_file(path)
  with h5py.File(path, 'r') as f:
    return {name: f[name][:] for name in names}


def split_rows(path: str | os.PathLike, subsets: Iterable[int], *,
               skip_excluded: bool) -> np.ndarray:
  """File rows (int64, increasing) of the LUNA `subsets`, without exclude=True rows if asked.

  Training and validation skip excluded negatives (too close to a nodule to call negative);
  LUNA16 scoring (--mode=eval) keeps every candidate, since FROC decides hits by distance.
  """
  columns = _read_columns(path, ('subset', 'exclude'))
  keep = np.isin(columns['subset'], np.asarray(tuple(subsets), np.int64))
  if skip_excluded:
    keep &= ~columns['exclude']
  return np.flatnonzero(keep).astype(np.int64)


def split_by_label(path: str | os.PathLike, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(positive_rows, negative_rows) of `rows` (int64, order kept), by the file's label."""
  rows = np.asarray(rows, np.int64)
  positive = _read_columns(path, ('label',))['label'][rows] > 0
  return rows[positive], rows[~positive]


# ---- class-balanced training order: a pure function of (seed, step) ---------------------------


def positives_per_batch(global_batch_size: int, positive_fraction: float) -> int:
  """Positives in every training batch: round(B * fraction) (Python rounding, half to even)."""
  if not 0.0 <= positive_fraction <= 1.0:
    raise ConfigError(f'data.positive_fraction must be in [0, 1], got {positive_fraction}')
  return int(round(global_batch_size * positive_fraction))


def _epoch_permutations(stream: int):
  """(seed, epoch, n) -> the stream's order of epoch `epoch` over n rows, cached per stream."""

  @functools.lru_cache(maxsize=2)  # The epochs one batch can straddle; bounded memory for big n.
  def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    order = np.random.default_rng([seed, stream, epoch]).permutation(n)
    order.setflags(write=False)  # Shared through the cache.
    return order

  return permutation


_EPOCH_PERMUTATIONS = {stream: _epoch_permutations(stream)
                       for stream in (_POSITIVE_STREAM, _NEGATIVE_STREAM)}


def _stream_rows(rows: np.ndarray, seed: int, stream: int, start: int, count: int) -> np.ndarray:
  """Elements start..start+count-1 of `rows` repeated forever, reshuffled every epoch."""
  positions = start + np.arange(count, dtype=np.int64)
  epochs, within = np.divmod(positions, len(rows))
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    chosen = epochs == epoch
    order = _EPOCH_PERMUTATIONS[stream](seed, int(epoch), len(rows))
    out[chosen] = rows[order[within[chosen]]]
  return out


def train_batch_rows(seed: int, step: int, global_batch_size: int, positive_rows: np.ndarray,
                     negative_rows: np.ndarray, positive_fraction: float) -> np.ndarray:
  """File rows (int64, (B,)) of global training batch `step`.

  round(B * positive_fraction) rows come from the positive stream and the rest from the negative
  stream; each stream walks its rows in an order reshuffled every epoch, and positions within
  the batch are shuffled too. Depends only on the arguments, never on process/device/worker counts.
  """
  if seed < 0 or step < 0:
    raise ValueError(f'seed and step must be >= 0, got seed={seed}, step={step}')
  num_positive = positives_per_batch(global_batch_size, positive_fraction)
  num_negative = global_batch_size - num_positive
  positive_rows = np.asarray(positive_rows, np.int64)
  negative_rows = np.asarray(negative_rows, np.int64)
  for count, rows, name in ((num_positive, positive_rows, 'positive'),
                            (num_negative, negative_rows, 'negative')):
    if count and not len(rows):
      raise ValueError(
          f'training batches need {count} {name} examples but the training subsets have none: '
          'check config.data.train_subsets and config.data.positive_fraction')
  parts = []
  if num_positive:
    parts.append(_stream_rows(positive_rows, seed, _POSITIVE_STREAM, step * num_positive,
                              num_positive))
  if num_negative:
    parts.append(_stream_rows(negative_rows, seed, _NEGATIVE_STREAM, step * num_negative,
                              num_negative))
  rows = np.concatenate(parts)
  order = np.random.default_rng([seed, _ORDER_STREAM, step]).permutation(global_batch_size)
  return rows[order]


# ---- which rows of a global batch this process holds -------------------------------------------


def rows_for_process(global_batch_size: int, process_index: int, process_count: int,
                     mesh_processes: np.ndarray | None = None,
                     batch_axes: Sequence[int] = (0,)) -> np.ndarray:
  """Positions in the global batch (int64, increasing) that process `process_index` holds.

  Pure simulation of `process_batch_rows`. The batch is split into equal shards over the mesh
  axes `batch_axes` (major first, as in PartitionSpec(('data', 'fsdp'))); a process holds every
  shard one of its devices holds. Processes that differ only along other axes (model, spatial)
  hold the same rows.

  Args:
    global_batch_size: B.
    process_index, process_count: the process simulated, and how many there are.
    mesh_processes: int array with the mesh's shape: the process of each device. None means
      a 1-D data mesh with one device per process.
    batch_axes: dimensions of `mesh_processes` that split the batch.
  """
  if mesh_processes is None:
    mesh_processes, batch_axes = np.arange(process_count), (0,)
  mesh_processes = np.asarray(mesh_processes)
  if not 0 <= process_index < process_count or mesh_processes.max() >= process_count:
    raise ValueError(f'process index {process_index} / mesh processes {mesh_processes.max()} '
                     f'outside process count {process_count}')
  batch_axes = tuple(batch_axes)
  num_shards = int(np.prod([mesh_processes.shape[a] for a in batch_axes]))
  _check_divisible(global_batch_size, num_shards, batch_axes)
  other_axes = [a for a in range(mesh_processes.ndim) if a not in batch_axes]
  by_shard = np.transpose(mesh_processes, batch_axes + tuple(other_axes)).reshape(num_shards, -1)
  shard_size = global_batch_size // num_shards
  shards = [s for s in range(num_shards) if np.any(by_shard[s] == process_index)]
  return np.concatenate([np.arange(s * shard_size, (s + 1) * shard_size) for s in shards]
                        ).astype(np.int64)


def _check_divisible(global_batch_size: int, num_shards: int, axes) -> None:
  if global_batch_size % num_shards:
    raise ValueError(
        f'batch size {global_batch_size} is not divisible by the {num_shards} shards the mesh '
        f'splits the batch into (axes {axes}): set config.train.global_batch_size / '
        f'eval_batch_size to a multiple of {num_shards}')


def _batch_axis_sharding(batch_sharding: jax.sharding.Sharding, ndim: int):
  """The sharding of a rank-`ndim` batch array: batch_sharding's spec cut or padded to ndim."""
  if isinstance(batch_sharding, NamedSharding):
    spec = (tuple(batch_sharding.spec) + (None,) * ndim)[:ndim]
    return NamedSharding(batch_sharding.mesh, PartitionSpec(*spec))
  return batch_sharding


def process_batch_rows(batch_sharding: jax.sharding.Sharding,
                       global_batch_size: int) -> np.ndarray:
  """Positions in the global batch (int64, increasing) held by this process's devices.

  Read from batch_sharding.addressable_devices_indices_map, in the order
  jax.make_array_from_process_local_data expects the process-local rows.
  """
  sharding = _batch_axis_sharding(batch_sharding, 1)
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

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    rows = train_batch_rows(self.seed, step, self.global_batch_size, self.positive_rows,
                            self.negative_rows, self.positive_fraction)[self.positions]
    crops = self.source.read_crops(rows, _crops_buffer((len(rows),) + self.source.crop_shape))
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

  def __call__(self, batch_number: int) -> dict[str, np.ndarray]:
    wanted = int(batch_number) * self.eval_batch_size + self.positions
    mask = wanted < len(self.rows)  # A prefix: positions increase. The rest is padding.
    num_valid = int(mask.sum())
    rows = np.full(len(wanted), -1, np.int64)
    rows[:num_valid] = self.rows[wanted[:num_valid]]
    crops = _crops_buffer((len(wanted),) + self.source.crop_shape)
    self.source.read_crops(rows[:num_valid], crops[:num_valid])
    crops[num_valid:] = 0
    label = np.zeros(len(wanted), np.int32)
    label[:num_valid] = self.source.labels(rows[:num_valid])
    return {'crops': crops, 'label': label, 'row': rows.astype(np.int32), 'mask': mask}


_in_grain_worker = False  # Set in each Grain worker process by _mark_grain_worker.


def _mark_grain_worker(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  global _in_grain_worker
  _in_grain_worker = True


def _aligned_empty(shape: tuple[int, ...], dtype=np.int16) -> np.ndarray:
  """np.empty aligned to 64 bytes, so that CPU devices take the array without copying it."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
  offset = -raw.ctypes.data % _ALIGNMENT
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _crops_buffer(shape: tuple[int, ...]) -> np.ndarray:
  """An int16 buffer for a batch of crops; in a Grain worker, shared memory Grain sends as is."""
  if _in_grain_worker and _SharedMemoryArray is not None:
    return _SharedMemoryArray(shape, np.int16)  # Saves copying every batch into shared memory.
  return _aligned_empty(shape)


def _ensure_absl_flags_parsed() -> None:
  # Grain's worker start reads absl flags; outside absl.app.run (tests, notebooks) none are parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _prefetched(dataset: grain.MapDataset, workers: int, prefetch: int) -> grain.IterDataset:
  """One Grain element per batch: `workers` processes (0 = a reader thread in this process)."""
  if workers < 0 or prefetch < 0:
    raise ValueError(f'config.data.workers ({workers}) and prefetch ({prefetch}) must be >= 0')
  if workers == 0:
    return dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch))
  _ensure_absl_flags_parsed()
  # Inside a worker the process queue is the prefetch buffer: no extra reader threads.
  batches = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  # Crops travel through shared memory; labels and indices are cheaper to pickle.
  batches = grain.experimental.WithOptionsIterDataset(
      batches, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_MEMORY_BYTES))
  return batches.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch)),
      worker_init_fn=_mark_grain_worker)


# Iterators still open at exit are closed while their modules still exist (Grain's own __del__
# at interpreter teardown fails noisily and may leave workers behind).
_open_iterators = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for iterator in list(_open_iterators):
    iterator.close()


class BatchIterator:
  """Iterator of dicts of global jax.Arrays, assembled from this process's numpy batches.

  close() (or leaving a `with` block, or running out, or exiting) stops Grain's worker processes.
  """

  def __init__(self, dataset: grain.IterDataset, batch_sharding: jax.sharding.Sharding,
               global_batch_size: int, num_batches: int | None = None):
    self._iterator = iter(dataset)
    self._batch_sharding = batch_sharding
    self._global_batch_size = global_batch_size
    self.num_batches = num_batches
    self._closed = False
    # Only CPU devices alias host buffers; accelerators copy them into device memory anyway.
    self._copy_shared_memory = any(d.platform == 'cpu' for d in batch_sharding.device_set)
    _open_iterators.add(self)

  def __iter__(self):
    return self

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError('a training iterator has no length: it runs until closed')
    return self.num_batches

  def __next__(self) -> dict[str, jax.Array]:
    if self._closed:
      raise StopIteration
    try:
      local = next(self._iterator)
    except StopIteration:
      self.close()
      raise
    return {name: self._to_global(value) for name, value in local.items()}

  def _to_global(self, value: np.ndarray) -> jax.Array:
    if self._copy_shared_memory and type(value) is not np.ndarray:
      # A worker's shared-memory block: copy it out so it is freed now, not when the jax.Array
      # aliasing it (zero-copy on CPU) dies, possibly after shutdown (a "leaked" warning).
      shared, value = value, _aligned_empty(value.shape, value.dtype)
      np.copyto(value, shared)
    return jax.make_array_from_process_local_data(
        _batch_axis_sharding(self._batch_sharding, value.ndim), value,
        (self._global_batch_size,) + value.shape[1:])

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._iterator.close()
      self._iterator = None  # Drops buffered batches, which frees their shared memory.

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def make_train_iterator(config, batch_sharding: jax.sharding.Sharding,
                        start_step: int = 0) -> BatchIterator:
  """Global training batches for steps start_step, start_step + 1, ... (never ends; close it).

  Each batch: 'crops' int16 (B, S, S, S) HU, 'label' int32 (B,), 'index' int32 (B,) = the global
  example position step * B + i (augmentation keys fold it), 'row' int32 (B,) file rows.
  B = config.train.global_batch_size, sharded over its first axis by `batch_sharding`.
  Starting at start_step is O(1): the step range is sliced, nothing is replayed.
  """
  path = config.data.crops_file
  source = CropsSource(path)
  positive_rows, negative_rows = split_by_label(
      path, split_rows(path, config.data.train_subsets, skip_excluded=True))
  global_batch_size = config.train.global_batch_size
  loader = _TrainBatchLoader(source, config.seed, global_batch_size,
                             process_batch_rows(batch_sharding, global_batch_size),
                             positive_rows, negative_rows, config.data.positive_fraction)
  loader(start_step)  # Fail here, with a clear message, rather than inside a worker.
  steps = grain.MapDataset.range(start_step, _LAST_STEP).map(loader)
  return BatchIterator(_prefetched(steps, config.data.workers, config.data.prefetch),
                       batch_sharding, global_batch_size)


def make_eval_iterator(config, subsets: Iterable[int], batch_sharding: jax.sharding.Sharding,
                       skip_excluded: bool = False) -> BatchIterator:
  """One pass over every example of `subsets` (excluded negatives left out if asked), in file
  order; len() = number of batches.

  Each batch: 'crops' int16 (E, S, S, S) HU, 'label' int32 (E,), 'row' int32 (E,) file row
  (-1 for padding), 'mask' bool (E,) False for padding; E = config.train.eval_batch_size.
  The last batch is padded, never dropped.
  """
  path = config.data.crops_file
  source = CropsSource(path)
  rows = split_rows(path, subsets, skip_excluded=skip_excluded)
  eval_batch_size = config.train.eval_batch_size
  num_batches = -(-len(rows) // eval_batch_size)
  loader = _EvalBatchLoader(source, rows, eval_batch_size,
                            process_batch_rows(batch_sharding, eval_batch_size))
  batches = grain.MapDataset.range(num_batches).map(loader)
  return BatchIterator(_prefetched(batches, config.data.workers, config.data.prefetch),
                       batch_sharding, eval_batch_size, num_batches)


def eval_num_batches(config, subsets: Iterable[int], skip_excluded: bool = False) -> int:
  """Batches of make_eval_iterator(config, subsets, ...): ceil(examples / eval_batch_size)."""
  rows = split_rows(config.data.crops_file, subsets, skip_excluded=skip_excluded)
  return -(-len(rows) // config.train.eval_batch_size)


# ---- input benchmark -------------------------------------------------------------------------


def _write_benchmark_crops_file(path: str, num_crops: int, size: int) -> None:
  """A schema-v1 crops file of `num_crops` (size,)*3 crops (half positives), subset 0."""
  rng = np.random.default_rng(0)
  pattern = rng.integers(-1000, 400, (size,) * 3, dtype=np.int16)
  with h5py.File(path, 'w') as f:
    crops = f.create_dataset('crops', (num_crops, size, size, size), np.int16,
                             chunks=(1, size, size, size))
    for row in range(num_crops):
      crops[row] = pattern + np.int16(row % 7)
    f['label'] = (np.arange(num_crops) % 2).astype(np.uint8)
    f['seriesuid'] = np.array([b'benchmark'] * num_crops)
    f['subset'] = np.zeros(num_crops, np.int8)
    f['center_world'] = np.zeros((num_crops, 3), np.float64)
    f['diameter_mm'] = np.zeros(num_crops, np.float32)
    f['exclude'] = np.zeros(num_crops, bool)
    f.attrs.update(schema_version=crops_file.SCHEMA_VERSION, spacing_mm=1.0,
                   crop_shape=(size,) * 3, sources='{}', config='{}')


def _rate(run_batch, seconds: float, crops_per_batch: int) -> tuple[float, int]:
  start, batches = time.perf_counter(), 0
  while batches < 2 or time.perf_counter() - start < seconds:
    run_batch()
    batches += 1
  return batches * crops_per_batch / (time.perf_counter() - start), batches


def benchmark_input(config, crop_sizes: Sequence[int] = (32, 64),
                    workers: Sequence[int] = (0, 1, 2), seconds: float = 5.0,
                    file_mb: int = 256) -> list[dict]:
  """Crops/s of the training input alone and with on-device augmentation.

  For each crop size c a temporary crops file is written with stored edge
  ceil(c * stored_crop_size / crop_size) (the config's margin ratio) and at most `file_mb` MB
  (page cache warm, like a file read repeatedly). Rows: one 'h5py' row per size (plain random
  reads of single crops in this process, the reader's ceiling) and, per worker count, 'loader'
  (global int16 batches on the devices) and 'loader+augment' (plus jitted augment_crops, waited on).
  Batches are config.train.global_batch_size crops over a 1-D mesh of the local devices.
  """
  results = []
  devices = jax.local_devices()
  global_batch_size = config.train.global_batch_size
  if global_batch_size % len(devices):
    devices = devices[:1]
  batch_sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), ('data',)),
                                 PartitionSpec('data'))
  with tempfile.TemporaryDirectory(prefix='jaxmed_input_benchmark_') as tmp:
    for crop_size in crop_sizes:
      stored = -(-crop_size * config.data.stored_crop_size // config.data.crop_size)
      num_crops = int(max(global_batch_size, min(4096, file_mb * 2**20 // (2 * stored**3))))
      path = os.path.join(tmp, f'crops_{stored}.h5')
      _write_benchmark_crops_file(path, num_crops, stored)
      common = dict(crop_size=crop_size, stored_size=stored, file_crops=num_crops)

      source = CropsSource(path)
      rows = iter(np.random.default_rng(0).integers(0, num_crops, 10**7))
      rate, batches = _rate(lambda: source[next(rows)], seconds, 1)
      source.close()
      results.append(dict(common, workers=0, mode='h5py', crops_per_s=rate, batches=batches))

      bench_config = config.copy_and_resolve_references()
      bench_config.data.crops_file = path
      bench_config.data.train_subsets = (0,)
      augment = jax.jit(functools.partial(
          augment_lib.augment_crops, seed=config.seed, aug_config=config.data.augment,
          crop_size=crop_size, hu_window=tuple(config.data.hu_window)))
      for num_workers in workers:
        bench_config.data.workers = num_workers
        with make_train_iterator(bench_config, batch_sharding) as batches_it:
          step = [0]

          def load():
            step[0] += 1
            return jax.block_until_ready(next(batches_it))

          def load_and_augment():
            batch = load()
            jax.block_until_ready(augment(batch['crops'], batch['index'], step=step[0]))

          load_and_augment()  # Start the workers and compile outside the timing.
          for mode, run_batch in (('loader', load), ('loader+augment', load_and_augment)):
            rate, batches = _rate(run_batch, seconds, global_batch_size)
            results.append(dict(common, workers=num_workers, mode=mode, crops_per_s=rate,
                                batches=batches))
  return results
