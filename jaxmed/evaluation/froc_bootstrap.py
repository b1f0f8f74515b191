"""The bootstrap confidence interval of LUNA16's FROC and CPM (froc.py holds the FROC itself).

As the LUNA16 evaluation script (noduleCADEvaluationLUNA16.py) does: draw the scans with
replacement, compute each sample's curve with the same arithmetic as the point estimate, and
take order statistics: lower = sorted[floor(0.025 n)], upper = sorted[floor(0.975 n)].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxmed.evaluation.froc import (FP_RATES, OFFICIAL_MAX_CANDIDATES_PER_SCAN, check_arithmetic,
                                    curve_points, match_candidates, sorted_rows)
from jaxmed.evaluation.submission import Annotations, EvaluationInputError, Predictions


class FROCBand(NamedTuple):
  """Bootstrap band: sensitivity bounds (and mean) at each FP rate of `fps_per_scan`."""
  fps_per_scan: np.ndarray
  sensitivity_low: np.ndarray
  sensitivity_high: np.ndarray
  sensitivity_mean: np.ndarray
  confidence: float


class FROCConfidence(NamedTuple):
  """Bootstrap confidence interval of a FROC evaluation (see bootstrap_froc)."""
  cpm_low: float
  cpm_high: float
  sensitivity_low: np.ndarray  # (7,) at FP_RATES
  sensitivity_high: np.ndarray  # (7,)
  band: FROCBand


def _order_statistic_bounds(values: np.ndarray, confidence: float):
  """Official CI: sorted[floor(p n)], sorted[floor((1 - p) n)] with p = (1 - confidence) / 2."""
  n = values.shape[0]
  tail = (1.0 - confidence) / 2.0
  ordered = np.sort(values, axis=0)
  low = ordered[int(np.floor(tail * n))]
  high = ordered[min(int(np.floor((1.0 - tail) * n)), n - 1)]
  return low, high


def bootstrap_froc(predictions: Predictions, annotations: Annotations,
                   excluded: Annotations | None = None, seriesuids=None, *,
                   num_samples: int = 1000, seed: int = 0, confidence: float = 0.95,
                   fps_grid: np.ndarray | None = None,
                   max_candidates_per_scan: int | None = OFFICIAL_MAX_CANDIDATES_PER_SCAN,
                   arithmetic: str = 'official') -> FROCConfidence:
  """Bootstrap confidence interval of compute_froc's result: scans drawn with replacement.

  Arguments as compute_froc. Returns (cpm_low, cpm_high, sensitivity_low (7,),
  sensitivity_high (7,), band), band holding bounds and mean at `fps_grid` FPs per scan
  (default: 129 points log-spaced over 1/8..8). Samples that draw no nodule have no defined
  sensitivity and are left out (the official script would carry NaN); all NaN if no sample has
  one. Each sample's curve follows `arithmetic` as compute_froc does (the official script draws
  its samples unseeded, so only the arithmetic, not the draws, can match it). Deterministic in
  `seed`.
  """
  check_arithmetic(arithmetic)
  if num_samples < 1:
    raise EvaluationInputError(f'num_samples must be >= 1, got {num_samples}')
  if not 0.0 < confidence < 1.0:
    raise EvaluationInputError(f'confidence must be in (0, 1), got {confidence}')
  grid = np.geomspace(FP_RATES[0], FP_RATES[-1], 129) if fps_grid is None else np.asarray(
      fps_grid, np.float64)
  m = match_candidates(predictions, annotations, excluded, seriesuids, max_candidates_per_scan)
  num_scans = m.num_scans
  targets = np.r_[FP_RATES, grid]
  nan_result = FROCConfidence(
      np.nan, np.nan, np.full(7, np.nan), np.full(7, np.nan),
      FROCBand(grid, np.full(len(grid), np.nan), np.full(len(grid), np.nan),
               np.full(len(grid), np.nan), confidence))
  if num_scans == 0:
    return nan_result

  # The curve is flat between groups that hold a hit, so np.interp needs only the points of
  # those groups, of the groups just before them, and of the last group: K <= 2 hits + 1.
  _, row_scan, is_hit, ends = sorted_rows(m)
  group_of_row = np.repeat(np.arange(len(ends)), np.diff(np.r_[-1, ends]))
  hit_groups = np.unique(group_of_row[is_hit])
  kept = np.unique(np.r_[hit_groups, hit_groups - 1, len(ends) - 1])
  kept = kept[kept >= 0]
  # counts[s, k]: rows of scan s at or above kept group k (rows fall in the first kept group
  # at or after their own, then a cumulative sum over k).
  bucket = np.searchsorted(kept, group_of_row)
  num_kept = len(kept)

  def per_scan_cumulative(rows):
    flat = np.bincount(row_scan[rows] * num_kept + bucket[rows],
                       minlength=num_scans * num_kept).reshape(num_scans, num_kept)
    return np.cumsum(flat, axis=1).astype(np.float64)

  hits_per_scan = per_scan_cumulative(is_hit)
  fps_per_scan = per_scan_cumulative(~is_hit)
  nodules_per_scan = np.bincount(m.nodule_scan, minlength=num_scans)

  rng = np.random.default_rng(seed)
  draws = rng.integers(0, num_scans, size=(num_samples, num_scans))
  # weights[b, s]: how often sample b drew scan s; a sample's counts are weights @ counts.
  weights = np.bincount((draws + num_scans * np.arange(num_samples)[:, None]).ravel(),
                        minlength=num_samples * num_scans).reshape(num_samples, num_scans)
  weights = weights.astype(np.float64)  # Integer counts, exact in float64; BLAS matmul.
  total_nodules = weights @ nodules_per_scan
  hits_cum = weights @ hits_per_scan
  fps_cum = weights @ fps_per_scan

  values = np.full((num_samples, len(targets)), np.nan)
  drew_nodules = np.flatnonzero(total_nodules > 0)
  fps, sens = curve_points(fps_cum[drew_nodules], hits_cum[drew_nodules], num_scans,
                     total_nodules[drew_nodules], arithmetic)
  for b, fps_b, sens_b in zip(drew_nodules, fps, sens):
    values[b] = np.interp(targets, fps_b, sens_b)

  values = values[total_nodules > 0]
  if len(values) == 0:
    return nan_result
  cpm = values[:, :7].mean(axis=1)
  cpm_low, cpm_high = _order_statistic_bounds(cpm, confidence)
  low, high = _order_statistic_bounds(values, confidence)
  return FROCConfidence(
      cpm_low=float(cpm_low), cpm_high=float(cpm_high),
      sensitivity_low=low[:7], sensitivity_high=high[:7],
      band=FROCBand(grid, low[7:], high[7:], values[:, 7:].mean(axis=0), confidence))


