"""Grain wiring for detection: volumes file -> global batches of int16 HU patches and the nodule
centres inside them, batch over the batch axes and depth over 'spatial'.

Which patches form batch `step` is data/patch_sampling.py's pure function of (seed, step); each
process reads only its rows of the batch and, when the mesh splits depth across processes, only
the depth slab its devices hold. Grain elements are whole per-process batches, read by `workers`
processes straight into the shared-memory ring (data/batch_ring.py), exactly as the crops loader
(data/loader.py) does, so the batches are the same for any worker count. Normalisation and
augmentation run on the device (data/augment.py: augment_patches, patches_to_unit).
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from jaxmed.data.batch_ring import BatchRing, aligned_empty
from jaxmed.data.loader import BatchIterator, prefetched, process_batch_rows, ring_for
from jaxmed.data.patch_sampling import (TrainScans, check_patch_size, nodules_in_patches,
                                        train_patches, train_scans)
from jaxmed.data.volumes_file import VolumesSource, scans_in_subsets
from jaxmed.errors import ConfigError
from jaxmed.parallel import sharding as sharding_lib

_LAST_STEP = 2**62  # Training runs "forever": Grain needs a length; any step a run reaches is below.
PATCH_AXES = ('batch', 'depth', 'height', 'width')  # Logical axes of `patches`.


def patch_sharding(config, mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of patches (B, D, H, W): batch over the batch axes, depth over what the
  logical rules map 'depth' to (spatial). ConfigError if those axes do not divide B or D."""
  rules = config.mesh.logical_rules
  shape = (int(config.train.global_batch_size),) + tuple(int(s) for s in config.detect.patch_size)
  for dim, name in ((0, 'batch'), (1, 'depth')):
    axes = sharding_lib.mesh_axes_for(name, mesh, rules)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if shape[dim] % shards:
      key = 'train.global_batch_size' if dim == 0 else 'detect.patch_size'
      raise ConfigError(f'{key}: {("batch", "patch depth")[dim]} {shape[dim]} is not divisible '
                        f'by the {shards} shards of mesh axes {axes}; set --config.{key} to a '
                        f'multiple of {shards}')
  return sharding_lib.logical_sharding(PATCH_AXES, mesh, rules, shape)


def process_depth_slab(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """[start, stop) of the patch depth this process's devices hold (one contiguous slab)."""
  index_map = sharding.addressable_devices_indices_map(global_shape)
  depth = global_shape[1]
  ranges = sorted({(index[1].start or 0, depth if index[1].stop is None else index[1].stop)
                   for index in index_map.values()})
  start, stop = ranges[0][0], ranges[-1][1]
  covered = sum(b - a for a, b in ranges)
  if covered != stop - start:
    raise ValueError(f'this process holds depth slabs {ranges} of the patches: not contiguous')
  return start, stop


class _PatchBatchLoader:
  """Picklable map: step -> this process's part of global patch batch `step` (numpy)."""

  def __init__(self, source: VolumesSource, scans: TrainScans, seed: int, global_batch_size: int,
               positions: np.ndarray, depth_slab: tuple[int, int], detect):
    self.source = source
    self.scans = scans
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.positions = positions
    self.depth_slab = depth_slab
    self.patch_size = tuple(int(s) for s in detect.patch_size)
    self.positive_fraction = float(detect.positive_fraction)
    self.margin_vox = int(detect.margin_vox)
    self.max_nodules = int(detect.max_nodules_per_patch)
    self.ring: BatchRing | None = None  # Set when workers read: patches go into its slots.

  @property
  def slot_shape(self) -> tuple[int, ...]:
    start, stop = self.depth_slab
    return (len(self.positions), stop - start) + self.patch_size[1:]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    scan, corner = train_patches(self.seed, step, self.global_batch_size, self.scans,
                                 self.patch_size, self.positive_fraction, self.margin_vox)
    scan, corner = scan[self.positions], corner[self.positions]
    patches = aligned_empty(self.slot_shape) if self.ring is None else self.ring.write(step)
    start, stop = self.depth_slab
    for j in range(len(scan)):
      self.source.read_patch(int(self.scans.rows[scan[j]]), corner[j] + (start, 0, 0),
                             patches.shape[1:], out=patches[j])
    if self.ring is not None:
      self.ring.written(step)
      patches = np.int64(step)  # The main process takes the patches out of the ring.
    centers, diameters, valid = nodules_in_patches(self.scans, scan, corner, self.patch_size,
                                                   self.max_nodules)
    # int32 wraps past 2**31 examples; it only seeds augmentation keys, so that stays exact.
    index = (step * self.global_batch_size + self.positions).astype(np.int32)
    return {'patches': patches, 'centers': centers, 'diameters_mm': diameters, 'valid': valid,
            'index': index}


def _log_small_scans(source: VolumesSource, scans: TrainScans, patch_size) -> None:
  small = np.any(scans.shapes < np.asarray(patch_size), axis=1)
  if small.any():
    example = source.seriesuids[int(scans.rows[np.flatnonzero(small)[0]])]
    logging.warning('patches: %d of %d training scans are smaller than detect.patch_size %s on '
                    'some axis (e.g. %s, %s voxels): their patches are padded with -1000 HU',
                    int(small.sum()), len(small), tuple(patch_size), example,
                    tuple(int(n) for n in scans.shapes[np.flatnonzero(small)[0]]))


def make_patch_train_iterator(config, batch_sharding: NamedSharding, start_step: int = 0):
  """Global detection training batches for steps start_step, start_step + 1, ... (close it).

  Each batch (B = config.train.global_batch_size, K = detect.max_nodules_per_patch):
    'patches' int16 (B, D, H, W) HU, logical axes PATCH_AXES (depth over 'spatial');
    'centers' float32 (B, K, 3) nodule centres, patch voxel (z, y, x);
    'diameters_mm' float32 (B, K); 'valid' float32 (B, K) 1 = a nodule, 0 = padding;
    'index' int32 (B,) global example position step * B + i (augmentation keys fold it).
  Everything but patches is sharded like `batch_sharding` (its mesh is the mesh).
  Starting at start_step is O(1): nothing is replayed.
  """
  detect = config.detect
  global_batch_size = int(config.train.global_batch_size)
  patch_size = tuple(int(s) for s in check_patch_size(detect.patch_size, detect.margin_vox))
  patches_sharding = patch_sharding(config, batch_sharding.mesh)
  global_shape = (global_batch_size,) + patch_size
  source = VolumesSource(config.data.volumes_file)
  scans = train_scans(source, scans_in_subsets(source, config.data.train_subsets))
  _log_small_scans(source, scans, patch_size)
  positions = process_batch_rows(batch_sharding, global_batch_size)
  loader = _PatchBatchLoader(source, scans, int(config.seed), global_batch_size, positions,
                             process_depth_slab(patches_sharding, global_shape), detect)
  loader(start_step)  # Fail here, with a clear message, rather than inside a worker.
  ring = ring_for(loader, config, loader.slot_shape)
  steps = grain.MapDataset.range(start_step, _LAST_STEP).map(loader)
  return BatchIterator(prefetched(steps, config.data.workers, config.data.prefetch),
                       batch_sharding, global_batch_size, ring=ring, ring_key='patches',
                       layouts={'patches': (patches_sharding, global_shape)})
