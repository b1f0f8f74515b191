"""Synthetic CT scans in the LUNA16 format, with nodules at known world coordinates.

`synthesize(config)` writes `raw_dir/subset<k>/<seriesuid>.mhd/.raw` (int16 HU, through
SimpleITK) plus annotations.csv and candidates_V2.csv, so the whole pipeline runs offline on data
whose truth is known. Each scan (the phantom: synthetic_anatomy.py): air outside a body
ellipse, soft tissue, two lungs, branching vessel trees in the lungs, and solid ellipsoid nodules
(isolated, touching the lung wall, or touching a vessel). Scans vary in in-plane spacing
(0.5-0.9 mm), slice spacing (0.6-2.5 mm), origin and direction (some have flipped axes); their
size is data.synthetic.shape_xyz (LUNA16-like 512 x 512 x 250 takes about 2.5 s a scan).
Candidates: jittered positives at every nodule, negatives on vessels and their branch points
(hard), in the lungs and in the body.

The phantom is defined in world mm (x, y, z) and evaluated on the scan's voxel grid, so the CSV
coordinates are right whatever the direction. Same `synthetic.seed` -> byte-identical files.
This module imports no JAX.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import numpy as np
import SimpleITK as sitk
from absl import logging

from jaxmed.scans import luna16
from jaxmed.scans.synthetic_anatomy import (Ellipsoid, Grid, paint_nodule, paint_segment,
                                            place_nodules, unit, vessel_tree)

UID_PREFIX = '1.3.6.1.4.1.14519.5.2.1.6279.6001.'
MARKER = 'SYNTHETIC.json'  # Marks a raw_dir written by synthesize (and lists its files).
# Cycled over scans: identity, and the flips met in LUNA16 (z reversed; x and y reversed).
DIRECTION_SIGNS = ((1, 1, 1), (1, 1, -1), (1, 1, 1), (-1, -1, 1))
AIR_HU, BODY_HU, LUNG_HU = -1000, 40, -850
NOISE_HU = 20.0  # Standard deviation of the Gaussian noise added everywhere.


@dataclasses.dataclass(frozen=True)
class ScanSpec:
  """One scan to generate: identity, grid (x, y, z order) and its own random seed."""
  index: int
  seriesuid: str
  subset: int
  shape_xyz: tuple[int, int, int]
  spacing_xyz: tuple[float, float, float]
  direction_signs: tuple[int, int, int]
  seed: tuple[int, ...]


def _random_uid(rng, taken):
  while True:
    uid = UID_PREFIX + str(rng.integers(1, 10)) + ''.join(map(str, rng.integers(0, 10, 29)))
    if uid not in taken:
      return uid


def scan_specs(synthetic) -> list[ScanSpec]:
  """The scans `config.data.synthetic` describes, each with its own seed."""
  rng = np.random.default_rng([synthetic.seed, 0])
  specs, taken = [], set()
  for index in range(synthetic.num_scans):
    uid = _random_uid(rng, taken)
    taken.add(uid)
    in_plane = float(np.round(rng.uniform(0.5, 0.9), 4))
    slice_mm = float(np.round(rng.uniform(0.6, 2.5), 4))
    specs.append(ScanSpec(index, uid, index % synthetic.num_subsets,
                          tuple(int(n) for n in synthetic.shape_xyz),
                          (in_plane, in_plane, slice_mm),
                          DIRECTION_SIGNS[index % len(DIRECTION_SIGNS)],
                          (int(synthetic.seed), 1, index)))
  return specs


def _make_scan(spec: ScanSpec, synthetic):
  """Builds one scan. Returns (image, nodules, candidate rows [(x, y, z, class)], clamped)."""
  rng = np.random.default_rng(list(spec.seed))
  shape = np.asarray(spec.shape_xyz)
  spacing = np.asarray(spec.spacing_xyz, np.float64)
  extent = (shape - 1) * spacing
  center = np.array([rng.uniform(-30, 30), rng.uniform(-60, 60), rng.uniform(-350, -100)])
  low = np.round(center - extent / 2, 3)
  grid = Grid(*(low[a] + np.arange(shape[a]) * spacing[a] for a in range(3)), low, spacing)

  # Body (an elliptic cylinder along z), then the two lungs: int16 HU, canonical (z, y, x).
  half = extent / 2
  body_axes = np.array([0.92 * half[0], 0.72 * half[1]])
  body2d = (((grid.xs[None, :] - center[0]) / body_axes[0]) ** 2 +
            ((grid.ys[:, None] - center[1]) / body_axes[1]) ** 2) <= 1
  volume = np.empty(tuple(shape[::-1]), np.int16)
  volume[:] = np.where(body2d, BODY_HU, AIR_HU).astype(np.int16)[None]
  lungs = []
  for side in (-1.0, 1.0):
    lung = Ellipsoid(center + np.array([side * 0.47 * body_axes[0], -0.05 * body_axes[1], 0.0]),
                      np.array([0.36 * body_axes[0], 0.68 * body_axes[1], 0.44 * extent[2]]))
    slices, coords = grid.box(lung.center - lung.axes, lung.center + lung.axes)
    volume[slices][lung.mask(coords)] = LUNG_HU
    lungs.append(lung)

  vessel_points = []  # (point, radius): where hard negatives go, branch points among them.
  vessels_by_lung = []
  for lung, side in zip(lungs, (-1.0, 1.0)):
    segments, branch_points = vessel_tree(rng, lung, medial_sign=-side)
    for p0, p1, radius in segments:
      paint_segment(volume, grid, p0, p1, radius, int(rng.integers(40, 101)), lungs)
      vessel_points.append((0.5 * (p0 + p1), radius))
    vessel_points += branch_points
    vessels_by_lung.append(segments)

  low_n, high_n = (int(v) for v in synthetic.nodules_per_scan)
  nodules, clamped = place_nodules(rng, lungs, vessels_by_lung, synthetic,
                                   int(rng.integers(low_n, high_n + 1)))
  for nodule in nodules:
    paint_nodule(volume, grid, nodule)

  # Noise, slab by slab to bound memory on LUNA16-sized scans.
  for z0 in range(0, volume.shape[0], 32):
    slab = volume[z0:z0 + 32]
    noise = rng.standard_normal(slab.shape, dtype=np.float32) * NOISE_HU
    slab[...] = np.clip(slab + np.rint(noise), -1024, 3071).astype(np.int16)

  rows = _candidates(rng, synthetic, nodules, lungs, vessel_points, center, body_axes, grid)

  # Store in the scan's own direction: a flipped axis runs from the high world end.
  signs = np.asarray(spec.direction_signs)
  flip_axes = tuple(2 - a for a in range(3) if signs[a] < 0)  # numpy axis of x is 2.
  stored = np.ascontiguousarray(np.flip(volume, axis=flip_axes) if flip_axes else volume)
  image = sitk.GetImageFromArray(stored)
  image.SetSpacing([float(v) for v in spacing])
  image.SetOrigin([float(v) for v in np.where(signs < 0, low + extent, low)])
  image.SetDirection([float(v) for v in np.diag(signs.astype(np.float64)).ravel()])
  return image, nodules, rows, clamped


def _candidates(rng, synthetic, nodules, lungs, vessel_points, center, body_axes, grid):
  """Candidate rows (x, y, z, class) in world mm, shuffled."""
  rows = []
  low_p, high_p = (int(v) for v in synthetic.positives_per_nodule)
  for nodule in nodules:
    for _ in range(int(rng.integers(low_p, high_p + 1))):
      jitter = unit(rng.normal(size=3)) * rng.uniform(0, min(0.25 * nodule['diameter'], 2.5))
      rows.append((*(nodule['center'] + jitter), 1))

  def far_from_nodules(p):
    return all(np.linalg.norm(p - n['center']) > n['diameter'] / 2 + 4.0 for n in nodules)

  n_neg = int(synthetic.negatives_per_scan)
  n_vessel, n_lung = n_neg // 3, n_neg // 3
  n_body = n_neg - n_vessel - n_lung
  vessel_pool = [(p, r) for p, r in vessel_points if far_from_nodules(p)]
  if vessel_pool:  # Thicker vessels are likelier: they look most like nodules in a crop.
    weights = np.array([r for _, r in vessel_pool]) ** 2
    picks = rng.choice(len(vessel_pool), size=n_vessel, p=weights / weights.sum())
    for i in picks:
      rows.append((*(vessel_pool[i][0] + rng.normal(0, 0.5, 3)), 0))
  else:
    n_lung += n_vessel
  for count, region in ((n_lung, 'lung'), (n_body, 'body')):
    made = 0
    for _ in range(count * 50):
      if made == count:
        break
      if region == 'lung':
        lung = lungs[rng.integers(0, 2)]
        p = lung.center + unit(rng.normal(size=3)) * rng.uniform(0, 1) ** (1 / 3) * lung.axes
      else:
        p = np.array([rng.uniform(grid.xs[0], grid.xs[-1]), rng.uniform(grid.ys[0], grid.ys[-1]),
                      rng.uniform(grid.zs[0], grid.zs[-1])])
        if ((p[0] - center[0]) / body_axes[0]) ** 2 + ((p[1] - center[1]) / body_axes[1]) ** 2 > 1:
          continue
      if far_from_nodules(p):
        rows.append((*p, 0))
        made += 1
  order = rng.permutation(len(rows))
  return [rows[i] for i in order]


# ---- writing --------------------------------------------------------------------------------

def _fmt(value: float) -> str:
  return f'{value:.4f}'


def write_dataset(raw_dir: str, specs: list[ScanSpec], synthetic,
                  candidates_csv: str, annotations_csv: str) -> dict:
  """Writes the scans of `specs` and the two CSVs (written last: their presence = complete)."""
  start = time.perf_counter()
  annotation_rows, candidate_rows, files, clamped_total = [], [], [], 0
  for spec in specs:
    image, nodules, rows, clamped = _make_scan(spec, synthetic)
    folder = os.path.join(raw_dir, f'subset{spec.subset}')
    os.makedirs(folder, exist_ok=True)
    sitk.WriteImage(image, os.path.join(folder, spec.seriesuid + '.mhd'), False)
    files += [f'subset{spec.subset}/{spec.seriesuid}.{ext}' for ext in ('mhd', 'raw')]
    clamped_total += clamped
    for n in nodules:
      annotation_rows.append([spec.seriesuid, *map(_fmt, n['center']), _fmt(n['diameter'])])
    for x, y, z, cls in rows:
      candidate_rows.append([spec.seriesuid, _fmt(x), _fmt(y), _fmt(z), str(cls)])
    logging.info('synthesize: scan %d/%d subset%d %s: %s voxels, spacing %s mm, %d nodules',
                 spec.index + 1, len(specs), spec.subset, spec.seriesuid,
                 'x'.join(map(str, spec.shape_xyz)), spec.spacing_xyz, len(nodules))
  for path, header, rows in ((annotations_csv, luna16.ANNOTATION_COLUMNS, annotation_rows),
                             (candidates_csv, luna16.CANDIDATE_COLUMNS, candidate_rows)):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.partial', 'w', newline='') as f:
      writer = csv.writer(f, lineterminator='\n')
      writer.writerow(header)
      writer.writerows(rows)
    os.replace(path + '.partial', path)
  positives = sum(1 for row in candidate_rows if row[-1] == '1')
  return {'raw_dir': raw_dir, 'scans': len(specs), 'nodules': len(annotation_rows),
          'candidates': len(candidate_rows), 'positives': positives,
          'nodules_clamped_to_lung': clamped_total, 'files': files,
          'seconds': time.perf_counter() - start}


def _check_settings(synthetic, raw_dir: str) -> None:
  """Raises DataError (one line) for settings synthesize cannot use."""
  if os.path.exists(raw_dir) and not os.path.isdir(raw_dir):
    raise luna16.DataError(f'raw folder {raw_dir} is a file, not a folder; choose another '
                           '--config.data.raw_dir')
  if not (int(synthetic.num_scans) > 0 and int(synthetic.num_subsets) > 0):
    raise luna16.DataError('synthetic.num_scans and synthetic.num_subsets must be > 0; set '
                           '--config.data.synthetic.num_scans / num_subsets')
  for key, least in (('nodules_per_scan', 0), ('positives_per_nodule', 1),
                     ('nodule_diameter_mm', 0.1)):
    value = tuple(synthetic[key])
    if len(value) != 2 or not least <= value[0] <= value[1]:
      raise luna16.DataError(f'synthetic.{key} is {value}, not a range (low, high) with '
                             f'{least} <= low <= high; set --config.data.synthetic.{key}')
  shape = tuple(synthetic.shape_xyz)
  if len(shape) != 3 or min(shape) < 8:
    raise luna16.DataError(f'synthetic.shape_xyz is {shape}: need 3 sizes (x, y, z) of at least '
                           '8 voxels; set --config.data.synthetic.shape_xyz')
  if int(synthetic.negatives_per_scan) < 0:
    raise luna16.DataError(f'synthetic.negatives_per_scan is {synthetic.negatives_per_scan}, '
                           'must be >= 0; set --config.data.synthetic.negatives_per_scan')


def synthesize(config) -> dict:
  """Writes `config.data.synthetic.num_scans` LUNA16-format scans and the two CSVs to raw_dir.

  Refuses (DataError) if raw_dir already holds a complete dataset, unless
  config.data.overwrite; never overwrites a dataset it did not write. Returns a summary dict.
  """
  data, synthetic = config.data, config.data.synthetic
  raw_dir = data.raw_dir
  _check_settings(synthetic, raw_dir)  # Before anything on disk changes.
  candidates_csv = luna16.resolve(raw_dir, data.candidates_csv)
  annotations_csv = luna16.resolve(raw_dir, data.annotations_csv)
  marker = os.path.join(raw_dir, MARKER)
  complete = os.path.isfile(candidates_csv) and os.path.isfile(annotations_csv)
  has_scans = bool(luna16.find_scans(raw_dir)) if os.path.isdir(raw_dir) else False
  if (complete or has_scans) and not os.path.isfile(marker):
    raise luna16.DataError(
        f'raw folder {raw_dir} holds scans or CSVs not written by synthesize; refusing to '
        'write synthetic scans there: choose another --config.data.raw_dir')
  if complete and not data.overwrite:
    raise luna16.DataError(
        f'raw folder {raw_dir} already holds a complete synthetic dataset ({candidates_csv}); '
        'pass --config.data.overwrite=True to replace it')
  if os.path.isfile(marker):  # Remove the previous synthetic dataset's files, CSVs first.
    with open(marker) as f:
      old_files = json.load(f).get('files', [])
    for path in [candidates_csv, annotations_csv] + [os.path.join(raw_dir, p) for p in old_files]:
      if os.path.isfile(path):
        os.remove(path)
  specs = scan_specs(synthetic)
  try:
    os.makedirs(raw_dir, exist_ok=True)
  except OSError as e:
    raise luna16.DataError(f'raw folder {raw_dir} cannot be created ({e.strerror}); choose a '
                           'writable --config.data.raw_dir') from None
  files = [f'subset{s.subset}/{s.seriesuid}.{ext}' for s in specs for ext in ('mhd', 'raw')]
  with open(marker, 'w') as f:  # First, so a half-written dataset is known to be ours.
    json.dump({'files': files, 'synthetic': synthetic.to_dict()}, f, indent=1, sort_keys=True)
    f.write('\n')
  summary = write_dataset(raw_dir, specs, synthetic, candidates_csv, annotations_csv)
  summary.pop('files')
  logging.info('synthesize: wrote %d scans, %d nodules, %d candidates (%d positive) to %s in '
               '%.1f s', summary['scans'], summary['nodules'], summary['candidates'],
               summary['positives'], raw_dir, summary['seconds'])
  if summary['nodules_clamped_to_lung']:
    logging.info('synthesize: %d nodule diameters were clamped to fit the lungs of these small '
                 'scans (raise synthetic.shape_xyz to avoid it)',
                 summary['nodules_clamped_to_lung'])
  return summary
