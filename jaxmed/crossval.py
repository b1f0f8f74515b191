"""--mode=crossval: LUNA16's 10-fold protocol, each subset held out once, one merged FROC.

Fold k trains on the other subsets except k-1 (which validates during training), then scores
subset k. The ten predictions.csv files are merged and scored as one FROC over all scans, the
number LUNA16 papers report. Folds already finished (their predictions.csv exists) are skipped,
so an interrupted cross-validation resumes; a SIGTERM during a fold's training saves that fold's
step and stops (exit 0) without scoring the half-trained fold.

  python -m jaxmed.main --config=configs/luna16.py --mode=crossval
  python -m jaxmed.main --config=configs/default.py --mode=crossval --config.eval.crossval_folds=(8,9)

Writes workdir/fold_<k>/ (a normal train + eval workdir each), workdir/predictions.csv (all
folds), workdir/froc.png and a 'crossval' record in workdir/metrics.jsonl.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxmed import evaluate
from jaxmed import reporting
from jaxmed import train
from jaxmed.data import crops_file
from jaxmed.data import prepare
from jaxmed.evaluation import froc
from jaxmed.errors import ConfigError
from jaxmed.evaluation import submission

NUM_SUBSETS = 10


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
  """The config of fold `fold`: test on it, validate on the one before, train on the rest."""
  fold_cfg = copy.deepcopy(config)
  val = (fold - 1) % NUM_SUBSETS
  with fold_cfg.unlocked():
    fold_cfg.data.test_subsets = (fold,)
    fold_cfg.data.val_subsets = (val,)
    fold_cfg.data.train_subsets = tuple(s for s in range(NUM_SUBSETS) if s not in (fold, val))
    fold_cfg.name = f'{config.name}_fold{fold}'
  return fold_cfg


def run_crossval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  folds = tuple(config.eval.crossval_folds)
  if not folds or len(set(folds)) != len(folds) or not set(folds) <= set(range(NUM_SUBSETS)):
    raise ConfigError(f'eval.crossval_folds is {folds}: need distinct subsets out of 0..'
                      f'{NUM_SUBSETS - 1}, at least one; set --config.eval.crossval_folds')
  evaluate.check_froc_arithmetic(config)
  # Before any fold trains: the folds are scored on every candidate, so no capped file.
  prepare.ensure_crops_file(config)
  crops_file.check_uncapped(config.data.crops_file)
  parts = []
  for fold in folds:
    fold_dir = os.path.join(workdir, f'fold_{fold}')
    csv_path = os.path.join(fold_dir, 'predictions.csv')
    if not os.path.exists(csv_path):
      logging.info('cross-validation fold %d of %s: training', fold, folds)
      cfg = fold_config(config, fold)
      trained = train.train_and_evaluate(cfg, fold_dir)
      if trained['step'] < cfg.train.steps:  # Stopped by SIGTERM, its step saved: resume later.
        logging.warning('cross-validation stopped in fold %d at step %d (saved); run the same '
                        'command to resume', fold, trained['step'])
        return {'stopped_in_fold': fold, 'step': trained['step']}
      evaluate.evaluate(cfg, fold_dir)
    else:
      logging.info('cross-validation fold %d: %s exists, skipping', fold, csv_path)
    parts.append(csv_path)
  if jax.process_index() != 0:
    return {}

  merged = [submission.read_predictions(p) for p in parts]
  predictions = submission.Predictions(np.concatenate([m.seriesuid for m in merged]),
                                 np.concatenate([m.center_world for m in merged]),
                                 np.concatenate([m.probability for m in merged]))
  submission.write_predictions_csv(os.path.join(workdir, 'predictions.csv'),
                                   predictions.seriesuid, predictions.center_world,
                                   predictions.probability)
  writer = reporting.MetricWriter(workdir)
  try:
    metrics = evaluate.froc_metrics(config, predictions, folds, workdir, step=0, writer=writer)
    writer.write(0, 'crossval', {'folds': len(folds), **metrics})
  finally:
    writer.close()
  logging.info('cross-validation over folds %s: CPM %.3f (95%% CI %.3f-%.3f)', folds,
               metrics['cpm'], metrics['cpm_low'], metrics['cpm_high'])
  return metrics
