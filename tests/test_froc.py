"""LUNA16 FROC / CPM, bootstrap CI, candidate ROC and the submission CSV, on hand-built cases."""

import csv
import os
import time

import numpy as np
import pytest

from jaxmed.errors import UserError
from jaxmed.evaluation import (FP_RATES, Annotations, EvaluationInputError, Predictions,
                               accuracy, bootstrap_froc, compute_froc, read_annotations,
                               read_predictions, read_seriesuids, roc_auc, roc_curve,
                               write_predictions_csv)


def predictions(rows):
  """rows: (seriesuid, x, y, z, probability)."""
  return Predictions([r[0] for r in rows], np.array([r[1:4] for r in rows], float).reshape(-1, 3),
                     [r[4] for r in rows])


def annotations(rows):
  """rows: (seriesuid, x, y, z, diameter_mm)."""
  return Annotations([r[0] for r in rows], np.array([r[1:4] for r in rows], float).reshape(-1, 3),
                     [r[4] for r in rows])


# Four scans, four nodules (D has no candidates at all), five false positives.
HAND_NODULES = [
    ('A', 0, 0, 0, 10.0),  # a1: radius 5
    ('A', 50, 0, 0, 10.0),  # a2
    ('B', 0, 0, 0, 20.0),  # b1: radius 10
    ('D', 0, 0, 0, 10.0),  # d1: no candidate in D -> missed
]
HAND_CANDIDATES = [
    ('A', 1, 0, 0, 0.9),  # hits a1
    ('A', 0, 2, 0, 0.6),  # hits a1 again: ignored, a1 keeps 0.9
    ('A', 100, 0, 0, 0.8),  # FP
    ('A', 50, 0, 3, 0.3),  # hits a2
    ('B', 0, 0, 8, 0.7),  # hits b1 (8 mm < radius 10)
    ('B', 40, 40, 40, 0.5),  # FP
    ('C', 0, 0, 0, 0.95),  # FP (C has no nodules)
    ('C', 10, 10, 10, 0.4),  # FP
    ('C', 20, 20, 20, 0.2),  # FP
]


def test_hand_worked_case_gives_exact_sensitivities():
  # Rows by probability (hits count once per nodule, with their best probability):
  #   0.95 FP, 0.90 hit, 0.80 FP, 0.70 hit, 0.50 FP, 0.40 FP, 0.30 hit, 0.20 FP
  # Curve (FPs / 4 scans, hits / 4 nodules), starting at (0, 0):
  #   (0.25, 0) (0.25, .25) (0.5, .25) (0.5, .5) (0.75, .5) (1, .5) (1, .75) (1.25, .75)
  # 1/8: between (0, 0) and (0.25, 0) -> 0.
  # 1/4, 1/2, 1: the rate falls on a vertical step; every hit before the next FP counts, so the
  #   top of the step: 0.25, 0.5, 0.75 (exact arithmetic).
  # 2, 4, 8: past the curve's end (1.25, 0.75) -> flat at 0.75 (d1 is never found).
  # CPM = (0 + 0.25 + 0.5 + 0.75 * 4) / 7 = 3.75 / 7. The official arithmetic gives the same
  # (1/5 * 5 / 4 is exactly 0.25) and drops the point (0.75, .5) inside a straight run.
  official = compute_froc(predictions(HAND_CANDIDATES), annotations(HAND_NODULES),
                          seriesuids=['A', 'B', 'C', 'D'])
  np.testing.assert_allclose(official.sensitivities, [0, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75])
  np.testing.assert_allclose(official.fps_per_scan, [0, .25, .25, .5, .5, 1, 1, 1.25])
  result = compute_froc(predictions(HAND_CANDIDATES), annotations(HAND_NODULES),
                        seriesuids=['A', 'B', 'C', 'D'], arithmetic='exact')
  np.testing.assert_allclose(result.sensitivities, [0, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75])
  assert result.cpm == pytest.approx(3.75 / 7)
  np.testing.assert_allclose(result.fp_rates, FP_RATES)
  assert (result.num_scans, result.num_nodules, result.num_hits) == (4, 4, 3)
  assert (result.num_false_positives, result.num_candidates, result.num_ignored) == (5, 9, 0)
  np.testing.assert_allclose(result.fps_per_scan, [0, .25, .25, .5, .5, .75, 1, 1, 1.25])
  np.testing.assert_allclose(result.sensitivity, [0, 0, .25, .25, .5, .5, .5, .75, .75])
  np.testing.assert_allclose(result.thresholds, [np.inf, .95, .9, .8, .7, .5, .4, .3, .2])


def test_duplicate_hits_on_one_nodule_count_once_with_their_best_probability():
  result = compute_froc(predictions(HAND_CANDIDATES), annotations(HAND_NODULES),
                        seriesuids=['A', 'B', 'C', 'D'])
  np.testing.assert_array_equal(result.nodule_detected, [True, True, True, False])
  np.testing.assert_allclose(result.nodule_probability, [0.9, 0.3, 0.7, np.nan])
  # The 0.6 candidate on a1 is neither a second hit nor a false positive.
  assert result.num_hits == 3 and result.num_false_positives == 5


def test_perfect_scores_give_cpm_one():
  nodules = annotations([(f's{i}', 10 * i, 0, 0, 6.0) for i in range(5)])
  hits = [(f's{i}', 10 * i + 1, 0, 0, 1.0) for i in range(5)]
  false_positives = [(f's{i}', 10 * i, 50 + j, 0, 0.0) for i in range(5) for j in range(20)]
  result = compute_froc(predictions(hits + false_positives), nodules)
  np.testing.assert_allclose(result.sensitivities, np.ones(7))
  assert result.cpm == 1.0


def test_tied_probabilities_enter_the_curve_together():
  # Scans X, Y; nodule in X hit at 0.5, FP in Y also at 0.5, another FP at 0.1. The tie makes one
  # point (1 FP / 2 scans, 1 hit / 1 nodule) = (0.5, 1) reached from (0, 0) in a straight line,
  # so the rates 1/8, 1/4, 1/2 read 0.25, 0.5, 1 (sklearn's roc_curve groups ties the same way in
  # the official script). Were the hit ranked first, 1/8 would read 1.
  result = compute_froc(
      predictions([('X', 0, 0, 0, 0.5), ('Y', 9, 9, 9, 0.5), ('Y', 0, 0, 0, 0.1)]),
      annotations([('X', 0, 0, 0, 4.0)]))
  np.testing.assert_allclose(result.sensitivities, [0.25, 0.5, 1, 1, 1, 1, 1])


def test_excluded_findings_are_neither_hits_nor_false_positives():
  cands = predictions([('A', 0, 0, 0, 0.9), ('A', 30, 0, 0, 0.95), ('A', 60, 0, 0, 0.2)])
  nodules = annotations([('A', 0, 0, 0, 5.0)])
  excluded = annotations([('A', 31, 0, 0, 4.0)])
  with_exclusion = compute_froc(cands, nodules, excluded)
  assert with_exclusion.num_false_positives == 1 and with_exclusion.num_ignored == 1
  assert with_exclusion.num_nodules == 1  # Excluded findings are not nodules to find.
  # 0.95 no longer counts as an FP above the hit: sensitivity 1 from 0 FPs per scan on.
  np.testing.assert_allclose(with_exclusion.sensitivities, np.ones(7))
  without = compute_froc(cands, nodules)
  assert without.num_false_positives == 2 and without.num_ignored == 0


def test_excluded_finding_with_negative_diameter_counts_as_10_mm():
  cands = predictions([('A', 4.9, 0, 0, 0.9), ('A', 5.1, 20, 0, 0.8)])
  excluded = annotations([('A', 0, 0, 0, -1.0), ('A', 0, 20, 0, -1.0)])
  result = compute_froc(cands, annotations([('A', 90, 0, 0, 5.0)]), excluded)
  assert result.num_ignored == 1 and result.num_false_positives == 1


def test_scans_without_candidates_count_in_fps_per_scan_and_their_nodules_as_missed():
  cands = predictions([('A', 0, 0, 0, 0.9), ('A', 40, 0, 0, 0.8), ('A', 50, 0, 0, 0.7)])
  nodules = annotations([('A', 0, 0, 0, 6.0), ('B', 0, 0, 0, 6.0)])
  two_scans = compute_froc(cands, nodules)  # A and B (B: a nodule, no candidates)
  four_scans = compute_froc(cands, nodules, seriesuids=['A', 'B', 'C', 'D'])
  assert two_scans.num_scans == 2 and four_scans.num_scans == 4
  assert two_scans.num_nodules == four_scans.num_nodules == 2
  np.testing.assert_allclose(two_scans.fps_per_scan[-1], 2 / 2)
  np.testing.assert_allclose(four_scans.fps_per_scan[-1], 2 / 4)
  np.testing.assert_allclose(four_scans.sensitivities, np.full(7, 0.5))  # B's nodule missed


def test_candidates_of_scans_not_evaluated_are_left_out():
  cands = predictions([('A', 0, 0, 0, 0.9), ('Z', 40, 0, 0, 0.99)])
  result = compute_froc(cands, annotations([('A', 0, 0, 0, 6.0)]), seriesuids=['A'])
  assert result.num_candidates == 1 and result.num_false_positives == 0


@pytest.mark.parametrize('dz, hit', [(3.999999, True), (4.0, False), (4.000001, False)])
def test_hit_needs_the_centre_strictly_inside_the_radius(dz, hit):
  # Radius 5 mm; offset (3, 0, dz) mm from the centre: exactly 5 mm (3-4-5) is not a hit.
  cands = predictions([('A', 10 + 3.0, 20, -30 + dz, 0.7)])
  result = compute_froc(cands, annotations([('A', 10, 20, -30, 10.0)]))
  assert result.num_hits == int(hit)
  assert result.num_false_positives == int(not hit)


def test_official_cap_keeps_each_scans_100_most_probable_candidates():
  probability = np.linspace(0.99, 0.01, 150)
  rows = [('A', 1000 + i, 0, 0, p) for i, p in enumerate(probability)]
  rows[120] = ('A', 0, 0, 0, probability[120])  # the 121st most probable hits the nodule
  nodule = annotations([('A', 0, 0, 0, 6.0)])
  capped = compute_froc(predictions(rows), nodule)
  assert capped.num_candidates == 100 and capped.num_hits == 0
  uncapped = compute_froc(predictions(rows), nodule, max_candidates_per_scan=None)
  assert uncapped.num_candidates == 150 and uncapped.num_hits == 1


def test_no_nodules_gives_nan_sensitivity():
  result = compute_froc(predictions([('A', 0, 0, 0, 0.9)]), Annotations.empty())
  assert result.num_nodules == 0 and np.isnan(result.cpm)
  assert np.isnan(result.sensitivities).all()


def test_predictions_accept_hdf5_bytes_uids_and_reject_nan():
  p = Predictions(np.array([b'1.2.3']), np.zeros((1, 3)), [0.5])
  assert p.seriesuid.tolist() == ['1.2.3']
  with pytest.raises(EvaluationInputError, match='NaN'):
    Predictions(['a'], np.zeros((1, 3)), [np.nan])
  with pytest.raises(EvaluationInputError, match=r'\(1, 3\)'):
    Predictions(['a'], np.zeros((1, 2)), [0.5])


# ---------------------------------------------------------------------------------------------
# Bootstrap


def _random_study(num_scans, num_candidates, seed=0):
  rng = np.random.default_rng(seed)
  uids = np.array([f'1.3.6.1.{i}' for i in range(num_scans)])
  nodule_scan = rng.integers(0, num_scans, int(1.5 * num_scans))
  nodule_xyz = rng.uniform(-150, 150, (len(nodule_scan), 3))
  cand_scan = rng.integers(0, num_scans, num_candidates)
  cand_xyz = rng.uniform(-150, 150, (num_candidates, 3))
  probability = rng.uniform(size=num_candidates)
  near = rng.integers(0, len(nodule_scan), len(nodule_scan) * 2)
  cand_scan[:len(near)] = nodule_scan[near]
  cand_xyz[:len(near)] = nodule_xyz[near] + rng.normal(0, 1, (len(near), 3))
  probability[:len(near)] = rng.uniform(0.5, 1.0, len(near))
  return (Predictions(uids[cand_scan], cand_xyz, probability),
          Annotations(uids[nodule_scan], nodule_xyz, rng.uniform(4, 30, len(nodule_scan))), uids)


def test_bootstrap_ci_contains_the_point_estimate_and_is_deterministic():
  preds, nodules, uids = _random_study(40, 4000)
  result = compute_froc(preds, nodules, seriesuids=uids)
  ci = bootstrap_froc(preds, nodules, seriesuids=uids, num_samples=300, seed=3)
  assert ci.cpm_low < result.cpm < ci.cpm_high
  assert np.all(ci.sensitivity_low <= result.sensitivities + 1e-12)
  assert np.all(result.sensitivities <= ci.sensitivity_high + 1e-12)
  band = ci.band
  assert band.fps_per_scan[0] == pytest.approx(0.125) and band.fps_per_scan[-1] == pytest.approx(8)
  assert np.all(band.sensitivity_low <= band.sensitivity_high)
  again = bootstrap_froc(preds, nodules, seriesuids=uids, num_samples=300, seed=3)
  assert (again.cpm_low, again.cpm_high) == (ci.cpm_low, ci.cpm_high)
  cpm_low, cpm_high, sens_low, sens_high, band = again  # unpacks as a 5-tuple
  assert sens_low.shape == sens_high.shape == (7,)


def test_bootstrap_ci_collapses_when_all_scans_are_identical():
  rows, nodule_rows = [], []
  for s in range(6):  # every scan: one nodule hit at 0.8, FPs at 0.9 and 0.3
    rows += [(f's{s}', 0, 0, 0, 0.8), (f's{s}', 50, 0, 0, 0.9), (f's{s}', 80, 0, 0, 0.3)]
    nodule_rows.append((f's{s}', 0, 0, 0, 8.0))
  result = compute_froc(predictions(rows), annotations(nodule_rows))
  ci = bootstrap_froc(predictions(rows), annotations(nodule_rows), num_samples=200)
  assert ci.cpm_low == pytest.approx(result.cpm) and ci.cpm_high == pytest.approx(result.cpm)
  np.testing.assert_allclose(ci.sensitivity_low, result.sensitivities)
  np.testing.assert_allclose(ci.sensitivity_high, result.sensitivities)
  np.testing.assert_allclose(ci.band.sensitivity_low, ci.band.sensitivity_high)


def test_bootstrap_of_100_scans_and_100k_candidates_takes_seconds():
  preds, nodules, uids = _random_study(100, 100_000, seed=1)
  start = time.perf_counter()
  ci = bootstrap_froc(preds, nodules, seriesuids=uids, num_samples=1000,
                      max_candidates_per_scan=None)
  assert time.perf_counter() - start < 10.0
  assert 0.0 <= ci.cpm_low <= ci.cpm_high <= 1.0


# ---------------------------------------------------------------------------------------------
# CSV files


def test_predictions_csv_has_one_row_per_candidate_and_reads_back_exactly(tmp_path):
  rng = np.random.default_rng(0)
  uids = np.array([b'1.3.6.1.4.1.14519.5.2.1.6279.6001.1', b'1.3.6.1.4.1.14519.5.2.1.6279.6001.2'])
  seriesuid = uids[rng.integers(0, 2, 25)]
  center = rng.normal(0, 100, (25, 3))
  probability = rng.uniform(size=25).astype(np.float32)
  path = tmp_path / 'workdir' / 'predictions.csv'
  write_predictions_csv(path, seriesuid, center, probability)
  with open(path, newline='') as f:
    lines = list(csv.reader(f))
  assert lines[0] == ['seriesuid', 'coordX', 'coordY', 'coordZ', 'probability']
  assert len(lines) == 1 + 25
  back = read_predictions(path)
  np.testing.assert_array_equal(back.seriesuid, np.char.decode(seriesuid))
  np.testing.assert_array_equal(back.center_world, center)  # bit-exact
  np.testing.assert_array_equal(back.probability, probability.astype(np.float64))
  assert os.listdir(path.parent) == ['predictions.csv']  # no temporary file left


def test_failed_write_leaves_the_previous_predictions_csv_intact(tmp_path):
  path = tmp_path / 'predictions.csv'
  write_predictions_csv(path, ['a'], np.zeros((1, 3)), [0.5])
  before = path.read_text()
  with pytest.raises(EvaluationInputError):
    write_predictions_csv(path, ['a', 'b'], np.zeros((2, 3)), [0.5, np.nan])
  assert path.read_text() == before and os.listdir(tmp_path) == ['predictions.csv']


def test_read_annotations_and_one_line_errors(tmp_path):
  path = tmp_path / 'annotations.csv'
  path.write_text('seriesuid,coordX,coordY,coordZ,diameter_mm\n'
                  '1.2.3,-128.69,-175.31,-298.38,5.65\n1.2.4,103.78,-211.92,-227.12,4.22\n')
  nodules = read_annotations(path)
  assert nodules.seriesuid.tolist() == ['1.2.3', '1.2.4']
  np.testing.assert_allclose(nodules.center_world[0], [-128.69, -175.31, -298.38])
  np.testing.assert_allclose(nodules.diameter_mm, [5.65, 4.22])

  with pytest.raises(UserError, match='does not exist') as missing:
    read_annotations(tmp_path / 'nope.csv')
  bad = tmp_path / 'bad.csv'
  bad.write_text('seriesuid,coordX,coordY,coordZ\n1.2.3,1,2,3\n')
  with pytest.raises(UserError, match='lacks column diameter_mm') as no_column:
    read_annotations(bad)
  bad.write_text('seriesuid,coordX,coordY,coordZ,probability\n1.2.3,1,2,x,0.5\n')
  with pytest.raises(UserError, match=r'bad.csv: column coordZ has .x. on data row 1') as bad_value:
    read_predictions(bad)
  for error in (missing, no_column, bad_value):
    assert '\n' not in str(error.value)


def test_read_seriesuids_skips_a_header(tmp_path):
  path = tmp_path / 'seriesuids.csv'
  path.write_text('seriesuid\n1.2.3\n1.2.4\n')
  assert read_seriesuids(path).tolist() == ['1.2.3', '1.2.4']


# ---------------------------------------------------------------------------------------------
# Candidate-level ROC


def test_roc_auc_equals_the_pairwise_count_with_ties_as_half():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 300)
  scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties
  pos, neg = scores[labels == 1], scores[labels == 0]
  pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
  assert roc_auc(labels, scores) == pytest.approx(pairwise / (len(pos) * len(neg)), abs=1e-12)
  fpr, tpr, _ = roc_curve(labels, scores)
  assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores), abs=1e-12)


def test_roc_auc_is_nan_with_one_class_and_roc_curve_spans_the_unit_square():
  assert np.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
  assert np.isnan(roc_auc([0, 0], [0.1, 0.2]))
  fpr, tpr, thresholds = roc_curve([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.4])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
  np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.1])


def test_accuracy_at_a_threshold():
  assert accuracy([0, 1, 1, 0], [0.2, 0.7, 0.5, 0.6]) == 0.75  # 0.5 counts as positive
  assert accuracy([0, 1], [0.2, 0.7], threshold=0.8) == 0.5
