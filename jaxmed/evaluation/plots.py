"""Evaluation figures as PNG (and as HWC uint8 images for TensorBoard).

Figures are built on matplotlib's Agg canvas directly, without pyplot: no global backend switch,
no figure registry to leak, safe to call from any thread. Every plot_* returns its Figure, so
the same figure can go to TensorBoard through figure_to_image, and writes `path` (if given)
atomically.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from jaxmed import files
from jaxmed.evaluation.froc import FP_RATES, FROCResult
from jaxmed.evaluation.froc_bootstrap import FROCConfidence
from jaxmed.evaluation.submission import EvaluationInputError
from jaxmed.evaluation.roc import roc_auc, roc_curve

# Lung window for display, HU.
HU_WINDOW = (-1000.0, 400.0)
_FP_LABELS = ('1/8', '1/4', '1/2', '1', '2', '4', '8')


def _froc_axes(ax) -> None:
  """LUNA16's FROC axes: FPs per scan on a log2 axis at its 7 rates, sensitivity 0-1."""
  ax.set_xscale('log', base=2)
  ax.set_xlim(FP_RATES[0], FP_RATES[-1])
  ax.xaxis.set_major_locator(FixedLocator(FP_RATES))
  ax.xaxis.set_minor_locator(NullLocator())
  ax.set_xticklabels(_FP_LABELS)
  ax.set_ylim(0, 1.06)
  ax.set_yticks(np.linspace(0, 1, 11))
  ax.grid(True, which='major', alpha=0.4)
  ax.set_xlabel('Average number of false positives per scan')
  ax.set_ylabel('Sensitivity')


def _new_figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
  fig = Figure(figsize=(width_in, height_in), dpi=dpi)
  FigureCanvasAgg(fig)  # Attaches itself as fig.canvas.
  return fig


def save_png(fig: Figure, path) -> str:
  """Writes `fig` to `path` as PNG, atomically (jaxmed.files.atomic_write); returns the path."""
  with files.atomic_write(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=fig.dpi)
  return os.fspath(path)


def figure_to_image(fig: Figure) -> np.ndarray:
  """(H, W, 3) uint8 RGB rendering of `fig`, for SummaryWriter.add_image(dataformats='HWC')."""
  canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
  canvas.draw()
  return np.array(canvas.buffer_rgba())[..., :3]


def _finish(fig: Figure, path) -> Figure:
  if path is not None:
    save_png(fig, path)
  return fig


def plot_froc(result: FROCResult, ci: FROCConfidence | None = None, path=None,
              name: str = '') -> Figure:
  """FROC curve on a log2 axis over 1/8..8 FPs per scan, the 7 CPM points marked, bootstrap
  band shaded (if `ci`), CPM and its CI in the title. Writes `path` as PNG if given."""
  fig = _new_figure(6.4, 4.8, dpi=120)
  ax = fig.add_subplot()
  # The curve as the official script draws it: interpolated between 1/8 and 8 FPs per scan.
  grid = np.geomspace(FP_RATES[0], FP_RATES[-1], 400)
  label = name or 'FROC'
  if result.num_nodules:
    ax.plot(grid, np.interp(grid, result.fps_per_scan, result.sensitivity), color='C0', lw=2,
            label=label)
    ax.plot(result.fp_rates, result.sensitivities, 'o', color='C0', ms=5,
            label='CPM operating points')
    for i, (rate, sens) in enumerate(zip(result.fp_rates, result.sensitivities)):
      # The end labels lean inwards so that the axes do not cut them.
      align = 'left' if i == 0 else 'right' if i == len(FP_RATES) - 1 else 'center'
      ax.annotate(f'{sens:.3f}', (rate, sens), textcoords='offset points', xytext=(0, 7),
                  ha=align, fontsize=7)
  else:
    ax.text(0.5, 0.5, 'no nodules: sensitivity undefined', transform=ax.transAxes,
            ha='center', va='center')
  title = f'{label}  CPM {result.cpm:.3f}'
  if ci is not None:
    band = ci.band
    ax.fill_between(band.fps_per_scan, band.sensitivity_low, band.sensitivity_high,
                    color='C0', alpha=0.2, lw=0,
                    label=f'{100 * band.confidence:.0f}% CI (bootstrap over scans)')
    title += f' ({100 * band.confidence:.0f}% CI {ci.cpm_low:.3f}-{ci.cpm_high:.3f})'
  ax.set_title(title + f'\n{result.num_scans} scans, {result.num_nodules} nodules, '
               f'{result.num_hits} hit, {result.num_false_positives} FPs', fontsize=10)
  _froc_axes(ax)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  return _finish(fig, path)


def plot_roc(labels, scores, path=None, name: str = '') -> Figure:
  """Candidate-level ROC curve with its AUC in the title. Writes `path` as PNG if given."""
  labels = np.asarray(labels).reshape(-1) != 0
  fpr, tpr, _ = roc_curve(labels, scores)
  auc = roc_auc(labels, scores)
  fig = _new_figure(4.8, 4.8, dpi=120)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color='0.6', ls='--', lw=1)
  ax.plot(fpr, tpr, color='C0', lw=2)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_aspect('equal')
  ax.grid(True, alpha=0.4)
  ax.set_xlabel('False positive rate')
  ax.set_ylabel('True positive rate')
  ax.set_title(f'{name + "  " if name else ""}ROC  AUC {auc:.4f}\n'
               f'{int(labels.sum())} positives, {int((~labels).sum())} negatives', fontsize=10)
  fig.tight_layout()
  return _finish(fig, path)


def plot_montage(crops, titles=None, path=None) -> Figure:
  """Central axial, coronal and sagittal slices of each crop, one row per crop.

  crops: (K, D, H, W) HU, axes (z, y, x) as in the crops file; shown in the window -1000..400
  HU. Axial shows (y down, x right); coronal and sagittal show z increasing upwards.
  titles: K strings (e.g. 'label 1  p=0.93') or None.
  """
  crops = np.asarray(crops)
  if crops.ndim != 4 or crops.shape[0] == 0:
    raise EvaluationInputError(f'crops must have shape (K, D, H, W) with K >= 1, got '
                               f'{crops.shape}')
  num = crops.shape[0]
  if titles is not None and len(titles) != num:
    raise EvaluationInputError(f'{len(titles)} titles for {num} crops: pass one per crop')
  fig = _new_figure(3 * 2.0, num * 2.0 + 0.3, dpi=100)
  axes = fig.subplots(num, 3, squeeze=False)
  vmin, vmax = HU_WINDOW
  for k in range(num):
    crop = crops[k].astype(np.float32)
    d, h, w = crop.shape
    views = (
        ('axial', crop[d // 2], 'upper'),  # (y, x)
        ('coronal', crop[:, h // 2, :], 'lower'),  # (z, x)
        ('sagittal', crop[:, :, w // 2], 'lower'),  # (z, y)
    )
    for col, (view, image, origin) in enumerate(views):
      ax = axes[k, col]
      ax.imshow(image, cmap='gray', vmin=vmin, vmax=vmax, origin=origin,
                interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if k == 0:
        ax.set_title(view, fontsize=9)
    if titles is not None:
      axes[k, 0].set_ylabel(str(titles[k]), fontsize=8)
  fig.suptitle(f'HU window {vmin:.0f}..{vmax:.0f}', fontsize=8)
  fig.tight_layout()
  return _finish(fig, path)


def _number(value) -> float | None:
  """float of a metric value (numbers, or 'nan'/'inf' strings as MetricWriter writes them)."""
  if isinstance(value, bool) or value is None:
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def read_metrics_jsonl(path) -> list[dict]:
  """Records of workdir/metrics.jsonl. A last line cut short (a run still writing) is skipped;
  any other line that is not a JSON object raises EvaluationInputError naming it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise EvaluationInputError(f'metrics file {path} not found: pass workdir/metrics.jsonl of '
                               'a run that has logged at least one step')
  with open(path) as f:
    lines = f.read().split('\n')
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):  # No newline yet: the writer is mid-line.
        continue
      raise EvaluationInputError(f'{path}:{number}: not a JSON object; fix or remove that '
                                 'line') from None
    if not isinstance(record, dict):
      raise EvaluationInputError(f'{path}:{number}: not a JSON object; fix or remove that line')
    records.append(record)
  return records


def _series(records, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  points = [(r['step'], _number(r.get(key))) for r in records
            if r.get('split') == split and _number(r.get('step')) is not None]
  points = sorted((float(s), v) for s, v in points if v is not None)
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps), np.asarray(values)


def plot_training_curves(metrics_jsonl_path, path=None) -> Figure:
  """Loss vs step (train and every eval split) and eval auc / accuracy / cpm vs step.

  Reads the metrics.jsonl contract: one JSON object per line with step, split ('train', 'val',
  ...), loss, and for eval auc, accuracy, cpm. Writes `path` as PNG if given.
  """
  records = read_metrics_jsonl(metrics_jsonl_path)
  splits = []
  for r in records:
    if r.get('split') is not None and r['split'] not in splits:
      splits.append(r['split'])
  eval_splits = [s for s in splits if s != 'train']
  fig = _new_figure(11, 4.2, dpi=100)
  ax_loss, ax_metrics = fig.subplots(1, 2)

  steps, loss = _series(records, 'train', 'loss')
  if len(steps):
    ax_loss.plot(steps, loss, color='C0', lw=0.8, alpha=0.5 if len(steps) > 50 else 1.0,
                 label='train')
    if len(steps) > 50:  # A moving average shows the trend through per-step noise.
      width = max(len(steps) // 50, 2)
      smooth = np.convolve(loss, np.ones(width) / width, mode='valid')
      ax_loss.plot(steps[width - 1:], smooth, color='C0', lw=1.8, label=f'train (mean of {width})')
  for i, split in enumerate(eval_splits):
    steps, loss = _series(records, split, 'loss')
    if len(steps):
      ax_loss.plot(steps, loss, 'o-', color=f'C{i + 1}', ms=3, label=split)
  ax_loss.set_xlabel('step')
  ax_loss.set_ylabel('loss')
  ax_loss.set_title('loss')
  ax_loss.grid(True, alpha=0.4)

  plotted = False
  for i, split in enumerate(eval_splits):
    for key, marker in (('auc', 'o'), ('accuracy', 's'), ('cpm', '^')):
      steps, values = _series(records, split, key)
      if len(steps):
        ax_metrics.plot(steps, values, marker=marker, ms=3, label=f'{split} {key}',
                        color=f'C{i + 1}', alpha=1.0 if key == 'auc' else 0.75,
                        ls={'auc': '-', 'accuracy': '--', 'cpm': ':'}[key])
        plotted = True
  if not plotted:
    ax_metrics.text(0.5, 0.5, 'no evaluation yet', transform=ax_metrics.transAxes,
                    ha='center', va='center')
  ax_metrics.set_ylim(0, 1.02)
  ax_metrics.set_xlabel('step')
  ax_metrics.set_title('evaluation: auc, accuracy, cpm')
  ax_metrics.grid(True, alpha=0.4)
  for ax in (ax_loss, ax_metrics):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl_path))) or
               'training', fontsize=10)
  fig.tight_layout()
  return _finish(fig, path)


def plot_froc_curves(results: dict[str, FROCResult], path=None, title: str = '') -> Figure:
  """Several FROC curves on one log2 axis over 1/8..8 FPs per scan, each labelled with its CPM
  (e.g. detection alone, detection + FP reduction, the classifier on the dataset's candidates).
  A result without nodules is listed as undefined. Writes `path` as PNG if given."""
  fig = _new_figure(6.4, 4.8, dpi=120)
  ax = fig.add_subplot()
  grid = np.geomspace(FP_RATES[0], FP_RATES[-1], 400)
  for i, (name, result) in enumerate(results.items()):
    if not result.num_nodules:
      ax.plot([], [], color=f'C{i}', label=f'{name}: no nodules')
      continue
    ax.plot(grid, np.interp(grid, result.fps_per_scan, result.sensitivity), color=f'C{i}', lw=2,
            label=f'{name}: CPM {result.cpm:.3f}')
    ax.plot(result.fp_rates, result.sensitivities, 'o', color=f'C{i}', ms=4)
  first = next(iter(results.values()))
  ax.set_title((title + '\n' if title else '') + f'{first.num_scans} scans, '
               f'{first.num_nodules} nodules', fontsize=10)
  _froc_axes(ax)
  ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  return _finish(fig, path)
