"""Centre-point targets: where a nodule centre falls on the detector's output grid, the Gaussian
heatmap around it, and decode_center, the one rule that turns a cell and its offset back into
input voxels (inference decodes with it; nothing else spells the convention out).

The grid (output stride s = detect.stride). Input voxel coordinates are numpy indices (z, y, x),
a voxel's centre at its integer index, continuous in between. Output cell (i, j, k) covers the
input voxels s*i ... s*i + s - 1 along each axis, i.e. the coordinates s*i <= c < s*(i + 1).
A centre c lies in cell floor(c / s), at offset c / s - floor(c / s) in [0, 1) OUTPUT voxels,
and decodes as (cell + offset) * s. Cell-corner based: offset 0 is the cell's first input
voxel; the mean of its voxel indices, s*i + (s - 1) / 2, is offset (s - 1) / (2 s) (0.375 for
s = 4), not 0.5.

The heatmap (CenterNet, Zhou et al. 2019): each nodule puts exp(-|g - cell|^2 / (2 sigma^2)) on
every grid cell g, exactly 1 at its own cell; several nodules take the maximum. sigma follows the
nodule's radius r in OUTPUT voxels (diameter_mm / 2 / spacing_mm / s): sigma = max(
sigma_per_radius * r, min_sigma), so a 30 mm nodule spreads over several cells and a 3 mm one
stays on about one.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def center_cells(centers: jax.Array, stride: int,
                 grid_shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """(cells int32 (..., 3), offsets float32 (..., 3)) of centres (..., 3) in input voxels (z, y, x).

  cells = floor(centers / stride), clamped into the grid (a centre on the far face of a patch
  belongs to its last cell); offsets = centers / stride - cells, in output voxels.
  """
  scaled = jnp.asarray(centers, jnp.float32) / stride
  cells = jnp.clip(jnp.floor(scaled).astype(jnp.int32), 0,
                   jnp.asarray(grid_shape, jnp.int32) - 1)
  return cells, scaled - cells


def decode_center(cell_zyx, offset, stride: int):
  """Input voxel (z, y, x) of a centre from its cell (..., 3) and offset (..., 3) in output
  voxels: (cell + offset) * stride. NumPy in, NumPy out; jax in, jax out."""
  xp = jnp if isinstance(cell_zyx, jax.Array) or isinstance(offset, jax.Array) else np
  return (xp.asarray(cell_zyx, xp.float32) + xp.asarray(offset, xp.float32)) * stride


def sigma_cells(diameters_mm: jax.Array, spacing_mm: float, stride: int,
                sigma_per_radius: float, min_sigma: float) -> jax.Array:
  """Gaussian sigma in output voxels for nodules of these diameters (module docstring)."""
  radius = jnp.asarray(diameters_mm, jnp.float32) / (2.0 * spacing_mm * stride)
  return jnp.maximum(sigma_per_radius * radius, min_sigma)


def gaussian_heatmap(cells: jax.Array, sigmas: jax.Array, valid: jax.Array,
                     grid_shape: Sequence[int]) -> jax.Array:
  """Heatmap targets float32 (B, d, h, w) in [0, 1] of nodules at `cells` int (B, K, 3) with
  `sigmas` (B, K) output voxels; `valid` (B, K) 1 for a nodule, 0 for a padding slot.

  The maximum over the nodules of their Gaussians; 1 exactly at each nodule's own cell.
  """
  axes = [jnp.arange(n, dtype=jnp.float32) for n in grid_shape]
  heatmap = jnp.zeros((cells.shape[0], *grid_shape), jnp.float32)
  for k in range(cells.shape[1]):  # K is small (detect.max_nodules_per_patch): a running max.
    c = cells[:, k].astype(jnp.float32)
    dz, dy, dx = ((a[None] - c[:, i, None]) ** 2 for i, a in enumerate(axes))
    squared = dz[:, :, None, None] + dy[:, None, :, None] + dx[:, None, None, :]
    two_var = 2.0 * jnp.square(sigmas[:, k])[:, None, None, None]
    bump = jnp.exp(-squared / two_var) * (valid[:, k] > 0)[:, None, None, None]
    heatmap = jnp.maximum(heatmap, bump)
  return heatmap


def build_targets(centers: jax.Array, diameters_mm: jax.Array, valid: jax.Array,
                  grid_shape: Sequence[int], *, stride: int, spacing_mm: float,
                  sigma_per_radius: float, min_sigma: float) -> dict[str, jax.Array]:
  """Everything the loss compares the detector's outputs with, from a batch's nodules.

  centers float (B, K, 3) patch input voxels (z, y, x); diameters_mm (B, K); valid (B, K).
  Returns heatmap (B, d, h, w), cells int32 (B, K, 3), offset (B, K, 3) output voxels,
  log_diameter (B, K) (log mm; 0 where not valid) and valid float32 (B, K).
  """
  valid = jnp.asarray(valid, jnp.float32)
  cells, offset = center_cells(centers, stride, grid_shape)
  sigmas = sigma_cells(diameters_mm, spacing_mm, stride, sigma_per_radius, min_sigma)
  diameters = jnp.where(valid > 0, jnp.asarray(diameters_mm, jnp.float32), 1.0)
  return {'heatmap': gaussian_heatmap(cells, sigmas, valid, grid_shape), 'cells': cells,
          'offset': offset, 'log_diameter': jnp.log(diameters), 'valid': valid}
