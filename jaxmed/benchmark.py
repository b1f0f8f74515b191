"""python -m jaxmed.benchmark: how fast jaxmed trains, and where the time goes.

  python -m jaxmed.benchmark --config=configs/X.py --what=WHAT [--workdir=DIR] [--config.k=v ...]
      [--steps=10 --warmup=3 --repeats=3]

WHAT (each prints a short table and writes WORKDIR/benchmark_<what>.json):
  step        samples/s of the real jitted train step (train.make_train_step, sharded as the
              config's mesh says) on synthetic on-device int16 crops of the stored crop size;
              analytic model FLOPs (model_flops), TFLOP/s, MFU against a matmul peak measured in
              the same run (bf16 on accelerators for a bf16 model, else f32), compile time and
              peak device memory.
  input       crops/s of the Grain loader alone and with augmentation (pipeline.benchmark_input).
  e2e         training fed from the HDF5 crops file (pipeline.make_train_iterator, as the train
              loop does it) against the step rate on synthetic input: the fraction kept.
              Uses config.data.crops_file when it exists (or auto_prepare builds it), else
              writes a synthetic crops file of the stored crop size into the workdir.
  compare     the step above, then the same architecture in PyTorch eager
              (models/resnet3d_torch.py; AMP bf16 + channels_last_3d + cudnn.benchmark on CUDA,
              float32 on CPU), same shapes and batch, same process; both and their ratio.
  comms       bytes per device per step of each collective kind in the compiled train step's
              HLO for the configured mesh, beside the data-parallel minimum.
  checkpoint  save and restore seconds of the train state (checkpointing.Checkpointer).
  preprocess  seconds per LUNA16-sized scan per worker (preprocess.benchmark).
  profile     a jax.profiler trace of a few train steps in WORKDIR/profile (TensorBoard /
              Perfetto), after warm-up.
  summary     one table (and a README line) from every benchmark_*.json under --workdir.

The default workdir is workdirs/<config.name>. Figures are medians of --repeats timed runs of
--steps steps each, after --warmup steps, every run waited on with block_until_ready.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

WHATS = ('step', 'input', 'e2e', 'compare', 'comms', 'checkpoint', 'preprocess', 'profile',
         'summary')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the JSON goes (default workdirs/<name>).')
_WHAT = flags.DEFINE_enum('what', 'step', WHATS, 'What to measure.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per repeat.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats; the median is reported.')
_SECONDS = flags.DEFINE_float('seconds', 5.0, 'input: seconds per measurement.')
_WORKERS = flags.DEFINE_string('workers', '', 'input: comma-separated Grain worker counts '
                               '(default: 0 and config.data.workers).')
_PEAK_SIZE = flags.DEFINE_integer('peak_size', 0, 'Matmul edge for the peak (0: 8192 on '
                                  'accelerators, 1024 on CPU).')


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


# ---- building the real train step ---------------------------------------------------------------

class StepBench:
  """The production train step, sharded and compiled for the config, on synthetic crops."""

  def __init__(self, config):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxmed import train
    from jaxmed.parallel import sharding as sharding_lib
    self.config = config
    self.mesh, self.rules = train.create_mesh_and_rules(config)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules, ndim=1)
    with sharding_lib.use_rules(self.mesh, self.rules):
      self.graphdef, self.state, self.state_shardings = train.init_sharded_state(
          config, self.mesh, self.rules)
      self.step_fn = train.make_train_step(self.graphdef, self.state_shardings, config)
    b, s = config.train.global_batch_size, config.data.stored_crop_size
    first = tuple(self.batch_sharding.spec)[:1] or (None,)

    def sharding(ndim):  # As the input pipeline shards: batch axis, the rest replicated.
      return NamedSharding(self.mesh, PartitionSpec(*(first + (None,) * (ndim - 1))))

    @functools.partial(jax.jit, out_shardings={'crops': sharding(4), 'label': sharding(1),
                                               'index': sharding(1), 'row': sharding(1)})
    def make_batch(key):
      positions = jnp.arange(b, dtype=jnp.int32)
      return {'crops': jax.random.randint(key, (b, s, s, s), -1000, 400, jnp.int16),
              'label': positions % 2, 'index': positions, 'row': positions}

    self.batch = make_batch(jax.random.key(config.seed))
    t0 = time.perf_counter()
    with sharding_lib.use_rules(self.mesh, self.rules):
      self.lowered = self.step_fn.lower(self.state, self.batch, jnp.int32(0))
      self.compiled = self.lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.steps_done = 0

  def run(self, batch=None) -> dict:
    """One step on `batch` (default the synthetic one); returns the metrics (not waited on)."""
    import jax.numpy as jnp
    self.state, metrics = self.compiled(self.state, self.batch if batch is None else batch,
                                        jnp.int32(self.steps_done))
    self.steps_done += 1
    return metrics

  def time_steps(self, steps: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per step of `repeats` runs of `steps` steps each, after `warmup` steps."""
    import jax
    for _ in range(warmup):
      metrics = self.run()
    if warmup:
      jax.block_until_ready((self.state, metrics))
    per_step = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        metrics = self.run()
      jax.block_until_ready((self.state, metrics))
      per_step.append((time.perf_counter() - t0) / steps)
    return per_step

  def memory(self) -> dict[str, Any]:
    """Per-device bytes: XLA's static analysis, and the allocator's peak where it reports one."""
    import jax
    out: dict[str, Any] = {}
    try:
      m = self.compiled.memory_analysis()
      out.update(argument_bytes=int(m.argument_size_in_bytes),
                 output_bytes=int(m.output_size_in_bytes),
                 temp_bytes=int(m.temp_size_in_bytes),
                 generated_code_bytes=int(m.generated_code_size_in_bytes))
    except Exception:  # Not every backend reports it.
      pass
    peaks = []
    for device in jax.local_devices():
      stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
      if stats and 'peak_bytes_in_use' in stats:
        peaks.append(int(stats['peak_bytes_in_use']))
    if peaks:
      out['peak_bytes_in_use'] = max(peaks)
    return out


def describe_run(config) -> dict[str, Any]:
  """What was measured on what: model, shapes, mesh, devices, versions."""
  import flax
  import jax

  from jaxmed.parallel import mesh as mesh_lib
  ici, dcn = mesh_lib.mesh_shape(config.mesh, jax.device_count())
  model = config.model
  return {
      'config': config.name, 'model': model.name, 'depth': model.get('depth'),
      'width': model.width, 'space_to_depth': model.get('space_to_depth', 'none'),
      'dtype': model.dtype, 'crop_size': config.data.crop_size,
      'stored_crop_size': config.data.stored_crop_size,
      'global_batch_size': config.train.global_batch_size,
      'mesh': mesh_lib.describe([i * d for i, d in zip(ici, dcn)]),
      'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
      'device_kind': jax.devices()[0].device_kind, 'processes': jax.process_count(),
      'jax': jax.__version__, 'flax': flax.__version__, 'python': platform.python_version(),
  }


def _peak_for(config, peak_size: int = 0) -> dict[str, Any]:
  import jax
  on_cpu = jax.devices()[0].platform == 'cpu'
  dtype = 'bfloat16' if config.model.dtype == 'bfloat16' and not on_cpu else 'float32'
  return matmul_peak(dtype, peak_size or (1024 if on_cpu else 8192))


def benchmark_step(config, steps: int = 10, warmup: int = 3, repeats: int = 3,
                   peak_size: int = 0, bench: StepBench | None = None) -> dict[str, Any]:
  """Samples/s, TFLOP/s, MFU, compile time and memory of the real train step (see module doc)."""
  bench = bench or StepBench(config)
  per_step = bench.time_steps(steps, warmup, repeats)
  seconds = statistics.median(per_step)
  batch = config.train.global_batch_size
  flops = model_flops(config.model, config.data.crop_size)
  tflops = flops['train_step'] * batch / seconds / 1e12
  peak = _peak_for(config, peak_size)
  result = {
      **describe_run(config),
      'samples_per_s': batch / seconds, 'step_ms': 1e3 * seconds,
      'step_ms_all_repeats': [1e3 * t for t in per_step], 'compile_s': bench.compile_s,
      'forward_gflops_per_sample': flops['forward'] / 1e9,
      'train_gflops_per_sample': flops['train_step'] / 1e9,
      'model_tflops_per_s': tflops, 'matmul_peak': peak,
      'mfu': tflops / peak['tflops'], 'memory': bench.memory(),
  }
  return result


# ---- end to end ---------------------------------------------------------------------------------

def write_synthetic_crops_file(path: str, num_crops: int, size: int,
                               subsets: Sequence[int]) -> None:
  """A schema-v1 crops file of random HU cubes (half positives), spread over `subsets`."""
  import h5py

  from jaxmed.data import crops_file
  rng = np.random.default_rng(0)
  pattern = rng.integers(-1000, 400, (size,) * 3, dtype=np.int16)
  tmp = path + '.tmp'
  with h5py.File(tmp, 'w') as f:
    crops = f.create_dataset('crops', (num_crops, size, size, size), np.int16,
                             chunks=(1, size, size, size))
    for row in range(num_crops):
      crops[row] = np.roll(pattern, row, axis=row % 3)
    f['label'] = (np.arange(num_crops) % 2).astype(np.uint8)
    f['seriesuid'] = np.array([b'benchmark.%d' % (row // 100) for row in range(num_crops)])
    f['subset'] = np.array([subsets[row % len(subsets)] for row in range(num_crops)], np.int8)
    f['center_world'] = np.zeros((num_crops, 3), np.float64)
    f['diameter_mm'] = np.where(np.arange(num_crops) % 2, 10.0, 0.0).astype(np.float32)
    f['exclude'] = np.zeros(num_crops, bool)
    f.attrs.update(schema_version=crops_file.SCHEMA_VERSION, spacing_mm=1.0,
                   crop_shape=(size,) * 3, sources='{}', config='{}')
  os.replace(tmp, path)


def _e2e_crops_file(config, workdir: str) -> str:
  """config.data.crops_file if it exists or may be prepared; else a synthetic one in workdir."""
  from jaxmed.data import prepare
  if os.path.exists(config.data.crops_file) or config.data.auto_prepare:
    prepare.ensure_crops_file(config)
    return config.data.crops_file
  size = config.data.stored_crop_size
  batch = config.train.global_batch_size
  num_crops = int(max(4 * batch, min(16384, (512 << 20) // (2 * size**3))))
  path = os.path.join(workdir, f'benchmark_crops_{size}.h5')
  if not os.path.exists(path):
    logging.warning('%s does not exist: timing on a synthetic crops file %s (%d crops)',
                    config.data.crops_file, path, num_crops)
    write_synthetic_crops_file(path, num_crops, size, tuple(config.data.train_subsets))
  return path


def benchmark_e2e(config, workdir: str, steps: int = 10, warmup: int = 3,
                  repeats: int = 3) -> dict[str, Any]:
  """Training fed from the crops file, step by step as train.py's loop does, vs the step alone.

  The loop waits on each step's metrics and then takes the next batch, exactly as train.py;
  input_wait_fraction is the share of the time spent in next(iterator).
  """
  import jax

  from jaxmed.data import pipeline
  config = config.copy_and_resolve_references()
  config.data.crops_file = _e2e_crops_file(config, workdir)
  bench = StepBench(config)
  step_result = benchmark_step(config, steps, warmup, repeats, bench=bench)
  iterator = pipeline.make_train_iterator(config, bench.batch_sharding, 0)
  try:
    batch = next(iterator)
    for _ in range(max(warmup, 1)):
      jax.device_get(bench.run(batch))
      batch = next(iterator)
    total = steps * repeats
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(total):
      jax.device_get(bench.run(batch))
      t1 = time.perf_counter()
      batch = next(iterator)
      waited += time.perf_counter() - t1
    seconds = (time.perf_counter() - t0) / total
  finally:
    iterator.close()
  samples = config.train.global_batch_size / seconds
  return {**describe_run(config), 'crops_file': config.data.crops_file,
          'data_workers': config.data.workers, 'e2e_samples_per_s': samples,
          'step_samples_per_s': step_result['samples_per_s'],
          'fraction_of_step': samples / step_result['samples_per_s'],
          'input_wait_fraction': waited / (seconds * total), 'e2e_steps': total,
          'step': step_result}


# ---- PyTorch comparison -------------------------------------------------------------------------

def torch_step_rate(config, steps: int = 10, warmup: int = 3, repeats: int = 3) -> dict[str, Any]:
  """Samples/s of the PyTorch twin's training step on the same shapes, batch and optimiser.

  Per step: centre window of the int16 stored crops + HU window on the device (the JAX step also
  draws a random rotation/flip/offset: one gather, a small share), forward, BCE, backward,
  global-norm clip, AdamW. CUDA: cudnn.benchmark, channels_last_3d, AMP bf16 autocast when
  config.model.dtype is bfloat16, fused AdamW. CPU: float32.
  """
  import torch
  import torch.nn.functional as F

  from jaxmed.models import resnet3d_torch
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  amp = cuda and config.model.dtype == 'bfloat16'
  torch.manual_seed(config.seed)
  if cuda:
    torch.backends.cudnn.benchmark = True
  model = resnet3d_torch.from_model_config(config.model).to(device)
  layout = torch.channels_last_3d if cuda else torch.contiguous_format
  model = model.to(memory_format=layout)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate,
                                weight_decay=config.train.weight_decay,
                                **({'fused': True} if cuda else {}))
  b, s, c = (config.train.global_batch_size, config.data.stored_crop_size,
             config.data.crop_size)
  crops = torch.randint(-1000, 400, (b, s, s, s), dtype=torch.int16, device=device)
  labels = (torch.arange(b, device=device) % 2).float()
  low, high = config.data.hu_window
  o = (s - c) // 2

  def step():
    x = crops[:, o:o + c, o:o + c, o:o + c].float().sub_(low).div_(high - low).clamp_(0, 1)
    x = x.unsqueeze(1).contiguous(memory_format=layout)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.train.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip_norm)
    optimizer.step()
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(max(warmup, 1)):
    step()
  sync()
  per_step = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = step()
    loss.item()
    sync()
    per_step.append((time.perf_counter() - t0) / steps)
  seconds = statistics.median(per_step)
  return {'torch': torch.__version__, 'device': torch.cuda.get_device_name() if cuda else 'cpu',
          'precision': 'amp_bf16' if amp else 'float32', 'channels_last_3d': cuda,
          'samples_per_s': b / seconds, 'step_ms': 1e3 * seconds,
          'step_ms_all_repeats': [1e3 * t for t in per_step],
          'peak_bytes_allocated': torch.cuda.max_memory_allocated() if cuda else None}


def benchmark_compare(config, steps: int = 10, warmup: int = 3, repeats: int = 3,
                      peak_size: int = 0) -> dict[str, Any]:
  """The JAX step and the PyTorch twin's step, same shapes, same process; ratio JAX / torch."""
  jax_result = benchmark_step(config, steps, warmup, repeats, peak_size)
  result = {**describe_run(config), 'jax_samples_per_s': jax_result['samples_per_s'],
            'jax': jax_result}
  try:
    import torch  # noqa: F401
  except ImportError:
    result['torch'] = None
    result['note'] = 'torch is not installed: pip install torch to compare'
    return result
  torch_result = torch_step_rate(config, steps, warmup, repeats)
  result.update(torch=torch_result, torch_samples_per_s=torch_result['samples_per_s'],
                jax_over_torch=jax_result['samples_per_s'] / torch_result['samples_per_s'])
  return result


# ---- communication ------------------------------------------------------------------------------

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1}


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO shape string: 'f32[64,3]{1,0}' or a tuple '(f32[2]{0}, bf16[4]{0})'."""
  import re
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]', text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives in a compiled (per-device) HLO module.

  Bytes are each collective's result buffer on one device (for all-gather the gathered
  result, for reduce-scatter the scattered piece). Async pairs are counted once, at their
  '-done' (whose result is the collective's result); collectives wrapped in async computations
  are counted where they appear. Per execution of the module (a step), loops not unrolled.
  """
  import re
  pattern = re.compile(r'=\s+(?P<shape>.+?)\s+(?P<op>' + '|'.join(COLLECTIVES) +
                       r')(?P<suffix>-start|-done)?\(')
  out = {kind: {'count': 0, 'bytes': 0} for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match or match.group('suffix') == '-start':
      continue
    out[match.group('op')]['count'] += 1
    out[match.group('op')]['bytes'] += _shape_bytes(match.group('shape'))
  return out


def benchmark_comms(config) -> dict[str, Any]:
  """Collective bytes per device per step of the compiled train step, and the DP minimum.

  Data parallel needs one all-reduce of the gradients per step: result bytes = parameter
  gradient bytes; a ring moves 2 (n-1)/n times that through each device's links (the analytic
  minimum, also listed). BatchNorm statistics add a few small all-reduces.
  """
  import jax
  from flax import nnx
  bench = StepBench(config)
  comms = collective_bytes(bench.compiled.as_text())
  params = nnx.state(nnx.merge(bench.graphdef, bench.state).model, nnx.Param)
  grad_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
  n = math.prod(bench.mesh.shape[a] for a in ('data', 'fsdp'))
  return {**describe_run(config), 'collectives': comms,
          'total_bytes': sum(c['bytes'] for c in comms.values()),
          'param_gradient_bytes': grad_bytes, 'batch_shards': n,
          'dp_allreduce_result_bytes': grad_bytes if n > 1 else 0,
          'dp_ring_bytes_per_device': 2 * (n - 1) / n * grad_bytes,
          'compile_s': bench.compile_s}


# ---- checkpoint ---------------------------------------------------------------------------------

def benchmark_checkpoint(config, workdir: str, repeats: int = 2) -> dict[str, Any]:
  """Seconds to save (until save() returns, and until on disk) and restore the train state."""
  import jax
  from flax import nnx

  from jaxmed import checkpointing
  from jaxmed import train
  from jaxmed.parallel import sharding as sharding_lib
  mesh, rules = train.create_mesh_and_rules(config)
  directory = tempfile.mkdtemp(prefix='benchmark_checkpoint_', dir=workdir)
  config = config.copy_and_resolve_references()
  config.checkpoint.keep = repeats + 1
  saves, returns, restores = [], [], []
  try:
    with sharding_lib.use_rules(mesh, rules):
      graphdef, state, _ = train.init_sharded_state(config, mesh, rules)
      _, abstract_state, _ = train.abstract_train_state(config, mesh, rules)
      jax.block_until_ready(state)
      state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
      checkpointer = checkpointing.Checkpointer(directory, config)
      try:
        for step in range(1, repeats + 1):
          t0 = time.perf_counter()
          checkpointer.save(step, nnx.to_pure_dict(state))
          returns.append(time.perf_counter() - t0)
          checkpointer.wait()
          saves.append(time.perf_counter() - t0)
          t0 = time.perf_counter()
          restored, _ = train.restore_state(checkpointer, abstract_state, step)
          jax.block_until_ready(restored)
          restores.append(time.perf_counter() - t0)
      finally:
        checkpointer.close()
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  save_s, restore_s = statistics.median(saves), statistics.median(restores)
  return {**describe_run(config), 'state_bytes': state_bytes,
          'async_save': bool(config.checkpoint.async_save),
          'save_s': save_s, 'save_returns_s': statistics.median(returns),
          'restore_s': restore_s, 'save_gb_per_s': state_bytes / save_s / 1e9,
          'restore_gb_per_s': state_bytes / restore_s / 1e9,
          'save_s_all': saves, 'restore_s_all': restores}


# ---- profile ------------------------------------------------------------------------------------

def benchmark_profile(config, workdir: str, steps: int = 5, warmup: int = 3) -> dict[str, Any]:
  """A jax.profiler trace of `steps` train steps (after compile and warm-up) in workdir/profile."""
  import jax
  bench = StepBench(config)
  bench.time_steps(1, warmup, 0)
  log_dir = os.path.join(workdir, 'profile')
  t0 = time.perf_counter()
  with jax.profiler.trace(log_dir):
    for _ in range(steps):
      metrics = bench.run()
    jax.block_until_ready((bench.state, metrics))
  seconds = (time.perf_counter() - t0) / steps
  traces = sorted(glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True))
  return {**describe_run(config), 'profile_dir': log_dir, 'traces': traces,
          'profiled_steps': steps, 'step_ms_while_tracing': 1e3 * seconds,
          'view': f'tensorboard --logdir {log_dir}  (or xprof / Perfetto)'}


# ---- delegates ----------------------------------------------------------------------------------

def benchmark_input(config, seconds: float = 5.0, workers: Sequence[int] = ()) -> dict[str, Any]:
  from jaxmed.data import pipeline
  if not hasattr(pipeline, 'benchmark_input'):
    raise NotImplementedError('jaxmed.data.pipeline.benchmark_input does not exist yet')
  workers = tuple(workers) or tuple(sorted({0, int(config.data.workers)}))
  rows = pipeline.benchmark_input(config, crop_sizes=(config.data.crop_size,), workers=workers,
                                  seconds=seconds)
  return {**describe_run(config), 'rows': rows}


def benchmark_preprocess(config) -> dict[str, Any]:
  from jaxmed.data import preprocess
  if not hasattr(preprocess, 'benchmark'):
    raise NotImplementedError('jaxmed.data.preprocess.benchmark does not exist yet')
  return {**describe_run(config), **preprocess.benchmark(config)}


# ---- tables -------------------------------------------------------------------------------------

def _si(value: float, unit: str = '') -> str:
  if value is None:
    return '-'
  for scale, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'.rstrip()


def _gib(value) -> str:
  return '-' if value is None else f'{value / 2**30:.2f} GiB'


def _head(r: dict) -> list[tuple[str, str]]:
  return [('model', f"{r['model']}-{r['depth']} width {r['width']} s2d {r['space_to_depth']} "
                    f"{r['dtype']}"),
          ('shapes', f"batch {r['global_batch_size']} x {r['crop_size']}^3 "
                     f"(stored {r['stored_crop_size']}^3)"),
          ('devices', f"{r['devices']} x {r['device_kind']} ({r['platform']}), mesh {r['mesh']}")]


def table_rows(what: str, r: dict) -> list[tuple[str, str]]:
  """(label, value) lines of the printed table for one result."""
  if what in ('step', 'compare', 'e2e', 'comms', 'checkpoint', 'profile'):
    rows = _head(r)
  else:
    rows = []
  if what == 'step':
    mem = r['memory']
    rows += [('train step', f"{r['samples_per_s']:,.1f} samples/s ({r['step_ms']:.2f} ms/step)"),
             ('model FLOPs', f"{r['forward_gflops_per_sample']:.4g} GFLOP fwd/sample, x3/step"),
             ('achieved', f"{r['model_tflops_per_s']:.4g} TFLOP/s"),
             ('matmul peak', f"{r['matmul_peak']['tflops']:.4g} TFLOP/s "
                             f"({r['matmul_peak']['dtype']}, {r['matmul_peak']['size']}^2)"),
             ('MFU', f"{100 * r['mfu']:.2f} %"), ('compile', f"{r['compile_s']:.1f} s"),
             ('memory/device', f"peak {_gib(mem.get('peak_bytes_in_use'))}, temp "
                               f"{_gib(mem.get('temp_bytes'))}, args {_gib(mem.get('argument_bytes'))}")]
  elif what == 'compare':
    rows += table_rows('step', r['jax'])[3:5]
    if r.get('torch'):
      t = r['torch']
      rows += [('pytorch eager', f"{t['samples_per_s']:,.1f} samples/s ({t['step_ms']:.2f} ms, "
                                 f"{t['precision']}, torch {t['torch']})"),
               ('jax / pytorch', f"{r['jax_over_torch']:.3f}")]
    else:
      rows += [('pytorch', r.get('note', 'not run'))]
  elif what == 'e2e':
    rows += [('crops file', r['crops_file']),
             ('step alone', f"{r['step_samples_per_s']:,.1f} samples/s"),
             ('end to end', f"{r['e2e_samples_per_s']:,.1f} samples/s "
                            f"({100 * r['fraction_of_step']:.1f} % of the step, "
                            f"{r['data_workers']} Grain workers)"),
             ('input wait', f"{100 * r['input_wait_fraction']:.1f} % of the time")]
  elif what == 'comms':
    for kind, c in r['collectives'].items():
      rows.append((kind, f"{c['count']} ops, {_si(c['bytes'], 'B')}"))
    rows += [('param gradients', _si(r['param_gradient_bytes'], 'B')),
             ('DP minimum', f"all-reduce of {_si(r['dp_allreduce_result_bytes'], 'B')}; ring "
                            f"{_si(r['dp_ring_bytes_per_device'], 'B')}/device over "
                            f"{r['batch_shards']} shards")]
  elif what == 'checkpoint':
    rows += [('train state', _si(r['state_bytes'], 'B')),
             ('save', f"{r['save_s']:.2f} s to disk ({r['save_gb_per_s']:.2f} GB/s); "
                      f"save() returns in {r['save_returns_s']:.2f} s"
                      f"{' (async)' if r['async_save'] else ''}"),
             ('restore', f"{r['restore_s']:.2f} s ({r['restore_gb_per_s']:.2f} GB/s)")]
  elif what == 'profile':
    rows += [('trace', r['profile_dir']), ('steps', str(r['profiled_steps'])),
             ('view', r['view'])]
  elif what == 'input':
    for row in r['rows']:
      rows.append((f"{row['mode']} w={row['workers']} {row['crop_size']}^3",
                   f"{row['crops_per_s']:,.0f} crops/s"))
  elif what == 'preprocess':
    rows += [('per scan/worker', f"{r['seconds_per_scan_per_worker']:.2f} s "
                                 f"({r['candidates']} candidates)")]
    rows += [(k, f'{v:.2f} s') for k, v in r.items()  # the breakdown preprocess reports
             if k.endswith('_s') and isinstance(v, (int, float)) and k != 'generate_s']
  return rows


def format_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
  width = max((len(k) for k, _ in rows), default=0)
  return '\n'.join([title, '-' * len(title)] + [f'{k:<{width}}  {v}' for k, v in rows])


def summarize(root: str) -> tuple[str, list[str]]:
  """One table from every benchmark_*.json under `root`, and README-ready lines."""
  results = []
  for path in sorted(glob.glob(os.path.join(root, '**', 'benchmark_*.json'), recursive=True)):
    with open(path) as f:
      results.append((os.path.relpath(path, root), json.load(f)))
  header = ('run', 'crop', 'batch', 's2d', 'dtype', 'JAX samples/s', 'TFLOP/s', 'MFU',
            'PyTorch samples/s', 'JAX/PT', 'e2e samples/s', 'e2e/step')
  lines, readme = [header], []
  for name, r in results:
    what = r.get('what')
    step = r.get('jax') or r.get('step') or (r if what == 'step' else None)
    if step is None:
      continue
    torch_rate = r.get('torch_samples_per_s')
    lines.append((os.path.dirname(name) or name, f"{r['crop_size']}^3",
                  str(r['global_batch_size']), r['space_to_depth'], r['dtype'],
                  f"{step['samples_per_s']:,.0f}", f"{step['model_tflops_per_s']:.1f}",
                  f"{100 * step['mfu']:.1f}%", f'{torch_rate:,.0f}' if torch_rate else '-',
                  f"{r['jax_over_torch']:.2f}" if torch_rate else '-',
                  f"{r['e2e_samples_per_s']:,.0f}" if what == 'e2e' else '-',
                  f"{100 * r['fraction_of_step']:.0f}%" if what == 'e2e' else '-'))
    if torch_rate:
      readme.append(
          f"| {r['model']}-{r['depth']} w{r['width']} | {r['crop_size']}^3 | "
          f"{r['global_batch_size']} | {r['device_kind']} | {step['samples_per_s']:,.0f} "
          f"samples/s ({step['model_tflops_per_s']:.0f} TFLOP/s, MFU "
          f"{100 * step['mfu']:.1f}%) | {torch_rate:,.0f} samples/s | "
          f"{r['jax_over_torch']:.2f} |")
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
  text = '\n'.join('  '.join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)
  return text, readme


# ---- entry point --------------------------------------------------------------------------------

def run(what: str, config, workdir: str, *, steps: int = 10, warmup: int = 3, repeats: int = 3,
        seconds: float = 5.0, workers: Sequence[int] = (), peak_size: int = 0) -> dict:
  """Runs one benchmark, writes workdir/benchmark_<what>.json, prints its table; returns it."""
  os.makedirs(workdir, exist_ok=True)
  if what == 'step':
    result = benchmark_step(config, steps, warmup, repeats, peak_size)
  elif what == 'input':
    result = benchmark_input(config, seconds, workers)
  elif what == 'e2e':
    result = benchmark_e2e(config, workdir, steps, warmup, repeats)
  elif what == 'compare':
    result = benchmark_compare(config, steps, warmup, repeats, peak_size)
  elif what == 'comms':
    result = benchmark_comms(config)
  elif what == 'checkpoint':
    result = benchmark_checkpoint(config, workdir, max(repeats, 1))
  elif what == 'preprocess':
    result = benchmark_preprocess(config)
  elif what == 'profile':
    result = benchmark_profile(config, workdir, max(steps // 2, 1), warmup)
  else:
    raise ValueError(f'unknown --what={what}; one of {", ".join(WHATS)}')
  result['what'] = what
  path = os.path.join(workdir, f'benchmark_{what}.json')
  import jax
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(result, f, indent=1, default=str)
    print(format_table(f'jaxmed benchmark --what={what}', table_rows(what, result)))
    print(f'wrote {path}')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('workdirs', config.name)
  if _WHAT.value == 'summary':
    text, readme = summarize(workdir)
    print(text)
    for line in readme:
      print('README:', line)
    return
  if _WHAT.value == 'compare':
    # JAX and PyTorch share the accelerator: keep JAX from taking 75% of its memory up front.
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
  from jaxmed.errors import exit_with_one_line
  from jaxmed.parallel import distributed
  with exit_with_one_line():
    distributed.initialize(config)
    workers = tuple(int(w) for w in _WORKERS.value.split(',') if w.strip())
    run(_WHAT.value, config, workdir, steps=_STEPS.value, warmup=_WARMUP.value,
        repeats=_REPEATS.value, seconds=_SECONDS.value, workers=workers,
        peak_size=_PEAK_SIZE.value)


if __name__ == '__main__':
  app.run(main)
