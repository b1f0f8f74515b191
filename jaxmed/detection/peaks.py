"""Heatmap peaks -> detections: 3D max-pool non-maximum suppression, then the top k above a
threshold, decoded to input voxels (z, y, x) and diameters in mm.

A cell is a peak when its probability equals the maximum of its kernel^3 neighbourhood (CenterNet's
NMS: no boxes, no IoU; a plateau of equal neighbours keeps every cell of it) and is at least
`threshold`. Its centre is targets.decode_center(cell, offset at the cell, stride), its diameter
exp(log_diameter) mm. Everything runs inside jit on fixed shapes: `find_peaks` returns k = min(
max_per_scan, cells) slots per scan with a `valid` mask, and `to_numpy` drops the empty slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.detection import targets
from jaxmed.errors import ConfigError


def check_settings(threshold: float, max_per_scan: int, nms_kernel: int) -> None:
  """ConfigError (one line) for a threshold outside [0, 1], max_per_scan < 1 or an even or
  non-positive NMS kernel."""
  if not 0.0 <= float(threshold) <= 1.0:
    raise ConfigError(f'detect.threshold is {threshold}, outside [0, 1] (a probability); set '
                      '--config.detect.threshold, e.g. 0.05')
  if int(max_per_scan) < 1:
    raise ConfigError(f'detect.max_per_scan is {max_per_scan}, must be >= 1; set '
                      '--config.detect.max_per_scan, e.g. 100')
  if int(nms_kernel) < 1 or int(nms_kernel) % 2 == 0:
    raise ConfigError(f'detect.nms_kernel is {nms_kernel}, must be an odd number >= 1 (a window '
                      'centred on its cell); set --config.detect.nms_kernel, e.g. 3')


def nms_mask(probability: jax.Array, kernel: int) -> jax.Array:
  """(B, d, h, w) bool: the cell equals the maximum of its kernel^3 neighbourhood."""
  pad = kernel // 2
  pooled = jax.lax.reduce_window(probability, -jnp.inf, jax.lax.max, (1, kernel, kernel, kernel),
                                 (1, 1, 1, 1), [(0, 0)] + [(pad, pad)] * 3)
  return probability >= pooled


def find_peaks(outputs: dict[str, jax.Array], *, stride: int, kernel: int, threshold: float,
               max_per_scan: int, grid_shape: tuple[int, int, int] | None = None
               ) -> dict[str, jax.Array]:
  """Peaks of the detector's outputs, best first (jittable).

  outputs: 'heatmap' logits (B, d, h, w), 'log_diameter' (B, d, h, w) log mm, 'offset'
  (B, d, h, w, 3) output voxels (z, y, x). grid_shape: only cells [0, d') x [0, h') x [0, w')
  may be peaks (the rest is padding the volume got to fit the model); None = all.
  Returns score (B, k) probability, center_zyx (B, k, 3) input voxels, diameter_mm (B, k),
  valid (B, k) bool; k = min(max_per_scan, d h w); invalid slots hold score 0.
  """
  probability = jax.nn.sigmoid(outputs['heatmap'].astype(jnp.float32))
  b, d, h, w = probability.shape
  keep = nms_mask(probability, kernel) & (probability >= threshold)
  if grid_shape is not None:
    inside = [jnp.arange(n) < limit for n, limit in zip((d, h, w), grid_shape)]
    keep &= inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
  flat = jnp.where(keep, probability, -1.0).reshape(b, -1)
  k = min(int(max_per_scan), d * h * w)
  score, index = jax.lax.top_k(flat, k)
  cells = jnp.stack(jnp.unravel_index(index, (d, h, w)), axis=-1)  # (B, k, 3) (z, y, x)
  rows = jnp.arange(b)[:, None]
  offset = outputs['offset'][rows, cells[..., 0], cells[..., 1], cells[..., 2]]
  log_diameter = outputs['log_diameter'][rows, cells[..., 0], cells[..., 1], cells[..., 2]]
  valid = score >= 0.0
  return {'score': jnp.where(valid, score, 0.0),
          'center_zyx': targets.decode_center(cells, offset.astype(jnp.float32), stride),
          'diameter_mm': jnp.exp(log_diameter.astype(jnp.float32)),
          'valid': valid}


@dataclasses.dataclass(frozen=True)
class Detections:
  """One scan's detections, best first: score (N,) probability, center_zyx (N, 3) input voxels
  of the detector's grid, diameter_mm (N,)."""
  score: np.ndarray
  center_zyx: np.ndarray
  diameter_mm: np.ndarray

  def __len__(self) -> int:
    return len(self.score)


def to_numpy(peaks: dict[str, jax.Array]) -> list[Detections]:
  """find_peaks' fixed-size slots (B, k) -> one Detections per scan, empty slots dropped."""
  host = jax.device_get(peaks)
  return [Detections(np.asarray(host['score'][i][host['valid'][i]], np.float64),
                     np.asarray(host['center_zyx'][i][host['valid'][i]], np.float64),
                     np.asarray(host['diameter_mm'][i][host['valid'][i]], np.float64))
          for i in range(len(host['score']))]
