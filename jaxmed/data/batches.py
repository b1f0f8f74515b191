"""Global batches: this process's rows of a batch as global jax.Arrays, and the iteration
protocol the Grain loader and the device crops cache share."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def batch_axis_sharding(batch_sharding: jax.sharding.Sharding, ndim: int):
  """The sharding of a rank-`ndim` batch array: batch_sharding's spec cut or padded to ndim."""
  if isinstance(batch_sharding, NamedSharding):
    spec = (tuple(batch_sharding.spec) + (None,) * ndim)[:ndim]
    return NamedSharding(batch_sharding.mesh, PartitionSpec(*spec))
  return batch_sharding


def to_global(value: np.ndarray, batch_sharding: jax.sharding.Sharding,
              global_batch_size: int, global_shape: tuple[int, ...] | None = None) -> jax.Array:
  """This process's part of a global (B, ...) batch array, as the global jax.Array.

  The part is its rows (n, ...) of the batch, or with `global_shape` (B, ...) any block the
  sharding gives this process (e.g. its rows and its depth slab of patches).
  """
  return jax.make_array_from_process_local_data(
      batch_axis_sharding(batch_sharding, value.ndim), value,
      global_shape or (global_batch_size,) + value.shape[1:])


class GlobalBatches:
  """An iterator of dicts of global jax.Arrays, closed by close() or by leaving a `with` block.

  num_batches: the length of an evaluation pass; None for training, which runs until closed.
  Subclasses define __next__ and close.
  """

  num_batches: int | None = None

  def __iter__(self):
    return self

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError('a training iterator has no length: it runs until closed')
    return self.num_batches

  def close(self) -> None:
    raise NotImplementedError

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
