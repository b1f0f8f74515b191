"""Detection targets and loss: the grid convention, the Gaussian heatmap, the focal and L1 terms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.detection import loss as loss_lib
from jaxmed.detection import targets

STRIDE = 4


def test_a_centre_decodes_back_from_its_cell_and_offset():
  centers = jnp.array([[[0.0, 3.99, 4.0], [17.25, 30.5, 9.0]]])
  cells, offsets = targets.center_cells(centers, STRIDE, (8, 8, 8))
  np.testing.assert_array_equal(cells, [[[0, 0, 1], [4, 7, 2]]])
  assert np.all((offsets >= 0) & (offsets < 1))
  np.testing.assert_allclose(targets.decode_center(cells, offsets, STRIDE), centers, atol=1e-5)
  # NumPy in, NumPy out: inference decodes peaks found on the host with the same rule.
  decoded = targets.decode_center(np.array([2, 3, 4]), np.array([0.5, 0.0, 0.25]), STRIDE)
  assert isinstance(decoded, np.ndarray)
  np.testing.assert_allclose(decoded, [10.0, 12.0, 17.0])


def test_a_centre_on_the_far_face_belongs_to_the_last_cell():
  cells, offsets = targets.center_cells(jnp.array([[32.0, 0.0, 0.0]]), STRIDE, (8, 8, 8))
  np.testing.assert_array_equal(cells, [[7, 0, 0]])
  np.testing.assert_allclose(targets.decode_center(cells, offsets, STRIDE), [[32.0, 0, 0]])


@functools.partial(jax.jit, static_argnums=3)
def _build_targets(centers, diameters, valid, grid):
  return targets.build_targets(centers, diameters, valid, grid, stride=STRIDE, spacing_mm=1.0,
                               sigma_per_radius=0.5, min_sigma=0.5)


def _targets(centers, diameters, valid, grid=(8, 8, 8)):
  return _build_targets(jnp.asarray(centers, jnp.float32), jnp.asarray(diameters, jnp.float32),
                        jnp.asarray(valid, jnp.float32), grid)


# Weights 1 and 1; jitted, as in the train step (eager dispatch of every op is slow on CPU).
_loss = jax.jit(functools.partial(loss_lib.detection_loss, diameter_weight=1.0,
                                  offset_weight=1.0))


def test_heatmap_is_one_at_each_centre_cell_and_falls_off_with_the_nodule_radius():
  t = _targets([[[9.0, 9.0, 9.0], [25.0, 25.0, 25.0], [0.0, 0.0, 0.0]]],
               [[24.0, 4.0, 10.0]], [[1, 1, 0]])
  heatmap = np.asarray(t['heatmap'][0])
  assert heatmap[2, 2, 2] == 1.0 and heatmap[6, 6, 6] == 1.0
  assert np.sum(heatmap == 1.0) == 2  # The padding slot at the origin puts nothing there.
  np.testing.assert_allclose(heatmap[0, 0, 0], np.exp(-12 / (2 * 1.5**2)), rtol=1e-6)
  # sigma = max(0.5 x radius in cells, 0.5): 24 mm -> 1.5 cells, 4 mm -> 0.5 cells.
  np.testing.assert_allclose(heatmap[3, 2, 2], np.exp(-1 / (2 * 1.5**2)), rtol=1e-6)
  np.testing.assert_allclose(heatmap[6, 6, 5], np.exp(-1 / (2 * 0.5**2)), rtol=1e-6)
  np.testing.assert_allclose(t['log_diameter'][0, :2], np.log([24.0, 4.0]), rtol=1e-6)


def test_overlapping_nodules_take_the_maximum_not_the_sum():
  t = _targets([[[9.0, 9.0, 9.0], [13.0, 9.0, 9.0]]], [[20.0, 20.0]], [[1, 1]])
  heatmap = np.asarray(t['heatmap'][0])
  assert heatmap.max() == 1.0 and heatmap[2, 2, 2] == heatmap[3, 2, 2] == 1.0


def test_values_at_cells_reads_exactly_the_cell():
  maps = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
  cells = jnp.array([[[1, 2, 3], [0, 0, 0]], [[3, 3, 3], [2, 1, 0]]])
  np.testing.assert_array_equal(loss_lib.values_at_cells(maps, cells),
                                [[maps[0, 1, 2, 3], maps[0, 0, 0, 0]],
                                 [maps[1, 3, 3, 3], maps[1, 2, 1, 0]]])
  offsets = jnp.stack([maps, -maps, 2 * maps], -1)
  np.testing.assert_array_equal(loss_lib.values_at_cells(offsets, cells)[1, 0],
                                [maps[1, 3, 3, 3], -maps[1, 3, 3, 3], 2 * maps[1, 3, 3, 3]])


def _outputs(t, logit_at_centres, background_logit=-8.0):
  """Outputs that are right everywhere but the heatmap logits at centres and elsewhere."""
  heatmap = np.where(np.asarray(t['heatmap']) >= 1.0, logit_at_centres, background_logit)
  log_diameter = np.zeros(heatmap.shape, np.float32)
  offset = np.zeros(heatmap.shape + (3,), np.float32)
  cells = np.asarray(t['cells'])
  for b, k in np.ndindex(cells.shape[:2]):
    log_diameter[(b, *cells[b, k])] = t['log_diameter'][b, k]
    offset[(b, *cells[b, k])] = t['offset'][b, k]
  return {'heatmap': jnp.asarray(heatmap, jnp.float32), 'log_diameter': jnp.asarray(log_diameter),
          'offset': jnp.asarray(offset)}


def test_focal_loss_matches_its_formula_on_one_nodule():
  t = _targets([[[9.0, 9.0, 9.0]]], [[8.0]], [[1]])
  outputs = _outputs(t, logit_at_centres=0.0)
  loss, terms = _loss(outputs, t)
  y = np.asarray(t['heatmap']).ravel()
  p_bg = 1 / (1 + np.exp(8.0))
  negative = np.sum(((1 - y) ** 4 * p_bg**2 * np.log(1 - p_bg))[y < 1])
  positive = (1 - 0.5) ** 2 * np.log(0.5)
  np.testing.assert_allclose(terms['heatmap'], -(positive + negative), rtol=1e-5)
  assert terms['diameter'] == 0.0 and terms['offset'] == 0.0  # Read exactly at the cell.
  assert loss == pytest.approx(float(terms['heatmap']))


def test_loss_falls_as_the_prediction_approaches_the_targets():
  t = _targets([[[9.0, 9.0, 9.0], [20.0, 5.0, 30.0]]], [[8.0, 16.0]], [[1, 1]])
  confident, _ = _loss(_outputs(t, 6.0), t)
  unsure, _ = _loss(_outputs(t, -2.0), t)
  assert confident < unsure
  wrong = dict(_outputs(t, 6.0), log_diameter=jnp.zeros(t['heatmap'].shape))
  _, terms = _loss(wrong, t)
  np.testing.assert_allclose(terms['diameter'], np.mean(np.log([8.0, 16.0])), rtol=1e-6)


def test_loss_is_normalised_by_the_nodules_of_the_whole_batch():
  # Two examples with 1 and 3 nodules: the batch's L1 term is the sum over its 4 nodules / 4,
  # not the mean of the per-example means (which would weigh the lone nodule 3x).
  centers = [[[9.0, 9.0, 9.0], [0, 0, 0], [0, 0, 0]],
             [[5.0, 5.0, 5.0], [20.0, 20.0, 20.0], [29.0, 9.0, 13.0]]]
  t = _targets(centers, [[8.0, 0, 0], [4.0, 8.0, 16.0]], [[1, 0, 0], [1, 1, 1]])
  outputs = dict(_outputs(t, 3.0), log_diameter=jnp.zeros(t['heatmap'].shape))
  _, terms = _loss(outputs, t)
  np.testing.assert_allclose(terms['diameter'], np.log([8.0, 4.0, 8.0, 16.0]).sum() / 4,
                             rtol=1e-6)


def test_a_batch_without_nodules_has_a_finite_background_only_loss():
  t = _targets(np.zeros((2, 2, 3)), np.zeros((2, 2)), np.zeros((2, 2)))
  assert float(jnp.max(t['heatmap'])) == 0.0
  loss, terms = _loss(_outputs(t, 0.0, background_logit=-3.0), t)
  assert np.isfinite(loss) and loss > 0 and terms['diameter'] == 0 and terms['offset'] == 0
  grads = jax.grad(lambda h: loss_lib.focal_loss_sum(h, t['heatmap']))(jnp.zeros((2, 8, 8, 8)))
  assert np.all(np.isfinite(grads)) and np.all(grads > 0)  # Pushes every logit down.
