"""--mode=eval of a detect config (config.task 'detect'): the test subsets scored from whole-scan
detections with the official LUNA16 FROC arithmetic, three ways:
  detection        the detector's peaks and probabilities alone
  detection + FPR  each detection re-scored by the crop classifier (detect.classifier_workdir),
                   combined by detect.combine; every rule of rescoring.COMBINE_RULES is scored too
                   (cpm_<rule>), which is how the default rule is chosen
  classifier       the baseline: the crop classifier on the dataset's own candidates, exactly what
                   jaxmed/evaluate.py scores for a classify workdir
and candidate recall (nodules with one of their scan's 8 / 32 / 100 most probable detections
inside their radius). The test scans are read from data.raw_dir (LUNA16 layout) and resampled
as --mode=detect resamples a new scan.

Writes into the workdir: detect/detections.csv (combined probability), predictions.csv (LUNA16
submission of detection + FPR, or of detection alone without a classifier), froc_detect.png (the
curves on one plot) and a 'test' record in metrics.jsonl.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxmed import detect
from jaxmed import evaluate as classify_evaluate
from jaxmed import reporting
from jaxmed import steps
from jaxmed.data import crops_file
from jaxmed.data import prepare
from jaxmed.detection import rescoring
from jaxmed.detection import validation
from jaxmed.errors import ConfigError
from jaxmed.evaluation import froc
from jaxmed.evaluation import plots
from jaxmed.evaluation import submission
from jaxmed.scans import luna16


def _by_scan(annotations: submission.Annotations) -> dict[str, np.ndarray]:
  table: dict[str, list] = {}
  for uid, xyz, d in zip(annotations.seriesuid, annotations.center_world, annotations.diameter_mm):
    table.setdefault(str(uid), []).append([*xyz, d])
  return {uid: np.asarray(rows, np.float64) for uid, rows in table.items()}


def test_scans(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """(seriesuid, read) of every scan of data.test_subsets under data.raw_dir."""
  subsets = set(int(s) for s in config.data.test_subsets)
  scans = [s for s in luna16.find_scans(config.data.raw_dir).values() if s.subset in subsets]
  if not scans:
    raise ConfigError(f'{config.data.raw_dir} holds no scan of data.test_subsets '
                      f'{sorted(subsets)}; set --config.data.test_subsets or data.raw_dir')
  return [(s.seriesuid, lambda s=s: luna16.read_scan(s.mhd_path)) for s in scans]


def _baseline(config):
  """then(classifier) for detect.run: the classifier's FROC predictions on the dataset's own
  candidates of the test subsets (None without a classifier)."""

  def score(classifier):
    if classifier is None:
      return None
    cfg = classifier.classifier_config
    with cfg.unlocked():
      cfg.data.test_subsets = tuple(config.data.test_subsets)
      cfg.data.raw_dir = config.data.raw_dir
    prepare.ensure_crops_file(cfg)
    crops_file.check_uncapped(cfg.data.crops_file)
    scores = steps.predict(classifier.eval_fn, classifier.state, cfg, tuple(cfg.data.test_subsets),
                           classifier.batch_sharding)
    table = classify_evaluate.candidate_table(cfg.data.crops_file, scores['row'])
    return submission.Predictions(table['seriesuid'], table['center_world'],
                                  scores['probability'])
  return score


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores data.test_subsets (module docstring); returns the metrics written to metrics.jsonl."""
  classify_evaluate.check_froc_arithmetic(config)
  detect.check_settings(config)
  scans = test_scans(config)
  raw = lambda name: luna16.resolve(config.data.raw_dir, name)
  annotations = submission.read_annotations(raw(config.data.annotations_csv))
  excluded = (submission.read_annotations(raw(config.data.annotations_excluded_csv))
              if config.data.annotations_excluded_csv else None)
  found, step, baseline = detect.run(config, workdir, scans, then=_baseline(config))
  uids = [uid for uid, _ in scans]
  nodules = {uid: t for uid, t in _by_scan(annotations).items() if uid in set(uids)}
  excluded_by_scan = _by_scan(excluded) if excluded is not None else None
  arithmetic = config.eval.froc_arithmetic

  def result(scores):
    return validation.froc_result(scores, nodules, uids, excluded_by_scan, arithmetic)

  detector_scores = {s.seriesuid: (s.world_xyz, s.detector) for s in found}
  curves = {'detection': result(detector_scores)}
  metrics: dict[str, Any] = {'scans': len(uids), 'nodules': curves['detection'].num_nodules,
                             'detections': int(sum(len(s.detector) for s in found)),
                             'cpm_detection': curves['detection'].cpm}
  metrics.update(validation.candidate_recall(detector_scores, nodules))
  rescored = found[0].classifier is not None if found else False
  if rescored:
    for rule in rescoring.COMBINE_RULES:
      combined = {s.seriesuid: (s.world_xyz, rescoring.combine(s.detector, s.classifier, rule))
                  for s in found}
      metrics[f'cpm_{rule}'] = result(combined).cpm
    curves[f'detection + FPR ({config.detect.combine})'] = result(
        {s.seriesuid: (s.world_xyz, s.probability) for s in found})
    metrics['cpm_detection_fpr'] = metrics[f'cpm_{config.detect.combine}']
  if baseline is not None:
    curves['classifier on the dataset\'s candidates'] = froc.compute_froc(
        baseline, annotations, excluded, np.asarray(sorted(uids), str), arithmetic=arithmetic)
    metrics['cpm_baseline'] = curves['classifier on the dataset\'s candidates'].cpm
  final = curves[list(curves)[1] if rescored else 'detection']
  for rate, sensitivity in zip(final.fp_rates, final.sensitivities):
    metrics[f'sensitivity_at_{rate:g}_fp'] = sensitivity
  metrics['cpm'] = final.cpm
  if jax.process_index() != 0:
    return metrics
  writer = reporting.MetricWriter(workdir)
  try:
    detect.write_detections_csv(os.path.join(workdir, 'detect', 'detections.csv'), found)
    submission.write_predictions_csv(
        os.path.join(workdir, 'predictions.csv'),
        np.concatenate([[s.seriesuid] * len(s.probability) for s in found] + [np.zeros(0, str)]),
        np.concatenate([s.world_xyz.reshape(-1, 3) for s in found] + [np.zeros((0, 3))]),
        np.concatenate([s.probability for s in found] + [np.zeros(0)]))
    figure = plots.plot_froc_curves(curves, os.path.join(workdir, 'froc_detect.png'),
                                    title=f'test subsets {list(config.data.test_subsets)}')
    writer.write_image(step, 'eval/froc_detect', plots.figure_to_image(figure))
    writer.write(step, 'test', metrics)
  finally:
    writer.close()
  logging.info('test subsets %s at step %d: %s', tuple(config.data.test_subsets), step,
               ', '.join(f'{k} {v:.3f}' for k, v in metrics.items()
                         if k.startswith(('cpm', 'recall')) and isinstance(v, float)))
  return metrics
