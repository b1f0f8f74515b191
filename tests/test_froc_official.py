"""compute_froc against an independent port of the official LUNA16 script, bit for bit.

The port below follows noduleCADEvaluationLUNA16.py's structure loop by loop: per scan, the
100-mark cap (marks strictly above the 101st probability), the nodule loop that deletes matched
marks from a copy, the FROC lists with missed nodules as excluded entries, and computeFROC with
sklearn's roc_curve (written out here in plain Python: ties grouped, drop_intermediate) and its
rates fpr * FPs / scans. The seven sensitivities are np.interp of that curve at 1/8 ... 8 FPs
per scan, CPM their mean. It shares no code with jaxmed.evaluation.
"""

import math

import numpy as np
import pytest

from jaxmed.evaluation import (Annotations, EvaluationInputError, Predictions, bootstrap_froc,
                               compute_froc)

RATES = [0.125, 0.25, 0.5, 1, 2, 4, 8]


# ---- the port ----------------------------------------------------------------------------------


def _roc_curve(y_true, y_score):
  """sklearn.metrics.roc_curve(y_true, y_score) with drop_intermediate=True: fpr, tpr lists."""
  order = sorted(range(len(y_score)), key=lambda i: y_score[i], reverse=True)
  fps, tps = [], []
  tp = fp = 0.0
  for k, i in enumerate(order):
    tp += y_true[i]
    fp += 1.0 - y_true[i]
    if k == len(order) - 1 or y_score[order[k + 1]] != y_score[i]:
      fps.append(fp)
      tps.append(tp)
  if len(fps) > 2:
    keep = [0] + [j for j in range(1, len(fps) - 1)
                  if (fps[j + 1] - fps[j]) - (fps[j] - fps[j - 1]) != 0
                  or (tps[j + 1] - tps[j]) - (tps[j] - tps[j - 1]) != 0] + [len(fps) - 1]
    fps, tps = [fps[j] for j in keep], [tps[j] for j in keep]
  fps, tps = [0.0] + fps, [0.0] + tps
  fpr = [f / fps[-1] if fps[-1] > 0 else math.nan for f in fps]
  tpr = [t / tps[-1] if tps[-1] > 0 else math.nan for t in tps]
  return fpr, tpr


def _compute_froc(froc_gt, froc_prob, total_images, exclude):
  gt_local = [g for g, e in zip(froc_gt, exclude) if not e]
  prob_local = [p for p, e in zip(froc_prob, exclude) if not e]
  detected = sum(gt_local)
  total_lesions = sum(froc_gt)
  total_candidates = len(prob_local)
  fpr, tpr = _roc_curve(gt_local, prob_local)
  if sum(froc_gt) == len(froc_gt):  # no false positives at all
    fps = [0.0] * len(fpr)
  else:
    fps = [f * (total_candidates - detected) / total_images for f in fpr]
  sens = [(t * detected) / total_lesions if total_lesions else math.nan for t in tpr]
  return fps, sens


def official_froc(seriesuids, marks, nodules, excluded, max_marks=100):
  """marks: [(uid, x, y, z, p)]; nodules, excluded: [(uid, x, y, z, d)]. -> fps, sens, cpm."""
  cands_per_scan = {}
  for uid in seriesuids:
    cands = {i: m for i, m in enumerate(m for m in marks if m[0] == uid)}
    if max_marks > 0 and len(cands) > max_marks:
      probs = sorted((c[4] for c in cands.values()), reverse=True)
      threshold = probs[max_marks]
      cands = {k: c for k, c in cands.items() if c[4] > threshold}
    cands_per_scan[uid] = cands
  froc_gt, froc_prob, exclude = [], [], []
  for uid in seriesuids:
    cands = cands_per_scan[uid]
    remaining = dict(cands)
    findings = ([(n, 'Included') for n in nodules if n[0] == uid]
                + [(n, 'Excluded') for n in excluded if n[0] == uid])
    for (_, x, y, z, diameter), state in findings:
      diameter = 10.0 if diameter < 0.0 else diameter
      radius_squared = pow(diameter / 2.0, 2.0)
      matches = []
      for key, c in cands.items():
        dist = math.pow(x - c[1], 2.) + math.pow(y - c[2], 2.) + math.pow(z - c[3], 2.)
        if dist < radius_squared:
          if state == 'Included':
            matches.append(c)
            remaining.pop(key, None)
          elif key in remaining:
            del remaining[key]
      if state == 'Included':
        froc_gt.append(1.0)
        froc_prob.append(max(c[4] for c in matches) if matches else -1e9)
        exclude.append(not matches)
    for c in remaining.values():
      froc_gt.append(0.0)
      froc_prob.append(c[4])
      exclude.append(False)
  fps, sens = _compute_froc(froc_gt, froc_prob, len(seriesuids), exclude)
  sensitivities = np.interp(RATES, fps, sens)
  return np.array(fps), np.array(sens), sensitivities, float(np.mean(sensitivities))


# ---- studies -----------------------------------------------------------------------------------


def _jaxmed(seriesuids, marks, nodules, excluded, **kwargs):
  def table(rows, cls):
    return cls([r[0] for r in rows], np.array([r[1:4] for r in rows], float).reshape(-1, 3),
               [r[4] for r in rows])
  return compute_froc(table(marks, Predictions), table(nodules, Annotations),
                      table(excluded, Annotations), seriesuids, **kwargs)


def random_study(seed):
  """Ties, the cap with ties at the cut-off, duplicates, overlapping nodules, excluded findings,
  negative diameters, scans without marks and marks of scans not evaluated."""
  rng = np.random.default_rng(seed)
  num_scans = int(rng.integers(3, 12))
  uids = [f'1.3.6.{seed}.{s}' for s in range(num_scans)]
  nodules, excluded, marks = [], [], []
  levels = int(rng.choice([5, 20, 1000]))  # few levels: many ties
  prob = lambda: float(rng.integers(0, levels) / levels)
  for uid in uids:
    for _ in range(int(rng.integers(0, 4))):
      c = rng.uniform(-100, 100, 3)
      d = float(rng.choice([-1.0, rng.uniform(3, 30)]))
      nodules.append((uid, *c, d))
      if rng.uniform() < 0.3:  # a second nodule overlapping the first
        nodules.append((uid, *(c + rng.normal(0, 2, 3)), float(rng.uniform(4, 20))))
      for _ in range(int(rng.integers(0, 4))):
        marks.append((uid, *(c + rng.normal(0, 4, 3)), prob()))
    for _ in range(int(rng.integers(0, 2))):
      c = rng.uniform(-100, 100, 3)
      excluded.append((uid, *c, float(rng.choice([-1.0, rng.uniform(3, 15)]))))
      marks.append((uid, *(c + rng.normal(0, 2, 3)), prob()))
    if rng.uniform() < 0.2:
      continue  # no false positives in this scan
    for _ in range(int(rng.choice([5, 40, 130]))):  # 130: over the cap
      marks.append((uid, *rng.uniform(-120, 120, 3), prob()))
    if marks and rng.uniform() < 0.3:
      marks.append(marks[-1])  # a duplicate row
  marks.append(('not.evaluated', 0.0, 0.0, 0.0, 0.99))
  order = rng.permutation(len(marks))
  return uids, [marks[i] for i in order], nodules, excluded


def integral_rate_study(num_scans=5, total_fps=147, hits_after=(5, 10, 20, 40), early_hits=14):
  """Hits right after the 5th, 10th, 20th and 40th FP: there 1, 2, 4, 8 FPs per scan (5 scans)
  are whole numbers of false positives, and a vertical step of the curve sits on the rate."""
  uids = [f'scan{s}' for s in range(num_scans)]
  nodules, marks = [], []
  probability = iter(np.linspace(0.999, 0.001, early_hits + total_fps + len(hits_after)))

  def hit():
    k = len(nodules)
    uid, center = uids[k % num_scans], (100.0 * k, 0.0, 0.0)
    nodules.append((uid, *center, 8.0))
    marks.append((uid, center[0] + 1.0, 0.0, 0.0, float(next(probability))))

  for _ in range(early_hits):
    hit()
  for fp in range(1, total_fps + 1):
    marks.append((uids[fp % num_scans], -500.0, float(fp), 0.0, float(next(probability))))
    if fp in hits_after:
      hit()
  return uids, marks, nodules, []


# ---- tests -------------------------------------------------------------------------------------


def _assert_equal_to_port(study, **kwargs):
  fps, sens, sensitivities, cpm = official_froc(*study)
  result = _jaxmed(*study, **kwargs)
  if np.isnan(sens).all() and result.num_nodules:  # no hit: NaN there, 0 here (deliberate)
    assert result.num_hits == 0
    np.testing.assert_array_equal(result.sensitivities, np.zeros(7))
    np.testing.assert_array_equal(result.fps_per_scan, fps)
    return result
  np.testing.assert_array_equal(result.fps_per_scan, fps)
  np.testing.assert_array_equal(result.sensitivity, sens)
  np.testing.assert_array_equal(result.sensitivities, sensitivities)
  assert result.cpm == cpm or (np.isnan(cpm) and np.isnan(result.cpm))
  return result


@pytest.mark.parametrize('seed', range(40))
def test_random_submissions_equal_the_official_script_bit_for_bit(seed):
  _assert_equal_to_port(random_study(seed))


def test_integral_rates_read_the_bottom_of_the_step_as_the_official_script_does():
  study = integral_rate_study()
  official = _assert_equal_to_port(study)
  assert round(official.cpm, 4) == 0.8254  # (7 * 14 + 0 + 1 + 2 + 3) / (7 * 18)
  np.testing.assert_array_equal(official.sensitivities * 18, [14, 14, 14, 14, 15, 16, 17])
  # fpr * 147 / 5 with fpr = 10 / 147 is 2.0000000000000004, not 2.
  assert official.fps_per_scan.max() > 29.4 - 1e-9
  assert 2.0 < official.fps_per_scan[np.searchsorted(official.fps_per_scan, 2.0)] < 2.0 + 1e-15
  exact = _jaxmed(*study, arithmetic='exact')
  assert round(exact.cpm, 4) == 0.8571  # the top of each step: (7 * 14 + 10) / (7 * 18)
  np.testing.assert_array_equal(exact.sensitivities * 18, [14, 14, 14, 15, 16, 17, 18])


@pytest.mark.parametrize('num_scans', [3, 7, 8, 10, 888])
def test_integral_rates_for_other_scan_counts(num_scans):
  hits_after = [int(r * num_scans) for r in (1, 2, 4, 8)]
  _assert_equal_to_port(integral_rate_study(num_scans, total_fps=9 * num_scans + 3,
                                            hits_after=hits_after, early_hits=3))


@pytest.mark.parametrize('case', ['no hit', 'no false positive', 'no mark', 'ties at the cap',
                                  'mark in two nodules', 'mark on an excluded finding'])
def test_adversarial_submissions_equal_the_official_script(case):
  uids = ['a', 'b']
  nodules = [('a', 0.0, 0.0, 0.0, 10.0), ('b', 0.0, 0.0, 0.0, -1.0)]
  excluded = []
  if case == 'no hit':
    marks = [('a', 50.0, 0.0, 0.0, 0.9), ('b', 50.0, 0.0, 0.0, 0.8)]
  elif case == 'no false positive':
    marks = [('a', 1.0, 0.0, 0.0, 0.9), ('a', 2.0, 0.0, 0.0, 0.9)]
  elif case == 'no mark':
    marks = []
  elif case == 'ties at the cap':  # the 98th to 104th tie at 0.5: all of them dropped
    marks = [('a', 30.0 + i, 0.0, 0.0, 0.5 if i >= 97 else 1 - i / 200) for i in range(103)]
    marks += [('a', 0.0, 0.0, 1.0, 0.5), ('b', 1.0, 0.0, 0.0, 0.7)]
  elif case == 'mark in two nodules':
    nodules.append(('a', 3.0, 0.0, 0.0, 10.0))
    marks = [('a', 1.5, 0.0, 0.0, 0.6), ('b', 30.0, 0.0, 0.0, 0.9), ('b', 0.0, 0.0, 1.0, 0.3)]
  else:
    excluded = [('a', 1.0, 0.0, 0.0, 6.0), ('b', 40.0, 0.0, 0.0, 6.0)]
    marks = [('a', 1.0, 0.0, 0.0, 0.9), ('b', 40.0, 0.0, 0.0, 0.95), ('b', 1.0, 1.0, 0.0, 0.2),
             ('b', 70.0, 0.0, 0.0, 0.1)]
  result = _assert_equal_to_port((uids, marks, nodules, excluded))
  if case == 'ties at the cap':
    assert result.num_candidates == 97 + 1  # scan a keeps its 97 marks above the tie at 0.5
  if case == 'no hit':
    assert result.cpm == 0.0


def test_exact_arithmetic_keeps_every_point_and_divides_counts_once():
  uids, marks, nodules, excluded = random_study(3)
  result = _jaxmed(uids, marks, nodules, excluded, arithmetic='exact')
  fps_counts = result.fps_per_scan * result.num_scans
  np.testing.assert_array_equal(fps_counts, np.round(fps_counts))
  assert len(result.thresholds) == len(np.unique(result.thresholds))
  with pytest.raises(EvaluationInputError, match="arithmetic must be one of"):
    _jaxmed(uids, marks, nodules, excluded, arithmetic='fast')


def test_bootstrap_samples_follow_the_chosen_arithmetic():
  # Same draws (same seed), so the two intervals differ only by the rates' arithmetic: in the
  # integral-rate study the official one reads the bottom of steps that the exact one tops.
  uids, marks, nodules, _ = integral_rate_study()
  preds = Predictions([r[0] for r in marks], np.array([r[1:4] for r in marks]),
                      [r[4] for r in marks])
  nodules = Annotations([r[0] for r in nodules], np.array([r[1:4] for r in nodules]),
                        [r[4] for r in nodules])
  official = bootstrap_froc(preds, nodules, seriesuids=uids, num_samples=300)
  exact = bootstrap_froc(preds, nodules, seriesuids=uids, num_samples=300, arithmetic='exact')
  assert official.cpm_low < exact.cpm_low
  assert np.all(official.sensitivity_low <= exact.sensitivity_low)
  assert np.any(official.sensitivity_low < exact.sensitivity_low)
