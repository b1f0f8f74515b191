"""Model options that change how XLA computes, never what: each equals the plain reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmed.models import create_model
from jaxmed.models import resnet3d
from jaxmed.models.resnet3d import ResNet3D


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize('kernel,size,cin', [(7, 10, 1), (7, 9, 1), (3, 8, 3), (3, 7, 2),
                                             (1, 8, 4), (1, 9, 4)])
def test_strided_conv_equals_the_strided_convolution_and_its_gradients(kernel, size, cin):
  conv = resnet3d.conv3d(cin, 5, kernel, 2, dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, size, size + 1, size, cin))
  reference = conv(x)
  rewritten = resnet3d.strided_conv(conv, x)
  assert rewritten.shape == reference.shape
  assert _rel_err(rewritten, reference) < 1e-6

  def loss(fn, conv, x):
    weights = jnp.cos(jnp.arange(reference.size).reshape(reference.shape))
    return jnp.sum(fn(conv, x) * weights)

  ref_grads = nnx.grad(lambda c, x: loss(lambda c, x: c(x), c, x), argnums=(0, 1))(conv, x)
  new_grads = nnx.grad(lambda c, x: loss(resnet3d.strided_conv, c, x), argnums=(0, 1))(conv, x)
  for new, ref in zip(jax.tree.leaves(new_grads), jax.tree.leaves(ref_grads)):
    assert _rel_err(new, ref) < 1e-5


@pytest.mark.parametrize('size', [10, 9])
def test_space_to_depth_resnet_equals_the_plain_one_in_float32(size):
  x = jax.random.uniform(jax.random.key(2), (6, size, size, size, 1))

  def loss(model):
    return jnp.mean(model(x) ** 2)

  plain = ResNet3D(depth=10, width=4, rngs=nnx.Rngs(0))
  ref_out, ref_grads = plain(x), nnx.grad(loss)(plain)
  plain.eval()
  ref_eval = plain(x)
  for mode in ('stem', 'all'):
    rewritten = ResNet3D(depth=10, width=4, space_to_depth=mode, rngs=nnx.Rngs(0))
    # Same parameters: the option rearranges the kernels at run time, it adds none.
    assert (jax.tree.map(np.shape, nnx.state(plain))
            == jax.tree.map(np.shape, nnx.state(rewritten)))
    assert _rel_err(rewritten(x), ref_out) < 1e-5  # Training mode: batch statistics.
    new_grads = nnx.grad(loss)(rewritten)
    for new, ref in zip(jax.tree.leaves(new_grads), jax.tree.leaves(ref_grads)):
      assert _rel_err(new, ref) < 1e-4
    rewritten.eval()
    assert _rel_err(rewritten(x), ref_eval) < 1e-5


def test_space_to_depth_resnet_in_bfloat16_stays_within_bfloat16_rounding():
  x = jax.random.uniform(jax.random.key(3), (6, 12, 12, 12, 1))
  kw = dict(depth=10, width=4, dtype=jnp.bfloat16)
  exact = ResNet3D(depth=10, width=4, rngs=nnx.Rngs(0))(x)  # float32 reference
  plain = ResNet3D(**kw, rngs=nnx.Rngs(0))(x)
  rewritten = ResNet3D(space_to_depth='all', **kw, rngs=nnx.Rngs(0))(x)
  # bf16 differs from float32 by ~3e-2 here; the rewrite adds nothing beyond bf16 rounding.
  assert _rel_err(rewritten, plain) < 1e-2
  assert _rel_err(rewritten, exact) < 2 * _rel_err(plain, exact) + 1e-2


def test_create_model_reads_the_config_option():
  from configs import default
  config = default.get_config().model
  config.depth, config.width, config.space_to_depth = 10, 2, 'all'
  model = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
  assert model.stem_space_to_depth and model.blocks[2].space_to_depth
  config.space_to_depth = 'sideways'
  with pytest.raises(ValueError, match='space_to_depth'):
    nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
