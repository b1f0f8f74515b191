"""The production train step on synthetic crops (StepBench), the run description every result
carries (describe_run), and the two benchmarks built on the step alone: --what=step and profile."""

from __future__ import annotations

import functools
import glob
import os
import platform
import statistics
import time
from typing import Any

from jaxmed.benchmarks.flops import matmul_peak
from jaxmed.benchmarks.flops import model_flops


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
      self.graphdef, state, self.state_shardings = train.init_sharded_state(
          config, self.mesh, self.rules)
      self.leaves, self._treedef = jax.tree.leaves(state), jax.tree.structure(state)
      self.step_fn = train.make_train_step(self.graphdef, self.state_shardings, config)
      self.stats = train.new_loop_stats(self.mesh, 0)
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
      self.lowered = self.step_fn.lower(self.leaves, self.stats, self.batch)
      self.compiled = self.lowered.compile()
    self.compile_s = time.perf_counter() - t0

  def run(self, batch=None) -> dict:
    """One step on `batch` (default the synthetic one); returns the loop stats (not waited on)."""
    self.leaves, self.stats = self.compiled(self.leaves, self.stats,
                                            self.batch if batch is None else batch)
    return self.stats

  @property
  def state(self):
    """The train state (nnx.State) as of the last step."""
    import jax
    return jax.tree.unflatten(self._treedef, self.leaves)

  def time_steps(self, steps: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per step of `repeats` runs of `steps` steps each, after `warmup` steps."""
    import jax
    for _ in range(warmup):
      metrics = self.run()
    if warmup:
      jax.block_until_ready((self.leaves, metrics))
    per_step = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        metrics = self.run()
      jax.block_until_ready((self.leaves, metrics))
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
      'config': config.name, 'task': config.get('task', 'classify'), 'model': model.name,
      'depth': model.get('depth'),
      'width': model.width, 'space_to_depth': model.get('space_to_depth', 'none'),
      'dtype': model.dtype, 'crop_size': config.data.crop_size,
      'stored_crop_size': config.data.stored_crop_size,
      **({'patch_size': tuple(config.detect.patch_size)} if config.get('task') == 'detect'
         else {}),
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
  """Samples/s, TFLOP/s, MFU, compile time and memory of the real train step (--what=step)."""
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
    jax.block_until_ready((bench.leaves, metrics))
  seconds = (time.perf_counter() - t0) / steps
  traces = sorted(glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True))
  return {**describe_run(config), 'profile_dir': log_dir, 'traces': traces,
          'profiled_steps': steps, 'step_ms_while_tracing': 1e3 * seconds,
          'view': f'tensorboard --logdir {log_dir}  (or xprof / Perfetto)'}
