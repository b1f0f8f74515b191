"""--mode=eval: score every candidate of the test subsets, LUNA16 FROC/CPM, submission CSV, plots.

Writes into the workdir:
  predictions.csv           LUNA16 submission: seriesuid,coordX,coordY,coordZ,probability
  metrics.jsonl             one 'test' record: cpm (+ 95% CI), sensitivities over every candidate;
                            loss, auc, accuracy over auc_population (as validation's)
  froc.png, roc.png         curves (FROC with the 7 CPM points and the bootstrap band)
  false_positives.png       top-scoring negatives (axial, coronal, sagittal centre slices)
  missed_nodules.png        lowest-scoring positives
  training_curves.png       loss / AUC from metrics.jsonl
and the same figures as TensorBoard images.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import jax
import ml_collections
import numpy as np
from absl import logging

from jaxmed import reporting
from jaxmed import train
from jaxmed.data import crops_file
from jaxmed.data import prepare
from jaxmed.errors import ConfigError
from jaxmed.evaluation import froc
from jaxmed.evaluation import froc_bootstrap
from jaxmed.evaluation import plots
from jaxmed.evaluation import submission
from jaxmed.parallel import sharding as sharding_lib
from jaxmed.tasks import classify


def _raw_path(config, name: str) -> str:
  return name if os.path.isabs(name) else os.path.join(config.data.raw_dir, name)


def candidate_table(crops_path: str, rows: np.ndarray) -> dict[str, np.ndarray]:
  """seriesuid (str), center_world (N, 3) x,y,z mm, subset and exclude of the given file rows."""
  with h5py.File(crops_path, 'r') as f:
    order = np.argsort(rows)
    sorted_rows = rows[order]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    take = lambda name: f[name][sorted_rows][inverse] if len(rows) else f[name][:0]
    return {'seriesuid': np.char.decode(take('seriesuid').astype('S'), 'ascii'),
            'center_world': take('center_world').astype(np.float64),
            'subset': take('subset'), 'exclude': take('exclude')}


def _read_crops(crops_path: str, rows: np.ndarray) -> np.ndarray:
  with h5py.File(crops_path, 'r') as f:
    return np.stack([f['crops'][int(r)] for r in rows]) if len(rows) else np.zeros((0, 1, 1, 1))


def froc_metrics(config, predictions: submission.Predictions, subsets, workdir, step,
                 writer) -> dict[str, Any]:
  """LUNA16 FROC over the scans of `subsets`; plots into workdir; returns metrics to log."""
  annotations = submission.read_annotations(_raw_path(config, config.data.annotations_csv))
  excluded_csv = config.data.annotations_excluded_csv
  excluded = (submission.read_annotations(_raw_path(config, excluded_csv))
              if excluded_csv else None)
  # The scans evaluated: every scan of these subsets that the crops file holds.
  with h5py.File(config.data.crops_file, 'r') as f:
    in_subsets = np.isin(f['subset'][:], subsets)
    scans = np.unique(np.char.decode(f['seriesuid'][:][in_subsets].astype('S'), 'ascii'))
  arithmetic = config.eval.froc_arithmetic
  result = froc.compute_froc(predictions, annotations, excluded, scans, arithmetic=arithmetic)
  ci = froc_bootstrap.bootstrap_froc(predictions, annotations, excluded, scans,
                                     num_samples=config.eval.bootstrap_samples,
                                     seed=config.seed, arithmetic=arithmetic)
  figure = plots.plot_froc(result, ci, os.path.join(workdir, 'froc.png'))
  writer.write_image(step, 'eval/froc', plots.figure_to_image(figure))
  metrics = {'cpm': result.cpm, 'cpm_low': ci.cpm_low, 'cpm_high': ci.cpm_high,
             'scans': result.num_scans, 'nodules': result.num_nodules,
             'nodules_hit': result.num_hits}
  for rate, sensitivity in zip(result.fp_rates, result.sensitivities):
    metrics[f'sensitivity_at_{rate:g}_fp'] = sensitivity
  return metrics


def check_froc_arithmetic(config) -> None:
  if config.eval.froc_arithmetic not in froc.ARITHMETICS:
    raise ConfigError(f'eval.froc_arithmetic is {config.eval.froc_arithmetic!r}, not one of '
                      f'{froc.ARITHMETICS}; set --config.eval.froc_arithmetic')


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the checkpoint onto the current mesh and evaluates config.data.test_subsets."""
  is_main = jax.process_index() == 0
  check_froc_arithmetic(config)
  mesh, rules = train.create_mesh_and_rules(config)
  prepare.ensure_crops_file(config)
  # LUNA16 scoring needs every candidate: a file built with a cap on negatives would
  # undercount false positives per scan.
  crops_file.check_uncapped(config.data.crops_file)
  subsets = tuple(config.data.test_subsets)
  with h5py.File(config.data.crops_file, 'r') as f:
    held = sorted(set(int(s) for s in np.unique(f['subset'][:])))
  if not set(subsets) & set(held):
    raise ConfigError(f'crops file {config.data.crops_file} holds no candidate of '
                      f'data.test_subsets {list(subsets)}; set --config.data.test_subsets to '
                      f'subsets it holds ({held})')
  batch_sharding = sharding_lib.batch_sharding(mesh, rules, ndim=1)
  with sharding_lib.use_rules(mesh, rules):
    graphdef, state, shardings, step = train.restore_for_eval(config, workdir, mesh, rules)
    logging.info('evaluating step %d of %s on subsets %s', step, workdir, subsets)
    eval_step_fn = train.make_eval_step(graphdef, shardings, mesh, config)
    scores = train.predict(eval_step_fn, state, config, subsets, batch_sharding)

  # Every candidate goes to the FROC; loss, AUC and accuracy leave excluded negatives out, as
  # validation does, so the two AUCs are over the same population.
  table = candidate_table(config.data.crops_file, scores['row'])
  population = {k: v[~table['exclude']] for k, v in scores.items()}
  metrics = {**train.classification_metrics(population['label'], population['probability']),
             'auc_population': classify.AUC_POPULATION, 'candidates': int(len(scores['row']))}
  if not is_main:
    return metrics
  writer = reporting.MetricWriter(workdir)
  try:
    csv_path = submission.write_predictions_csv(
        os.path.join(workdir, 'predictions.csv'), table['seriesuid'], table['center_world'],
        scores['probability'])
    logging.info('wrote %d predictions to %s', len(scores['row']), csv_path)
    predictions = submission.Predictions(table['seriesuid'], table['center_world'],
                                   scores['probability'])
    metrics.update(froc_metrics(config, predictions, subsets, workdir, step, writer))
    _plots(config, population, workdir, step, writer)
    writer.write(step, 'test', metrics)
  finally:
    writer.close()
  logging.info('test subsets %s at step %d: CPM %.3f (95%% CI %.3f-%.3f) over %d candidates; '
               'AUC %.4f, accuracy %.4f over %d (%s)', subsets, step, metrics['cpm'],
               metrics['cpm_low'], metrics['cpm_high'], metrics['candidates'], metrics['auc'],
               metrics['accuracy'], metrics['examples'], metrics['auc_population'])
  return metrics


def _plots(config, scores, workdir, step, writer) -> None:
  labels, probs, rows = scores['label'], scores['probability'], scores['row']
  figures = {'roc': plots.plot_roc(labels, probs, os.path.join(workdir, 'roc.png'))}
  k = config.eval.montage_size
  negatives, positives = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
  worst_negatives = negatives[np.argsort(-probs[negatives], kind='stable')[:k]]
  worst_positives = positives[np.argsort(probs[positives], kind='stable')[:k]]
  for name, picked, what in (('false_positives', worst_negatives, 'negative'),
                             ('missed_nodules', worst_positives, 'nodule')):
    if len(picked):
      crops = _read_crops(config.data.crops_file, rows[picked])
      titles = [f'{what} row {int(r)}  p={p:.3f}' for r, p in zip(rows[picked], probs[picked])]
      figures[name] = plots.plot_montage(crops, titles, os.path.join(workdir, f'{name}.png'))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics_path):
    figures['training_curves'] = plots.plot_training_curves(
        metrics_path, os.path.join(workdir, 'training_curves.png'))
  for name, figure in figures.items():
    writer.write_image(step, f'eval/{name}', plots.figure_to_image(figure))
