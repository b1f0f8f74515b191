"""The device mesh from config.mesh: axes data x fsdp x model x spatial, ici x dcn per axis.

Each axis has an ici size (within a host / slice) and a dcn size (across hosts / slices); the
mesh size of the axis is their product. Exactly one of the eight sizes may be -1: it is filled
from the device count. The mesh uses Auto axes (GSPMD propagates shardings between the
constraints the model and the train step give).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxmed.errors import UserError
from jaxmed.parallel import sharding

MESH_AXES = ('data', 'fsdp', 'model', 'spatial')


class MeshError(UserError, ValueError):
  """A mesh or batch size that does not fit the devices; the message is one line with the fix."""


def _get(mesh_config: Any, key: str) -> int:
  value = mesh_config[key] if isinstance(mesh_config, Mapping) else getattr(mesh_config, key)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise MeshError(f'config.mesh.{key}={value!r} is not an integer; set it to a size >= 1 or -1')
  if value == 0 or value < -1:
    raise MeshError(f'config.mesh.{key}={value} is not a mesh size; set it to a size >= 1 or -1')
  return int(value)


def describe(sizes: Sequence[int] | Mesh) -> str:
  """'data=2 x fsdp=1 x model=4 x spatial=1' for a mesh or its four axis sizes."""
  if isinstance(sizes, Mesh):
    sizes = [sizes.shape[a] for a in MESH_AXES]
  return ' x '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici sizes, dcn sizes) per axis of MESH_AXES, with the one -1 filled from num_devices.

  Raises MeshError (one line naming the numbers) for two or more -1 sizes, or sizes whose
  product cannot equal num_devices.
  """
  keys = [f'{kind}_{axis}' for kind in ('ici', 'dcn') for axis in MESH_AXES]
  values = {key: _get(mesh_config, key) for key in keys}
  free = [key for key in keys if values[key] == -1]
  if len(free) > 1:
    raise MeshError(
        f'mesh sizes {", ".join(f"{k}=-1" for k in free)}: only one size may be -1; '
        f'set all but one of them (--config.mesh.{free[1]}=1)')
  known = math.prod(v for v in values.values() if v != -1)
  if free:
    if num_devices % known != 0:
      shown = [values[f'ici_{a}'] * values[f'dcn_{a}'] if f'ici_{a}' not in free
               and f'dcn_{a}' not in free else -1 for a in MESH_AXES]
      raise MeshError(
          f'mesh {describe(shown)} cannot fill {free[0]}=-1: {num_devices} devices are not '
          f'divisible by the other sizes\' product {known}; choose sizes that divide '
          f'{num_devices}')
    values[free[0]] = num_devices // known
  ici = tuple(values[f'ici_{a}'] for a in MESH_AXES)
  dcn = tuple(values[f'dcn_{a}'] for a in MESH_AXES)
  total = math.prod(ici) * math.prod(dcn)
  if total != num_devices:
    sizes = [i * d for i, d in zip(ici, dcn)]
    biggest = MESH_AXES[int(np.argmax(sizes))]
    raise MeshError(
        f'mesh {describe(sizes)} needs {total} devices but {num_devices} are available; set '
        f'--config.mesh.ici_{biggest}=-1 (or another axis) or choose sizes whose product is '
        f'{num_devices}')
  return ici, dcn


def _num_granules(devices: Sequence[Any]) -> tuple[int, bool]:
  """(number of slices, or of processes when all devices share one slice; whether processes).

  TPU multislice devices carry distinct slice_index values; GPU and CPU hosts report one slice
  (or none), and there the processes are what dcn axes span.
  """
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if len(slices) > 1:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def _hybrid_reshape(devices: Sequence[Any], ici: Sequence[int], dcn: Sequence[int]) -> np.ndarray:
  """Devices ordered process-major, laid out so each axis is dcn-major then ici."""
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  grid = np.array(ordered, dtype=object).reshape(tuple(dcn) + tuple(ici))
  n = len(MESH_AXES)
  interleaved = [axis for i in range(n) for axis in (i, n + i)]  # (dcn_0, ici_0, dcn_1, ...)
  return grid.transpose(interleaved).reshape([i * d for i, d in zip(ici, dcn)])


def create_mesh(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """The jax.sharding.Mesh ('data', 'fsdp', 'model', 'spatial') from config.mesh, Auto axes.

  devices: defaults to jax.devices() (all processes). With a dcn product > 1 the dcn part of
  each axis spans processes / slices (mesh_utils.create_hybrid_device_mesh); otherwise
  mesh_utils.create_device_mesh; a plain reshape when those refuse (e.g. on CPU).
  Raises MeshError when the sizes do not fit the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = mesh_shape(mesh_config, len(devices))
  shape = [i * d for i, d in zip(ici, dcn)]
  if math.prod(dcn) > 1:
    granules, process_is_granule = _num_granules(devices)
    if granules != math.prod(dcn):
      logging.warning(
          'mesh dcn sizes multiply to %d but the devices span %d %s; placing devices by a plain '
          'reshape', math.prod(dcn), granules, 'processes' if process_is_granule else 'slices')
      grid = _hybrid_reshape(devices, ici, dcn)
    else:
      try:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=process_is_granule,
            allow_split_physical_axes=True)
      except (ValueError, NotImplementedError, AssertionError, KeyError) as e:
        logging.info('create_hybrid_device_mesh refused (%s); using a plain reshape', e)
        grid = _hybrid_reshape(devices, ici, dcn)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError, KeyError) as e:
      logging.info('create_device_mesh refused (%s); using a plain reshape', e)
      grid = np.array(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_shards(mesh: Mesh, rules: sharding.LogicalRules) -> int:
  """How many pieces the 'batch' axis is split into on `mesh` under `rules`."""
  return math.prod(mesh.shape[a] for a in sharding.mesh_axes_for('batch', mesh, rules))


def check_batch_divisible(global_batch_size: int, mesh: Mesh,
                          rules: sharding.LogicalRules) -> None:
  """Raises MeshError (one line) unless the batch axes of `mesh` divide global_batch_size."""
  axes = sharding.mesh_axes_for('batch', mesh, rules)
  shards = batch_shards(mesh, rules)
  if global_batch_size <= 0 or global_batch_size % shards != 0:
    named = ' x '.join(f'{a}={mesh.shape[a]}' for a in axes) or 'none'
    raise MeshError(
        f'global batch size {global_batch_size} is not divisible by {shards}, the product of '
        f'the batch mesh axes ({named}); set --config.train.global_batch_size to a multiple of '
        f'{shards}')
