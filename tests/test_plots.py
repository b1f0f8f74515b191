"""Evaluation figures: each writes a PNG of the expected size and renders to an HWC image."""

import json
import os

import matplotlib.image
import numpy as np
import pytest

from jaxmed.evaluation import (Annotations, EvaluationInputError, Predictions, bootstrap_froc,
                               compute_froc)
from jaxmed.evaluation import plots

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def read_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  assert os.path.getsize(path) > 5_000  # A drawn figure, not a blank canvas.
  return matplotlib.image.imread(path)


def study(num_scans=20, seed=0):
  rng = np.random.default_rng(seed)
  uids = np.array([f'1.2.{i}' for i in range(num_scans)])
  nodule_scan = np.arange(num_scans)
  nodule_xyz = rng.uniform(-100, 100, (num_scans, 3))
  cand_scan = np.r_[nodule_scan, rng.integers(0, num_scans, 400)]
  cand_xyz = np.r_[nodule_xyz + 0.5, rng.uniform(-100, 100, (400, 3)) + 300]
  probability = np.r_[rng.uniform(0.3, 1.0, num_scans), rng.uniform(0.0, 0.8, 400)]
  return (Predictions(uids[cand_scan], cand_xyz, probability),
          Annotations(uids[nodule_scan], nodule_xyz, np.full(num_scans, 8.0)))


def test_froc_plot_with_ci_band(tmp_path):
  preds, nodules = study()
  result = compute_froc(preds, nodules)
  ci = bootstrap_froc(preds, nodules, num_samples=200)
  fig = plots.plot_froc(result, ci, tmp_path / 'froc.png')
  image = read_png(tmp_path / 'froc.png')
  assert image.shape[:2] == (576, 768)  # 6.4 x 4.8 in at 120 dpi
  assert f'CPM {result.cpm:.3f}' in fig.axes[0].get_title()
  assert f'{ci.cpm_low:.3f}-{ci.cpm_high:.3f}' in fig.axes[0].get_title()
  hwc = plots.figure_to_image(fig)
  assert hwc.dtype == np.uint8 and hwc.shape == (576, 768, 3)
  assert hwc.std() > 10  # not a blank image


def test_froc_plot_without_nodules_still_draws(tmp_path):
  result = compute_froc(Predictions(['a'], np.zeros((1, 3)), [0.5]), Annotations.empty())
  plots.plot_froc(result, None, tmp_path / 'froc.png')
  read_png(tmp_path / 'froc.png')


def test_roc_plot(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  fig = plots.plot_roc(labels, rng.normal(labels, 1.0), tmp_path / 'roc.png')
  assert read_png(tmp_path / 'roc.png').shape[:2] == (576, 576)
  assert 'AUC 0.' in fig.axes[0].get_title()


def test_montage_has_one_row_of_three_views_per_crop(tmp_path):
  rng = np.random.default_rng(0)
  size = 32
  z, y, x = np.mgrid[:size, :size, :size] - size // 2
  blob = np.where(z**2 + y**2 + x**2 < 36, 40, -850)  # nodule-like blob in lung
  crops = np.stack([blob, np.roll(blob, 5, axis=2), rng.integers(-1000, 400, (size,) * 3)])
  crops = crops.astype(np.int16)
  fig = plots.plot_montage(crops, ['label 1  p=0.97', 'label 1  p=0.41', 'label 0  p=0.02'],
                           tmp_path / 'montage.png')
  image = read_png(tmp_path / 'montage.png')
  assert image.shape[:2] == (630, 600)  # 3 x 2 in wide, 3 x 2 + 0.3 in tall at 100 dpi
  assert len(fig.axes) == 9
  assert [ax.get_title() for ax in fig.axes[:3]] == ['axial', 'coronal', 'sagittal']
  with pytest.raises(EvaluationInputError, match='titles'):
    plots.plot_montage(crops, ['only one'])


def write_jsonl(path, records, tail=''):
  with open(path, 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
    f.write(tail)


def training_records():
  records = [{'step': s, 'split': 'train', 'loss': 0.7 * np.exp(-s / 80) + 0.05}
             for s in range(0, 300, 3)]
  records += [{'step': s, 'split': 'val', 'loss': 0.6 * np.exp(-s / 100) + 0.1,
               'auc': 0.6 + s / 1000, 'accuracy': 0.55 + s / 1000, 'cpm': 0.3 + s / 1000}
              for s in range(0, 300, 50)]
  records.append({'step': 300, 'split': 'val', 'loss': 'nan', 'auc': 'nan'})  # NaN, as written
  return records


def test_training_curves_from_metrics_jsonl(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  # A run still writing: the last line is cut short, and is skipped.
  write_jsonl(path, training_records(), tail='{"step": 303, "split": "tr')
  fig = plots.plot_training_curves(path, tmp_path / 'curves.png')
  assert read_png(tmp_path / 'curves.png').shape[:2] == (420, 1100)
  loss_ax, metrics_ax = fig.axes
  assert {line.get_label() for line in loss_ax.get_lines()} >= {'train', 'val'}
  assert {line.get_label() for line in metrics_ax.get_lines()} == {'val auc', 'val accuracy',
                                                                  'val cpm'}
  train_line = next(line for line in loss_ax.get_lines() if line.get_label() == 'train')
  assert len(train_line.get_xdata()) == 100


def test_training_curves_reject_a_broken_line_in_the_middle(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  records = training_records()
  with open(path, 'w') as f:
    f.write(json.dumps(records[0]) + '\nnot json\n' + json.dumps(records[1]) + '\n')
  with pytest.raises(EvaluationInputError, match='metrics.jsonl:2'):
    plots.plot_training_curves(path)
  with pytest.raises(EvaluationInputError, match='not found'):
    plots.plot_training_curves(tmp_path / 'missing.jsonl')


def test_training_curves_before_any_eval(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  write_jsonl(path, [{'step': 0, 'split': 'train', 'loss': 0.69}])
  plots.plot_training_curves(path, tmp_path / 'curves.png')
  read_png(tmp_path / 'curves.png')
