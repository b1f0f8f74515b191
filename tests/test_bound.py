"""The lower bound (parallel/bound.py) and the plan it is computed from (communication.trace_plan).

Analytic only: models are traced abstractly (nnx.eval_shape), nothing is compiled.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxmed.models import communication_plan
from jaxmed.models import resnet3d
from jaxmed.parallel import bound
from jaxmed.parallel import communication

RULES = default.get_config().mesh.logical_rules
# Every mesh shape jaxmed ships or composes, on 8 devices.
MESHES = [dict(data=8), dict(data=2, model=4), dict(model=8), dict(fsdp=8),
          dict(data=2, spatial=4), dict(fsdp=2, spatial=4), dict(model=2, spatial=4),
          dict(data=2, model=2, spatial=2)]


def resnet_config(depth, width, dtype='float32'):
  config = default.get_config().model
  config.update(name='resnet3d', depth=depth, width=width, dtype=dtype, space_to_depth='none')
  return config


def test_the_bound_is_at_most_the_schemes_cost_on_random_small_models():
  # jaxmed's scheme is one program of the ways the bound ranges over, so it can never cost
  # less than the bound: on every mesh, width, depth, crop size, batch and dtype.
  rng = np.random.default_rng(19)
  for _ in range(8):
    depth = int(rng.choice([10, 18]))
    width = int(rng.integers(2, 9))
    crop = int(rng.choice([16, 24, 32, 48]))
    batch = int(rng.choice([8, 16, 32]))
    dtype = str(rng.choice(['float32', 'bfloat16']))
    plan = communication_plan(resnet_config(depth, width, dtype), crop, batch)
    for mesh_shape in MESHES:
      scheme = communication.scheme_bytes(plan, mesh_shape, RULES)['total']
      lower = bound.lower_bound(plan, mesh_shape)['total']
      assert 0 < lower <= scheme * (1 + 1e-9), (depth, width, crop, batch, dtype, mesh_shape,
                                                lower, scheme)


def test_one_device_moves_nothing():
  plan = communication_plan(resnet_config(10, 4), 16, 8)
  assert bound.lower_bound(plan, dict(data=1))['total'] == 0


def test_the_bound_splits_the_batch_where_activations_dominate_and_channels_where_kernels_do():
  # The seed's ResNet-18 at 64^3 on model 8: stage 1's activations are 64x its kernels, stage
  # 4's kernels 1000x its activations ("one weird trick").
  plan = communication_plan(resnet_config(18, 64), 64, 64)
  ways = dict(bound.lower_bound(plan, dict(model=8))['ways'])
  assert ways['stem_conv'] == ways['blocks/0/conv1'] == ways['blocks/1/conv2'] == ('batch',)
  assert {ways['blocks/7/conv1'][0], ways['blocks/7/conv2'][0]} <= {'column', 'row'}


def test_one_layer_bounds_by_hand():
  # One 3^3 conv, 8 -> 16 channels, on (8, 8, 8, 8, 8) float32 inputs split over the batch
  # axes and whole over model (as the crops arrive), but which need a gradient.
  layer = communication.Layer('conv', (8, 8, 8, 8, 8), (8, 8, 8, 8, 16), 3, 1, (1, 1), 0, False,
                              name='conv', producer=-1)
  plan = communication.Plan([layer], [], [], [], {}, 4)
  kernel, inputs = 27 * 8 * 16 * 4, 8 ** 5 * 4
  # data 8: the batch stays split; the kernel gradient is all-reduced.
  result = bound.lower_bound(plan, dict(data=8))
  assert result['ways'] == [('conv', ('batch',))]
  assert result['total'] == pytest.approx(2 * 7 / 8 * kernel)
  # model 8: any split of a whole input owes its producer the whole gradient (an all-gather);
  # the batch split adds the kernel gradient, the row split the reduction of its partial
  # output (twice the larger output), the column split an all-reduce of the input gradient.
  result = bound.lower_bound(plan, dict(model=8))
  assert result['ways'] == [('conv', ('batch',))]
  assert result['total'] == pytest.approx(7 / 8 * inputs + 2 * 7 / 8 * kernel)
  # Replicated is not admitted where the layer splits along channels.
  narrow = dataclasses.replace(layer, input_shape=(8, 8, 8, 8, 3),
                               output_shape=(8, 8, 8, 8, 5))
  narrow_plan = communication.Plan([narrow], [], [], [], {}, 4)
  assert bound.lower_bound(narrow_plan, dict(model=8))['ways'] == [('conv', ('replicated',))]
  assert bound.lower_bound(narrow_plan, dict(model=8))['total'] == 0


def test_bf16_activations_halve_the_activation_bytes_but_not_the_gradients():
  f32 = communication_plan(resnet_config(10, 8), 32, 16)
  bf16 = communication_plan(resnet_config(10, 8, 'bfloat16'), 32, 16)
  assert (f32.activation_itemsize, bf16.activation_itemsize) == (4, 2)
  assert [l.kernel_itemsize for l in bf16.layers if l.op == 'conv'] == [4] * 12
  # The parameters stay float32, and their kernel axes are still found through the cast.
  assert [l.kernel_axes for l in bf16.layers] == [l.kernel_axes for l in f32.layers]
  data = dict(data=8)  # The scheme moves gradients only (float32 both), the bound some
  assert communication.scheme_bytes(bf16, data, RULES)['total'] == pytest.approx(
      communication.scheme_bytes(f32, data, RULES)['total'])
  assert bound.lower_bound(bf16, data)['total'] < bound.lower_bound(f32, data)['total']
  spatial = dict(data=2, spatial=4)  # halos are activations: fewer bytes in bf16
  assert (communication.scheme_bytes(bf16, spatial, RULES)['by_axis']['spatial']
          < 0.6 * communication.scheme_bytes(f32, spatial, RULES)['by_axis']['spatial'])


class _Nested(nnx.Module):
  """Convolutions inside jax.checkpoint, jax.jit and a custom_vjp."""

  def __init__(self, rngs):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.first = resnet3d.conv3d(1, 4, 3, 1, **kw)
    self.second = resnet3d.conv3d(4, 8, 3, 2, **kw)
    self.projection = resnet3d.conv3d(4, 8, 1, 2, **kw)

  def __call__(self, x):
    kernel = self.first.kernel[...]
    x = jax.checkpoint(lambda x, k: resnet3d.conv_same(x, k, 1, False))(x, kernel)
    x = jax.jit(jax.nn.relu)(x)
    h, shortcut = jax.jit(functools.partial(resnet3d.shared_input_convs, stride=2,
                                            space_to_depth_strided=False))(
        x, self.second.kernel[...], self.projection.kernel[...])
    return jnp.mean(h + shortcut, axis=(1, 2, 3, 4))


def test_trace_plan_follows_remat_jit_and_custom_vjp():
  model = nnx.eval_shape(lambda: _Nested(nnx.Rngs(0)))
  plan = communication.trace_plan(model, (2, 8, 8, 8, 1))
  assert [(l.name, l.output_shape) for l in plan.layers] == [
      ('first', (2, 8, 8, 8, 4)), ('second', (2, 4, 4, 4, 8)), ('projection', (2, 4, 4, 4, 8))]
  first, second, projection = plan.layers
  assert first.reads_model_input and not second.reads_model_input
  assert first.producer == -1 and second.producer == projection.producer == 0
  assert second.input_id == projection.input_id != first.input_id
  assert all(l.kernel_axes == resnet3d.CONV_KERNEL_AXES for l in plan.layers)
  assert bound.side_layers(plan) == {1, 2}  # Both read one activation; neither feeds a layer.
