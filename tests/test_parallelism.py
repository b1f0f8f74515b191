"""Every mesh axis shards what it names and moves close to the bytes its scheme says it moves.

Each assertion reads the compiled train step itself (its HLO collectives, the shapes of its
convolutions, the shardings of its inputs, its memory analysis), never the rule table: GSPMD
computes the right numbers for a replicated program too, so only the compiled program can tell
a real mesh from a nominal one. The model is a ResNet-10 of width 8 on 32^3 crops (stored 40^3),
batch 16, float32: small enough to compile in seconds, deep enough that the spatial axis splits
the stem and the first two stages and not the last two.
"""

import math

import jax
import numpy as np
import pytest

from configs import default
from jaxmed.benchmarks import comms
from jaxmed.parallel import collectives
from jaxmed.models import communication_plan
from jaxmed.parallel import communication

# name -> ici sizes (data, fsdp, model, spatial): the shipped mesh configs' shapes on 8 devices.
MESHES = {
    'data8': (8, 1, 1, 1),
    'data2_model4': (2, 1, 4, 1),
    'model8': (1, 1, 8, 1),
    'fsdp8': (1, 8, 1, 1),
    'data2_spatial4': (2, 1, 1, 4),
}
AXES = ('data', 'fsdp', 'model', 'spatial')


def small_config(sizes, crop_size=32, width=8):
  config = default.get_config()
  # The seed's plain strided convolutions (space-to-depth is a CPU-speed rewrite of them).
  config.model.update(name='resnet3d', depth=10, width=width, space_to_depth='none')
  config.data.crop_size = crop_size
  config.data.stored_crop_size = crop_size + 8
  config.train.global_batch_size = config.train.eval_batch_size = 16
  for axis, size in zip(AXES, sizes):
    config.mesh[f'ici_{axis}'] = size
  # Megatron pairs in every stage: the scheme these tests hold the model axis to (the
  # per-stage choice the shipped configs make is tested in tests/test_stages.py).
  config.mesh.model_axis_by_stage = ','.join(['channels'] * 6)
  return config


_COMPILED = {}  # mesh name -> (config, compiled step, analysis): each mesh compiles once.


def compiled(name):
  if name not in _COMPILED:
    config = small_config(MESHES[name])
    step = comms.compile_train_step(config)
    _COMPILED[name] = (config, step, comms.benchmark_comms(config, step))
  return _COMPILED[name]


def stem_convolution_elements(hlo_text):
  """Elements per device of the forward stem convolution's result: the one 7^3 stride-2 conv
  whose result is an (N, D, H, W, C) activation (the backward pass's convs have other windows
  or dimension labels)."""
  found = []
  for line in hlo_text.splitlines():
    if (' convolution(' in line and 'size=7x7x7 stride=2x2x2' in line
        and 'dim_labels=b012f_012io->b012f' in line):
      shape = line.split('=', 1)[1].split()[0]
      found.append(math.prod(int(d) for d in shape[shape.index('[') + 1:shape.index(']')]
                             .split(',')))
  assert len(found) == 1, found
  return found[0]


@pytest.mark.parametrize('name', list(MESHES))
def test_collectives_are_within_ten_percent_of_the_schemes_cost(name):
  _, _, result = compiled(name)
  assert 0.95 <= result['ratio'] <= 1.1, (name, result['ratio'], result['collectives'],
                                          result['scheme'])
  total = result['scheme_ring_bytes']
  for kind, scheme in result['scheme'].items():
    measured = result['collectives'][kind]['ring_bytes']
    if scheme > 0.02 * total:  # Each kind the scheme needs is there, at about its bytes.
      assert 0.9 * scheme <= measured <= 1.25 * scheme, (name, kind, measured, scheme)
    else:  # A kind the scheme does not need costs almost nothing.
      assert measured <= 0.02 * total, (name, kind, measured, scheme)


@pytest.mark.parametrize('name', list(MESHES))
def test_each_axis_uses_its_own_collectives(name):
  config, step, result = compiled(name)
  sizes = dict(zip(AXES, MESHES[name]))
  found = collectives.parse_collectives(step['compiled'].as_text())
  kinds = {c.kind for c in found if c.ring_bytes > 0.01 * result['measured_ring_bytes']}
  total = result['scheme_ring_bytes']
  assert kinds == {k for k, v in result['scheme'].items() if v > 0.01 * total}, name
  expected = set()
  if sizes['data'] > 1 or sizes['fsdp'] > 1:
    expected.add('all-reduce')  # gradients and batch-norm statistics over the examples
  if sizes['fsdp'] > 1 or sizes['model'] > 1:
    expected |= {'all-gather', 'reduce-scatter'}  # weights / channel-sharded activations
  if sizes['spatial'] > 1:
    expected.add('collective-permute')  # depth halos between neighbours
  assert expected <= kinds, (name, kinds)


@pytest.mark.parametrize('name', list(MESHES))
def test_parameters_and_optimizer_state_are_split_as_the_axes_say(name):
  config, step, _ = compiled(name)
  sizes = dict(zip(AXES, MESHES[name]))
  state_shardings = step['compiled'].input_shardings[0][0]
  full = per_device = 0
  for leaf, sharding in zip(jax.tree.leaves(step['abstract_state']),
                            jax.tree.leaves(state_shardings)):
    full += math.prod(leaf.shape) * leaf.dtype.itemsize
    per_device += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  # model shards kernels by channels, fsdp by input channels; batch-norm vectors, the 1-channel
  # stem and the dense head (11% of this small model, 0.1% of the seed's) stay whole.
  split = sizes['model'] * sizes['fsdp']
  assert full / split <= per_device <= 1.15 * full / split, (name, per_device, full)


@pytest.mark.parametrize('name', list(MESHES))
def test_forward_activations_are_split_over_batch_channels_and_depth(name):
  config, step, _ = compiled(name)
  sizes = dict(zip(AXES, MESHES[name]))
  plan = communication_plan(config.model, config.data.crop_size,
                            config.train.global_batch_size)
  stem_global = math.prod(plan.layers[0].output_shape)  # (16, 16, 16, 16, 8)
  stem_per_device = stem_convolution_elements(step['compiled'].as_text())
  # The largest activation: batch over data x fsdp, channels over model, depth over spatial;
  # no device computes it whole.
  assert stem_per_device == stem_global // math.prod(sizes.values()), (
      name, stem_per_device, stem_global)


def test_spatial_axis_cuts_per_device_activation_memory():
  # Wider and larger than above, so activations outweigh the (unsplit) augmentation buffers.
  def temporaries(sizes):
    devices = jax.devices()[:math.prod(sizes)]
    step = comms.compile_train_step(small_config(sizes, crop_size=48, width=16), devices)
    return step['compiled'].memory_analysis().temp_size_in_bytes

  whole = temporaries((2, 1, 1, 1))  # 8 examples per device
  split = temporaries((2, 1, 1, 4))  # the same 8 examples, each split 4 ways along depth
  assert split < 0.45 * whole, (split, whole)


def test_fsdp_gradients_are_reduce_scattered_as_all_reduce_plus_slices_on_cpu():
  # XLA:CPU has no reduce-scatter: the gradient sum arrives as an all-reduce whose every user
  # keeps 1/8 of it (GPU and TPU turn exactly this into a reduce-scatter). The accounting
  # counts it as one.
  _, step, _ = compiled('fsdp8')
  text = step['compiled'].as_text()
  scattered = [c for c in collectives.parse_collectives(text)
               if c.kind == 'reduce-scatter' and c.from_pattern and c.result_bytes > 10_000]
  assert scattered
  name = scattered[0].name.split('[')[0]
  line = next(line for line in text.splitlines() if line.lstrip().startswith(f'%{name} = '))
  assert ' all-reduce(' in line
  users = [line for line in text.splitlines() if f'%{name})' in line or f'%{name},' in line]
  assert users and all('dynamic-slice' in u or 'get-tuple-element' in u or 'fusion(' in u
                       for u in users), users
  ring = scattered[0].ring_bytes
  assert ring == pytest.approx(7 / 8 * scattered[0].result_bytes)


def test_spatial_startup_line_names_the_layers_left_whole():
  config = small_config(MESHES['data2_spatial4'])
  line = communication.spatial_summary(communication_plan(config.model, 32, 16),
                                       {'spatial': 4})
  assert line.startswith('spatial parallelism over 4 devices at 32^3: ')
  # 32^3: stem 16^3, pool 8^3, stage 2 4^3, stage 3 2^3, stage 4 1^3: stages 3-4 stay whole.
  assert 'blocks/2/conv1 (depth 4 -> 2 does not divide by 4)' in line
  assert 'blocks/1/' not in line and 'stem' not in line
  assert communication.spatial_summary(communication_plan(config.model, 32, 16),
                                       {'spatial': 1}) is None


def test_halo_planes_follow_same_padding():
  # 3^3 stride 1: one plane each side forward and backward.
  assert communication.halo_planes(3, 1, 1) == (1, 1, 1, 1)
  # 3^3 stride 2 on an even depth pads (0, 1): the next plane forward, the previous output
  # gradient plane backward.
  assert communication.halo_planes(3, 2, 0) == (0, 1, 1, 0)
  # The seed's 7^3 stride-2 stem pads (2, 3).
  assert communication.halo_planes(7, 2, 2) == (2, 3, 2, 1)
  assert communication.halo_planes(1, 2, 0) == (0, 0, 0, 0)


def test_ring_bytes_compare_collectives_fairly():
  hlo = '''
  HloModule m, num_partitions=8
  %ar = f32[1000]{0} all-reduce(f32[1000]{0} %p), replica_groups=[2,4]<=[8], to_apply=%add
  %ag = f32[1000]{0} all-gather(f32[250]{0} %q), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %rs = f32[250]{0} reduce-scatter(f32[1000]{0} %r), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, to_apply=%add
  %cp = f32[100]{0} collective-permute(f32[100]{0} %s), source_target_pairs={{0,1}}
  '''
  by_kind = {c.kind: c for c in collectives.parse_collectives(hlo)}
  assert {k: c.group_size for k, c in by_kind.items() if k != 'collective-permute'} == {
      'all-reduce': 4, 'all-gather': 4, 'reduce-scatter': 4}
  # An all-reduce moves what an all-gather and a reduce-scatter of the same tensor move.
  assert by_kind['all-reduce'].ring_bytes == 2 * 3 / 4 * 4000
  assert by_kind['all-gather'].ring_bytes == by_kind['reduce-scatter'].ring_bytes == 3 / 4 * 4000
  assert by_kind['collective-permute'].ring_bytes == 400


def test_a_nominal_spatial_axis_is_caught(monkeypatch):
  # The model split depth twice over: shard_map around every conv and pool, and the activation
  # constraints between them (either alone still splits, GSPMD-style or by propagation). With
  # both switched off the compiled program is still correct, replicated, and spatial does
  # nothing: the checks above must say so.
  from jaxmed.models import cnn3d
  from jaxmed.models import resnet3d
  from jaxmed.parallel import spatial
  monkeypatch.setattr(spatial, 'depth_axis', lambda: None)
  for module in (resnet3d, cnn3d):
    monkeypatch.setattr(module, 'constrain', lambda x, *axes: x)
  config = small_config(MESHES['data2_spatial4'])
  step = comms.compile_train_step(config)
  result = comms.benchmark_comms(config, step)
  plan = communication_plan(config.model, 32, 16)
  assert stem_convolution_elements(step['compiled'].as_text()) > (
      math.prod(plan.layers[0].output_shape) // 8)
  assert result['collectives']['collective-permute']['ring_bytes'] < (
      0.9 * result['scheme']['collective-permute'])


def test_a_model_axis_without_activation_constraints_is_caught(monkeypatch):
  from jaxmed.models import cnn3d
  from jaxmed.models import resnet3d
  for module in (resnet3d, cnn3d):
    monkeypatch.setattr(module, 'constrain', lambda x, *axes: x)
  config = small_config(MESHES['data2_model4'])
  result = comms.benchmark_comms(config)
  assert result['ratio'] > 1.1, result['ratio']


def test_an_all_reduce_is_a_reduce_scatter_only_when_each_device_keeps_its_own_piece():
  def parse(offset_line, offset, piece=250):
    hlo = f'''
  HloModule m, num_partitions=4
  %pid = u32[] partition-id()
  %four = u32[] constant({piece})
  {offset_line}
  %ar = f32[1000]{{0}} all-reduce(f32[1000]{{0}} %p), replica_groups=[1,4]<=[4], to_apply=%add
  %ds = f32[{piece}]{{0}} dynamic-slice(f32[1000]{{0}} %ar, u32[] %{offset}), dynamic_slice_sizes={{{piece}}}
  '''
    (found,) = collectives.parse_collectives(hlo)
    return found

  # Each device slices at its own partition's offset: the pieces cover the sum.
  own = parse('%at = u32[] multiply(u32[] %pid, u32[] %four)', 'at')
  assert own.kind == 'reduce-scatter' and own.from_pattern
  assert own.ring_bytes == pytest.approx(3 / 4 * 4000)
  # Every device slices the same piece: a real all-reduce (the rest of the sum is dropped,
  # not scattered), at all-reduce bytes.
  same = parse('%at = u32[] constant(0)', 'at')
  assert same.kind == 'all-reduce' and not same.from_pattern
  assert same.ring_bytes == pytest.approx(2 * 3 / 4 * 4000)
  # Pieces of half the sum on 4 devices cannot be a reduce-scatter's.
  half = parse('%at = u32[] multiply(u32[] %pid, u32[] %four)', 'at', piece=500)
  assert half.kind == 'all-reduce'
