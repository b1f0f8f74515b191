"""The class-balanced training order: which file rows form global training batch `step`.

A pure function of (seed, step) and the row lists (`train_batch_rows`), with no I/O: the stream
is the same for any number of hosts, devices or Grain workers, and resuming at a step is O(1).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxmed.errors import ConfigError

# Seed streams of the training order (folded with config.seed; each stream is independent).
_POSITIVE_STREAM, _NEGATIVE_STREAM, _ORDER_STREAM = 0, 1, 2
NODULE_STREAM = 3  # The nodules that positive detection patches hold (data/patch_sampling.py).


def positives_per_batch(global_batch_size: int, positive_fraction: float,
                        key: str = 'data.positive_fraction') -> int:
  """Positives in every training batch: round(B * fraction) (Python rounding, half to even).

  ConfigError (one line naming config `key`) unless the fraction is in [0, 1].
  """
  if not 0.0 <= positive_fraction <= 1.0:
    raise ConfigError(f'{key} must be in [0, 1], got {positive_fraction}; set --config.{key}')
  return int(round(global_batch_size * positive_fraction))


def _epoch_permutations(stream: int):
  """(seed, epoch, n) -> the stream's order of epoch `epoch` over n rows, cached per stream."""

  @functools.lru_cache(maxsize=2)  # The epochs one batch can straddle; bounded memory for big n.
  def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    order = np.random.default_rng([seed, stream, epoch]).permutation(n)
    order.setflags(write=False)  # Shared through the cache.
    return order

  return permutation


_EPOCH_PERMUTATIONS = {stream: _epoch_permutations(stream)
                       for stream in (_POSITIVE_STREAM, _NEGATIVE_STREAM, NODULE_STREAM)}


def stream_rows(rows: np.ndarray, seed: int, stream: int, start: int, count: int) -> np.ndarray:
  """Elements start..start+count-1 of `rows` repeated forever, reshuffled every epoch.

  stream: one of the positive / negative streams (each has its own seeds and epoch cache).
  """
  positions = start + np.arange(count, dtype=np.int64)
  epochs, within = np.divmod(positions, len(rows))
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    chosen = epochs == epoch
    order = _EPOCH_PERMUTATIONS[stream](seed, int(epoch), len(rows))
    out[chosen] = rows[order[within[chosen]]]
  return out


def train_batch_rows(seed: int, step: int, global_batch_size: int, positive_rows: np.ndarray,
                     negative_rows: np.ndarray, positive_fraction: float) -> np.ndarray:
  """File rows (int64, (B,)) of global training batch `step`.

  round(B * positive_fraction) rows come from the positive stream and the rest from the negative
  stream; each stream walks its rows in an order reshuffled every epoch, and positions within
  the batch are shuffled too. Depends only on the arguments, never on process/device/worker counts.
  """
  if seed < 0 or step < 0:
    raise ValueError(f'seed and step must be >= 0, got seed={seed}, step={step}')
  num_positive = positives_per_batch(global_batch_size, positive_fraction)
  num_negative = global_batch_size - num_positive
  positive_rows = np.asarray(positive_rows, np.int64)
  negative_rows = np.asarray(negative_rows, np.int64)
  for count, rows, name in ((num_positive, positive_rows, 'positive'),
                            (num_negative, negative_rows, 'negative')):
    if count and not len(rows):
      raise ConfigError(
          f'training batches need {count} {name} examples but the training subsets have none; '
          'check --config.data.train_subsets and --config.data.positive_fraction')
  parts = []
  if num_positive:
    parts.append(stream_rows(positive_rows, seed, _POSITIVE_STREAM, step * num_positive,
                              num_positive))
  if num_negative:
    parts.append(stream_rows(negative_rows, seed, _NEGATIVE_STREAM, step * num_negative,
                              num_negative))
  rows = np.concatenate(parts)
  order = np.random.default_rng([seed, _ORDER_STREAM, step]).permutation(global_batch_size)
  return rows[order]
