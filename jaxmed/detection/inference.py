"""Whole-volume detector inference: one jitted forward over whole scans, depth split over the mesh.

A volume (D, H, W) int16 HU on the detector's grid is padded with air (-1000 HU) at its far ends
to a multiple of the model's size_divisor (depth: size_divisor x the devices depth splits over,
so every layer's depth divides), and several volumes run at once over the batch axes (one per
batch shard; a group is padded to its largest member). The input is sharded ('batch', 'depth',
'height', 'width'), so the model's convolutions run depth-split with halos
(jaxmed/parallel/spatial.py): the same numbers as one device. The output maps (small: 1/stride^3
of the volume) come back replicated and are cut back to the volume's cells, ceil(D / stride) etc.

Windows: where a device's slab, (padded D / spatial) x H x W x volumes per batch shard, exceeds
detect.max_voxels_per_device, or where the compiled whole-volume program needs more bytes than
the device has (when the backend reports both), the volume runs as windows along depth. Each
window reaches `overlap` input voxels past the cells it keeps on either side (clamped to the
volume, where the whole-volume run sees the same ends). With overlap >= the receptive field's
radius, measured by receptive_radius, every kept cell sees exactly the input it sees in the
whole-volume run: the stitched maps equal the whole-volume maps to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmed.data import augment
from jaxmed.errors import ConfigError
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib
from jaxmed.scans.luna16 import AIR_HU

VOLUME_AXES = ('batch', 'depth', 'height', 'width')
MAP_NAMES = ('heatmap', 'log_diameter', 'offset')

# model_apply(state, images (B, D, H, W, 1) float32 in [0, 1]) -> {'heatmap', 'log_diameter',
# 'offset'} at output stride, BatchNorm on its running statistics.
ModelApply = Callable[[Any, jax.Array], dict[str, jax.Array]]


def hu_to_unit(hu: jax.Array, hu_window) -> jax.Array:
  """(B, D, H, W) HU -> (B, D, H, W, 1) float32 in [0, 1], as training sees its inputs."""
  return augment.hu_to_unit(hu, hu_window)[..., None]


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Window:
  """One depth window: input planes [start, start + depth) of the padded volume; it keeps output
  cells [keep_start, keep_stop) of the whole volume, which are its cells from keep_start -
  start / stride on."""
  start: int
  keep_start: int
  keep_stop: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a group of volumes runs: padded (D, H, W), window depth (= padded D without windows),
  the windows, and per-device bytes of the compiled program (None if not reported)."""
  padded_shape: tuple[int, int, int]
  window_depth: int
  windows: tuple[Window, ...]
  slab_voxels: int
  device_bytes: int | None

  @property
  def windowed(self) -> bool:
    return len(self.windows) > 1 or self.window_depth != self.padded_shape[0]


def plan_windows(depth: int, window_depth: int, overlap: int, stride: int) -> tuple[Window, ...]:
  """Windows of `window_depth` input planes over a padded depth, each keeping the cells of its
  core (window_depth - 2 overlap planes), that core `overlap` planes from the window's inner
  ends (module docstring). All numbers are multiples of `stride`."""
  if window_depth >= depth:
    return (Window(0, 0, depth // stride),)
  core = window_depth - 2 * overlap
  windows = []
  for core_start in range(0, depth, core):
    start = min(max(core_start - overlap, 0), depth - window_depth)
    windows.append(Window(start, core_start // stride, min(core_start + core, depth) // stride))
  return tuple(windows)


class VolumeDetector:
  """The detector's forward over whole volumes on `mesh` (module docstring).

  model_apply, state: the model as a pure function of its state (ModelApply); state_shardings:
  the state's placement. size_divisor: every input edge must be a multiple of it; stride: the
  output stride. max_voxels_per_device: windows above this slab size (0 = no limit).
  overlap: window overlap in input voxels (None = the receptive field's radius, measured).
  Call inside sharding.use_rules(mesh, rules).
  """

  def __init__(self, model_apply: ModelApply, state, state_shardings, mesh, rules, *,
               size_divisor: int, stride: int, hu_window, max_voxels_per_device: int = 0,
               overlap: int | None = None):
    self.model_apply, self.state, self.mesh, self.rules = model_apply, state, mesh, rules
    self.size_divisor, self.stride, self.hu_window = int(size_divisor), int(stride), hu_window
    self.max_voxels = int(max_voxels_per_device)
    self._overlap = overlap
    self.batch_shards = mesh_lib.batch_shards(mesh, rules)
    depth_axes = sharding_lib.mesh_axes_for('depth', mesh, rules)
    self.depth_shards = math.prod(mesh.shape[a] for a in depth_axes)
    self._state_shardings = state_shardings
    self._compiled: dict[tuple[int, ...], Any] = {}

  # ---- compiled programs, one per input shape
  def _forward(self, shape: tuple[int, int, int, int]):
    if shape not in self._compiled:
      volume_sharding = sharding_lib.logical_sharding(VOLUME_AXES, self.mesh, self.rules, shape)
      replicated = NamedSharding(self.mesh, PartitionSpec())

      def forward(state, hu):
        out = self.model_apply(state, hu_to_unit(hu, self.hu_window))
        return {name: out[name].astype(jnp.float32) for name in MAP_NAMES}

      jitted = jax.jit(forward, in_shardings=(self._state_shardings, volume_sharding),
                       out_shardings=replicated)
      lowered = jitted.lower(self.state, jax.ShapeDtypeStruct(shape, jnp.int16,
                                                              sharding=volume_sharding))
      self._compiled[shape] = (lowered.compile(), volume_sharding)
    return self._compiled[shape]

  def device_bytes(self, shape: tuple[int, int, int, int]) -> int | None:
    """Per-device bytes (arguments + outputs + temporaries) of the compiled forward at `shape`."""
    try:
      m = self._forward(shape)[0].memory_analysis()
      return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except (AttributeError, NotImplementedError, TypeError):  # Not every backend reports it.
      return None

  @property
  def overlap(self) -> int:
    if self._overlap is None:
      self._overlap = receptive_radius(
          lambda x: self.model_apply(self.state, x), self.batch_shards,
          self.size_divisor * self.depth_shards, self.size_divisor, self.stride)
      logging.info('detector receptive field: %d input voxels each side', self._overlap)
    return round_up(self._overlap, self.size_divisor)

  # ---- planning
  def plan(self, shapes: list[tuple[int, int, int]]) -> Plan:
    """The Plan of a group of at most batch_shards volumes of these (D, H, W) shapes."""
    d, h, w = (max(s[i] for s in shapes) for i in range(3))
    if min(min(s) for s in shapes) < self.stride:
      raise ConfigError(f'a volume of shape {min(shapes, key=min)} voxels is smaller than the '
                        f'detector\'s output stride {self.stride} along an axis; such a scan '
                        'cannot be detected in: remove it or use a finer detect.spacing_mm')
    depth_multiple = self.size_divisor * self.depth_shards
    padded = (round_up(d, depth_multiple), round_up(h, self.size_divisor),
              round_up(w, self.size_divisor))
    per_shard = 1  # Volumes per batch shard: the batch is padded to the shards.
    slab = lambda depth: depth // self.depth_shards * padded[1] * padded[2] * per_shard
    window_depth = padded[0]
    limit = self.max_voxels if self.max_voxels > 0 else None
    if limit is None:  # The device's own limit, where the backend reports it.
      available = _device_bytes_limit(self.mesh)
      need = self.device_bytes((self.batch_shards,) + padded) if available else None
      if available and need and need > available:
        limit = int(slab(padded[0]) * available / need)
    if limit is not None and slab(padded[0]) > limit:
      window_depth = limit * self.depth_shards // (padded[1] * padded[2] * per_shard)
      window_depth = window_depth // depth_multiple * depth_multiple
      if window_depth - 2 * self.overlap < depth_multiple:
        raise ConfigError(
            f'detect.max_voxels_per_device={self.max_voxels} leaves windows of {window_depth} '
            f'planes, no deeper than twice the receptive field\'s {self.overlap} planes of '
            f'overlap (slabs of {padded[1]} x {padded[2]} voxels); raise '
            '--config.detect.max_voxels_per_device or split depth over more devices')
    windows = plan_windows(padded[0], window_depth, self.overlap if window_depth < padded[0]
                           else 0, self.stride)
    return Plan(padded, min(window_depth, padded[0]), windows, slab(min(window_depth, padded[0])),
                self.device_bytes((self.batch_shards, min(window_depth, padded[0])) + padded[1:]))

  # ---- running
  def __call__(self, volumes: list[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], Plan]:
    """Output maps of each (D, H, W) int16 HU volume (at most batch_shards of them), cut to
    its cells: heatmap, log_diameter (ceil(D/s), ceil(H/s), ceil(W/s)), offset (..., 3)."""
    if not 0 < len(volumes) <= self.batch_shards:
      raise ValueError(f'{len(volumes)} volumes for {self.batch_shards} batch shards')
    plan = self.plan([v.shape for v in volumes])
    batch = np.full((self.batch_shards,) + plan.padded_shape, AIR_HU, np.int16)
    for i, v in enumerate(volumes):
      batch[i, :v.shape[0], :v.shape[1], :v.shape[2]] = v
    cells = tuple(n // self.stride for n in plan.padded_shape)
    maps = {'heatmap': np.zeros((self.batch_shards,) + cells, np.float32),
            'log_diameter': np.zeros((self.batch_shards,) + cells, np.float32),
            'offset': np.zeros((self.batch_shards,) + cells + (3,), np.float32)}
    shape = (self.batch_shards, plan.window_depth) + plan.padded_shape[1:]
    compiled, sharding = self._forward(shape)
    for window in plan.windows:
      piece = batch[:, window.start:window.start + plan.window_depth]
      out = jax.device_get(compiled(self.state, _to_global(piece, sharding)))
      first = window.keep_start - window.start // self.stride
      for name in MAP_NAMES:
        maps[name][:, window.keep_start:window.keep_stop] = out[name][
            :, first:first + window.keep_stop - window.keep_start]
    results = []
    for i, v in enumerate(volumes):
      d, h, w = (-(-n // self.stride) for n in v.shape)
      results.append({name: maps[name][i, :d, :h, :w] for name in MAP_NAMES})
    return results, plan


def model_apply_from(graphdef) -> ModelApply:
  """ModelApply of an nnx graphdef: a bare model's, or a train state's (its .model), in eval
  mode (BatchNorm on its running statistics)."""
  def apply(state, images):
    merged = nnx.merge(graphdef, state)
    model = getattr(merged, 'model', merged)
    model.eval()
    return model(images)
  return apply


def _to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array every process holds whole -> a global array placed as `sharding` says."""
  return jax.make_array_from_callback(local.shape, sharding, lambda index: local[index])


def _device_bytes_limit(mesh) -> int | None:
  stats = mesh.devices.flat[0].memory_stats()
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def receptive_radius(apply: Callable[[jax.Array], dict[str, jax.Array]], batch: int,
                     depth_multiple: int, size_divisor: int, stride: int) -> int:
  """Input planes on either side of an output cell that can change it, measured: a NaN plane
  in the middle of a probe volume spreads through every layer (convolutions, max-pools, BN,
  ReLU) to exactly the cells whose receptive field holds it. The probe is (batch, depth,
  size_divisor, size_divisor), its depth a multiple of depth_multiple, doubled until the NaN
  stops short of both ends."""
  depth = round_up(8 * size_divisor, depth_multiple)
  while True:
    plane = depth // 2
    probe = jnp.zeros((batch, depth, size_divisor, size_divisor, 1), jnp.float32)
    probe = probe.at[:, plane].set(jnp.nan)
    out = jax.jit(apply)(probe)
    touched = np.zeros(depth // stride, bool)
    for name in MAP_NAMES:
      values = np.moveaxis(np.asarray(out[name]), 1, 0).reshape(depth // stride, -1)
      touched |= np.isnan(values).any(axis=1)
    cells = np.flatnonzero(touched)
    if cells[0] > 0 and cells[-1] < len(touched) - 1:
      return int(max(plane - stride * cells[0], stride * cells[-1] + stride - 1 - plane))
    depth *= 2
