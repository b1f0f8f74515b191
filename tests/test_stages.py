"""What the model axis does stage by stage (parallel/stages.py): the cost model's choice, and the
compiled step doing what that choice says (not just computing the right numbers)."""

import contextlib
import math
import re

import jax
import pytest

from configs import default
from jaxmed import train
from jaxmed.benchmarks import comms
from jaxmed.errors import ConfigError
from jaxmed.models import communication_plan
from jaxmed.models import resnet3d
from jaxmed.parallel import bound
from jaxmed.parallel import communication
from jaxmed.parallel import stages

RULES = default.get_config().mesh.logical_rules


def seed_plan(crop_size):
  config = default.get_config().model
  config.update(name='resnet3d', depth=18, width=64, space_to_depth='none')
  return communication_plan(config, crop_size, 64)


@pytest.mark.parametrize('crop_size', [32, 64])
def test_auto_splits_the_batch_in_stage_one_and_channels_in_stage_four(crop_size):
  plan = seed_plan(crop_size)
  for mesh_shape in (dict(model=8), dict(data=2, model=4)):
    chosen, costs = stages.choose(plan, mesh_shape, RULES)
    assert chosen[stages.STAGES.index('stage1')] == 'batch'
    assert chosen[stages.STAGES.index('stage4')] == 'channels'
    # Megatron pairs everywhere (the scheme before the choice) cost 1.5-10x more.
    assert costs[('channels',) * 6] > 1.4 * costs[chosen]
    assert costs[chosen] >= bound.lower_bound(plan, mesh_shape)['total']
  # model 8 at 32^3: within 1.25x of the lower bound.
  chosen, costs = stages.choose(plan, dict(model=8), RULES)
  if crop_size == 32:
    assert costs[chosen] <= 1.25 * bound.lower_bound(plan, dict(model=8))['total']


def test_a_mesh_without_a_model_axis_keeps_the_plain_rules():
  config = default.get_config()
  config.mesh.ici_data = 8
  assert train.logical_rules(config, dict(data=8)) == tuple(
      (n, a) for n, a in config.mesh.logical_rules)


def test_a_wrong_strategy_is_one_line():
  with pytest.raises(ConfigError) as info:
    stages.parse('batch,channels')
  assert '\n' not in str(info.value) and 'model_axis_by_stage' in str(info.value)
  with pytest.raises(ConfigError):
    stages.parse(['batch', 'rows', 'batch', 'batch', 'batch', 'batch'])
  assert stages.parse('auto') is None
  assert stages.parse('batch, batch,batch,channels,channels,channels')[3] == 'channels'


def small_config(strategy='auto'):
  config = default.get_config()
  config.model.update(name='resnet3d', depth=10, width=8, space_to_depth='none')
  config.data.crop_size, config.data.stored_crop_size = 32, 40
  config.train.global_batch_size = config.train.eval_batch_size = 16
  config.mesh.ici_data, config.mesh.ici_model = 1, 8
  config.mesh.model_axis_by_stage = strategy
  return config


def forward_conv_shapes(hlo_text, spatial):
  """Per-device (B, D, H, W, C) of the forward 3^3 convolutions (stride 1 or 2) whose output
  is spatial^3: one ResNet stage at this crop size. (The backward pass's convolutions have
  dilations or other dimension labels.)"""
  shapes = []
  for line in hlo_text.splitlines():
    if (' convolution(' in line and 'window={size=3x3x3 ' in line and '_dilate=' not in line
        and 'dim_labels=b012f_012io->b012f' in line):
      dims = tuple(int(d) for d in re.search(r'f32\[([\d,]+)\]', line).group(1).split(','))
      if dims[1:4] == (spatial,) * 3:
        shapes.append(dims)
  return shapes


_COMPILED = {}


def compiled_model8(strategy='auto'):
  if strategy not in _COMPILED:
    config = small_config(strategy)
    step = comms.compile_train_step(config)
    _COMPILED[strategy] = (config, step, comms.benchmark_comms(config, step))
  return _COMPILED[strategy]


def test_the_compiled_step_splits_each_stage_as_the_config_says():
  config, step, result = compiled_model8()
  rules = step['rules']
  assert stages.describe(rules) == ('model axis by stage: stem batch, stage1 batch, '
                                    'stage2 batch, stage3 channels, stage4 channels, '
                                    'head channels')
  text = step['compiled'].as_text()
  # 32^3 crops: stage 1 runs at 8^3 (width 8), stage 3 at 2^3 (width 32); batch 16, model 8.
  stage1, stage3 = forward_conv_shapes(text, 8), forward_conv_shapes(text, 2)
  assert stage1 and all(s[0] == 2 and s[4] == 8 for s in stage1), stage1  # batch split
  assert stage3 and all(s[0] == 16 and s[4] == 4 for s in stage3), stage3  # channels split
  # Its kernels: stage 1 whole on every device, stage 3 split by output channels.
  shardings = jax.tree.leaves(step['compiled'].input_shardings[0][0])
  by_shape = {leaf.shape: s.shard_shape(leaf.shape)
              for leaf, s in zip(jax.tree.leaves(step['abstract_state']), shardings)}
  assert by_shape[(3, 3, 3, 8, 8)] == (3, 3, 3, 8, 8)
  assert by_shape[(3, 3, 3, 16, 32)] == (3, 3, 3, 16, 4)
  # And it moves what the scheme says, fewer bytes than Megatron pairs in every stage.
  assert 0.95 <= result['ratio'] <= 1.1, (result['ratio'], result['collectives'],
                                          result['scheme'])
  plan = communication_plan(config.model, 32, 16)
  megatron = communication.scheme_bytes(plan, dict(model=8),
                                        stages.with_strategies(RULES, ('channels',) * 6))
  assert result['measured_ring_bytes'] < 0.5 * megatron['total']


def test_a_stage_strategy_the_model_ignores_is_caught(monkeypatch):
  # Without the stage scopes the activations follow the plain rules (channels over model)
  # while the kernels are stored as the stage rules say: still the right numbers, but stage 1
  # runs channel-split where the config says batch, and the check above must see it.
  monkeypatch.setattr(resnet3d, 'in_stage', lambda stage: contextlib.nullcontext())
  config = small_config()
  step = comms.compile_train_step(config)
  stage1 = forward_conv_shapes(step['compiled'].as_text(), 8)
  assert not all(s[0] == 2 and s[4] == 8 for s in stage1), stage1
