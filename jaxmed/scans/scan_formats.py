"""Scans as MetaImage (.mhd/.raw), NIfTI (.nii, .nii.gz) or DICOM series: find, check and read.

A seriesuid is the file stem, or a DICOM series' SeriesInstanceUID (one series per folder, slices
ordered by position and checked: CT, one orientation, evenly spaced); SimpleITK turns NIfTI's RAS
into the LPS world (x, y, z) mm of the CSVs. This module imports no JAX.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import SimpleITK as sitk

from jaxmed.scans import luna16
from jaxmed.scans.luna16 import DataError

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
# Relative deviation of a slice gap from the series' median gap that still counts as even.
SLICE_GAP_TOLERANCE = 0.01
# DICOM tags (group|element), as SimpleITK names them.
TAG_MODALITY = '0008|0060'
TAG_POSITION = '0020|0032'  # ImagePositionPatient: world (x, y, z) mm of the first voxel.
TAG_ORIENTATION = '0020|0037'  # ImageOrientationPatient: row then column direction cosines.
TAG_IMAGE_TYPE = '0008|0008'  # e.g. ORIGINAL\PRIMARY\AXIAL, or ...\LOCALIZER for a scout.
TAG_FRAMES = '0028|0008'  # NumberOfFrames: > 1 in an enhanced (multi-frame) file.
TAG_SOP_CLASS = '0008|0016'
ENHANCED_CT_SOP_CLASS = '1.2.840.10008.5.1.4.1.1.2.1'
# Slices closer than this fraction of the usual gap are one slice twice (two exports, two
# reconstructions), not a thin slab.
DUPLICATE_GAP_FRACTION = 0.05


class DicomSeriesError(DataError):
  """A DICOM folder jaxmed cannot read as one CT volume (several series, gaps, not CT)."""


@dataclasses.dataclass(frozen=True)
class ScanFile:
  """One scan on disk: `path` is the .mhd / .nii(.gz) file, or the folder of a DICOM series
  whose `slices` are its files in the order of their position."""
  seriesuid: str
  format: str  # 'mhd', 'nifti' or 'dicom'
  path: str
  slices: tuple[str, ...] = ()
  unreadable: tuple[str, ...] = ()  # DICOM-looking files of the folder that are in no series.


def _stem(filename: str) -> tuple[str, str] | None:
  """(stem, format) of a MetaImage or NIfTI file name, None for any other file."""
  lower = filename.lower()
  if lower.endswith('.mhd'):
    return filename[:-4], 'mhd'
  for suffix in NIFTI_SUFFIXES:
    if lower.endswith(suffix):
      return filename[:-len(suffix)], 'nifti'
  return None


def _looks_like_dicom(path: str) -> bool:
  """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; some only a .dcm name."""
  if path.lower().endswith('.dcm'):
    return True
  try:
    with open(path, 'rb') as f:
      f.seek(128)
      return f.read(4) == b'DICM'
  except OSError:
    return False


def _dicom_series(folder: str, names: list[str]) -> ScanFile | None:
  """The one DICOM series of `folder` (None if it holds no DICOM file)."""
  dicom_like = [os.path.join(folder, n) for n in names
                if _looks_like_dicom(os.path.join(folder, n))]
  if not dicom_like:
    return None
  series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
  if not series:
    return None
  if len(series) > 1:
    raise DicomSeriesError(
        f'folder {folder} holds {len(series)} DICOM series ({", ".join(series[:3])}'
        f'{", ..." if len(series) > 3 else ""}); move each series into a folder of its own')
  uid = series[0]
  slices = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
  in_series = {os.path.normpath(p) for p in slices}
  unreadable = tuple(sorted({os.path.normpath(p) for p in dicom_like} - in_series))
  return ScanFile(uid, 'dicom', folder, slices, unreadable)


def find_scans(scans_dir: str,
               setting: str = '--config.predict.scans_dir') -> dict[str, ScanFile]:
  """Every scan under `scans_dir` (any depth), keyed by seriesuid, in path order.

  `setting` names, in error messages, where the user gave the folder.

  Raises DataError for a missing or scan-less folder or two scans with one seriesuid, and
  DicomSeriesError for a folder holding several DICOM series.
  """
  if not os.path.isdir(scans_dir):
    raise DataError(f'scans folder {scans_dir} does not exist; set {setting} to a '
                    'folder of .mhd/.raw, .nii(.gz) files or DICOM series folders')
  scans: dict[str, ScanFile] = {}

  def add(scan: ScanFile) -> None:
    if scan.seriesuid in scans:
      raise DataError(f'two scans have seriesuid {scan.seriesuid}: {scans[scan.seriesuid].path} '
                      f'and {scan.path}; keep one of them in {scans_dir}')
    scans[scan.seriesuid] = scan

  for folder, subfolders, names in os.walk(scans_dir):
    subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))  # .partial: unfinished.
    names = sorted(n for n in names if not n.startswith('.'))
    for name in names:
      found = _stem(name)
      if found:
        add(ScanFile(found[0], found[1], os.path.join(folder, name)))
    other = [n for n in names if _stem(n) is None and not n.lower().endswith('.raw')]
    series = _dicom_series(folder, other) if other else None
    if series:
      add(series)
  if not scans:
    raise DataError(f'scans folder {scans_dir} holds no scan (.mhd, .nii, .nii.gz or a folder '
                    f'of DICOM slices); put the scans there or fix {setting}')
  return scans


# ---- geometry from headers ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where a scan's voxels lie, read from headers only: `size_xyz` voxels and `grid`, a 1-voxel
  image carrying the scan's origin, spacing and direction (for luna16.world_to_voxel)."""
  size_xyz: tuple[int, int, int]
  grid: sitk.Image

  def outside(self, centers_world: np.ndarray) -> np.ndarray:
    """(K,) bool: the world (x, y, z) mm point lies outside the volume (as crop_cubes says)."""
    index = luna16.world_to_voxel(self.grid, centers_world)  # (z, y, x)
    shape = np.asarray(self.size_xyz)[::-1]
    return ~np.all((index >= -0.5) & (index <= shape - 0.5), axis=-1)


def _geometry(size_xyz, spacing, origin, direction) -> Geometry:
  grid = sitk.Image(1, 1, 1, sitk.sitkUInt8)
  grid.SetSpacing([float(v) for v in spacing])
  grid.SetOrigin([float(v) for v in origin])
  grid.SetDirection([float(v) for v in direction])
  return Geometry(tuple(int(n) for n in size_xyz), grid)


def read_geometry(scan: ScanFile) -> Geometry:
  """The scan's voxel grid from its header (DICOM: all slice headers, check_dicom_series)."""
  if scan.format == 'dicom':
    return check_dicom_series(scan)
  reader = sitk.ImageFileReader()
  reader.SetFileName(scan.path)
  try:
    reader.ReadImageInformation()
  except RuntimeError:
    raise DataError(f'scan {scan.path} has an unreadable header; re-export or remove it') from None
  if reader.GetDimension() != 3:
    raise DataError(f'scan {scan.path} has {reader.GetDimension()} dimensions, not 3; remove it')
  return _geometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(),
                   reader.GetDirection())


# ---- DICOM checks ------------------------------------------------------------------------------

def _numbers(text: str, count: int, path: str, tag: str) -> np.ndarray:
  try:
    values = np.array([float(v) for v in text.strip().split('\\')], np.float64)
  except ValueError:
    values = np.zeros(0)
  if len(values) != count:
    raise DicomSeriesError(f'DICOM file {path} has tag {tag} = {text!r}, not {count} numbers; '
                           'fix or remove that file')
  return values


def _refuse_multiframe(reader: sitk.ImageFileReader, tags: set[str], path: str) -> None:
  """An enhanced (multi-frame) CT file holds a whole volume in one file, its slice positions in
  functional groups the classic series reader does not read: refused, naming it."""
  frames = reader.GetMetaData(TAG_FRAMES).strip() if TAG_FRAMES in tags else ''
  sop_class = (reader.GetMetaData(TAG_SOP_CLASS).strip().rstrip('\0') if TAG_SOP_CLASS in tags
               else '')
  if (frames.isdigit() and int(frames) > 1) or sop_class == ENHANCED_CT_SOP_CLASS:
    raise DicomSeriesError(
        f'DICOM file {path} is an enhanced multi-frame CT file ({frames or "several"} frames in '
        'one file); jaxmed reads classic series (one slice per file): convert it to '
        'single-frame files (e.g. dcm4che emf2sf) or to NIfTI (e.g. dcm2niix)')


def check_dicom_series(scan: ScanFile) -> Geometry:
  """Checks from the slices' headers alone: classic single-frame files (not an enhanced
  multi-frame one), no localizer (scout) image, Modality CT, one orientation, at least 2 slices,
  no slice twice (two closer than a twentieth of the usual gap), stacked along the slice normal
  (no gantry tilt), evenly spaced (a missing slice shows as a double gap).

  Returns the volume's geometry as the series reader builds it (first slice = lowest along the
  normal). Raises DicomSeriesError naming the folder, the slice and the fix.
  """
  where = f'DICOM series {scan.seriesuid} in {scan.path}'
  reader = sitk.ImageFileReader()
  if len(scan.slices) == 1:  # One file: perhaps a whole volume in one enhanced file.
    reader.SetFileName(scan.slices[0])
    try:
      reader.ReadImageInformation()
      _refuse_multiframe(reader, set(reader.GetMetaDataKeys()), scan.slices[0])
    except RuntimeError:
      pass  # Unreadable: the count below is the clearer message.
  if len(scan.slices) < 2:
    raise DicomSeriesError(f'{where} has {len(scan.slices)} slice; a CT volume needs at least '
                           '2: add its slices or remove the folder')
  positions, orientations, first = [], [], None
  for path in scan.slices:
    reader.SetFileName(path)
    try:
      reader.ReadImageInformation()
    except RuntimeError:
      raise DicomSeriesError(f'DICOM file {path} cannot be read; re-export the series or remove '
                             'that file') from None
    tags = set(reader.GetMetaDataKeys())
    _refuse_multiframe(reader, tags, path)
    image_type = reader.GetMetaData(TAG_IMAGE_TYPE).upper() if TAG_IMAGE_TYPE in tags else ''
    if 'LOCALIZER' in image_type.split('\\'):
      raise DicomSeriesError(
          f'{where}: slice {os.path.basename(path)} is a localizer (scout) image (ImageType '
          f'{image_type.strip()}), not a slice of the volume; remove that file from the folder')
    modality = reader.GetMetaData(TAG_MODALITY).strip() if TAG_MODALITY in tags else ''
    if modality != 'CT':
      raise DicomSeriesError(f'{where} has Modality {modality or "(none)"} ({path}), not CT; '
                             'jaxmed scores CT scans only: remove that series')
    for tag in (TAG_POSITION, TAG_ORIENTATION):
      if tag not in tags:
        raise DicomSeriesError(f'DICOM file {path} lacks tag {tag} (slice position or '
                               'orientation); re-export the series with it or remove that file')
    positions.append(_numbers(reader.GetMetaData(TAG_POSITION), 3, path, TAG_POSITION))
    orientations.append(_numbers(reader.GetMetaData(TAG_ORIENTATION), 6, path, TAG_ORIENTATION))
    if first is None:
      first = (reader.GetSize(), reader.GetSpacing())
  orientations = np.stack(orientations)
  name = lambda k: os.path.basename(scan.slices[k])
  bad = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > 1e-4)
  if len(bad):
    raise DicomSeriesError(f'{where}: slice {name(bad[0])} is oriented differently from slice '
                           f'{name(0)}; remove the slices that do not belong to the volume')
  normal = np.cross(orientations[0, :3], orientations[0, 3:])
  along = np.stack(positions) @ normal  # Each slice's position along the normal, mm.
  gaps = np.diff(along)
  close = np.abs(gaps) <= DUPLICATE_GAP_FRACTION * np.median(np.abs(gaps))
  if np.any(close):
    k = int(np.flatnonzero(close)[0])
    at = ('the same position' if gaps[k] == 0 else
          f'{abs(gaps[k]):.3g} mm apart (the series spaces its slices '
          f'{float(np.median(np.abs(gaps))):.3g} mm)')
    raise DicomSeriesError(f'{where}: slices {name(k)} and {name(k + 1)} lie at {at}: the same '
                           'slice twice; remove the duplicate slice')
  if not (np.all(gaps > 0) or np.all(gaps < 0)):
    k = int(np.flatnonzero(np.sign(gaps) != np.sign(gaps[0]))[0])
    raise DicomSeriesError(f'{where}: the series reader could not order the slices by position '
                           f'(slice {name(k + 1)} after {name(k)}); check their '
                           'ImagePositionPatient or remove the series')
  gaps = np.abs(gaps)
  median = float(np.median(gaps))
  # Slices must stack along their normal: a sideways step (gantry tilt) would be read as a box.
  steps = np.diff(np.stack(positions), axis=0)
  sideways = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
  if np.any(sideways > SLICE_GAP_TOLERANCE * median):
    k = int(np.argmax(sideways > SLICE_GAP_TOLERANCE * median))
    raise DicomSeriesError(
        f'{where}: slice {name(k + 1)} is shifted {sideways[k]:.3g} mm sideways from slice '
        f'{name(k)} (gantry tilt?); resample the series onto a grid along the slice normal or '
        'remove it')
  uneven = np.flatnonzero(np.abs(gaps - median) > SLICE_GAP_TOLERANCE * median)
  if len(uneven):
    k = int(uneven[0])
    fix = ('a missing slice? restore it or remove the series' if gaps[k] > 1.5 * median else
           'resample the series evenly or remove it')
    unreadable = (f' ({len(scan.unreadable)} file(s) of that folder, e.g. '
                  f'{os.path.basename(scan.unreadable[0])}, are unreadable as DICOM)'
                  if scan.unreadable else '')
    raise DicomSeriesError(
        f'{where}: uneven slice spacing, {gaps[k]:.4g} mm between slices {name(k)} and '
        f'{name(k + 1)} against {median:.4g} mm elsewhere{unreadable}; {fix}')
  lowest = int(np.argmin(along))
  direction = np.stack([orientations[0, :3], orientations[0, 3:], normal], axis=1)
  return _geometry((first[0][0], first[0][1], len(scan.slices)),
                   (first[1][0], first[1][1], median), positions[lowest], direction.ravel())


# ---- reading -----------------------------------------------------------------------------------

def _read_with_sitk(read, what: str) -> sitk.Image:
  try:
    image = read()
  except RuntimeError as e:
    lines = [line for line in str(e).splitlines() if 'ERROR' in line] or ['unreadable']
    raise DataError(f'{what} cannot be read ({lines[-1].strip()[:200]}); re-export or remove '
                    'it') from None
  if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
    raise DataError(f'{what} is not a 3D single-channel volume (size {image.GetSize()}, '
                    f'{image.GetNumberOfComponentsPerPixel()} channels); remove it')
  return image


def read_scan(scan: ScanFile, checked: bool = False) -> sitk.Image:
  """The scan as a SimpleITK image in HU (DICOM rescale slope/intercept applied).

  Raises DataError (DicomSeriesError for a DICOM series failing check_dicom_series, which
  `checked=True` says has already run).
  """
  if scan.format == 'mhd':
    return luna16.read_scan(scan.path)
  if scan.format == 'nifti':
    return _read_with_sitk(lambda: sitk.ReadImage(scan.path), f'scan {scan.path}')
  if not checked:
    check_dicom_series(scan)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(list(scan.slices))
  return _read_with_sitk(reader.Execute, f'DICOM series {scan.seriesuid} in {scan.path}')
