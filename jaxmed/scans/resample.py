"""Whole scans on the detector's grid: resampled to isotropic `spacing_mm`, identity direction.

A `Volume` is a scan resampled (luna16.resample_isotropic: through the scan's own origin,
spacing and DIRECTION, -1000 HU outside it) onto the grid whose axes are world z, y, x,
increasing, so that world (x, y, z) mm = origin_xyz + spacing_mm * (x, y, z) voxel index.
The volumes file stores these; whole-scan detection reads new scans through resample_scan.
This module imports no JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from jaxmed.scans import luna16


@dataclasses.dataclass(frozen=True)
class Volume:
  """A scan on an isotropic identity-direction grid.

  hu: int16 (D, H, W) HU, axes (z, y, x) = world z, y, x increasing.
  origin_xyz: float64 (3,) world (x, y, z) mm of voxel (0, 0, 0)'s centre.
  spacing_mm: the grid's isotropic spacing, mm.
  """
  hu: np.ndarray
  origin_xyz: np.ndarray
  spacing_mm: float

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(int(n) for n in self.hu.shape)

  def voxel_to_world(self, zyx: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (N, 3) as (z, y, x) -> world points (N, 3) as (x, y, z) mm."""
    return voxel_to_world(zyx, self.origin_xyz, self.spacing_mm)

  def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
    """World points (N, 3) as (x, y, z) mm -> continuous voxel indices (N, 3) as (z, y, x)."""
    return world_to_voxel(xyz, self.origin_xyz, self.spacing_mm)


def voxel_to_world(zyx: np.ndarray, origin_xyz: np.ndarray, spacing_mm: float) -> np.ndarray:
  """(N, 3) (z, y, x) voxel indices of an identity-direction grid -> (N, 3) (x, y, z) mm."""
  zyx = np.asarray(zyx, np.float64).reshape(-1, 3)
  return np.asarray(origin_xyz, np.float64) + float(spacing_mm) * zyx[:, ::-1]


def world_to_voxel(xyz: np.ndarray, origin_xyz: np.ndarray, spacing_mm: float) -> np.ndarray:
  """(N, 3) (x, y, z) mm -> (N, 3) continuous (z, y, x) voxel indices (index 0 = voxel centre)."""
  xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
  return ((xyz - np.asarray(origin_xyz, np.float64)) / float(spacing_mm))[:, ::-1]


def check_spacing(spacing_mm: float, key: str = 'detect.spacing_mm') -> float:
  """spacing_mm as a float; DataError (one line) unless it is a positive number of mm."""
  try:
    spacing = float(spacing_mm)
  except (TypeError, ValueError):
    spacing = float('nan')
  if not spacing > 0:
    raise luna16.DataError(f'{key} is {spacing_mm}, must be > 0 (mm); set --config.{key}')
  return spacing


def resample_scan(image: sitk.Image, spacing_mm: float, interpolator: str = 'linear') -> Volume:
  """Resamples the whole scan onto the isotropic identity-direction grid covering its world box.

  The grid starts at the lowest world corner of the scan's voxel centres; points outside the
  scan read -1000 HU. Raises DataError for a non-positive spacing or an unknown interpolator.
  """
  spacing = check_spacing(spacing_mm)
  resampled = luna16.resample_isotropic(image, spacing, interpolator)
  return Volume(hu=sitk.GetArrayFromImage(resampled),
                origin_xyz=np.asarray(resampled.GetOrigin(), np.float64), spacing_mm=spacing)
