"""The HDF5 volumes file, schema version 1 (task 'detect'): every scan resampled whole to
`spacing_mm` isotropic on an identity-direction grid, its geometry and its annotations.

Layout (N scans, sorted by (subset, seriesuid); M annotations, E excluded annotations):
  volumes/<seriesuid>  int16   (D, H, W)  HU, axes (z, y, x) = world z, y, x increasing;
                                          chunks of CHUNK_EDGE^3 voxels (random patch reads)
  seriesuid            bytes   (N,)
  subset               int8    (N,)       LUNA16 subset 0..9
  shape                int64   (N, 3)     (D, H, W) of each volume
  origin_xyz           float64 (N, 3)     world (x, y, z) mm of voxel (0, 0, 0)
  body_box             int64   (N, 2, 3)  [low, high) voxel (z, y, x) box of the body (> -500 HU):
                                          where patches without a nodule are drawn
  annotations          float64 (M, 4)     world x, y, z mm, diameter_mm (annotations.csv)
  annotation_scan      int32   (M,)       the row of `seriesuid` each belongs to
  excluded             float64 (E, 4)     the same for annotations_excluded.csv (none: E = 0)
  excluded_scan        int32   (E,)
Attributes: schema_version=1, spacing_mm, direction (9,) = identity (row-major 3x3), chunk_edge,
sources (JSON: file -> sha256), config (JSON of the config used).
World (x, y, z) mm = origin_xyz + spacing_mm * (x, y, z) voxel index.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import h5py
import numpy as np

from jaxmed.data.source import LazyFile
from jaxmed.errors import UserError
from jaxmed.scans import luna16
from jaxmed.scans.resample import Volume, voxel_to_world, world_to_voxel

SCHEMA_VERSION = 1
CHUNK_EDGE = 32  # A 64^3 patch at a random corner touches at most 27 chunks of 64 KB.
BODY_HU = -500  # Voxels above this count as body when the body box is measured.
REBUILD = ('python -m jaxmed.main --mode=preprocess --config.task=detect '
           '--config.data.overwrite=True')

# name -> (dtype, shape after the leading count; None = checked elsewhere).
COLUMNS = {
    'seriesuid': (None, ()),
    'subset': (np.int8, ()),
    'shape': (np.int64, (3,)),
    'origin_xyz': (np.float64, (3,)),
    'body_box': (np.int64, (2, 3)),
    'annotations': (np.float64, (4,)),
    'annotation_scan': (np.int32, ()),
    'excluded': (np.float64, (4,)),
    'excluded_scan': (np.int32, ()),
}
ATTRIBUTES = ('schema_version', 'spacing_mm', 'direction', 'chunk_edge', 'sources', 'config')


class VolumesFileError(UserError, ValueError):
  """A volumes file that is missing, does not follow schema v1, or lacks a scan; the message
  says how to fix it."""


@dataclasses.dataclass(frozen=True)
class VolumeGeometry:
  """Where a stored volume lies in the world: shape (D, H, W), origin_xyz mm, spacing_mm."""
  shape: tuple[int, int, int]
  origin_xyz: np.ndarray
  spacing_mm: float

  def voxel_to_world(self, zyx: np.ndarray) -> np.ndarray:
    """(N, 3) (z, y, x) voxel indices -> (N, 3) world (x, y, z) mm."""
    return voxel_to_world(zyx, self.origin_xyz, self.spacing_mm)

  def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
    """(N, 3) world (x, y, z) mm -> (N, 3) continuous (z, y, x) voxel indices."""
    return world_to_voxel(xyz, self.origin_xyz, self.spacing_mm)


def check_volumes_file(path: str | os.PathLike, f: h5py.File | None = None) -> int:
  """Checks that `path` is a complete schema-v1 volumes file and returns its number of scans.

  Raises VolumesFileError with one line naming the problem and the fix.
  """
  path = os.fspath(path)
  fix = f'rebuild it with: {REBUILD}'
  if f is None:
    if not os.path.exists(path):
      raise VolumesFileError(
          f'volumes file {path} does not exist: run python -m jaxmed.main --mode=preprocess '
          '--config.task=detect (or set --config.data.volumes_file)')
    try:
      with h5py.File(path, 'r') as opened:
        return check_volumes_file(path, opened)
    except OSError as e:
      raise VolumesFileError(
          f'volumes file {path} is not a readable HDF5 file ({e}); {fix}') from None
  version = f.attrs.get('schema_version')
  version = version.item() if isinstance(version, np.generic) else version
  if version != SCHEMA_VERSION or 'volumes' not in f:
    what = 'a crops file' if 'crops' in f else f'schema_version {version!r}'
    raise VolumesFileError(f'{path} is {what}, not a volumes file of schema_version '
                           f'{SCHEMA_VERSION}; {fix}, or point --config.data.volumes_file at one')
  missing = [name for name in COLUMNS if name not in f]
  missing += [f'@{name}' for name in ATTRIBUTES if name not in f.attrs]
  if missing:
    raise VolumesFileError(f'volumes file {path} lacks {", ".join(missing)}; {fix}')
  n = f['seriesuid'].shape[0]
  for name, (dtype, tail) in COLUMNS.items():
    ds = f[name]
    count = ds.shape[0] if ds.ndim else -1
    want = (count if name in ('annotations', 'annotation_scan', 'excluded', 'excluded_scan')
            else n,) + tail
    if ds.shape != want or (dtype is not None and ds.dtype != np.dtype(dtype)):
      raise VolumesFileError(f'volumes file {path}: dataset {name} is {ds.dtype} {ds.shape}, '
                             f'expected {np.dtype(dtype) if dtype else "bytes"} {want}; {fix}')
  shapes = f['shape'][:]
  for uid, shape in zip(f['seriesuid'][:], shapes):
    uid = uid.decode()
    if uid not in f['volumes']:
      raise VolumesFileError(f'volumes file {path} lists scan {uid} but holds no volume for it; '
                             f'{fix}')
    ds = f['volumes'][uid]
    if ds.shape != tuple(shape) or ds.dtype != np.int16:
      raise VolumesFileError(f'volumes file {path}: volume {uid} is {ds.dtype} {ds.shape}, '
                             f'expected int16 {tuple(shape)}; {fix}')
  return n


class VolumesSource(LazyFile):
  """Random access to a volumes file: geometry, annotations and int16 HU patches of each scan.

  Scan `i` is row i of the file's `seriesuid` column. Picklable (Grain workers): the HDF5 file
  is opened lazily by the process that reads (again after a fork). Metadata and annotations are
  read once, at construction.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    check_volumes_file(self.path)
    with h5py.File(self.path, 'r') as f:
      self.seriesuids = [uid.decode() for uid in f['seriesuid'][:]]
      self.subsets = f['subset'][:].astype(np.int64)
      self.shapes = f['shape'][:]
      self.origins = f['origin_xyz'][:]
      self.body_boxes = f['body_box'][:]
      self.spacing_mm = float(f.attrs['spacing_mm'])
      annotations, annotation_scan = f['annotations'][:], f['annotation_scan'][:]
      excluded, excluded_scan = f['excluded'][:], f['excluded_scan'][:]
    rows = np.arange(len(self.seriesuids))
    self._annotations = [annotations[annotation_scan == i] for i in rows]
    self._excluded = [excluded[excluded_scan == i] for i in rows]
    self._row = {uid: i for i, uid in enumerate(self.seriesuids)}
    self._handle = None  # (pid, h5py.File), per process.

  def _volume(self, i: int) -> h5py.Dataset:
    if self._handle is None or self._handle[0] != os.getpid():
      self._handle = (os.getpid(), h5py.File(self.path, 'r'))
    return self._handle[1]['volumes'][self.seriesuids[i]]

  def __len__(self) -> int:
    return len(self.seriesuids)

  def index_of(self, seriesuid: str) -> int:
    """The row of scan `seriesuid`; VolumesFileError (one line) if the file lacks it."""
    if seriesuid not in self._row:
      raise VolumesFileError(f'volumes file {self.path} holds no scan {seriesuid}; rebuild it '
                             f'from raw data that has it: {REBUILD}')
    return self._row[seriesuid]

  def volume_meta(self, i: int) -> VolumeGeometry:
    """Scan i's geometry: shape (D, H, W), origin_xyz mm, spacing_mm."""
    return VolumeGeometry(tuple(int(n) for n in self.shapes[i]), self.origins[i].copy(),
                          self.spacing_mm)

  def annotations(self, i: int) -> np.ndarray:
    """float64 (K, 4) world x, y, z mm and diameter_mm of scan i's nodules (K may be 0)."""
    return self._annotations[i]

  def excluded(self, i: int) -> np.ndarray:
    """float64 (K, 4) world x, y, z mm and diameter_mm of scan i's excluded findings."""
    return self._excluded[i]

  def read_patch(self, i: int, corner_zyx, size_zyx, out: np.ndarray | None = None) -> np.ndarray:
    """int16 (d, h, w) HU of scan i from voxel `corner_zyx` (may be negative or reach past the
    far faces: those voxels read -1000 HU), written into `out` if given."""
    corner = np.asarray(corner_zyx, np.int64)
    size = np.asarray(size_zyx, np.int64)
    if out is None:
      out = np.empty(tuple(size), np.int16)
    low = np.maximum(corner, 0)
    high = np.minimum(corner + size, self.shapes[i])
    if np.any(high <= low):
      out.fill(luna16.AIR_HU)
      return out
    inside = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    into = tuple(slice(int(a - c), int(b - c)) for a, b, c in zip(low, high, corner))
    if np.any(low > corner) or np.any(high < corner + size):
      out.fill(luna16.AIR_HU)  # Only a patch that reaches outside the scan needs the fill.
    self._volume(i).read_direct(out, source_sel=inside, dest_sel=into)
    return out

  def read_volume(self, i: int) -> Volume:
    """The whole resampled scan i."""
    return Volume(hu=self._volume(i)[...], origin_xyz=self.origins[i].copy(),
                  spacing_mm=self.spacing_mm)

  def __repr__(self) -> str:
    return f'VolumesSource(path={self.path!r}, scans={len(self)}, spacing_mm={self.spacing_mm})'


def scans_in_subsets(source: VolumesSource, subsets: Iterable[int]) -> np.ndarray:
  """Rows (int64, increasing) of the scans of the LUNA16 `subsets`."""
  return np.flatnonzero(np.isin(source.subsets, np.asarray(tuple(subsets), np.int64)))
