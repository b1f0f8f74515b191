"""python -m jaxmed.benchmark: the FLOP count, every --what at tiny size, the collective bytes."""

import json
import re
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxmed import benchmark
from jaxmed.benchmarks import flops as flops_lib
from jaxmed.benchmarks import tables
from jaxmed.parallel import collectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough for a shared 2-core CPU; the production code path.
BENCH = {
    'model.depth': 10,
    'model.width': 2,
    'model.dtype': 'float32',
    'data.stored_crop_size': 10,
    'data.crop_size': 8,
    'train.global_batch_size': 8,
    'train.eval_batch_size': 8,
}
QUICK = dict(steps=1, warmup=1, repeats=1, peak_size=128)


def bench_config(**overrides):
  from configs import default
  from conftest import apply_overrides
  config = apply_overrides(default.get_config(), BENCH)
  return apply_overrides(config, {k.replace('__', '.'): v for k, v in overrides.items()})


def test_flops_of_a_tiny_resnet_match_a_hand_count():
  # ResNet-10, width 2, one 8^3 crop: 2 * k^3 * Cin * Cout * output voxels per conv.
  stem = 2 * 7**3 * 1 * 2 * 4**3  # 7^3 stride 2: 8^3 -> 4^3, then max-pool -> 2^3
  stage1 = 2 * (2 * 27 * 2 * 2 * 2**3)  # two 3^3 convs 2 -> 2 at 2^3
  stage2 = 2 * 27 * 2 * 4 + 2 * 27 * 4 * 4 + 2 * 2 * 4  # stride 2 -> 1^3, + 1x1x1 projection
  stage3 = 2 * 27 * 4 * 8 + 2 * 27 * 8 * 8 + 2 * 4 * 8  # SAME keeps 1^3
  stage4 = 2 * 27 * 8 * 16 + 2 * 27 * 16 * 16 + 2 * 8 * 16
  dense = 2 * 16 * 1
  hand = stem + stage1 + stage2 + stage3 + stage4 + dense
  flops = flops_lib.model_flops(bench_config().model, 8)
  assert flops['forward'] == hand
  assert flops['train_step'] == 3 * hand
  assert len(flops['layers']) == 1 + 2 + 3 * 3 + 1
  # The space-to-depth rewrite does not change the model's useful work.
  assert flops_lib.model_flops(bench_config(model__space_to_depth='all').model, 8)['forward'] \
      == hand


def test_seed_resnet18_at_32_cubed_is_0_98_gflop_forward():
  from configs import luna16
  flops = flops_lib.model_flops(luna16.get_config().model, 32)
  # 0.98 GFLOP forward per 32^3 sample for the seed's ResNet-18 at width 64 (analytic count).
  assert abs(flops['forward'] / 1e9 - 0.981) < 0.001


def test_collective_parser_counts_sync_and_async_ops_once():
  hlo = '''
  %all-reduce.1 = f32[64,3]{1,0} all-reduce(f32[64,3]{1,0} %p), channel_id=1, to_apply=%add
  %ar2 = (f32[10]{0}, bf16[4]{0}) all-reduce(f32[10]{0} %a, bf16[4]{0} %b), to_apply=%add
  %ags = (f32[2,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[2,8]{1,0} %x), dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[16,8]{1,0}) %ags)
  %rs = f32[4]{0} reduce-scatter(f32[32]{0} %y), dimensions={0}, to_apply=%add
  %cp = s32[5]{0} collective-permute(s32[5]{0} %z), source_target_pairs={{0,1}}
  %add.3 = f32[64,3]{1,0} add(f32[64,3]{1,0} %q, f32[64,3]{1,0} %r)
  '''
  comms = collectives.collective_bytes(hlo)
  assert comms['all-reduce'] == {'count': 2, 'bytes': 64 * 3 * 4 + 10 * 4 + 4 * 2}
  assert comms['all-gather'] == {'count': 1, 'bytes': 16 * 8 * 4}
  assert comms['reduce-scatter'] == {'count': 1, 'bytes': 16}
  assert comms['collective-permute'] == {'count': 1, 'bytes': 20}
  assert comms['all-to-all'] == {'count': 0, 'bytes': 0}


def test_comms_on_data_parallel_8x1_is_the_gradient_all_reduce(tmp_path):
  config = bench_config(mesh__ici_data=8, model__width=4, model__space_to_depth='none')
  result = benchmark.run('comms', config, str(tmp_path))
  # One all-reduce of every gradient plus small batch-norm statistics, and nothing else.
  assert 0.98 <= result['ratio'] <= 1.05, result['ratio']
  measured = result['collectives']
  assert measured['all-gather']['ring_bytes'] < 0.01 * result['measured_ring_bytes']
  assert result['scheme']['all-reduce'] == result['scheme_ring_bytes']
  # The lower bound holds for any program of the stated ways, jaxmed's scheme among them.
  assert 0 < result['bound_ring_bytes'] <= result['scheme_ring_bytes']
  assert result['memory']['parameters'] > 0 and result['memory']['temporaries'] > 0
  assert os.path.exists(tmp_path / 'benchmark_comms.json')


def test_step_from_the_command_line_writes_its_json(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXMED_')}
  env.update(JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'jaxmed.benchmark', '--what=step', f'--workdir={tmp_path}',
         '--steps=1', '--warmup=1', '--repeats=1', '--peak_size=128',
         *[f'--config.{k}={v}' for k, v in {**BENCH, 'model.space_to_depth': 'all'}.items()]]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'samples/s' in proc.stdout and 'MFU' in proc.stdout
  with open(tmp_path / 'benchmark_step.json') as f:
    result = json.load(f)
  assert result['samples_per_s'] > 0 and result['compile_s'] > 0
  assert 0 < result['mfu'] < 1
  assert result['space_to_depth'] == 'all' and result['devices'] == 1


def test_e2e_on_a_synthetic_crops_file_reports_the_fraction_of_the_step(tmp_path):
  config = bench_config(data__auto_prepare=False, data__cache='device',
                        data__crops_file=str(tmp_path / 'missing.h5'), train__log_every_steps=1)
  result = benchmark.run('e2e', config, str(tmp_path), steps=2, warmup=1, repeats=1,
                         peak_size=128)
  # The steps ran in train.TrainLoop, as a training run's do: its writer logged each of them.
  with open(tmp_path / 'e2e_run' / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]
  assert result['e2e_steps'] == 2 and result['log_every_steps'] == 1
  assert result['crops_file'].startswith(str(tmp_path)) and result['cache'] == 'device'
  assert 'cache=device' in tables.format_table('e2e', tables.table_rows('e2e', result))
  assert result['e2e_samples_per_s'] > 0 and result['step_samples_per_s'] > 0
  assert result['fraction_of_step'] == pytest.approx(
      result['e2e_samples_per_s'] / result['step_samples_per_s'])
  assert 0 <= result['input_wait_fraction'] <= 1


def test_loop_times_the_train_loop_against_the_bare_step(tmp_path):
  config = bench_config(model__name='cnn3d', data__auto_prepare=False,
                        data__crops_file=str(tmp_path / 'missing.h5'), train__log_every_steps=2)
  result = benchmark.run('loop', config, str(tmp_path), steps=4, warmup=1, repeats=1)
  assert result['bare_steps_per_s'] > 0 and result['loop_steps_per_s'] > 0
  assert result['loop_over_bare'] == pytest.approx(
      result['loop_steps_per_s'] / result['bare_steps_per_s'])
  # The timed loop is the training run's own: it logged every 2 steps into its workdir.
  with open(tmp_path / 'loop_run' / 'metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  # Steps 1 (warm-up), 2-5 (fed by the pipeline), 6-9 (on device batches); not 10-13 (bare).
  assert steps == [2, 4, 6, 8]


def test_compare_runs_jax_and_the_pytorch_twin(tmp_path):
  pytest.importorskip('torch')
  result = benchmark.run('compare', bench_config(), str(tmp_path), **QUICK)
  assert result['jax_samples_per_s'] > 0 and result['torch_samples_per_s'] > 0
  assert result['torch']['precision'] == 'float32'  # CPU
  assert result['jax_over_torch'] == pytest.approx(
      result['jax_samples_per_s'] / result['torch_samples_per_s'])


def test_checkpoint_times_save_and_restore(tmp_path):
  result = benchmark.run('checkpoint', bench_config(), str(tmp_path), repeats=1)
  assert result['save_s'] > 0 and result['restore_s'] > 0 and result['state_bytes'] > 0
  assert not [p for p in os.listdir(tmp_path) if p.startswith('benchmark_checkpoint_')]


def test_profile_writes_a_trace(tmp_path):
  result = benchmark.run('profile', bench_config(), str(tmp_path), steps=2, warmup=1)
  assert result['traces'] and all(os.path.getsize(t) > 0 for t in result['traces'])


def test_input_delegates_to_the_pipeline_benchmark(tmp_path):
  result = benchmark.run('input', bench_config(), str(tmp_path), seconds=0.2, workers=(0,))
  modes = {row['mode'] for row in result['rows']}
  assert {'h5py', 'loader', 'loader+augment'} <= modes
  assert all(row['crops_per_s'] > 0 for row in result['rows'])


def test_preprocess_delegates_to_the_preprocess_benchmark(tmp_path):
  result = benchmark.run('preprocess', bench_config(), str(tmp_path))
  assert result['seconds_per_scan_per_worker'] > 0
  assert os.path.exists(tmp_path / 'benchmark_preprocess.json')


def test_summary_collects_the_runs(tmp_path):
  step = {'what': 'step', 'config': 'x', 'model': 'resnet3d', 'depth': 18, 'width': 64,
          'space_to_depth': 'none', 'dtype': 'bfloat16', 'crop_size': 32,
          'stored_crop_size': 40, 'global_batch_size': 256, 'device_kind': 'H100',
          'samples_per_s': 20000.0, 'model_tflops_per_s': 60.0, 'mfu': 0.08,
          'jax': '0.11.2'}  # a step result names the JAX version under 'jax', as the real one does
  # Each run its own figures, so a number landing in another run's row is caught.
  compare_step = dict(step, samples_per_s=21000.0, model_tflops_per_s=63.0, mfu=0.084)
  compare = dict(compare_step, what='compare', jax=compare_step, torch_samples_per_s=19000.0,
                 jax_over_torch=21000 / 19000)
  e2e_step = dict(step, samples_per_s=22000.0, model_tflops_per_s=66.0, mfu=0.088)
  e2e = dict(e2e_step, what='e2e', step=e2e_step, e2e_samples_per_s=9000.0,
             fraction_of_step=9000 / 22000)
  for name, r in (('a', step), ('b', compare), ('c', e2e)):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / f"benchmark_{r['what']}.json", 'w') as f:
      json.dump(r, f)
  text, readme = tables.summarize(str(tmp_path))
  header, *lines = text.splitlines()
  columns = [c for c in re.split(r'\s{2,}', header.strip())]
  rows = {cells[0]: dict(zip(columns, cells)) for cells in
          (re.split(r'\s{2,}', line.strip()) for line in lines)}
  assert sorted(rows) == ['a', 'b', 'c']
  assert [rows[r]['JAX samples/s'] for r in 'abc'] == ['20,000', '21,000', '22,000']
  assert [rows[r]['MFU'] for r in 'abc'] == ['8.0%', '8.4%', '8.8%']
  assert [rows[r]['PyTorch samples/s'] for r in 'abc'] == ['-', '19,000', '-']
  assert [rows[r]['JAX/PT'] for r in 'abc'] == ['-', '1.11', '-']
  assert [rows[r]['e2e samples/s'] for r in 'abc'] == ['-', '-', '9,000']
  assert [rows[r]['e2e/step'] for r in 'abc'] == ['-', '-', '41%']
  assert len(readme) == 1 and 'H100' in readme[0] and '21,000 samples/s' in readme[0]
  assert '19,000 samples/s | 1.11' in readme[0]


@pytest.mark.parametrize('depth,size,stem_pool', [(18, 16, True), (10, 13, False)])
def test_pytorch_twin_computes_what_the_flax_model_computes(depth, size, stem_pool):
  torch = pytest.importorskip('torch')
  import jax.numpy as jnp
  from flax import nnx

  from jaxmed.models import resnet3d_torch
  from jaxmed.models.resnet3d import ResNet3D
  flax_model = ResNet3D(depth=depth, width=4, stem_pool=stem_pool, rngs=nnx.Rngs(0))
  # Non-trivial BatchNorm statistics and affine parameters, so the eval path is checked too.
  rng = np.random.default_rng(1)
  for path, variable in nnx.iter_graph(flax_model):
    if isinstance(variable, nnx.Variable) and path[-1] in ('scale', 'bias', 'mean', 'var'):
      shape = variable[...].shape
      value = rng.uniform(0.5, 1.5, shape) if path[-1] in ('scale', 'var') else \
          rng.normal(0, 0.1, shape)
      variable[...] = jnp.asarray(value, jnp.float32)
  twin = resnet3d_torch.ResNet3D(depth=depth, width=4, stem_pool=stem_pool)
  resnet3d_torch.load_flax_state(twin, nnx.to_pure_dict(nnx.state(flax_model)))
  crops = rng.random((4, size, size, size, 1), np.float32)
  torch_crops = torch.from_numpy(crops.transpose(0, 4, 1, 2, 3).copy())  # (B, C, D, H, W)

  flax_model.eval()
  twin.eval()
  with torch.no_grad():
    np.testing.assert_allclose(twin(torch_crops).numpy(), flax_model(jnp.asarray(crops)),
                               rtol=1e-4, atol=1e-5)
  flax_model.train()
  twin.train()
  with torch.no_grad():
    np.testing.assert_allclose(twin(torch_crops).numpy(), flax_model(jnp.asarray(crops)),
                               rtol=1e-3, atol=1e-4)  # batch statistics of 4 crops
  assert sum(p.numel() for p in twin.parameters()) == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(flax_model, nnx.Param)))
