"""Reading data in the LUNA16 layout: scans, candidate/annotation CSVs, world <-> voxel, resampling.

Layout under `raw_dir`:
  subset0/ .. subset9/   <seriesuid>.mhd + the data file its ElementDataFile names (in LUNA16
                         <seriesuid>.raw; MetaImage, read with SimpleITK)
  candidates_V2.csv      seriesuid,coordX,coordY,coordZ,class
  annotations.csv        seriesuid,coordX,coordY,coordZ,diameter_mm

Axis conventions (the bugs of this field are axis-order and unit bugs):
  world / physical points  (x, y, z) in mm, as in the CSVs and in SimpleITK;
  numpy voxel indices      (z, y, x), as returned by sitk.GetArrayFromImage.
A voxel index (i, j, k) = (x, y, z) index of SimpleITK maps to the world point
  origin + direction @ (spacing * (i, j, k)),
so the image's DIRECTION matters: LUNA16 has scans with flipped axes.

This module imports no JAX: preprocessing workers load it.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re

import numpy as np
import SimpleITK as sitk

from jaxmed.errors import UserError

AIR_HU = -1000  # Value of every voxel outside the scanned volume.
CANDIDATE_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'class')
ANNOTATION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm')
INTERPOLATORS = {'linear': sitk.sitkLinear, 'bspline': sitk.sitkBSpline}
_SUBSET_RE = re.compile(r'^subset(\d+)$')


class DataError(UserError, ValueError):
  """Bad input data a user can fix (missing folder or file, bad CSV, unreadable scan).

  The message is one line naming the file and the fix.
  """


@dataclasses.dataclass(frozen=True)
class Scan:
  """Where one scan lives: its LUNA16 subset and its .mhd file."""
  seriesuid: str
  subset: int
  mhd_path: str

  @property
  def raw_path(self) -> str:
    """The file holding its voxels, as its header's ElementDataFile names it (data_file_path)."""
    return data_file_path(self.mhd_path)


def resolve(raw_dir: str, name: str) -> str:
  """A CSV path from the config: relative to `raw_dir` unless absolute."""
  return name if os.path.isabs(name) else os.path.join(raw_dir, name)


def find_scans(raw_dir: str) -> dict[str, Scan]:
  """All scans `raw_dir/subset<k>/<seriesuid>.mhd`, keyed by seriesuid.

  Raises DataError if `raw_dir` does not exist.
  """
  if not os.path.isdir(raw_dir):
    raise DataError(
        f'raw folder {raw_dir} does not exist: put LUNA16 (subset*/ + CSVs) there, set '
        '--config.data.raw_dir, or make synthetic scans with --mode=synthesize')
  scans = {}
  for mhd_path in sorted(glob.glob(os.path.join(raw_dir, 'subset*', '*.mhd'))):
    match = _SUBSET_RE.match(os.path.basename(os.path.dirname(mhd_path)))
    if match is None:
      continue
    uid = os.path.splitext(os.path.basename(mhd_path))[0]
    scans[uid] = Scan(uid, int(match.group(1)), mhd_path)
  return scans


def read_csv(path: str, columns: tuple[str, ...],
             config_key: str | None = None) -> dict[str, np.ndarray]:
  """Reads the named columns of a CSV with a header row (`config_key`: its config key, if any).

  Returns column -> array: 'seriesuid' as str objects, 'class' as int64, the rest float64.
  Raises DataError naming the file (and the column) if it is missing, lacks a column or holds a
  value that is not a number.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    fix = (f'put it there or set --config.data.{config_key}' if config_key else
           f'pass the path of a CSV with columns {",".join(columns)}')
    raise DataError(f'CSV file {path} does not exist: {fix}')
  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    header = [name.strip() for name in next(reader, [])]
    missing = [c for c in columns if c not in header]
    if missing:
      raise DataError(f'CSV file {path} lacks column {", ".join(missing)} (header: '
                      f'{",".join(header) or "empty"}); expected {",".join(columns)}')
    where = [header.index(c) for c in columns]
    rows = []
    for line, row in enumerate(reader, start=2):
      if not row:
        continue
      if len(row) <= max(where):
        raise DataError(f'CSV file {path}: line {line} has {len(row)} fields, the header '
                        f'{len(header)}; fix or remove that line')
      rows.append([row[i] for i in where])
  out = {}
  for col_index, name in enumerate(columns):
    values = [row[col_index] for row in rows]
    if name == 'seriesuid':  # ' 1.3.6...' and '1.3.6... ' name the same scan.
      out[name] = np.array([v.strip() for v in values], dtype=object)
      continue
    try:
      out[name] = np.array(values, dtype=np.float64)
    except ValueError:
      bad = next(i for i, v in enumerate(values) if not _is_number(v))
      raise DataError(f'CSV file {path}: column {name} has {values[bad]!r} on data row '
                      f'{bad + 1}, not a number; fix or remove that row') from None
  if 'class' in out:
    out['class'] = out['class'].astype(np.int64)
  return out


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def read_candidates(path: str) -> dict[str, np.ndarray]:
  """candidates_V2.csv: seriesuid, coordX/Y/Z (world mm), class (1 = nodule)."""
  return read_csv(path, CANDIDATE_COLUMNS, 'candidates_csv')


def read_annotations(path: str) -> dict[str, np.ndarray]:
  """annotations.csv: seriesuid, coordX/Y/Z (world mm), diameter_mm."""
  return read_csv(path, ANNOTATION_COLUMNS, 'annotations_csv')


_ELEMENT_BYTES = {'MET_CHAR': 1, 'MET_UCHAR': 1, 'MET_SHORT': 2, 'MET_USHORT': 2, 'MET_INT': 4,
                  'MET_UINT': 4, 'MET_LONG': 8, 'MET_ULONG': 8, 'MET_FLOAT': 4, 'MET_DOUBLE': 8}


def _read_mhd_header(mhd_path: str) -> dict[str, str]:
  """The `key = value` lines of a MetaImage header."""
  header = {}
  try:
    with open(mhd_path, 'r', errors='replace') as f:
      for line in f:
        key, sep, value = line.partition('=')
        if sep:
          header[key.strip()] = value.strip()
        if key.strip() == 'ElementDataFile':
          break  # Data (LOCAL) or nothing follows.
  except OSError as e:
    raise DataError(f'scan file {mhd_path} cannot be opened ({e.strerror})') from None
  return header


def _data_file(mhd_path: str, header: dict[str, str]) -> str:
  data_file = header.get('ElementDataFile', '')
  if not data_file:
    raise DataError(f'scan file {mhd_path} has no ElementDataFile entry (the MetaImage header '
                    'line naming its data file); re-download or regenerate it')
  if data_file == 'LOCAL':
    return mhd_path
  # MetaImage names the data file relative to the header's folder (or absolutely).
  return os.path.join(os.path.dirname(mhd_path), data_file)


def data_file_path(mhd_path: str) -> str:
  """The path of the file holding the voxels of a MetaImage scan: the one its ElementDataFile
  header entry names, relative to the .mhd's folder (often <stem>.raw, but any name is valid),
  or the .mhd itself when the voxels follow its header (ElementDataFile = LOCAL).

  Raises DataError if the .mhd cannot be read or names no data file.
  """
  return _data_file(mhd_path, _read_mhd_header(mhd_path))


def read_scan(mhd_path: str) -> sitk.Image:
  """Reads one scan (.mhd + its .raw) as a SimpleITK image in HU.

  Raises DataError naming the file if it is missing, truncated or unreadable.
  """
  if not os.path.isfile(mhd_path):
    raise DataError(f'scan file {mhd_path} does not exist; restore it or remove the scan')
  header = _read_mhd_header(mhd_path)
  raw_path = _data_file(mhd_path, header)
  if raw_path != mhd_path and header.get('CompressedData', 'False') == 'False':
    # A truncated .raw otherwise reads as a misleading ITK message: check its size first.
    if not os.path.isfile(raw_path):
      raise DataError(f'scan file {raw_path} (data of {mhd_path}) does not exist; restore it '
                      'or remove the scan')
    try:
      dims = [int(v) for v in header['DimSize'].split()]
      expected = int(np.prod(dims)) * _ELEMENT_BYTES[header['ElementType']] * int(
          header.get('ElementNumberOfChannels', '1'))
    except (KeyError, ValueError):
      expected = None  # Unusual header: let SimpleITK judge it.
    actual = os.path.getsize(raw_path)
    if expected is not None and actual < expected:
      raise DataError(f'scan file {raw_path} is truncated ({actual} of {expected} bytes); '
                      're-download or regenerate it')
  try:
    image = sitk.ReadImage(mhd_path)
  except RuntimeError as e:
    lines = [line for line in str(e).splitlines() if 'ERROR' in line] or ['unreadable']
    raise DataError(f'scan {mhd_path} cannot be read ({lines[-1].strip()[:200]}); '
                    're-download or regenerate it') from None
  if image.GetDimension() != 3:
    raise DataError(f'scan {mhd_path} has {image.GetDimension()} dimensions, expected 3')
  return image


# ---- geometry -----------------------------------------------------------------------------

def index_to_world_matrix(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
  """(M, origin) with world (x, y, z) = origin + M @ (i, j, k), M = direction @ diag(spacing)."""
  direction = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
  spacing = np.asarray(image.GetSpacing(), np.float64)
  return direction * spacing[None, :], np.asarray(image.GetOrigin(), np.float64)


def world_to_voxel(image: sitk.Image, points_xyz: np.ndarray) -> np.ndarray:
  """World points (N, 3) as (x, y, z) mm -> continuous voxel indices (N, 3) as (z, y, x).

  Uses the image's own origin, spacing and direction (the same as SimpleITK's
  TransformPhysicalPointToContinuousIndex, reversed into numpy order). Index 0 is the centre of
  the first voxel.
  """
  matrix, origin = index_to_world_matrix(image)
  points = np.asarray(points_xyz, np.float64).reshape(-1, 3)
  index_ijk = np.linalg.solve(matrix, (points - origin).T).T  # (x, y, z) order.
  return index_ijk[:, ::-1]


def voxel_to_world(image: sitk.Image, index_zyx: np.ndarray) -> np.ndarray:
  """Continuous voxel indices (N, 3) as (z, y, x) -> world points (N, 3) as (x, y, z) mm."""
  matrix, origin = index_to_world_matrix(image)
  index = np.asarray(index_zyx, np.float64).reshape(-1, 3)[:, ::-1]
  return origin + index @ matrix.T


def resample_isotropic(image: sitk.Image, spacing_mm: float,
                       interpolator: str = 'linear') -> sitk.Image:
  """Resamples the whole scan onto an isotropic identity-direction grid covering it (int16 HU).

  The output's index axes are world x, y, z (increasing): the canonical orientation of
  crop_cubes, which preprocessing uses instead (cheaper: it interpolates only near candidates).
  This is for viewing scans and as the reference crop_cubes is tested against. Points outside
  the original volume read AIR_HU.
  """
  if interpolator not in INTERPOLATORS:
    raise DataError(f'interpolator {interpolator!r} is not one of {sorted(INTERPOLATORS)}; '
                    'set --config.data.interpolator')
  size = np.asarray(image.GetSize())
  corners_ijk = np.array(np.meshgrid(*[[0, n - 1] for n in size], indexing='ij')).reshape(3, -1).T
  corners = voxel_to_world(image, corners_ijk[:, ::-1])
  low, high = corners.min(axis=0), corners.max(axis=0)
  # The tiny tolerance keeps float error from dropping the last plane of an exact multiple.
  out_size = np.floor((high - low) / spacing_mm + 1e-6).astype(int) + 1
  return sitk.Resample(image, [int(n) for n in out_size], sitk.Transform(),
                       INTERPOLATORS[interpolator], [float(v) for v in low],
                       [float(spacing_mm)] * 3, [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                       float(AIR_HU), sitk.sitkInt16)


def crop_cubes(image: sitk.Image, centers_world: np.ndarray, size: int, spacing_mm: float,
               interpolator: str = 'linear') -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Resamples a cube of edge `size` voxels of `spacing_mm` centred EXACTLY on each candidate.

  Each cube lies on an identity-direction grid (axes (z, y, x) = world z, y, x increasing,
  whatever the scan's direction), with the candidate at its geometric centre, index
  (size - 1) / 2 on every axis. Only the scan voxels near each cube are interpolated, which is
  cheaper than resampling the whole scan for LUNA16's ~850 candidates per scan.

  Args: centers_world (K, 3) world (x, y, z) mm.
  Returns (crops (K, size, size, size) int16 HU with AIR_HU outside the scan,
  padded (K,) bool: the cube reaches outside the scan, outside (K,) bool: its centre does).
  """
  if interpolator not in INTERPOLATORS:
    raise DataError(f'interpolator {interpolator!r} is not one of {sorted(INTERPOLATORS)}; '
                    'set --config.data.interpolator')
  centers = np.asarray(centers_world, np.float64).reshape(-1, 3)
  k = len(centers)
  half = (size - 1) / 2 * spacing_mm
  offsets = np.array(np.meshgrid(*[[-half, half]] * 3, indexing='ij')).reshape(3, -1).T
  corners = world_to_voxel(image, (centers[:, None, :] + offsets[None]).reshape(-1, 3))
  corners = corners.reshape(k, 8, 3)  # (z, y, x) continuous indices of each cube's corners.
  shape = np.asarray(image.GetSize())[::-1]
  inside = lambda index: np.all((index >= -0.5) & (index <= shape - 0.5), axis=-1)
  padded = ~np.all(inside(corners), axis=1)
  outside = ~inside(world_to_voxel(image, centers))
  # B-spline coefficients depend on neighbours: a wider block keeps its edges out of the cube.
  margin = 6 if interpolator == 'bspline' else 2
  lows = np.maximum(np.floor(corners.min(axis=1)).astype(np.int64) - margin, 0)
  highs = np.minimum(np.ceil(corners.max(axis=1)).astype(np.int64) + margin + 1, shape)
  matrix, origin = index_to_world_matrix(image)
  volume = sitk.GetArrayViewFromImage(image)  # (z, y, x), no copy.
  crops = np.full((k, size, size, size), AIR_HU, np.int16)
  spacing, direction = image.GetSpacing(), image.GetDirection()
  resample = sitk.ResampleImageFilter()  # One filter for all cubes: its setup is not free.
  resample.SetInterpolator(INTERPOLATORS[interpolator])
  resample.SetSize([size] * 3)
  resample.SetOutputSpacing((float(spacing_mm),) * 3)
  resample.SetOutputDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
  resample.SetDefaultPixelValue(float(AIR_HU))
  resample.SetOutputPixelType(sitk.sitkInt16)
  for row in range(k):
    lo, hi = lows[row], highs[row]
    if np.any(hi <= lo):
      continue  # Wholly outside the scan: all air.
    block = sitk.GetImageFromArray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    block.SetSpacing(spacing)
    block.SetDirection(direction)
    block.SetOrigin(tuple(origin + matrix @ lo[::-1].astype(np.float64)))
    resample.SetOutputOrigin(tuple(centers[row] - half))
    cube = resample.Execute(block)  # Named: a view does not keep its image alive.
    crops[row] = sitk.GetArrayViewFromImage(cube)
  return crops, padded, outside
