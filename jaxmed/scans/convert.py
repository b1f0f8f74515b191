"""Writes scans as DICOM series or NIfTI with SimpleITK, e.g. synthetic scans to try --mode=predict.

  python -m jaxmed.scans.convert --format=dicom --candidates=data/raw/synthetic/candidates_V2.csv \
      data/raw/synthetic/subset9 data/raw/synthetic_dicom/subset9

writes each scan under the input folder as <output>/<seriesuid>/<slice>.dcm (or, with
--format=nifti, <output>/<seriesuid>.nii.gz), each complete or not at all, and with --candidates
<output>/candidates.csv: that CSV's rows of the converted scans.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys

import SimpleITK as sitk

from jaxmed import files
from jaxmed.scans import scan_formats
from jaxmed.scans.luna16 import DataError

FORMATS = ('dicom', 'nifti')
_RESCALE_INTERCEPT = -1024  # What CT scanners store: unsigned HU + 1024.


def _decimal_string(value: float) -> str:
  """DICOM decimal string: at most 16 characters, as many significant digits as fit."""
  for digits in range(15, 3, -1):
    text = f'{float(value):.{digits}g}'
    if len(text) <= 16:
      return text
  raise ValueError(f'{value} does not fit a DICOM decimal string')


def _uid(*parts: str) -> str:
  """A deterministic DICOM UID under the 2.25 root (a UUID-sized integer, < 64 characters)."""
  digest = hashlib.sha256('/'.join(parts).encode()).digest()[:16]
  return '2.25.' + str(int.from_bytes(digest, 'big'))


def write_dicom_series(image: sitk.Image, folder: str, seriesuid: str,
                       modality: str = 'CT') -> list[str]:
  """Writes a 3D HU image as one DICOM series, one file per slice (k = third index axis).

  Each slice carries the tags a reader needs to rebuild the volume in world mm: Study / Series /
  SOP Instance and Frame of Reference UIDs, ImagePositionPatient (world (x, y, z) of the slice's
  first voxel), ImageOrientationPatient (the first two direction columns), PixelSpacing (from
  the image), SliceThickness, Modality and RescaleSlope / RescaleIntercept. A scan whose third
  direction column opposes row x column (a z-flipped LUNA16 scan) stays the same volume: readers
  sort slices by position. Returns the file paths, slice order.
  """
  if len(seriesuid) > 64:
    raise DataError(f'seriesuid {seriesuid} is longer than a DICOM UID (64 characters)')
  os.makedirs(folder, exist_ok=True)
  hu = sitk.Cast(image, sitk.sitkInt16)
  direction = image.GetDirection()  # Row-major 3x3: column j is index axis j in world.
  orientation = (direction[0], direction[3], direction[6], direction[1], direction[4],
                 direction[7])
  common = {
      '0008|0060': modality,
      '0008|0008': 'DERIVED\\SECONDARY',
      '0008|103e': 'jaxmed conversion',
      '0020|000d': _uid(seriesuid, 'study'),
      '0020|000e': seriesuid,
      '0020|0052': _uid(seriesuid, 'frame'),
      '0020|0037': '\\'.join(_decimal_string(v) for v in orientation),
      '0018|0050': _decimal_string(image.GetSpacing()[2]),
      '0028|1052': str(_RESCALE_INTERCEPT),
      '0028|1053': '1',
  }
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()  # Else the writer makes up new UIDs and splits the series.
  paths = []
  for k in range(image.GetDepth()):
    slice_image = hu[:, :, k]
    for tag, value in common.items():
      slice_image.SetMetaData(tag, value)
    position = image.TransformIndexToPhysicalPoint((0, 0, k))
    slice_image.SetMetaData('0020|0032', '\\'.join(_decimal_string(v) for v in position))
    slice_image.SetMetaData('0020|0013', str(k + 1))  # InstanceNumber.
    slice_image.SetMetaData('0008|0018', _uid(seriesuid, 'slice', str(k)))
    path = os.path.join(folder, f'{k:04d}.dcm')
    writer.SetFileName(path)
    writer.Execute(slice_image)
    paths.append(path)
  return paths


def write_nifti(image: sitk.Image, path: str) -> str:
  """Writes the image as NIfTI (.nii or .nii.gz); SimpleITK turns ITK's LPS into NIfTI's RAS."""
  sitk.WriteImage(image, path, True)
  return path


def convert_scans(scans_dir: str, out_dir: str, fmt: str,
                  candidates_csv: str | None = None) -> dict:
  """Writes every scan under `scans_dir` into `out_dir` in `fmt` ('dicom' or 'nifti').

  With `candidates_csv`, also writes out_dir/candidates.csv holding its rows of those scans.
  Returns {'scans': count, 'candidates': rows written or None}.
  """
  if fmt not in FORMATS:
    raise DataError(f'format {fmt!r} is not one of {", ".join(FORMATS)}; pass --format=dicom or '
                    '--format=nifti')
  scans = scan_formats.find_scans(scans_dir, setting='SCANS_DIR (the first argument)')
  rows = None
  if candidates_csv is not None:  # Read first: a bad CSV stops before any scan is written.
    if not os.path.isfile(candidates_csv):
      raise DataError(f'candidates CSV {candidates_csv} does not exist; pass --candidates=PATH '
                      'of a CSV with seriesuid,coordX,coordY,coordZ')
    with open(candidates_csv, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      header = [name.strip() for name in next(reader, [])]
      if 'seriesuid' not in header:
        raise DataError(f'candidates CSV {candidates_csv} has no seriesuid column; pass a LUNA16 '
                        'candidates CSV')
      column = header.index('seriesuid')
      rows = [row for row in reader if row and row[column].strip() in scans]
  os.makedirs(out_dir, exist_ok=True)
  for scan in scans.values():
    image = scan_formats.read_scan(scan)
    if fmt == 'dicom':
      final, tmp = (os.path.join(out_dir, name) for name in (scan.seriesuid,
                                                              f'.{scan.seriesuid}.partial'))
      shutil.rmtree(tmp, ignore_errors=True)  # Left by an interrupted run.
      write_dicom_series(image, tmp, scan.seriesuid)
      shutil.rmtree(final, ignore_errors=True)
      os.replace(tmp, final)
    else:
      final = os.path.join(out_dir, scan.seriesuid + '.nii.gz')
      tmp = os.path.join(out_dir, f'.{scan.seriesuid}.partial.nii.gz')
      write_nifti(image, tmp)
      os.replace(tmp, final)
  if rows is not None:
    with files.atomic_write(os.path.join(out_dir, 'candidates.csv'), 'w', newline='') as f:
      writer = csv.writer(f, lineterminator='\n')
      writer.writerow(header)
      writer.writerows(rows)
  return {'scans': len(scans), 'candidates': None if rows is None else len(rows)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m jaxmed.scans.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--format', required=True, choices=FORMATS)
  parser.add_argument('--candidates', default=None,
                      help='candidates CSV: its rows of the converted scans go to '
                           'OUTPUT/candidates.csv')
  parser.add_argument('scans_dir', help='folder of scans (.mhd, .nii(.gz), DICOM series)')
  parser.add_argument('output_dir')
  args = parser.parse_args(argv)
  from jaxmed.errors import exit_with_one_line
  with exit_with_one_line():
    summary = convert_scans(args.scans_dir, args.output_dir, args.format, args.candidates)
  candidates = ('' if summary['candidates'] is None else
                f' and {summary["candidates"]} candidates to {args.output_dir}/candidates.csv')
  print(f'wrote {summary["scans"]} scans as {args.format} to {args.output_dir}{candidates}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
