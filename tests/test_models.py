"""Models: shapes, parameter counts, dtypes, train/eval batch norm, logical names only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxmed.models import MODEL_NAMES, count_params, create_model
from jaxmed.parallel.mesh import MESH_AXES

LOGICAL_NAMES = {'kernel_spatial', 'conv_in', 'conv_out', 'channels', 'features', None}


def model_config(**overrides):
  config = default.get_config().model
  config.update(dtype='float32')
  config.update(overrides)
  return config


def crops(batch=8, size=16, seed=0):
  """(B, D, H, W, 1) float32 in [0, 1]."""
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, size, 1))


def analytic_resnet_params(depth: int, width: int, stem_kernel: int = 7) -> int:
  """Parameters of the pre-activation ResNet counted by hand (no conv biases)."""
  blocks = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
  total = stem_kernel**3 * 1 * width + 2 * width  # stem conv + BN
  channels = width
  for stage, n in enumerate(blocks):
    out = width * 2**stage
    for i in range(n):
      if stage or i:
        total += 2 * channels  # pre-activation BN (the first block's runs in the stem)
      total += 27 * channels * out + 2 * out + 27 * out * out  # conv3, BN, conv3
      if channels != out:
        total += channels * out  # 1x1x1 projection
      channels = out
  return total + 2 * channels + channels + 1  # final BN, dense kernel and bias


@pytest.mark.parametrize('depth', [10, 18, 34])
def test_resnet_param_count_matches_the_analytic_count(depth):
  model = nnx.eval_shape(
      lambda: create_model(model_config(depth=depth, width=64), rngs=nnx.Rngs(0)))
  assert count_params(model) == analytic_resnet_params(depth, 64)


def test_resnet18_at_width_64_has_about_33m_params():
  model = nnx.eval_shape(
      lambda: create_model(model_config(depth=18, width=64), rngs=nnx.Rngs(0)))
  assert count_params(model) == 33_158_721


@pytest.mark.parametrize('depth', [10, 18, 34])
def test_resnet_maps_crops_to_one_float32_logit_each(depth):
  model = create_model(model_config(depth=depth, width=4), rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, x: m(x))(model, crops())
  assert logits.shape == (8,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_cnn3d_maps_crops_to_logits_without_strided_convolutions():
  model = create_model(model_config(name='cnn3d', width=4), rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, x: m(x))(model, crops())
  assert logits.shape == (8,) and logits.dtype == jnp.float32
  convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
  assert len(convs) == 6 and all(tuple(c.strides) == (1, 1, 1) for c in convs)
  # 3 stages of two 3^3 convs + BN (widths 4, 8, 16), head BN + dense.
  w = (4, 8, 16)
  expected = sum(27 * cin * cout + 27 * cout * cout + 4 * cout
                 for cin, cout in zip((1,) + w[:-1], w)) + 2 * 16 + 16 + 1
  assert count_params(model) == expected


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = model_config(depth=10, width=4, dtype='bfloat16')
  model = create_model(config, rngs=nnx.Rngs(0))
  reference = create_model(model_config(depth=10, width=4), rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert params and all(p.dtype == jnp.float32 for p in params)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  assert model.stem_conv.dtype == jnp.bfloat16
  x = crops()
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  assert logits.dtype == jnp.float32
  expected = np.asarray(nnx.jit(lambda m, x: m(x))(reference, x))
  error = np.abs(np.asarray(logits) - expected).max()
  # The convolutions really ran in bfloat16 (not silently in float32)...
  assert error > 0
  # ...and differ from float32 by bfloat16 rounding (8 bits of mantissa over ten layers: about
  # 4% of the logits' spread here), not by a wrong layer, a lost scale or a swapped sign.
  assert error < 0.08 * expected.std(), (error, expected.std())
  assert np.corrcoef(np.ravel(logits), expected.ravel())[0, 1] > 0.99


def test_train_uses_batch_statistics_and_eval_the_running_averages():
  model = create_model(model_config(name='cnn3d', width=4), rngs=nnx.Rngs(0))
  x = crops()
  forward = nnx.jit(lambda m, x: m(x))
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  model.train()
  forward(model, x)
  stats_after = nnx.state(model, nnx.BatchStat)
  moved = [not np.allclose(a, b) for a, b in
           zip(jax.tree.leaves(stats_before), jax.tree.leaves(stats_after))]
  assert any(moved)

  model.eval()
  frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  whole_batch = forward(model, x)
  first_alone = forward(model, x[:1])
  # Running averages: an example's logit does not depend on the rest of the batch.
  np.testing.assert_allclose(first_alone, whole_batch[:1], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
    np.testing.assert_array_equal(a, b)


def test_create_model_rejects_an_unknown_name_in_one_line():
  with pytest.raises(ValueError) as info:
    create_model(model_config(name='vit3d'), rngs=nnx.Rngs(0))
  message = str(info.value)
  assert '\n' not in message and 'vit3d' in message
  assert all(name in message for name in MODEL_NAMES)


def test_create_model_rejects_an_unknown_depth_in_one_line():
  with pytest.raises(ValueError, match='10, 18, 34'):
    create_model(model_config(depth=50), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_variables_carry_logical_axis_names_only(name):
  model = nnx.eval_shape(lambda: create_model(model_config(name=name), rngs=nnx.Rngs(0)))
  variables = jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert variables
  for variable in variables:
    names = variable.get_metadata().get('out_sharding')
    assert names is not None and len(names) == len(variable.shape)
    assert set(names) <= LOGICAL_NAMES and not set(names) & set(MESH_AXES)
  if name != 'detector3d':  # The classifiers' dense head; the detector's heads are convs.
    kernel = model.head.dense.kernel
    assert kernel.get_metadata()['out_sharding'] == ('features', None)


def test_models_run_without_any_mesh_or_rules():
  # Construction never needs a mesh: plain CPU code and tests work unsharded.
  for name in MODEL_NAMES:
    model = create_model(model_config(name=name, width=4, depth=10), rngs=nnx.Rngs(1))
    if name == 'detector3d':  # Maps at stride 4 of 32^3 patches (stem 7^3 / 2, max-pool).
      assert model(crops(batch=2, size=32))['heatmap'].shape == (2, 8, 8, 8)
    else:
      assert model(crops(batch=2)).shape == (2,)
