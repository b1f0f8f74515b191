"""Crops caches (`config.data.cache`): the crops of the training and evaluation subsets read once
from the HDF5 file and kept in device memory ('device': rows split over every device of the mesh,
each batch gathered on the devices) or in host RAM ('host': one shared-memory file that Grain
workers map). Batches are those of the Grain path (jaxmed/data/loader.py) for the same step.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmed import leftovers
from jaxmed.data import shared_memory
from jaxmed.data.batches import GlobalBatches, to_global
from jaxmed.data.sampling import train_batch_rows
from jaxmed.data.source import CropsSource, split_by_label, split_rows
from jaxmed.errors import ConfigError, UserError

MODES = ('none', 'host', 'device')
_KEPT = 2  # Caches kept per kind: the training subsets and one evaluation split.
_READ_ROWS = 256  # Crops read from the HDF5 file per call while filling a cache.


class CacheError(UserError):
  """The crops cache does not fit where it was asked to live."""


def cache_mode(config) -> str:
  mode = config.data.get('cache', 'none')
  if mode not in MODES:
    raise ConfigError(f"data.cache must be one of {', '.join(MODES)}, got {mode!r}")
  return mode


def _file_key(path: str, rows: np.ndarray) -> tuple:
  """Identity of (file contents, rows): a rewritten file or another split is another cache."""
  stat = os.stat(path)
  return (os.path.realpath(path), stat.st_mtime_ns, stat.st_size,
          hashlib.sha256(np.ascontiguousarray(rows, np.int64).tobytes()).hexdigest())


class _Kept:
  """The last _KEPT caches by key; an iterator holding one keeps it alive after eviction too."""

  def __init__(self):
    self._items = collections.OrderedDict()

  def get(self, key, make):
    if key in self._items:
      self._items.move_to_end(key)
      return self._items[key]
    while len(self._items) >= _KEPT:
      self._items.popitem(last=False)
    value = self._items[key] = make()
    return value

  def clear(self):
    self._items.clear()


_device_caches = _Kept()
_host_caches = _Kept()


def clear() -> None:
  """Drops every kept cache (device memory and shared-memory files go with their last user)."""
  _device_caches.clear()
  _host_caches.clear()


_fmt_bytes = shared_memory.fmt_bytes


# ---- device: rows split over every device, batches gathered on the devices --------------------


def _batch_axes(batch_sharding) -> tuple[str, ...]:
  spec = tuple(batch_sharding.spec)[:1]
  if not spec or spec[0] is None:
    return ()
  return tuple(spec[0]) if isinstance(spec[0], tuple) else (spec[0],)


def _mesh_of(batch_sharding) -> Mesh:
  if isinstance(batch_sharding, NamedSharding):
    return batch_sharding.mesh
  return Mesh(np.array(sorted(batch_sharding.device_set, key=lambda d: d.id)), ('rows',))


def _free_device_bytes(devices) -> int | None:
  """Least free memory over `devices` as the backend reports it; None where it reports none."""
  free = []
  for device in devices:
    stats = device.memory_stats() or {}
    if 'bytes_limit' in stats:
      free.append(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  return min(free) if free else None


class DeviceCrops:
  """int16 crops (N, S, S, S) of the sorted file `rows`, split by rows over every device of `mesh`.

  gather(positions) makes a batch of crops on the devices: no host I/O and no host copy.
  """

  def __init__(self, source: CropsSource, rows: np.ndarray, mesh: Mesh, limit_bytes: int,
               reserved_bytes: int = 0):
    self.rows = np.asarray(rows, np.int64)
    self.crop_shape = source.crop_shape
    self.mesh = mesh
    self._axes = tuple(mesh.axis_names)
    num_devices = mesh.devices.size
    self.rows_per_device = max(1, -(-len(self.rows) // num_devices))
    self.bytes_per_device = self.rows_per_device * math.prod(self.crop_shape) * 2
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    free = _free_device_bytes(local)
    if jax.process_count() > 1:  # Every process decides alike: the least free of all of them.
      from jax.experimental import multihost_utils
      frees = np.asarray(multihost_utils.process_allgather(np.int64(-1 if free is None else free)))
      free = int(frees[frees >= 0].min()) if (frees >= 0).any() else None
    limit = limit_bytes if limit_bytes > 0 else free
    # The compiled step's temporaries are allocated at every step, after the cache: room for
    # them is taken now, or the first step ends in a raw RESOURCE_EXHAUSTED.
    if limit is not None and self.bytes_per_device + reserved_bytes > limit:
      room = (f'data.cache_max_bytes_per_device allows {_fmt_bytes(limit)}' if limit_bytes > 0
              else f'a device has {_fmt_bytes(limit)} free')
      beside = (f' beside the {_fmt_bytes(reserved_bytes)} of temporaries the compiled train step '
                'needs' if reserved_bytes else '')
      raise CacheError(
          f'the device crops cache needs {_fmt_bytes(self.bytes_per_device)} per device '
          f'({len(self.rows)} crops of {self.crop_shape} int16 over {num_devices} devices)'
          f'{beside} but {room}; use --config.data.cache=host (host RAM) or none (read from '
          'the file), or more devices')
    shape = (self.rows_per_device * num_devices,) + self.crop_shape
    self.table = jax.make_array_from_callback(
        shape, NamedSharding(mesh, PartitionSpec(self._axes)),
        lambda index: self._read(source, index[0]))
    logging.info('crops cache on the devices: %d crops of %s int16, %s per device over %d '
                 'devices', len(self.rows), 'x'.join(map(str, self.crop_shape)),
                 _fmt_bytes(self.bytes_per_device), num_devices)
    self._gathers = {}

  def _read(self, source: CropsSource, rows_slice: slice) -> np.ndarray:
    """This device's slice of the table, read from the file (zero rows past the end)."""
    start, stop, _ = rows_slice.indices(self.rows_per_device * self.mesh.devices.size)
    out = np.zeros((stop - start,) + self.crop_shape, np.int16)
    wanted = self.rows[start:stop]
    for first in range(0, len(wanted), _READ_ROWS):
      chunk = wanted[first:first + _READ_ROWS]
      source.read_crops(chunk, out[first:first + len(chunk)])
    return out

  def positions(self, file_rows: np.ndarray) -> np.ndarray:
    """int32 table positions of `file_rows` (each in the cache); -1 stays -1 (a zero crop)."""
    file_rows = np.asarray(file_rows, np.int64)
    found = np.searchsorted(self.rows, file_rows)
    wanted = file_rows >= 0
    clipped = np.minimum(found, len(self.rows) - 1)
    if np.any(wanted & ((found >= len(self.rows)) | (self.rows[clipped] != file_rows))):
      missing = file_rows[wanted & ((found >= len(self.rows)) | (self.rows[clipped] != file_rows))]
      raise IndexError(f'file rows {missing[:5].tolist()} are not in the device crops cache')
    return np.where(wanted, found, -1).astype(np.int32)

  def gather(self, positions: np.ndarray, batch_sharding) -> jax.Array:
    """int16 (B, S, S, S) crops at table `positions` (int32 (B,), the same on every process;
    -1 = zeros), sharded over the batch axes of `batch_sharding` like the Grain path's."""
    batch_axes = _batch_axes(batch_sharding) if isinstance(batch_sharding, NamedSharding) else ()
    key = (batch_axes, len(positions))
    if key not in self._gathers:
      self._gathers[key] = self._make_gather(batch_axes)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    positions = jax.make_array_from_process_local_data(
        replicated, np.asarray(positions, np.int32), (len(positions),))
    return self._gathers[key](self.table, positions)

  def _make_gather(self, batch_axes: tuple[str, ...]):
    axes, rows_per_device = self._axes, self.rows_per_device
    other_axes = tuple(a for a in axes if a not in batch_axes)

    def local_gather(table, positions):
      # Every device gathers the batch's rows it holds (zeros elsewhere); summing over devices
      # puts each crop together exactly (one non-zero term), already split over the batch axes.
      local = positions - jax.lax.axis_index(axes) * rows_per_device
      held = (local >= 0) & (local < rows_per_device)
      crops = jnp.take(table, jnp.clip(local, 0, rows_per_device - 1), axis=0)
      crops = jnp.where(held[:, None, None, None], crops, jnp.zeros((), crops.dtype))
      # Summed as bytes: GPU collectives have no int16 sum and XLA would widen it to int32,
      # doubling the bytes moved; one non-zero term per byte sums exactly in uint8.
      crops = jax.lax.bitcast_convert_type(crops, jnp.uint8)  # (B, S, S, S, 2)
      if batch_axes:
        crops = jax.lax.psum_scatter(crops, batch_axes, scatter_dimension=0, tiled=True)
      if other_axes:
        crops = jax.lax.psum(crops, other_axes)
      return jax.lax.bitcast_convert_type(crops, jnp.int16)

    out_spec = PartitionSpec(batch_axes or None)
    gather = jax.shard_map(local_gather, mesh=self.mesh,
                           in_specs=(PartitionSpec(axes), PartitionSpec()), out_specs=out_spec)
    return jax.jit(gather, out_shardings=NamedSharding(
        self.mesh, PartitionSpec(batch_axes or None, None, None, None)))


def device_crops(config, rows: np.ndarray, batch_sharding,
                 reserved_bytes: int = 0) -> DeviceCrops:
  """The device cache of file `rows` over batch_sharding's mesh, built once and then kept;
  refused when it leaves less than `reserved_bytes` per device (the train step's temporaries)."""
  path = config.data.crops_file
  mesh = _mesh_of(batch_sharding)
  key = _file_key(path, rows) + (tuple(d.id for d in mesh.devices.flat), mesh.axis_names,
                                 mesh.devices.shape)
  limit = int(config.data.get('cache_max_bytes_per_device', 0))
  return _device_caches.get(
      key, lambda: DeviceCrops(CropsSource(path), rows, mesh, limit, reserved_bytes))


class DeviceBatchIterator(GlobalBatches):
  """Batches gathered from a DeviceCrops: dicts of global jax.Arrays like loader.BatchIterator's.

  `make_batch(number)` returns (this process's host fields {name: (n, ...) numpy}, table
  positions int32 (B,) of the whole batch); crops come from the device cache.
  """

  def __init__(self, cache: DeviceCrops, make_batch, batch_sharding, global_batch_size: int,
               first: int, num_batches: int | None = None):
    self._cache = cache
    self._make_batch = make_batch
    self._batch_sharding = batch_sharding
    self._global_batch_size = global_batch_size
    self._next = first
    self.num_batches = num_batches

  def __next__(self) -> dict[str, jax.Array]:
    if self._cache is None or (self.num_batches is not None and self._next >= self.num_batches):
      self.close()
      raise StopIteration
    fields, positions = self._make_batch(self._next)
    self._next += 1
    batch = {'crops': self._cache.gather(positions, self._batch_sharding)}
    for name, value in fields.items():
      batch[name] = to_global(value, self._batch_sharding, self._global_batch_size)
    return batch

  def close(self) -> None:
    self._cache = None  # The kept cache stays for the next iterator over the same rows.


def device_train_iterator(config, batch_sharding, start_step: int, positions_held: np.ndarray,
                          reserved_bytes: int = 0) -> DeviceBatchIterator:
  """Training batches start_step, start_step + 1, ... from the device cache (see loader)."""
  path = config.data.crops_file
  positive_rows, negative_rows = split_by_label(
      path, split_rows(path, config.data.train_subsets, skip_excluded=True))
  cache = device_crops(config, np.union1d(positive_rows, negative_rows), batch_sharding,
                       reserved_bytes)
  labels = CropsSource(path).labels
  seed, size = config.seed, config.train.global_batch_size
  fraction = config.data.positive_fraction

  def make_batch(step: int):
    rows = train_batch_rows(seed, step, size, positive_rows, negative_rows, fraction)
    held = rows[positions_held]
    index = (step * size + positions_held).astype(np.int32)
    return ({'label': labels(held), 'index': index, 'row': held.astype(np.int32)},
            cache.positions(rows))

  make_batch(start_step)  # Fail here, with a clear message, like the Grain path.
  return DeviceBatchIterator(cache, make_batch, batch_sharding, size, start_step)


def device_eval_iterator(config, rows: np.ndarray, batch_sharding,
                         positions_held: np.ndarray) -> DeviceBatchIterator:
  """One pass over file `rows` (increasing) from the device cache, padded like the Grain path."""
  cache = device_crops(config, rows, batch_sharding)
  labels = CropsSource(config.data.crops_file).labels
  size = config.train.eval_batch_size

  def make_batch(number: int):
    wanted = number * size + np.arange(size)
    valid = wanted < len(rows)
    batch_rows = np.where(valid, rows[np.minimum(wanted, len(rows) - 1)], -1)
    held_rows, held_valid = batch_rows[positions_held], valid[positions_held]
    label = np.where(held_valid, labels(np.maximum(held_rows, 0)), 0).astype(np.int32)
    return ({'label': label, 'row': held_rows.astype(np.int32), 'mask': held_valid},
            cache.positions(batch_rows))

  return DeviceBatchIterator(cache, make_batch, batch_sharding, size, 0,
                             num_batches=-(-len(rows) // size))


# ---- host: one shared-memory file that every reading process maps ---------------------------


class HostCrops:
  """The crops of the sorted file `rows` in one int16 file in shared memory, mapped read-only by
  each process that reads; a drop-in for CropsSource in the Grain loaders (crop_shape,
  read_crops, labels). Picklable: workers map the file, they do not copy it.
  """

  def __init__(self, source: CropsSource, rows: np.ndarray):
    self.rows = np.asarray(rows, np.int64)
    self.crop_shape = source.crop_shape
    nbytes = len(self.rows) * math.prod(self.crop_shape) * 2
    available = shared_memory.available_host_bytes()  # The container's limit included.
    if available is not None and nbytes > available:
      raise CacheError(
          f'the host crops cache needs {_fmt_bytes(nbytes)} ({len(self.rows)} crops of '
          f'{self.crop_shape} int16) but this process may use {_fmt_bytes(available)} (host '
          'and container limit); use --config.data.cache=none (read from the file) or fewer '
          'subsets')
    self._labels = source.labels(np.arange(len(source)))
    fd, self.path = leftovers.mkstemp('jaxmed-crops-', shared_memory.shared_memory_dir(nbytes),
                                      '.int16')
    os.close(fd)
    # The creating process removes the file when this object goes (workers keep their mapping).
    self._remove = weakref.finalize(self, shared_memory.remove, self.path)
    crops = np.lib.format.open_memmap(self.path, 'w+', np.int16,
                                      (max(len(self.rows), 1),) + self.crop_shape)
    shared_memory.allocate(self.path, os.path.getsize(self.path),
                           f'the host crops cache ({len(self.rows)} crops of {self.crop_shape} '
                           'int16)')
    for first in range(0, len(self.rows), _READ_ROWS):
      chunk = self.rows[first:first + _READ_ROWS]
      source.read_crops(chunk, crops[first:first + len(chunk)])
    crops.flush()
    del crops
    self._mapped = None  # (pid, read-only memmap), per process.
    logging.info('crops cache in host memory: %d crops of %s int16, %s in %s', len(self.rows),
                 'x'.join(map(str, self.crop_shape)), _fmt_bytes(nbytes), self.path)

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_mapped'] = None
    state['_remove'] = None  # Only the creating process removes the file.
    return state

  def _crops(self) -> np.ndarray:
    if self._mapped is None or self._mapped[0] != os.getpid():
      self._mapped = (os.getpid(), np.load(self.path, mmap_mode='r'))
    return self._mapped[1]

  def __len__(self) -> int:
    return len(self._labels)

  def labels(self, rows: np.ndarray) -> np.ndarray:
    """int32 labels of file `rows` (1 = nodule)."""
    return self._labels[np.asarray(rows, np.int64)]

  def read_crops(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int16 (n, S, S, S) crops of file `rows` (each in the cache), written into `out` if given."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    positions = np.searchsorted(self.rows, rows)
    if rows.size and (positions.max() >= len(self.rows)
                      or np.any(self.rows[np.minimum(positions, len(self.rows) - 1)] != rows)):
      raise IndexError(f'rows outside the host crops cache {self.path}')
    if out is None:
      out = np.empty((rows.size,) + self.crop_shape, np.int16)
    np.take(self._crops(), positions, axis=0, out=out)
    return out


def host_crops(config, rows: np.ndarray) -> HostCrops:
  """The host cache of file `rows`, built once and then kept."""
  path = config.data.crops_file
  return _host_caches.get(_file_key(path, rows), lambda: HostCrops(CropsSource(path), rows))
