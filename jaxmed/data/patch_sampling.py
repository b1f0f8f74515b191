"""Which patches form global detection training batch `step`: a pure function of (seed, step).

The same contract as data/sampling.py (no I/O; the stream is the same for any number of hosts,
devices or Grain workers; resuming at a step is O(1)):
  round(B * positive_fraction) patches each hold one nodule, taken from a stream over every
  training nodule reshuffled each epoch, at a uniformly random voxel position inside the patch
  at least `margin_vox` from every face (its sub-voxel part kept: patch corners are whole voxels);
  the other patches are centred at a uniformly random point of a uniformly chosen scan's body box
  and moved inside the scan where it is large enough (a scan smaller than the patch is padded:
  the patch is centred on it).
Each patch then lists every nodule whose centre lies inside it (`nodules_in_patches`).
Coordinates are voxel (z, y, x) of the volumes file's grid; patch coordinates are relative to
the patch corner.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmed.data.sampling import NODULE_STREAM, positives_per_batch, stream_rows
from jaxmed.errors import ConfigError

_PATCH_STREAM = 0x5041  # 'PA': folded with (seed, step) for positions, scans and order.
UNKNOWN_DIAMETER_MM = 10.0  # LUNA16's evaluation reads a negative diameter as 10 mm.


@dataclasses.dataclass(frozen=True)
class TrainScans:
  """What sampling needs to know of the training scans (read once from the volumes file).

  rows: int64 (S,) the scans' rows in the volumes file.
  shapes: int64 (S, 3) volume (D, H, W).
  body_boxes: int64 (S, 2, 3) [low, high) voxel box of each body.
  nodule_scan: int64 (M,) which of the S scans each nodule is in (0..S-1).
  nodule_zyx: float64 (M, 3) nodule centres, voxel (z, y, x) of the volume.
  nodule_diameter_mm: float64 (M,) (unknown diameters read as 10 mm).
  """
  rows: np.ndarray
  shapes: np.ndarray
  body_boxes: np.ndarray
  nodule_scan: np.ndarray
  nodule_zyx: np.ndarray
  nodule_diameter_mm: np.ndarray

  def __post_init__(self):
    by_scan = [np.flatnonzero(self.nodule_scan == s) for s in range(len(self.rows))]
    object.__setattr__(self, '_nodules_by_scan', by_scan)

  def nodules_of(self, scan: int) -> np.ndarray:
    """Indices (into nodule_*) of the nodules of scan `scan` (0..S-1)."""
    return self._nodules_by_scan[scan]


def train_scans(source, rows: np.ndarray) -> TrainScans:
  """TrainScans of the volumes-file `rows` of `source` (a VolumesSource)."""
  rows = np.asarray(rows, np.int64)
  scan_of, zyx, diameters = [], [], []
  for s, row in enumerate(rows):
    annotations = source.annotations(int(row))
    scan_of.append(np.full(len(annotations), s, np.int64))
    zyx.append(source.volume_meta(int(row)).world_to_voxel(annotations[:, :3]))
    diameters.append(np.where(annotations[:, 3] < 0, UNKNOWN_DIAMETER_MM, annotations[:, 3]))
  return TrainScans(rows, source.shapes[rows].astype(np.int64),
                    source.body_boxes[rows].astype(np.int64),
                    np.concatenate(scan_of or [np.zeros(0, np.int64)]),
                    np.concatenate(zyx or [np.zeros((0, 3))]).reshape(-1, 3),
                    np.concatenate(diameters or [np.zeros(0)]))


def check_patch_size(patch_size, margin_vox: int) -> np.ndarray:
  """patch_size as int64 (3,); ConfigError (one line) unless each edge leaves room for a centre
  `margin_vox` from both faces."""
  size = np.asarray(tuple(patch_size), np.int64)
  if size.shape != (3,) or margin_vox < 0 or np.any(size < 2 * int(margin_vox) + 2):
    raise ConfigError(f'detect.patch_size {tuple(patch_size)} with detect.margin_vox '
                      f'{margin_vox}: need 3 edges (D, H, W) of at least 2 * margin + 2 voxels '
                      'and margin >= 0; fix --config.detect.patch_size / margin_vox')
  return size


def train_patches(seed: int, step: int, global_batch_size: int, scans: TrainScans,
                  patch_size, positive_fraction: float,
                  margin_vox: int) -> tuple[np.ndarray, np.ndarray]:
  """(scan int64 (B,) index into scans.rows, corner int64 (B, 3) voxel (z, y, x)) of every
  patch of global training batch `step`, positions in the batch shuffled."""
  if seed < 0 or step < 0:
    raise ValueError(f'seed and step must be >= 0, got seed={seed}, step={step}')
  size = check_patch_size(patch_size, margin_vox)
  num_positive = positives_per_batch(global_batch_size, positive_fraction,
                                     'detect.positive_fraction')
  if not len(scans.rows):
    raise ConfigError('no training scans in the volumes file; check '
                      '--config.data.train_subsets')
  if num_positive and not len(scans.nodule_scan):
    raise ConfigError('detection batches need patches with nodules but the training scans have '
                      'none; check --config.data.train_subsets and --config.detect.'
                      'positive_fraction')
  rng = np.random.default_rng([seed, _PATCH_STREAM, step])
  scan = np.empty(global_batch_size, np.int64)
  corner = np.empty((global_batch_size, 3), np.int64)

  if num_positive:
    nodules = stream_rows(np.arange(len(scans.nodule_scan)), seed, NODULE_STREAM,
                          step * num_positive, num_positive)
    centre = scans.nodule_zyx[nodules]
    whole = np.floor(centre)
    fraction = centre - whole
    # Whole-voxel shift k with k + fraction in [margin, size - 1 - margin], uniform.
    low = np.ceil(margin_vox - fraction)
    high = np.floor(size - 1 - margin_vox - fraction)
    shift = low + np.floor(rng.random((num_positive, 3)) * (high - low + 1))
    scan[:num_positive] = scans.nodule_scan[nodules]
    corner[:num_positive] = (whole - shift).astype(np.int64)

  num_negative = global_batch_size - num_positive
  if num_negative:
    chosen = rng.integers(0, len(scans.rows), num_negative)
    box = scans.body_boxes[chosen].astype(np.float64)
    point = box[:, 0] + rng.random((num_negative, 3)) * (box[:, 1] - box[:, 0])
    start = np.floor(point).astype(np.int64) - size // 2
    shape = scans.shapes[chosen]
    fits = shape >= size
    start = np.where(fits, np.clip(start, 0, np.maximum(shape - size, 0)), -((size - shape) // 2))
    scan[num_positive:] = chosen
    corner[num_positive:] = start

  order = rng.permutation(global_batch_size)
  return scan[order], corner[order]


def nodules_in_patches(scans: TrainScans, scan: np.ndarray, corner: np.ndarray, patch_size,
                       max_nodules: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The nodules whose centre lies inside each patch (0 <= centre - corner <= size - 1 on every
  axis), the `max_nodules` nearest the patch centre when more do.

  Returns centers float32 (n, K, 3) patch voxel (z, y, x), diameters_mm float32 (n, K),
  valid float32 (n, K) (1 = a nodule, 0 = an empty slot, whose centre and diameter are 0).
  """
  size = np.asarray(tuple(patch_size), np.float64)
  n = len(scan)
  centers = np.zeros((n, max_nodules, 3), np.float32)
  diameters = np.zeros((n, max_nodules), np.float32)
  valid = np.zeros((n, max_nodules), np.float32)
  for b in range(n):
    mine = scans.nodules_of(int(scan[b]))
    position = scans.nodule_zyx[mine] - corner[b]
    inside = np.all((position >= 0) & (position <= size - 1), axis=1)
    position, mine = position[inside], mine[inside]
    nearest = np.argsort(np.sum((position - (size - 1) / 2) ** 2, axis=1),
                         kind='stable')[:max_nodules]
    k = len(nearest)
    centers[b, :k] = position[nearest]
    diameters[b, :k] = scans.nodule_diameter_mm[mine[nearest]]
    valid[b, :k] = 1.0
  return centers, diameters, valid
