"""The analytic model FLOPs (counted from the traced model's convolutions and matrix products) and
the measured dense matmul peak that MFU is taken against."""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any

import numpy as np


# ---- analytic FLOPs -----------------------------------------------------------------------------

def _sub_jaxprs(eqn) -> list[tuple[Any, int]]:
  """(jaxpr, multiplicity) of the jaxprs an equation calls (pjit, remat, custom_vjp, scan, cond)."""
  found = []
  for name, value in eqn.params.items():
    values = value if isinstance(value, (list, tuple)) else [value]
    jaxprs = [getattr(v, 'jaxpr', v) for v in values]
    jaxprs = [j for j in jaxprs if hasattr(j, 'eqns')]
    if not jaxprs:
      continue
    if eqn.primitive.name == 'cond':  # One branch runs: count the most expensive.
      found.append(('max', jaxprs))
    else:
      times = int(eqn.params.get('length', 1)) if eqn.primitive.name == 'scan' else 1
      found.extend((j, times) for j in jaxprs)
  return found


def _count(jaxpr, layers: list[dict]) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.outvars[0].aval
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, spatial...)
      taps = math.prod(rhs.shape[d] for d in rhs_spec[2:])
      flops = 2.0 * math.prod(out.shape) * taps * rhs.shape[rhs_spec[1]]
      layers.append({'op': 'conv', 'input': tuple(lhs.shape), 'kernel': tuple(rhs.shape),
                     'strides': tuple(eqn.params['window_strides']), 'output': tuple(out.shape),
                     'flops': flops})
      total += flops
    elif name == 'dot_general':
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.outvars[0].aval
      (contract, _), _ = eqn.params['dimension_numbers']
      flops = 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)
      layers.append({'op': 'dot', 'input': tuple(lhs.shape), 'kernel': tuple(rhs.shape),
                     'output': tuple(out.shape), 'flops': flops})
      total += flops
    for sub, times in _sub_jaxprs(eqn):
      if isinstance(sub, str):  # cond: ('max', branches)
        branches = []
        for branch in times:
          branch_layers: list[dict] = []
          branches.append((_count(branch, branch_layers), branch_layers))
        best, best_layers = max(branches, key=lambda fb: fb[0])
        layers.extend(best_layers)
        total += best
      else:
        before = len(layers)
        total += times * _count(sub, layers)
        for layer in layers[before:]:
          layer['flops'] *= times
  return total


def model_flops(model_config: Any, crop_size: int) -> dict[str, Any]:
  """Analytic forward FLOPs of one example, from the model's own layer shapes.

  Traces the model abstractly (no arrays) on one (crop_size,)^3 crop and sums, over every
  convolution, 2 * k^3 * Cin * Cout * output voxels (2 * output elements * taps * Cin per
  group) and, over every matrix product, 2 * output elements * contracted size. Elementwise work
  (BN, ReLU, pooling) is not counted. space_to_depth is set to 'none' first: the count is the
  reference model's useful work, whatever rewrite computes it. A training step is counted as 3x
  the forward (the usual convention: backward = 2x forward).
  Returns {'forward': FLOPs, 'train_step': 3 * forward, 'layers': [per conv / dot dicts]}.
  """
  import jax
  from flax import nnx

  from jaxmed.models import create_model
  config = dict(model_config.to_dict() if hasattr(model_config, 'to_dict') else model_config)
  if 'space_to_depth' in config:
    config['space_to_depth'] = 'none'
  abstract = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def forward(state, crops):
    return nnx.merge(graphdef, state)(crops)

  crops = jax.ShapeDtypeStruct((1, crop_size, crop_size, crop_size, 1), np.float32)
  jaxpr = jax.make_jaxpr(forward)(state, crops)
  layers: list[dict] = []
  forward_flops = _count(jaxpr.jaxpr, layers)
  return {'forward': forward_flops, 'train_step': 3 * forward_flops, 'layers': layers}


# ---- matmul peak --------------------------------------------------------------------------------

def matmul_peak(dtype: str, size: int, iters: int = 10, repeats: int = 5) -> dict[str, Any]:
  """Measured dense matmul rate of all local devices together, TFLOP/s (median of repeats).

  Each device multiplies its own (size, size) matrices `iters` times in one jitted loop (the
  product feeds the next one, so nothing is hoisted); random data, never zeros.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ('d',))
  sharded = NamedSharding(mesh, PartitionSpec('d'))
  shape = (len(devices), size, size)

  @functools.partial(jax.jit, out_shardings=(sharded, sharded))
  def make(key):
    a, b = jax.random.normal(key, (2,) + shape, jnp.float32)
    return a.astype(dtype), (b / math.sqrt(size)).astype(dtype)  # Keeps magnitudes ~1.

  @functools.partial(jax.jit, out_shardings=sharded)
  def loop(a, b):
    return jax.lax.fori_loop(0, iters, lambda _, c: jnp.einsum('dij,djk->dik', c, b), a)

  a, b = make(jax.random.key(0))
  jax.block_until_ready(loop(a, b))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(a, b))
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  flops = 2.0 * size**3 * iters * len(devices)
  return {'dtype': str(np.dtype(dtype)) if dtype != 'bfloat16' else 'bfloat16', 'size': size,
          'devices': len(devices), 'tflops': flops / seconds / 1e12}
