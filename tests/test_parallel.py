"""Mesh from config, logical rules -> shardings, and every mesh computing what one device does."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import default
from jaxmed.models import create_model
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding
from jaxmed.parallel import stages

RULES = default.get_config().mesh.logical_rules


def mesh_config(**sizes) -> ml_collections.ConfigDict:
  """config.mesh with every ici/dcn size 1 except those given."""
  config = default.get_config().mesh
  for kind in ('ici', 'dcn'):
    for axis in mesh_lib.MESH_AXES:
      config[f'{kind}_{axis}'] = 1
  config.update(sizes)
  return config


def axis_sizes(mesh) -> dict:
  return {a: mesh.shape[a] for a in mesh_lib.MESH_AXES}


# ---- create_mesh ----------------------------------------------------------------------------


def test_create_mesh_fills_the_one_minus_one_from_the_device_count():
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=-1, ici_model=4))
  assert axis_sizes(mesh) == {'data': 2, 'fsdp': 1, 'model': 4, 'spatial': 1}
  assert mesh.axis_names == ('data', 'fsdp', 'model', 'spatial')
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_create_mesh_multiplies_ici_and_dcn():
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=2, dcn_data=2, ici_spatial=-1))
  assert axis_sizes(mesh) == {'data': 4, 'fsdp': 1, 'model': 1, 'spatial': 2}


def test_create_mesh_on_a_subset_of_devices():
  mesh = mesh_lib.create_mesh(mesh_config(ici_fsdp=-1), devices=jax.devices()[:4])
  assert axis_sizes(mesh)['fsdp'] == 4


def _one_line_error(config, *needles):
  with pytest.raises(mesh_lib.MeshError) as info:
    mesh_lib.create_mesh(config)
  message = str(info.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message, message
  return message


def test_mesh_that_does_not_fit_the_devices_is_one_line_naming_the_numbers():
  message = _one_line_error(mesh_config(ici_data=2, ici_model=8), '16 devices', '8 are available')
  assert 'data=2 x fsdp=1 x model=8 x spatial=1' in message
  assert '--config.mesh.' in message


def test_two_minus_ones_are_one_line():
  _one_line_error(mesh_config(ici_data=-1, ici_model=-1), 'ici_data=-1', 'ici_model=-1')


def test_minus_one_that_cannot_be_filled_names_the_numbers():
  _one_line_error(mesh_config(ici_data=-1, ici_model=3), '8 devices', '3')


def test_batch_not_divisible_by_the_batch_axes_names_both_numbers():
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=2, ici_fsdp=4))
  mesh_lib.check_batch_divisible(16, mesh, RULES)
  with pytest.raises(mesh_lib.MeshError) as info:
    mesh_lib.check_batch_divisible(12, mesh, RULES)
  message = str(info.value)
  assert '\n' not in message and '12' in message and ' 8,' in message, message
  assert 'data=2 x fsdp=4' in message and 'global_batch_size' in message
  # The model axis does not split the batch: any batch fits a model=8 mesh.
  mesh_lib.check_batch_divisible(3, mesh_lib.create_mesh(mesh_config(ici_model=-1)), RULES)


# ---- logical rules -> PartitionSpec ---------------------------------------------------------


def test_logical_names_resolve_through_the_rules():
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=2, ici_fsdp=2, ici_model=2))
  assert sharding.logical_to_spec(('batch', 'depth', None, None, 'channels'), mesh, RULES) == \
      P(('data', 'fsdp'), None, None, None, 'model')
  assert sharding.batch_sharding(mesh, RULES, 5).spec == P(('data', 'fsdp'))
  assert sharding.logical_to_spec(('unknown_name',), mesh, RULES) == P()


def test_dimensions_not_divisible_by_their_mesh_axes_are_replicated():
  mesh = mesh_lib.create_mesh(mesh_config(ici_fsdp=2, ici_model=4))
  kernel_axes = ('kernel_spatial',) * 3 + ('conv_in', 'conv_out')
  # A 1-channel input cannot be split over fsdp=2; 4 output channels split over model=4.
  assert sharding.logical_to_spec(kernel_axes, mesh, RULES, (7, 7, 7, 1, 4)) == \
      P(None, None, None, None, 'model')
  # 2 output channels on model=4: replicated, never an error.
  assert sharding.logical_to_spec(kernel_axes, mesh, RULES, (3, 3, 3, 2, 2)) == \
      P(None, None, None, 'fsdp')
  # Of batch -> (data, fsdp), only the axes that divide the dimension are used.
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=2, ici_fsdp=4))
  assert sharding.logical_to_spec(('batch',), mesh, RULES, (2,)) == P('data')


def test_a_mesh_axis_is_used_once_per_array():
  mesh = mesh_lib.create_mesh(mesh_config(ici_model=-1))
  rules = (('conv_in', 'model'), ('conv_out', 'model'))
  assert sharding.logical_to_spec(('conv_in', 'conv_out'), mesh, rules, (8, 8)) == P('model')


def test_a_rule_naming_a_missing_mesh_axis_is_an_error():
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=-1))
  with pytest.raises(ValueError, match='tensor'):
    sharding.logical_to_spec(('channels',), mesh, (('channels', 'tensor'),))


def test_constrain_is_a_no_op_without_rules():
  x = jnp.ones((2, 4, 4, 4, 3))
  assert sharding.constrain(x, ('batch', 'depth', 'height', 'width', 'channels')) is x


def test_constrain_inside_use_rules_shards_activations():
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=2, ici_model=4))
  axes = ('batch', 'depth', 'height', 'width', 'channels')
  with sharding.use_rules(mesh, RULES):
    y = jax.jit(lambda x: sharding.constrain(x * 2, axes))(jnp.ones((4, 2, 2, 2, 8)))
    z = jax.jit(lambda x: sharding.constrain(x * 2, axes))(jnp.ones((4, 2, 2, 2, 2)))
  assert y.sharding.spec == P('data', None, None, None, 'model')
  assert z.sharding.spec == P('data')  # 2 channels do not split over model=4


# ---- the model on a mesh --------------------------------------------------------------------


def tiny_resnet_config(depth=10, width=4):
  config = default.get_config().model
  config.update(name='resnet3d', depth=depth, width=width, dtype='float32')
  return config


def build_sharded(model_config, mesh, seed=0, rules=RULES):
  """(graphdef, state, shardings): the model's state built directly into its shardings."""
  make = lambda: create_model(model_config, rngs=nnx.Rngs(seed))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  shardings = sharding.state_shardings(abstract_state, mesh, rules)
  with sharding.use_rules(mesh, rules):
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_shardings(model_config, mesh):
  abstract_model = nnx.eval_shape(lambda: create_model(model_config, rngs=nnx.Rngs(0)))
  return sharding.state_shardings(nnx.state(abstract_model), mesh, RULES)


def test_param_specs_follow_the_rules():
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=2, ici_model=4))
  specs = jax.tree.map(lambda s: s.spec, abstract_shardings(tiny_resnet_config(width=4), mesh))
  # Stage-1 conv (3, 3, 3, 4, 4): output channels over model=4.
  assert specs['blocks'][0]['conv1']['kernel'] == P(None, None, None, None, 'model')
  assert specs['blocks'][0]['norm2']['scale'] == P('model')
  assert specs['blocks'][0]['norm2']['mean'] == P('model')
  assert specs['head']['dense']['kernel'] == P()

  mesh = mesh_lib.create_mesh(mesh_config(ici_fsdp=-1))
  specs = jax.tree.map(lambda s: s.spec, abstract_shardings(tiny_resnet_config(width=8), mesh))
  # The 1-channel stem input cannot be split over fsdp=8; 8 input channels are.
  assert specs['stem_conv']['kernel'] == P()
  assert specs['blocks'][0]['conv1']['kernel'] == P(None, None, None, 'fsdp')
  assert specs['blocks'][1]['conv1']['kernel'] == P(None, None, None, 'fsdp')

  mesh = mesh_lib.create_mesh(mesh_config(ici_model=-1))
  specs = jax.tree.map(lambda s: s.spec, abstract_shardings(tiny_resnet_config(width=4), mesh))
  # Width 4 on model=8 is replicated; the next stage's 8 channels are split.
  assert specs['blocks'][0]['conv1']['kernel'] == P()
  assert specs['blocks'][1]['conv1']['kernel'] == P(None, None, None, None, 'model')


def test_optimizer_state_shards_like_its_params():
  config = tiny_resnet_config(width=4)
  mesh = mesh_lib.create_mesh(mesh_config(ici_data=2, ici_model=4))

  def make():
    model = create_model(config, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

  _, abstract_state = nnx.split(nnx.eval_shape(make))
  shardings = sharding.state_shardings(abstract_state, mesh, RULES)
  model_shardings, optimizer_shardings = shardings[0], shardings[1]
  kernel = model_shardings['blocks'][0]['conv1']['kernel']
  mu = optimizer_shardings['opt_state'][0]['mu']['blocks'][0]['conv1']['kernel']
  assert kernel.get_value().spec == mu.get_value().spec == P(None, None, None, None, 'model')
  assert optimizer_shardings['step'].get_value().spec == P()
  assert optimizer_shardings['opt_state'][0]['count'].get_value().spec == P()


# name: (mesh sizes, whether to build the state with jit(init, out_shardings) on that mesh;
# otherwise the one-device state is device_put onto the mesh: XLA:CPU compiles sharded random
# initialisation slowly, so two meshes cover that path).
MESHES = {
    '1x1': (dict(), False),
    'data2_model4': (dict(ici_data=2, ici_model=4), True),
    'data8': (dict(ici_data=8), False),
    'model8': (dict(ici_model=8), False),
    'fsdp8': (dict(ici_fsdp=8), True),
    'data2_spatial4': (dict(ici_data=2, ici_spatial=4), False),
}


def bce_loss_grads_and_stats(graphdef, state, crops, labels):
  """Train-mode forward + parameter gradient of the mean BCE loss, float32."""
  model = nnx.merge(graphdef, state)

  def loss_fn(model):
    logits = model(crops)
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  return loss, grads, nnx.state(model, nnx.BatchStat)


@pytest.fixture(scope='module')
def reference():
  """ResNet-10 (strided convs, projections, BN in train mode) at 16^3 on one device."""
  config = tiny_resnet_config(depth=10, width=4)
  rng = np.random.default_rng(0)
  crops = rng.uniform(size=(8, 16, 16, 16, 1)).astype(np.float32)
  labels = (rng.uniform(size=(8,)) > 0.5).astype(np.float32)
  graphdef, state = nnx.split(create_model(config, rngs=nnx.Rngs(0)))
  step = jax.jit(lambda s, x, y: bce_loss_grads_and_stats(graphdef, s, x, y))
  outputs = jax.device_get(step(state, crops, labels))
  return config, crops, labels, jax.device_get(state), outputs


def _relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize('name', list(MESHES))
def test_every_mesh_matches_one_device(name, reference):
  _matches_one_device(name, reference, RULES)


@pytest.mark.parametrize('name', ['model8', pytest.param('data2_model4', marks=pytest.mark.heavy)])
def test_a_per_stage_strategy_matches_one_device(name, reference):
  # The model axis splits the batch in the stem and stages 1-2, channels in stages 3-4 and the
  # head (the cost model's choice for the seed's ResNet-18): the same numbers.
  strategies = ('batch', 'batch', 'batch', 'channels', 'channels', 'channels')
  _matches_one_device(name, reference, stages.with_strategies(RULES, strategies))


def _matches_one_device(name, reference, rules):
  config, crops, labels, ref_state, (ref_loss, ref_grads, ref_stats) = reference
  sizes, init_on_mesh = MESHES[name]
  devices = jax.devices()[:1] if name == '1x1' else None
  mesh = mesh_lib.create_mesh(mesh_config(**sizes), devices=devices)
  if init_on_mesh:
    graphdef, state, shardings = build_sharded(config, mesh, rules=rules)
    # Initialisation is a function of the seed only, not of the mesh.
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
      np.testing.assert_array_equal(np.asarray(a), b)
  else:
    graphdef, abstract_state = nnx.split(nnx.eval_shape(
        lambda: create_model(config, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    state = jax.device_put(ref_state, shardings)
  assert all(leaf.sharding == s for leaf, s in
             zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))

  batch5 = sharding.batch_sharding(mesh, rules, 5)
  batch1 = sharding.batch_sharding(mesh, rules, 1)
  with sharding.use_rules(mesh, rules):
    step = jax.jit(lambda s, x, y: bce_loss_grads_and_stats(graphdef, s, x, y),
                   in_shardings=(shardings, batch5, batch1))
    loss, grads, stats = step(state, crops, labels)

  assert _relative_error(loss, ref_loss) < 1e-5
  ref_by_path = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert _relative_error(g, ref_by_path[path]) < 1e-5, (name, jax.tree_util.keystr(path))
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
    assert _relative_error(a, b) < 1e-5
