"""The HDF5 crops file, schema version 2: its layout, and the checks its readers run first.

Layout (N candidates, crops stored as cubes of edge S voxels at `spacing_mm` isotropic):
  crops         int16   (N, S, S, S)  HU, axes (z, y, x), one crop per chunk
  label         uint8   (N,)          1 = nodule candidate (class 1 of candidates_V2.csv)
  seriesuid     bytes   (N,)          the scan the candidate belongs to
  subset        int8    (N,)          LUNA16 subset 0..9
  center_world  float64 (N, 3)        candidate centre in world mm, (x, y, z)
  diameter_mm   float32 (N,)          positives: diameter of the annotation whose sphere holds the
                                      candidate (the nearest such), -1 if none does; negatives: 0
  exclude       bool    (N,)          negatives within max(data.exclude_radius_mm,
                                      data.exclude_radius_factor x radius) of a nodule: left out
                                      of training, validation and the test AUC, never of the FROC
Attributes: schema_version=2, spacing_mm, crop_shape, sources (JSON: file -> sha256),
config (JSON of the config used).
Version 1 (before) had the same datasets with other labels: exclude within half a crop of a
nodule whatever its size, and each positive the nearest annotation's diameter however far.
"""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import numpy as np

from jaxmed.errors import UserError

SCHEMA_VERSION = 2
# What rebuilds a crops file in the current schema.
REBUILD = 'python -m jaxmed.main --mode=preprocess --config.data.overwrite=True'

# name -> (dtype, shape after the leading N); crops' shape is checked against crop_shape.
DATASETS = {
    'crops': (np.int16, None),
    'label': (np.uint8, ()),
    'seriesuid': (None, ()),  # Fixed-length bytes; the length depends on the longest uid.
    'subset': (np.int8, ()),
    'center_world': (np.float64, (3,)),
    'diameter_mm': (np.float32, ()),
    'exclude': (np.bool_, ()),
}
ATTRIBUTES = ('schema_version', 'spacing_mm', 'crop_shape', 'sources', 'config')


class CropsFileError(UserError, ValueError):
  """A crops file that is missing, does not follow schema v2, or cannot serve the purpose asked;
  the message says how to fix it."""


def check_crops_file(path: str | os.PathLike, f: h5py.File | None = None) -> int:
  """Checks that `path` is a complete schema-v2 crops file and returns its number of crops.

  Raises CropsFileError with one line naming the problem and the fix.
  """
  path = os.fspath(path)
  fix = f'rebuild it with: {REBUILD}'
  if f is None:
    if not os.path.exists(path):
      raise CropsFileError(
          f'crops file {path} does not exist: run python -m jaxmed.main --mode=preprocess '
          '(or set --config.data.crops_file)')
    try:
      with h5py.File(path, 'r') as opened:
        return check_crops_file(path, opened)
    except OSError as e:
      raise CropsFileError(f'crops file {path} is not a readable HDF5 file ({e}); {fix}') from None
  version = f.attrs.get('schema_version')
  version = version.item() if isinstance(version, np.generic) else version
  if version != SCHEMA_VERSION:
    older = ' (an older jaxmed labelled it otherwise)' if version == 1 else ''
    raise CropsFileError(f'crops file {path} has schema_version {version!r}, expected '
                         f'{SCHEMA_VERSION}{older}; {fix}')
  missing = [name for name in list(DATASETS) if name not in f]
  missing += [f'@{name}' for name in ATTRIBUTES if name not in f.attrs]
  if missing:
    raise CropsFileError(f'crops file {path} lacks {", ".join(missing)}; {fix}')
  n = f['crops'].shape[0]
  crop_shape = tuple(int(s) for s in f.attrs['crop_shape'])
  for name, (dtype, tail) in DATASETS.items():
    ds = f[name]
    want_shape = (n,) + (crop_shape if name == 'crops' else tail)
    if ds.shape != want_shape:
      raise CropsFileError(
          f'crops file {path}: dataset {name} has shape {ds.shape}, expected {want_shape}; {fix}')
    if dtype is not None and ds.dtype != np.dtype(dtype):
      raise CropsFileError(
          f'crops file {path}: dataset {name} has dtype {ds.dtype}, expected '
          f'{np.dtype(dtype)}; {fix}')
  return n


def negatives_cap(path: str | os.PathLike) -> int:
  """data.negatives_per_scan the file was built with (-1: every negative kept)."""
  with h5py.File(path, 'r') as f:
    try:
      stored = json.loads(f.attrs['config'])
      return int(stored['data']['negatives_per_scan'])
    except (KeyError, TypeError, ValueError):  # A file not written by preprocess: no cap known.
      return -1


def check_uncapped(path: str | os.PathLike) -> None:
  """Raises CropsFileError if `path` was built with a cap on negatives per scan.

  Scoring such a file would leave the dropped negatives out of the FROC and undercount false
  positives per scan, so evaluation refuses it.
  """
  path = os.fspath(path)
  cap = negatives_cap(path)
  if cap >= 0:
    raise CropsFileError(
        f'crops file {path} was built with data.negatives_per_scan={cap} (a cap on negatives '
        'per scan, for training only), so its FROC would undercount false positives; build an '
        'uncapped one into another file (--mode=preprocess --config.data.negatives_per_scan=-1 '
        '--config.data.crops_file=<new file>) or point --config.data.crops_file at one')


def identity(path: str | os.PathLike) -> dict[str, object]:
  """What names a crops file's content: a digest of its `sources` attribute (every source file's
  sha256) and its number of crops. A rebuilt file from the same sources keeps it."""
  with h5py.File(os.fspath(path), 'r') as f:
    sources = f.attrs['sources']
    num_crops = int(f['crops'].shape[0])
  if isinstance(sources, bytes):
    sources = sources.decode()
  return {'sources_sha256': hashlib.sha256(sources.encode()).hexdigest()[:16], 'crops': num_crops}
