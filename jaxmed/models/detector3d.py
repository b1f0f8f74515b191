"""A 3D centre-point nodule detector (CenterNet-style), in Flax NNX.

Input patches (B, D, H, W, 1) float in [0, 1] -> {'heatmap', 'log_diameter', 'offset'} on the
grid of output stride s (D/s, H/s, W/s), float32:
  heatmap       (B, D/s, H/s, W/s)     logit that a nodule centre lies in the cell
  log_diameter  (B, D/s, H/s, W/s)     log of the nodule's diameter in mm
  offset        (B, D/s, H/s, W/s, 3)  the centre inside its cell, (z, y, x), in OUTPUT voxels,
                                        in [0, 1) nominally: the centre is (cell + offset) * s in
                                        input voxels (jaxmed/detection/targets.py, decode_center)

  encoder: resnet3d's stem and pre-activation basic blocks (jaxmed/models/resnet3d.py, the same
           modules), four stages of width x (1, 2, 4, 8) at strides t, 2t, 4t, 8t, where t is
           the stem stride (x 2 with the stem max-pool)
  decoder: top-down (FPN, Lin et al. 2017) from the last stage to the stage at stride s: at each
           level, the coarser map upsampled x 2 (nearest) plus a 1x1x1 lateral conv of the stage
           output, then a 3^3 conv -> BN -> ReLU; c = the width of the stage at stride s
  heads:   1x1x1 convs with bias: heatmap (1, bias -log((1 - p) / p), p = 0.01, so the first
           steps' focal loss is not swamped by the background, as CenterNet), log-diameter (1,
           bias log 10 mm) and offset (3, bias 0.5)

Parameters and activations carry logical axis names only (as resnet3d: activations ('batch',
'depth', 'height', 'width', 'channels'), kernels ('kernel_spatial',) * 3 + ('conv_in',
'conv_out'), head biases ('conv_out',)); every conv, pool and upsampling goes through
parallel/spatial.py, so a patch's depth splits over the mesh axis 'depth' maps to, halos
exchanged explicitly. The decoder's convs are column-parallel: on a model axis their input is
gathered over channels. Every input D, H, W must be a multiple of size_divisor (the deepest
stage's stride), so the upsampled maps meet their laterals exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmed.errors import ConfigError
from jaxmed.models.resnet3d import (
    ACTIVATION_AXES, CONV_INPUT_AXES, STAGE_BLOCKS, STAGE_MULTIPLIERS,
    PreActBasicBlock, _logical, apply_conv, batch_norm, block_plan, check_settings, conv3d,
    max_pool_same)
from jaxmed.parallel import spatial
from jaxmed.parallel.sharding import constrain

MAP_AXES = ('batch', 'depth', 'height', 'width')
HEATMAP_PRIOR = 0.01  # Initial probability of a centre in any cell (CenterNet's focal-loss prior).
INITIAL_DIAMETER_MM = 10.0


def stage_strides(stem_stride: int, stem_pool: bool) -> tuple[int, ...]:
  """Input voxels per cell of the four encoder stages' outputs."""
  first = stem_stride * (2 if stem_pool else 1)
  return tuple(first * 2**i for i in range(len(STAGE_MULTIPLIERS)))


def size_divisor(model_config, stride: int) -> int:
  """Every patch or volume edge fed to the detector must be a multiple of this (voxels): the
  deepest stage's stride, which the output stride `stride` divides."""
  strides = stage_strides(model_config['stem_stride'], model_config['stem_pool'])
  _output_stage(strides, stride)
  return strides[-1]


def _output_stage(strides: tuple[int, ...], stride: int) -> int:
  if stride not in strides:
    raise ConfigError(
        f'detect.stride={stride} is not the stride of an encoder stage ({", ".join(map(str, strides))}'
        ' with this stem); set --config.detect.stride to one of them, or change '
        '--config.model.stem_stride / stem_pool')
  return strides.index(stride)


def upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x 2 along depth, height and width of (B, D, H, W, C); each depth slab
  is upsampled where it lies (no halo)."""

  def op(x, _, depth_padding):
    del depth_padding  # A 1-plane window: nothing to pad.
    for axis in (1, 2, 3):
      x = jnp.repeat(x, 2, axis=axis)
    return x

  return spatial.depth_parallel(op, x, (), kernel=1, stride=1)


class Head(nnx.Module):
  """A 1x1x1 conv with bias: (B, d, h, w, C) -> (B, d, h, w, outputs) float32."""

  def __init__(self, channels: int, outputs: int, bias: float, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.conv = nnx.Conv(
        channels, outputs, (1, 1, 1), padding='SAME', use_bias=True, dtype=jnp.float32,
        param_dtype=param_dtype,
        kernel_init=_logical(nnx.initializers.normal(0.01),
                             ('kernel_spatial',) * 3 + ('conv_in', 'conv_out')),
        bias_init=_logical(nnx.initializers.constant(bias), ('conv_out',)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x.astype(jnp.float32), CONV_INPUT_AXES)
    return apply_conv(self.conv, x, False) + self.conv.bias[...]


class Detector3D(nnx.Module):
  """ResNet encoder + top-down decoder + centre-point heads (module docstring)."""

  def __init__(self, *, depth: int = 10, width: int = 16, stem_kernel: int = 7,
               stem_stride: int = 2, stem_pool: bool = True, output_stride: int = 4,
               in_channels: int = 1, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, space_to_depth: str = 'none',
               rngs: nnx.Rngs):
    check_settings(depth, space_to_depth)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.stem_pool = stem_pool
    self.stem_space_to_depth = space_to_depth != 'none'
    self.output_stage = _output_stage(stage_strides(stem_stride, stem_pool), output_stride)
    # ---- encoder: resnet3d's own stem and blocks
    self.stem_conv = conv3d(in_channels, width, stem_kernel, stem_stride, **kw)
    self.stem_norm = batch_norm(width, **kw)
    self.blocks = nnx.List([
        PreActBasicBlock(cin, cout, stride, preactivate=preactivate,
                         space_to_depth=space_to_depth == 'all', **kw)
        for cin, cout, stride, preactivate in block_plan(depth, width)])
    self.stage_ends = tuple(int(sum(STAGE_BLOCKS[depth][:i + 1])) - 1
                            for i in range(len(STAGE_MULTIPLIERS)))
    # ---- decoder: one level per stage from the last down to the output stage
    stage_channels = [width * m for m in STAGE_MULTIPLIERS]
    channels = stage_channels[self.output_stage]
    levels = range(len(STAGE_MULTIPLIERS) - 1, self.output_stage - 1, -1)
    self.laterals = nnx.List([conv3d(stage_channels[i], channels, 1, **kw) for i in levels])
    self.smooth = nnx.List([conv3d(channels, channels, 3, **kw) for _ in levels])
    self.smooth_norms = nnx.List([batch_norm(channels, **kw) for _ in levels])
    # ---- heads
    prior = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)
    self.heatmap = Head(channels, 1, prior, **kw)
    self.log_diameter = Head(channels, 1, math.log(INITIAL_DIAMETER_MM), **kw)
    self.offset = Head(channels, 3, 0.5, **kw)

  def __call__(self, patches: jax.Array) -> dict[str, jax.Array]:
    x = constrain(patches.astype(self.dtype), ACTIVATION_AXES)
    x = nnx.relu(self.stem_norm(apply_conv(self.stem_conv, x, self.stem_space_to_depth)))
    if self.stem_pool:
      x = max_pool_same(x, 3, 2)
    x = constrain(x, ACTIVATION_AXES)
    stages = []
    for index, block in enumerate(self.blocks):
      x = block(x)
      if index in self.stage_ends:
        stages.append(x)
    p = None
    for lateral, smooth, norm, stage in zip(self.laterals, self.smooth, self.smooth_norms,
                                            stages[::-1]):
      side = constrain(apply_conv(lateral, constrain(stage, CONV_INPUT_AXES), False),
                       ACTIVATION_AXES)
      p = side if p is None else constrain(upsample2(p), ACTIVATION_AXES) + side
      p = apply_conv(smooth, constrain(p, CONV_INPUT_AXES), False)
      p = constrain(nnx.relu(norm(constrain(p, ACTIVATION_AXES))), ACTIVATION_AXES)
    return {'heatmap': constrain(self.heatmap(p)[..., 0], MAP_AXES),
            'log_diameter': constrain(self.log_diameter(p)[..., 0], MAP_AXES),
            'offset': constrain(self.offset(p), MAP_AXES + (None,))}
