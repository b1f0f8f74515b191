"""LUNA16 FROC and CPM, with the official evaluation's definitions, vectorised over scans.

Definitions follow noduleCADEvaluationLUNA16.py (the LUNA16 challenge's evaluation script):
- A candidate hits a finding when its centre lies strictly inside the finding's sphere:
  squared distance < (diameter_mm / 2)^2, in world mm. A diameter_mm < 0 counts as 10 mm.
- A nodule hit by several candidates counts once, with the highest probability among them. A
  candidate that hits a nodule is never a false positive (if it hits two nodules it counts for
  both, as in the official script).
- A candidate that hits only excluded findings (annotations_excluded.csv) is ignored: neither a
  hit nor a false positive. Every other candidate is a false positive.
- Each scan keeps at most 100 candidates: those whose probability is strictly above the 101st
  highest of that scan (evaluateCAD's maxNumberOfCADMarks=100; with ties there, fewer remain).
- The FROC curve has one point per distinct probability (tied probabilities enter together, as
  with sklearn's roc_curve), starting at (0 FP/scan, 0). FPs per scan = false positives above
  the threshold / number of scans evaluated; sensitivity = hits above it / all included nodules
  of those scans (missed nodules included). The sensitivity at an FP rate is the linearly
  interpolated curve (np.interp, flat past the curve's last point); CPM is their mean over
  1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per scan.
- The confidence interval draws scans with replacement (a scan drawn twice counts twice, in the
  FP divisor too, which stays the number of scans) and takes order statistics of the samples:
  lower = sorted[floor(0.025 n)], upper = sorted[floor(0.975 n)].
Scans with no candidates still count as scans, and their nodules as missed.

Where this deliberately differs from the official script (checked against a port of it on
random cases with ties, the cap, excluded findings and duplicate hits: equal to 1e-15 otherwise):
- FPs per scan are exact (integer count / scans). The official fpr * count / scans carries
  float noise (2.0000000000000004), so at a rate that lands exactly on a vertical step of the
  curve (rate x scans an integer) it may read the bottom of the step; here it is always the top.
- Sensitivities are interpolated at exactly 1/8..8; later versions of the official script read
  them off a 10001-point grid (at most one grid step, 0.0008 FP/scan, below each rate).
- Bootstrap samples whose nodules are all missed have sensitivity 0 (the official gets NaN from
  sklearn's roc_curve); samples with no nodule at all are left out. The CPM interval is taken
  over each sample's CPM (the official script only bands the curve).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import NamedTuple

import numpy as np

from jaxmed.data import luna16
from jaxmed.errors import UserError

# FP-per-scan rates whose mean sensitivity is the CPM (LUNA16).
FP_RATES = np.array([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
# The official evaluation keeps at most this many candidates per scan.
OFFICIAL_MAX_CANDIDATES_PER_SCAN = 100
# The official evaluation uses this diameter for findings whose diameter_mm is negative.
UNKNOWN_DIAMETER_MM = 10.0


class EvaluationInputError(UserError, ValueError):
  """Evaluation input (CSV, arrays) that is missing or malformed; the message says the fix."""


def _as_uids(values, what: str) -> np.ndarray:
  """(N,) str array from str, bytes (HDF5) or object arrays."""
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise EvaluationInputError(f'{what}: seriesuid must be 1-D, got shape {arr.shape}')
  if arr.dtype.kind == 'S':
    return np.char.decode(arr, 'utf-8')
  if arr.dtype.kind == 'O':
    return np.array([v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in arr],
                    dtype=str)
  return arr.astype(str)


def _as_centers(values, n: int, what: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float64)
  if arr.shape != (n, 3):
    raise EvaluationInputError(f'{what}: center_world must have shape ({n}, 3) (x, y, z mm), '
                               f'got {arr.shape}')
  return arr


def _as_vector(values, n: int, what: str, name: str) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float64)
  if arr.shape != (n,):
    raise EvaluationInputError(f'{what}: {name} must have shape ({n},), got {arr.shape}')
  return arr


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Scored candidates (CAD marks), the rows of a LUNA16 submission.

  seriesuid: (N,) str (bytes are decoded); center_world: (N, 3) float64 world mm (x, y, z);
  probability: (N,) float64, higher = more likely a nodule.
  """
  seriesuid: np.ndarray
  center_world: np.ndarray
  probability: np.ndarray

  def __post_init__(self):
    uids = _as_uids(self.seriesuid, 'predictions')
    object.__setattr__(self, 'seriesuid', uids)
    object.__setattr__(self, 'center_world',
                       _as_centers(self.center_world, len(uids), 'predictions'))
    prob = _as_vector(self.probability, len(uids), 'predictions', 'probability')
    if np.isnan(prob).any():
      raise EvaluationInputError(
          f'predictions: {int(np.isnan(prob).sum())} probabilities are NaN; '
          'score every candidate with a finite number')
    object.__setattr__(self, 'probability', prob)

  def __len__(self) -> int:
    return len(self.seriesuid)


@dataclasses.dataclass(frozen=True)
class Annotations:
  """Findings: nodules (annotations.csv) or excluded findings (annotations_excluded.csv).

  seriesuid: (M,) str; center_world: (M, 3) float64 world mm (x, y, z); diameter_mm: (M,)
  float64 (negative = unknown, counted as 10 mm).
  """
  seriesuid: np.ndarray
  center_world: np.ndarray
  diameter_mm: np.ndarray

  def __post_init__(self):
    uids = _as_uids(self.seriesuid, 'annotations')
    object.__setattr__(self, 'seriesuid', uids)
    object.__setattr__(self, 'center_world',
                       _as_centers(self.center_world, len(uids), 'annotations'))
    object.__setattr__(self, 'diameter_mm',
                       _as_vector(self.diameter_mm, len(uids), 'annotations', 'diameter_mm'))

  def __len__(self) -> int:
    return len(self.seriesuid)

  @classmethod
  def empty(cls) -> Annotations:
    return cls(np.zeros(0, str), np.zeros((0, 3)), np.zeros(0))


@dataclasses.dataclass(frozen=True)
class FROCResult:
  """One FROC evaluation.

  fps_per_scan, sensitivity, thresholds: (K,) the curve, one point per distinct probability,
    thresholds descending from +inf (the (0, 0) point); a point counts probabilities >= threshold.
  fp_rates: (7,) 1/8..8 FPs per scan; sensitivities: (7,) the curve interpolated there.
  cpm: mean of `sensitivities` (NaN when there are no nodules: sensitivity is undefined).
  nodule_detected, nodule_probability: (M,) for each row of the included annotations given:
    whether a candidate hits it and the highest such probability (NaN if missed, or if its scan
    is not evaluated).
  """
  fps_per_scan: np.ndarray
  sensitivity: np.ndarray
  thresholds: np.ndarray
  fp_rates: np.ndarray
  sensitivities: np.ndarray
  cpm: float
  num_scans: int
  num_nodules: int
  num_hits: int  # nodules hit by at least one candidate (at any threshold)
  num_false_positives: int  # candidates hitting no finding (at any threshold)
  num_candidates: int  # candidates evaluated: in the scans evaluated, after the per-scan cap
  num_ignored: int  # candidates hitting only excluded findings
  nodule_detected: np.ndarray
  nodule_probability: np.ndarray


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


@dataclasses.dataclass(frozen=True)
class _Matched:
  """Candidates matched to findings: what the FROC needs, per scan index 0..S-1."""
  num_scans: int
  fp_scan: np.ndarray  # (F,) scan index of each false positive
  fp_probability: np.ndarray  # (F,)
  nodule_scan: np.ndarray  # (M',) scan index of each included nodule in the evaluated scans
  nodule_detected: np.ndarray  # (M',) bool
  nodule_probability: np.ndarray  # (M',) max probability of the hitting candidates, NaN if none
  nodule_rows: np.ndarray  # (M',) row of each in the annotations given
  num_annotations: int
  num_candidates: int
  num_ignored: int


def _scan_index(uids: np.ndarray, sorted_scans: np.ndarray) -> np.ndarray:
  """Index of each uid in sorted_scans, -1 where absent."""
  if len(sorted_scans) == 0:
    return np.full(len(uids), -1)
  pos = np.searchsorted(sorted_scans, uids)
  pos = np.minimum(pos, len(sorted_scans) - 1)
  return np.where(sorted_scans[pos] == uids, pos, -1)


def _cap_per_scan(scan: np.ndarray, prob: np.ndarray, cap: int) -> np.ndarray:
  """Mask keeping, in scans with more than `cap` candidates, those above the (cap+1)-th best."""
  order = np.lexsort((-prob, scan))
  sorted_scan = scan[order]
  starts = np.searchsorted(sorted_scan, sorted_scan, side='left')
  rank = np.arange(len(order)) - starts
  counts = np.bincount(scan, minlength=scan.max(initial=-1) + 1)
  keep_sorted = np.ones(len(order), bool)
  at_cap = rank == cap  # the (cap+1)-th highest of each scan that has more than cap
  threshold = np.full(len(counts), -np.inf)
  threshold[sorted_scan[at_cap]] = prob[order][at_cap]
  over = counts[sorted_scan] > cap
  keep_sorted[over] = prob[order][over] > threshold[sorted_scan[over]]
  keep = np.empty(len(order), bool)
  keep[order] = keep_sorted
  return keep


def _hit_pairs(cand_scan, cand_xyz, find_scan, find_xyz, find_diameter):
  """(candidate index, finding index) of every candidate inside a finding of its own scan."""
  order = np.argsort(find_scan, kind='stable')
  sorted_scan = find_scan[order]
  starts = np.searchsorted(sorted_scan, cand_scan, side='left')
  counts = np.searchsorted(sorted_scan, cand_scan, side='right') - starts
  cand = np.repeat(np.arange(len(cand_scan)), counts)
  offsets = np.arange(len(cand)) - np.repeat(np.cumsum(counts) - counts, counts)
  find = order[np.repeat(starts, counts) + offsets]
  diameter = np.where(find_diameter < 0.0, UNKNOWN_DIAMETER_MM, find_diameter)
  dist2 = np.sum((cand_xyz[cand] - find_xyz[find]) ** 2, axis=1)
  inside = dist2 < (diameter[find] / 2.0) ** 2
  return cand[inside], find[inside]


def _match(predictions: Predictions, annotations: Annotations, excluded: Annotations | None,
           seriesuids, max_candidates_per_scan: int | None) -> _Matched:
  if not isinstance(predictions, Predictions):
    raise EvaluationInputError('predictions must be a jaxmed.evaluation.Predictions '
                               '(or read with read_predictions)')
  if not isinstance(annotations, Annotations):
    raise EvaluationInputError('annotations must be a jaxmed.evaluation.Annotations '
                               '(or read with read_annotations)')
  excluded = Annotations.empty() if excluded is None else excluded
  if seriesuids is None:
    scans = np.unique(np.concatenate([predictions.seriesuid, annotations.seriesuid]))
  else:
    given = _as_uids(seriesuids, 'seriesuids')
    scans = np.unique(given)
    if len(scans) != len(given):
      raise EvaluationInputError(f'seriesuids lists {len(given) - len(scans)} scans twice; '
                                 'pass each scan once')

  cand_scan = _scan_index(predictions.seriesuid, scans)
  cand_keep = cand_scan >= 0
  if max_candidates_per_scan is not None and cand_keep.any():
    idx = np.flatnonzero(cand_keep)
    cand_keep[idx] = _cap_per_scan(cand_scan[idx], predictions.probability[idx],
                                   max_candidates_per_scan)
  cand_scan = cand_scan[cand_keep]
  cand_xyz = predictions.center_world[cand_keep]
  cand_prob = predictions.probability[cand_keep]

  nod_scan_all = _scan_index(annotations.seriesuid, scans)
  nodule_rows = np.flatnonzero(nod_scan_all >= 0)
  nod_scan = nod_scan_all[nodule_rows]
  exc_scan_all = _scan_index(excluded.seriesuid, scans)
  exc_rows = np.flatnonzero(exc_scan_all >= 0)

  c_inc, n_inc = _hit_pairs(cand_scan, cand_xyz, nod_scan,
                            annotations.center_world[nodule_rows],
                            annotations.diameter_mm[nodule_rows])
  c_exc, _ = _hit_pairs(cand_scan, cand_xyz, exc_scan_all[exc_rows],
                        excluded.center_world[exc_rows], excluded.diameter_mm[exc_rows])
  hits_nodule = np.zeros(len(cand_scan), bool)
  hits_nodule[c_inc] = True
  hits_excluded = np.zeros(len(cand_scan), bool)
  hits_excluded[c_exc] = True
  is_fp = ~hits_nodule & ~hits_excluded

  best = np.full(len(nodule_rows), -np.inf)
  np.maximum.at(best, n_inc, cand_prob[c_inc])
  detected = np.bincount(n_inc, minlength=len(nodule_rows)) > 0
  return _Matched(
      num_scans=len(scans),
      fp_scan=cand_scan[is_fp],
      fp_probability=cand_prob[is_fp],
      nodule_scan=nod_scan,
      nodule_detected=detected,
      nodule_probability=np.where(detected, best, np.nan),
      nodule_rows=nodule_rows,
      num_annotations=len(annotations),
      num_candidates=len(cand_scan),
      num_ignored=int((hits_excluded & ~hits_nodule).sum()),
  )


def _sorted_rows(m: _Matched):
  """FROC rows (detected nodules and FPs) by probability, descending; ends of tie groups."""
  prob = np.concatenate([m.nodule_probability[m.nodule_detected], m.fp_probability])
  scan = np.concatenate([m.nodule_scan[m.nodule_detected], m.fp_scan])
  is_hit = np.concatenate([np.ones(m.nodule_detected.sum(), bool),
                           np.zeros(len(m.fp_probability), bool)])
  order = np.argsort(-prob, kind='stable')
  prob, scan, is_hit = prob[order], scan[order], is_hit[order]
  group_ends = np.flatnonzero(np.r_[prob[1:] != prob[:-1], True]) if len(prob) else np.zeros(
      0, int)
  return prob, scan, is_hit, group_ends


def _interp(rates: np.ndarray, fps: np.ndarray, sens: np.ndarray) -> np.ndarray:
  # At a rate equal to a vertical run of points np.interp takes the run's last (highest) point:
  # every hit before the next FP counts, as in the official np.interp over the same curve.
  return np.interp(rates, fps, sens)


def compute_froc(predictions: Predictions, annotations: Annotations,
                 excluded: Annotations | None = None, seriesuids=None, *,
                 max_candidates_per_scan: int | None = OFFICIAL_MAX_CANDIDATES_PER_SCAN
                 ) -> FROCResult:
  """LUNA16 FROC curve, sensitivities at 1/8..8 FPs per scan and CPM (definitions above).

  predictions: scored candidates. annotations: the nodules to find. excluded: findings whose
  hits are ignored (LUNA16 annotations_excluded.csv), or None. seriesuids: the scans evaluated
  (each once); candidates and findings of other scans are left out. None means every scan that
  has a candidate or a nodule - pass the list explicitly when some scans may have neither.
  max_candidates_per_scan: the official per-scan cap (100); None keeps every candidate.
  With no nodules in the scans evaluated, sensitivities and cpm are NaN (undefined).
  """
  m = _match(predictions, annotations, excluded, seriesuids, max_candidates_per_scan)
  prob, _, is_hit, ends = _sorted_rows(m)
  hits_cum = np.cumsum(is_hit)[ends]
  fps_cum = np.cumsum(~is_hit)[ends]
  num_nodules = len(m.nodule_scan)
  num_scans = max(m.num_scans, 1)
  fps = np.r_[0.0, fps_cum / num_scans]
  with np.errstate(invalid='ignore', divide='ignore'):
    sens = np.r_[0.0, hits_cum / num_nodules] if num_nodules else np.full(len(ends) + 1, np.nan)
  sensitivities = _interp(FP_RATES, fps, sens)
  detected = np.zeros(m.num_annotations, bool)
  detected[m.nodule_rows] = m.nodule_detected
  nodule_prob = np.full(m.num_annotations, np.nan)
  nodule_prob[m.nodule_rows] = m.nodule_probability
  return FROCResult(
      fps_per_scan=fps,
      sensitivity=sens,
      thresholds=np.r_[np.inf, prob[ends]],
      fp_rates=FP_RATES.copy(),
      sensitivities=sensitivities,
      cpm=float(np.mean(sensitivities)),
      num_scans=m.num_scans,
      num_nodules=num_nodules,
      num_hits=int(m.nodule_detected.sum()),
      num_false_positives=len(m.fp_probability),
      num_candidates=m.num_candidates,
      num_ignored=m.num_ignored,
      nodule_detected=detected,
      nodule_probability=nodule_prob,
  )


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
                   max_candidates_per_scan: int | None = OFFICIAL_MAX_CANDIDATES_PER_SCAN
                   ) -> FROCConfidence:
  """Bootstrap confidence interval of compute_froc's result: scans drawn with replacement.

  Arguments as compute_froc. Returns (cpm_low, cpm_high, sensitivity_low (7,),
  sensitivity_high (7,), band), band holding bounds and mean at `fps_grid` FPs per scan
  (default: 129 points log-spaced over 1/8..8). Samples that draw no nodule have no defined
  sensitivity and are left out (the official script would carry NaN); all NaN if no sample has
  one. Deterministic in `seed`.
  """
  if num_samples < 1:
    raise EvaluationInputError(f'num_samples must be >= 1, got {num_samples}')
  if not 0.0 < confidence < 1.0:
    raise EvaluationInputError(f'confidence must be in (0, 1), got {confidence}')
  grid = np.geomspace(FP_RATES[0], FP_RATES[-1], 129) if fps_grid is None else np.asarray(
      fps_grid, np.float64)
  m = _match(predictions, annotations, excluded, seriesuids, max_candidates_per_scan)
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
  _, row_scan, is_hit, ends = _sorted_rows(m)
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
  for b in np.flatnonzero(total_nodules > 0):
    fps = np.r_[0.0, fps_cum[b] / num_scans]
    sens = np.r_[0.0, hits_cum[b] / total_nodules[b]]
    values[b] = _interp(targets, fps, sens)

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


# ---------------------------------------------------------------------------------------------
# LUNA16 CSV files

_ANNOTATION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm')
_PREDICTION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'probability')


def _read_columns(path, columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(seriesuids (rows,) str, (rows, len(columns) - 1) float64) from a CSV with a header row.

  Missing file or column, or a non-number, raise luna16.DataError (one line naming the file).
  """
  table = luna16.read_csv(path, columns)
  numbers = np.stack([table[c] for c in columns[1:]], axis=1).reshape(-1, len(columns) - 1)
  return table['seriesuid'].astype(str), numbers


def read_annotations(path) -> Annotations:
  """Findings from a LUNA16 annotations.csv / annotations_excluded.csv.

  Columns seriesuid,coordX,coordY,coordZ,diameter_mm (world mm); others are ignored.
  """
  uids, numbers = _read_columns(path, _ANNOTATION_COLUMNS)
  return Annotations(uids, numbers[:, :3], numbers[:, 3])


def read_predictions(path) -> Predictions:
  """Scored candidates from a LUNA16 submission CSV: seriesuid,coordX,coordY,coordZ,probability."""
  uids, numbers = _read_columns(path, _PREDICTION_COLUMNS)
  return Predictions(uids, numbers[:, :3], numbers[:, 3])


def read_seriesuids(path) -> np.ndarray:
  """(S,) str: the scans to evaluate, one seriesuid per line (LUNA16 seriesuids.csv).

  The first column of each line is used; a first line reading 'seriesuid' is a header.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise EvaluationInputError(f'seriesuids file {path} not found: pass a CSV with one '
                               'seriesuid per line')
  with open(path, newline='') as f:
    uids = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
  if uids and uids[0] == 'seriesuid':
    uids = uids[1:]
  return np.asarray(uids, dtype=str)
