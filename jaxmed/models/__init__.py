"""Models, one file per family, picked by config.model.name."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmed.errors import ConfigError
from jaxmed.models.cnn3d import CNN3D
from jaxmed.models.detector3d import Detector3D
from jaxmed.models.resnet3d import ResNet3D

MODEL_NAMES = ('resnet3d', 'cnn3d', 'detector3d')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _dtype(model_config: Any, key: str) -> jnp.dtype:
  name = model_config[key]
  if name not in _DTYPES:
    raise ConfigError(
        f'config.model.{key}={name!r} is not a dtype jaxmed knows; set it to one of '
        f'{", ".join(_DTYPES)}')
  return _DTYPES[name]


def create_model(model_config: Any, *, rngs: nnx.Rngs, output_stride: int = 4) -> nnx.Module:
  """The model config.model describes, in training mode (BatchNorm uses batch statistics).

  model_config: config.model (name, depth, width, stem_kernel, stem_stride, stem_pool, dtype,
  param_dtype). The classifiers map crops (B, D, H, W, 1) float in [0, 1] to logits (B,)
  float32; 'detector3d' maps patches to its output maps at `output_stride` (detect.stride;
  jaxmed/models/detector3d.py). Raises ConfigError (one line) for an unknown name.
  """
  name = model_config['name']
  dtypes = dict(dtype=_dtype(model_config, 'dtype'),
                param_dtype=_dtype(model_config, 'param_dtype'))
  if name == 'resnet3d':
    return ResNet3D(
        depth=model_config['depth'], width=model_config['width'],
        stem_kernel=model_config['stem_kernel'], stem_stride=model_config['stem_stride'],
        stem_pool=model_config['stem_pool'],
        space_to_depth=model_config.get('space_to_depth', 'none'), **dtypes, rngs=rngs)
  if name == 'detector3d':
    return Detector3D(
        depth=model_config['depth'], width=model_config['width'],
        stem_kernel=model_config['stem_kernel'], stem_stride=model_config['stem_stride'],
        stem_pool=model_config['stem_pool'], output_stride=output_stride,
        space_to_depth=model_config.get('space_to_depth', 'none'), **dtypes, rngs=rngs)
  if name == 'cnn3d':
    return CNN3D(width=model_config['width'], **dtypes, rngs=rngs)
  raise ConfigError(
      f'unknown model {name!r}; set --config.model.name to one of: {", ".join(MODEL_NAMES)}')


def reference_model(model_config: Any, output_stride: int = 4) -> nnx.Module:
  """The abstract model (nnx.eval_shape, no arrays) of config.model in its reference math:
  space_to_depth rewrites off, since how XLA computes a strided conv is its own business."""
  config = dict(model_config.to_dict() if hasattr(model_config, 'to_dict') else model_config)
  config['space_to_depth'] = 'none'
  return nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0),
                                             output_stride=output_stride))


def communication_plan(model_config: Any, crop_size: int | tuple[int, int, int],
                       global_batch_size: int, output_stride: int = 4):
  """parallel.communication's plan of config.model on (B, S, S, S, 1) crops (or (B, D, H, W, 1)
  patches when crop_size is a (D, H, W) tuple)."""
  from jaxmed.parallel import communication
  size = tuple(crop_size) if isinstance(crop_size, (tuple, list)) else (crop_size,) * 3
  return communication.trace_plan(reference_model(model_config, output_stride),
                                  (global_batch_size,) + size + (1,))


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param elements; batch statistics excluded).

  Works on a concrete model or an abstract one from nnx.eval_shape.
  """
  params = nnx.state(model, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
