"""Heatmap peaks: max-pool NMS, threshold, top k, decoding through targets.decode_center."""

import jax
import numpy as np
import pytest

from jaxmed.detection import peaks
from jaxmed.detection import targets
from jaxmed.errors import ConfigError


def _outputs(grid, nodules, stride=4):
  """Detector outputs with a Gaussian bump (logits) per nodule (cell, offset, diameter, peak p)."""
  d, h, w = grid
  zz, yy, xx = np.meshgrid(*[np.arange(n) for n in grid], indexing='ij')
  probability = np.full(grid, 1e-3)
  offset = np.full(grid + (3,), 0.5, np.float32)
  log_diameter = np.zeros(grid, np.float32)
  for cell, off, diameter, p in nodules:
    bump = p * np.exp(-((zz - cell[0])**2 + (yy - cell[1])**2 + (xx - cell[2])**2) / 2.0)
    probability = np.maximum(probability, bump)
    offset[cell] = off
    log_diameter[cell] = np.log(diameter)
  logits = np.log(probability) - np.log1p(-probability)
  return {'heatmap': logits[None].astype(np.float32), 'offset': offset[None],
          'log_diameter': log_diameter[None]}


NODULES = [((3, 4, 5), (0.25, 0.5, 0.75), 12.0, 0.9), ((10, 2, 9), (0.0, 0.9, 0.1), 5.0, 0.6),
           ((10, 11, 2), (0.5, 0.5, 0.5), 20.0, 0.3)]


def test_peaks_decode_centres_diameters_and_order():
  out = _outputs((14, 14, 12), NODULES)
  found = peaks.to_numpy(jax.jit(lambda o: peaks.find_peaks(
      o, stride=4, kernel=3, threshold=0.1, max_per_scan=10))(out))[0]
  assert len(found) == 3  # NMS leaves one cell per bump; the 1e-3 floor is below threshold.
  np.testing.assert_allclose(found.score, [0.9, 0.6, 0.3], atol=1e-5)
  expected = [targets.decode_center(np.array(c), np.array(o), 4) for c, o, _, _ in NODULES]
  np.testing.assert_allclose(found.center_zyx, expected, atol=1e-5)
  np.testing.assert_allclose(found.center_zyx[0], [(3 + 0.25) * 4, (4 + 0.5) * 4, (5 + .75) * 4])
  np.testing.assert_allclose(found.diameter_mm, [12.0, 5.0, 20.0], rtol=1e-5)


def test_threshold_max_per_scan_and_grid_limit():
  out = _outputs((14, 14, 12), NODULES)
  found = peaks.to_numpy(peaks.find_peaks(out, stride=4, kernel=3, threshold=0.5,
                                          max_per_scan=10))[0]
  np.testing.assert_allclose(found.score, [0.9, 0.6], atol=1e-5)
  found = peaks.to_numpy(peaks.find_peaks(out, stride=4, kernel=3, threshold=0.0,
                                          max_per_scan=2))[0]
  np.testing.assert_allclose(found.score, [0.9, 0.6], atol=1e-5)
  # Cells at depth >= 8 are padding: the two deep nodules go, nothing else takes their place.
  found = peaks.to_numpy(peaks.find_peaks(out, stride=4, kernel=3, threshold=0.1,
                                          max_per_scan=10, grid_shape=(8, 14, 12)))[0]
  np.testing.assert_allclose(found.score, [0.9], atol=1e-5)


def test_nms_kernel_merges_close_peaks():
  close = [((5, 5, 5), (0.5,) * 3, 10.0, 0.8), ((5, 5, 7), (0.5,) * 3, 10.0, 0.7)]
  out = _outputs((12, 12, 12), close)
  small = peaks.to_numpy(peaks.find_peaks(out, stride=4, kernel=3, threshold=0.1,
                                          max_per_scan=10))[0]
  large = peaks.to_numpy(peaks.find_peaks(out, stride=4, kernel=5, threshold=0.1,
                                          max_per_scan=10))[0]
  assert len(small) == 2 and len(large) == 1
  np.testing.assert_allclose(large.score, [0.8], atol=1e-5)


@pytest.mark.parametrize('threshold', [-0.1, 1.5, float('nan')])
def test_threshold_outside_unit_interval_is_one_line_error(threshold):
  with pytest.raises(ConfigError, match=r'detect.threshold is .*outside \[0, 1\]'):
    peaks.check_settings(threshold, 100, 3)


def test_even_kernel_and_zero_max_per_scan_refused():
  with pytest.raises(ConfigError, match='nms_kernel'):
    peaks.check_settings(0.1, 100, 2)
  with pytest.raises(ConfigError, match='max_per_scan'):
    peaks.check_settings(0.1, 0, 3)
