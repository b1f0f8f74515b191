"""Candidate-level ROC: AUC by ranks, the ROC curve, and accuracy at a threshold."""

from __future__ import annotations

import numpy as np

from jaxmed.evaluation.submission import EvaluationInputError


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  """(N,) bool labels (nonzero = positive) and (N,) float64 scores, validated."""
  labels = np.asarray(labels).reshape(-1) != 0
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  if labels.shape != scores.shape:
    raise EvaluationInputError(f'labels ({labels.size}) and scores ({scores.size}) differ in '
                               'length: pass one score per labelled candidate')
  if np.isnan(scores).any():
    raise EvaluationInputError(f'{int(np.isnan(scores).sum())} scores are NaN: pass finite '
                               'scores')
  return labels, scores


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given the mean of the ranks they span."""
  order = np.argsort(values, kind='stable')
  sorted_values = values[order]
  new_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
  group = np.cumsum(new_group) - 1
  first = np.flatnonzero(new_group)  # 0-based start of each group
  last = np.r_[first[1:], len(values)] - 1
  ranks = np.empty(len(values))
  ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
  return ranks


def roc_auc(labels, scores) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

  labels: (N,) 0/1 (or bool); scores: (N,). NaN when either class is absent.
  """
  labels, scores = _check(labels, scores)
  num_pos = int(labels.sum())
  num_neg = len(labels) - num_pos
  if num_pos == 0 or num_neg == 0:
    return float('nan')
  ranks = _average_ranks(scores)
  return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds), one point per distinct score plus (0, 0) at threshold +inf.

  Thresholds descend; a point counts scores >= its threshold as positive (as sklearn's
  roc_curve without drop_intermediate). fpr is NaN without negatives, tpr without positives.
  """
  labels, scores = _check(labels, scores)
  order = np.argsort(-scores, kind='stable')
  scores, labels = scores[order], labels[order]
  ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]) if len(scores) else np.zeros(
      0, int)
  tps = np.r_[0, np.cumsum(labels)[ends]]
  fps = np.r_[0, np.cumsum(~labels)[ends]]
  with np.errstate(invalid='ignore', divide='ignore'):
    fpr = fps / fps[-1] if fps[-1] else np.full(len(fps), np.nan)
    tpr = tps / tps[-1] if tps[-1] else np.full(len(tps), np.nan)
  return fpr, tpr, np.r_[np.inf, scores[ends]]


def accuracy(labels, scores, threshold: float = 0.5) -> float:
  """Fraction of candidates with (score >= threshold) == label; NaN for no candidates."""
  labels, scores = _check(labels, scores)
  if len(labels) == 0:
    return float('nan')
  return float(np.mean((scores >= threshold) == labels))
