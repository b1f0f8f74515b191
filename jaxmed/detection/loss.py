"""The detector's loss (CenterNet, Zhou et al. 2019): penalty-reduced focal loss on the heatmap,
L1 on the log-diameter and on the sub-voxel offset at each nodule's own cell.

Every term is a SUM over the global batch divided by the number of nodules in the global batch
(at least 1), so the loss is the same number whatever the mesh splits (batch, depth, channels):
no per-device normalisation. The values at a nodule's cell are read with a one-hot mask and a
sum over the grid, not a gather: exact (one non-zero term) and, on a depth-split grid, a sum of
per-slab partial sums instead of moving the output maps.

  focal = -1/N sum_cells { (1 - p)^alpha log p              where the target is 1 (a centre)
                         { (1 - y)^beta p^alpha log(1 - p)  elsewhere
  size  = 1/N sum_nodules |log_diameter(cell) - log(diameter_mm)|
  offset = 1/N sum_nodules sum_zyx |offset(cell) - target offset|
  loss = focal + diameter_weight * size + offset_weight * offset
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.parallel.sharding import constrain

MAP_AXES = ('batch', 'depth', 'height', 'width')


def focal_loss_sum(logits: jax.Array, heatmap: jax.Array, alpha: float = 2.0,
                   beta: float = 4.0) -> jax.Array:
  """Penalty-reduced focal loss summed over (B, d, h, w) logits against targets in [0, 1]."""
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  centre = heatmap >= 1.0  # A Gaussian is exactly 1 at its own cell, below 1 everywhere else.
  positive = (1.0 - p) ** alpha * jax.nn.log_sigmoid(logits)
  negative = (1.0 - heatmap) ** beta * p ** alpha * jax.nn.log_sigmoid(-logits)
  return -jnp.sum(jnp.where(centre, positive, negative))


def values_at_cells(maps: jax.Array, cells: jax.Array) -> jax.Array:
  """maps (B, d, h, w[, C]) read at cells int (B, K, 3) -> (B, K[, C]), by one-hot sums."""
  grid = maps.shape[1:4]
  hits = [(jnp.arange(n)[None, None, :] == cells[:, :, i, None]) for i, n in enumerate(grid)]
  one_hot = (hits[0][:, :, :, None, None] & hits[1][:, :, None, :, None]
             & hits[2][:, :, None, None, :])  # (B, K, d, h, w)
  if maps.ndim == 4:
    return jnp.sum(jnp.where(one_hot, maps[:, None].astype(jnp.float32), 0.0), axis=(2, 3, 4))
  return jnp.sum(jnp.where(one_hot[..., None], maps[:, None].astype(jnp.float32), 0.0),
                 axis=(2, 3, 4))


def detection_loss(outputs: dict[str, jax.Array], targets: dict[str, jax.Array], *,
                   diameter_weight: float, offset_weight: float, alpha: float = 2.0,
                   beta: float = 4.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, {'heatmap', 'diameter', 'offset'} terms), float32 scalars (module docstring).

  outputs: the detector's heatmap (B, d, h, w) logits, log_diameter (B, d, h, w), offset
  (B, d, h, w, 3). targets: targets.build_targets of the same batch.
  """
  valid = targets['valid']
  num_nodules = jnp.maximum(jnp.sum(valid), 1.0)
  heatmap = constrain(targets['heatmap'], MAP_AXES)
  focal = focal_loss_sum(constrain(outputs['heatmap'], MAP_AXES), heatmap, alpha, beta)
  cells = targets['cells']
  log_diameter = values_at_cells(constrain(outputs['log_diameter'], MAP_AXES), cells)
  offset = values_at_cells(constrain(outputs['offset'], MAP_AXES + (None,)), cells)
  size = jnp.sum(jnp.abs(log_diameter - targets['log_diameter']) * valid)
  shift = jnp.sum(jnp.abs(offset - targets['offset']) * valid[..., None])
  terms = {'heatmap': focal / num_nodules, 'diameter': size / num_nodules,
           'offset': shift / num_nodules}
  loss = terms['heatmap'] + diameter_weight * terms['diameter'] + offset_weight * terms['offset']
  return loss, terms
