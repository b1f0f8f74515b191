"""Training: every mesh computes what one device computes; the train loop runs end to end."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmed import train
from jaxmed.data import loader
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib

# name -> (ici sizes data, fsdp, model, spatial); each uses all 8 virtual devices but '1x1'.
MESHES = {
    '1x1': (1, 1, 1, 1),
    'data2_model4': (2, 1, 4, 1),
    'data8': (8, 1, 1, 1),
    'model8': (1, 1, 8, 1),
    'fsdp8': (1, 8, 1, 1),
    'data2_spatial4': (2, 1, 1, 4),
}
STEPS = 5


def _set_mesh(config, sizes):
  for axis, size in zip(mesh_lib.MESH_AXES, sizes):
    config.mesh[f'ici_{axis}'] = size
  return config


def run_steps(config, num_steps):
  """Losses of the first `num_steps` production train steps, and the final state + shardings."""
  devices = jax.devices()[:int(np.prod([config.mesh[f'ici_{a}'] for a in mesh_lib.MESH_AXES]))]
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  rules = train.logical_rules(config)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules, ndim=1)
  with sharding_lib.use_rules(mesh, rules):
    graphdef, state, shardings = train.init_sharded_state(config, mesh, rules)
    step_fn = train.make_train_step(graphdef, shardings, config)
    leaves, stats = jax.tree.leaves(state), train.new_loop_stats(mesh, 0)
    batches = loader.make_train_iterator(config, batch_sharding, 0)
    losses = []
    for _ in range(num_steps):
      leaves, stats = step_fn(leaves, stats, next(batches))
      losses.append(train.logged_means(jax.device_get(stats))['loss'])
      stats = train.zero_logged_sums(stats)
    state = jax.tree.unflatten(jax.tree.structure(state), leaves)
    if hasattr(batches, 'close'):
      batches.close()
  return np.array(losses), state


_RUNS = {}  # mesh name -> (losses, final state): each mesh trains once per session.


def mesh_run(name, tiny_config):
  if name not in _RUNS:
    _RUNS[name] = run_steps(_set_mesh(tiny_config(), MESHES[name]), STEPS)
  return _RUNS[name]


@pytest.mark.parametrize('name', [m for m in MESHES if m != '1x1'])
def test_mesh_matches_one_device(name, tiny_config):
  losses, _ = mesh_run(name, tiny_config)
  one_device, _ = mesh_run('1x1', tiny_config)
  assert np.all(np.isfinite(losses))
  assert losses[0] != losses[-1]  # It trains: parameters change between steps.
  np.testing.assert_allclose(losses, one_device, rtol=1e-4)


def _specs(state):
  """{'model/stage1/.../kernel': PartitionSpec} for every array of the train state."""
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf.sharding.spec
          for path, leaf in flat}


def test_tensor_parallel_shards_conv_outputs_and_their_adam_moments(tiny_config):
  specs = _specs(mesh_run('data2_model4', tiny_config)[1])
  kernels = {k: v for k, v in specs.items()
             if k.startswith('model/') and k.endswith('kernel') and v != P()}
  assert len(kernels) >= 8, specs
  for key, spec in kernels.items():
    if key.endswith('conv2/kernel'):  # Row-parallel (Megatron's pair): input channels.
      assert spec == P(None, None, None, 'model'), (key, spec)
    elif len(spec) == 5:  # Column-parallel conv (kd, kh, kw, cin, cout): output channels.
      assert spec == P(None, None, None, None, 'model'), (key, spec)
    # AdamW's first and second moments follow their parameter.
    path = key.removeprefix('model/')
    moments = [k for k in specs if k.startswith('optimizer/') and k.endswith(path)]
    assert len(moments) == 2 and all(specs[m] == spec for m in moments), (key, moments)


def test_fsdp_shards_parameters_and_optimizer_state(tiny_config):
  specs = _specs(mesh_run('fsdp8', tiny_config)[1])
  sharded = [k for k, v in specs.items() if 'fsdp' in str(v)]
  # Kernels whose input channels divide by 8 are sharded over fsdp (ZeRO-3), moments too.
  assert any(k.startswith('model/') for k in sharded), specs
  assert any(k.startswith('optimizer/') for k in sharded), specs


def test_train_and_evaluate_end_to_end(tiny_config, tmp_path):
  config = tiny_config(train__steps=4, checkpoint__every_steps=2)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 4
  assert 0.0 <= result['auc'] <= 1.0 and np.isfinite(result['loss'])
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  assert train_steps == [1, 2, 3, 4]
  val = [r for r in records if r['split'] == 'val']
  assert len(val) == 1 and {'loss', 'auc', 'accuracy'} <= set(val[0])
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))


def test_no_validation_subsets_skips_validation_with_one_line(tiny_config, tmp_path, caplog):
  config = tiny_config(train__steps=2, train__eval_every_steps=1, data__val_subsets=())
  with caplog.at_level('INFO'):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result == {'step': 2}  # No AUC over zero examples.
  assert caplog.text.count('no validation subsets: validation skipped') == 1
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['split'], r['step']) for r in records] == [('train', 1), ('train', 2)]
