"""A small plain 3D CNN for CPU quick-starts: no strided convolutions.

Input crops (B, D, H, W, 1) float in [0, 1] -> logits (B,) float32.

  3 stages of [conv3^3 -> BN -> ReLU] x 2 -> max-pool 2^3 stride 2, filters width x (1, 2, 4)
  head: BN -> ReLU -> global average pool -> dense -> one logit

Downsampling is by max-pool only: on XLA:CPU the input gradient of a strided conv3d is very
slow, stride-1 convolutions are not. Logical axis names as in resnet3d.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmed.models.resnet3d import (ACTIVATION_AXES, CONV_INPUT_AXES, ROW_OUTPUT_AXES,
                                    ClassifierHead, apply_conv, batch_norm, conv3d, max_pool_same)
from jaxmed.parallel.sharding import constrain

STAGE_MULTIPLIERS = (1, 2, 4)


class ConvStage(nnx.Module):
  """[conv3^3 -> BN -> ReLU] x 2 -> max-pool 2^3 stride 2: (B, D, H, W, Cin) -> half size, Cout."""

  def __init__(self, in_channels: int, out_channels: int, *, dtype: jnp.dtype,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = conv3d(in_channels, out_channels, 3, 1, **kw)
    self.norm1 = batch_norm(out_channels, **kw)
    self.conv2 = conv3d(out_channels, out_channels, 3, 1, row_parallel=True, **kw)
    self.norm2 = batch_norm(out_channels, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    # A Megatron pair (see resnet3d): gather the input channels, reduce-scatter conv2's output.
    x = constrain(apply_conv(self.conv1, constrain(x, CONV_INPUT_AXES), False), ACTIVATION_AXES)
    x = nnx.relu(self.norm1(x))
    x = constrain(apply_conv(self.conv2, x, False), ACTIVATION_AXES, ROW_OUTPUT_AXES)
    x = nnx.relu(self.norm2(x))
    x = max_pool_same(x, 2, 2)
    return constrain(x, ACTIVATION_AXES)


class CNN3D(nnx.Module):
  """Plain 3D CNN: (B, D, H, W, 1) in [0, 1] -> logits (B,) float32."""

  def __init__(self, *, width: int = 16, in_channels: int = 1, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    stages = []
    channels = in_channels
    for multiplier in STAGE_MULTIPLIERS:
      stages.append(ConvStage(channels, width * multiplier, **kw))
      channels = width * multiplier
    self.stages = nnx.List(stages)
    self.head = ClassifierHead(channels, **kw)

  def __call__(self, crops: jax.Array) -> jax.Array:
    x = constrain(crops.astype(self.dtype), ACTIVATION_AXES)
    for stage in self.stages:
      x = stage(x)
    return self.head(x)
