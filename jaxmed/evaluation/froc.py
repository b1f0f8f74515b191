"""LUNA16 FROC and CPM, vectorised over scans (their bootstrap interval: froc_bootstrap.py).

Definitions are those of the LUNA16 evaluation script (noduleCADEvaluationLUNA16.py):
- A candidate hits a finding when its centre lies strictly inside the finding's sphere:
  squared distance < (diameter_mm / 2)^2, in world mm. A diameter_mm < 0 counts as 10 mm.
- A nodule hit by several candidates counts once, at the highest probability among them. A
  candidate that hits a nodule is never a false positive (if it hits two, it counts for both).
- A candidate that hits only excluded findings is ignored: neither a hit nor a false positive.
- Each scan keeps at most 100 candidates: those strictly above its 101st highest probability.
- The curve has one point per distinct probability, from (0 FP/scan, 0); sensitivity = hits /
  all included nodules of the scans evaluated. CPM is the mean of the curve interpolated
  (np.interp) at 1/8 ... 8 FPs per scan.
- arithmetic='official' (the default) computes the curve as the script does through sklearn's
  roc_curve: a point evenly between its neighbours on a straight run is dropped, FPs per scan
  are (fps / total_fps) * total_fps / scans and sensitivity (hits / total_hits) * total_hits /
  nodules in float64, so 2 FPs per scan can come out as 2.0000000000000004 and np.interp then
  reads the bottom of a vertical step. arithmetic='exact' keeps every point and divides the
  integer counts once: at a rate where rate x scans is a whole number it reads the top.
Deliberate differences from the script: a FROC without any hit has sensitivity 0 (the script's
is NaN), and a seriesuids file may start with a header line (read_seriesuids skips it; the
script would count it as a scan).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmed.evaluation.submission import (Annotations, EvaluationInputError, Predictions,
                                          as_uids)

# FP-per-scan rates whose mean sensitivity is the CPM (LUNA16).
FP_RATES = np.array([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
# The official evaluation keeps at most this many candidates per scan.
OFFICIAL_MAX_CANDIDATES_PER_SCAN = 100
# The official evaluation uses this diameter for findings whose diameter_mm is negative.
UNKNOWN_DIAMETER_MM = 10.0
# How FPs per scan and sensitivities are computed: as the official script does, or exactly.
ARITHMETICS = ('official', 'exact')


@dataclasses.dataclass(frozen=True)
class FROCResult:
  """One FROC evaluation.

  fps_per_scan, sensitivity, thresholds: (K,) the curve, one point per distinct probability
    (arithmetic='official': less those evenly between their neighbours on a straight run, as
    roc_curve drops them),
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


@dataclasses.dataclass(frozen=True)
class Matched:
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


def match_candidates(predictions: Predictions, annotations: Annotations,
                     excluded: Annotations | None, seriesuids,
                     max_candidates_per_scan: int | None) -> Matched:
  """Candidates of the scans evaluated (capped per scan) matched to the findings: which hit a
  nodule (and each nodule's best hit), which are false positives, which are ignored."""
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
    given = as_uids(seriesuids, 'seriesuids')
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
  return Matched(
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


def sorted_rows(m: Matched):
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


def _official_points(fps_cum: np.ndarray, hits_cum: np.ndarray) -> np.ndarray:
  """Mask of the points sklearn's roc_curve keeps (drop_intermediate): the first, the last and
  each point where a count's second difference is non-zero (where the curve bends)."""
  keep = np.ones(len(fps_cum), bool)
  if len(fps_cum) > 2:
    keep[1:-1] = (np.diff(fps_cum, 2) != 0) | (np.diff(hits_cum, 2) != 0)
  return keep


def curve_points(fps_cum: np.ndarray, hits_cum: np.ndarray, num_scans: int, num_nodules,
                 arithmetic: str) -> tuple[np.ndarray, np.ndarray]:
  """(fps_per_scan, sensitivity), each (..., K + 1): the (0, 0) point, then one per point.

  fps_cum, hits_cum: (..., K) float64 cumulative false positives and hits, the last point
  holding the totals. num_nodules: scalar or (...,) nodules to find, > 0.
  """
  zeros = np.zeros(fps_cum.shape[:-1] + (1,))
  fps = np.concatenate([zeros, fps_cum], axis=-1)
  hits = np.concatenate([zeros, hits_cum], axis=-1)
  nodules = np.asarray(num_nodules, np.float64)[..., None]
  if arithmetic == 'exact':
    return fps / num_scans, hits / nodules
  # The official script: fpr * total_fps / scans and (tpr * total_hits) / nodules, in this order,
  # fpr and tpr being roc_curve's counts / totals; without FPs it sets every rate to 0. (Without
  # a hit its tpr is NaN; here the sensitivity is 0.)
  total_fps, total_hits = fps[..., -1:], hits[..., -1:]
  with np.errstate(invalid='ignore', divide='ignore'):
    fps = np.where(total_fps > 0, fps / total_fps * total_fps / num_scans, 0.0)
    sens = np.where(total_hits > 0, hits / total_hits * total_hits / nodules, 0.0)
  return fps, sens


def check_arithmetic(arithmetic: str) -> None:
  if arithmetic not in ARITHMETICS:
    raise EvaluationInputError(f"arithmetic must be one of {ARITHMETICS}, got '{arithmetic}'")


def compute_froc(predictions: Predictions, annotations: Annotations,
                 excluded: Annotations | None = None, seriesuids=None, *,
                 max_candidates_per_scan: int | None = OFFICIAL_MAX_CANDIDATES_PER_SCAN,
                 arithmetic: str = 'official') -> FROCResult:
  """LUNA16 FROC curve, sensitivities at 1/8..8 FPs per scan and CPM (definitions above).

  predictions: scored candidates. annotations: the nodules to find. excluded: findings whose
  hits are ignored (LUNA16 annotations_excluded.csv), or None. seriesuids: the scans evaluated
  (each once); candidates and findings of other scans are left out. None means every scan that
  has a candidate or a nodule - pass the list explicitly when some scans may have neither.
  max_candidates_per_scan: the official per-scan cap (100); None keeps every candidate.
  arithmetic: 'official' (equal to the official script's numbers to the last bit) or 'exact'
  (FPs per scan = integer count / scans, every distinct probability a point).
  With no nodules in the scans evaluated, sensitivities and cpm are NaN (undefined); with
  nodules but no hit they are 0.
  """
  check_arithmetic(arithmetic)
  m = match_candidates(predictions, annotations, excluded, seriesuids, max_candidates_per_scan)
  prob, _, is_hit, ends = sorted_rows(m)
  hits_cum = np.cumsum(is_hit)[ends].astype(np.float64)
  fps_cum = np.cumsum(~is_hit)[ends].astype(np.float64)
  thresholds = prob[ends]
  if arithmetic == 'official':
    keep = _official_points(fps_cum, hits_cum)
    fps_cum, hits_cum, thresholds = fps_cum[keep], hits_cum[keep], thresholds[keep]
  num_nodules = len(m.nodule_scan)
  fps, sens = curve_points(fps_cum, hits_cum, max(m.num_scans, 1), max(num_nodules, 1), arithmetic)
  if not num_nodules:
    sens = np.full(len(sens), np.nan)
  sensitivities = np.interp(FP_RATES, fps, sens)
  detected = np.zeros(m.num_annotations, bool)
  detected[m.nodule_rows] = m.nodule_detected
  nodule_prob = np.full(m.num_annotations, np.nan)
  nodule_prob[m.nodule_rows] = m.nodule_probability
  return FROCResult(
      fps_per_scan=fps,
      sensitivity=sens,
      thresholds=np.r_[np.inf, thresholds],
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
