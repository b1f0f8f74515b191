"""--what=loop: steps/s of train.py's own loop against a bare loop over the same compiled step.

The loop is train.TrainLoop, set up by train.training_loop exactly as a training run is (crops
file, input pipeline, checkpointer, metric writer), with logging as configured and no evaluation
or checkpoint inside the timed steps. It runs twice per repeat: fed by the input pipeline, and
fed with batches already on the device (what the loop itself costs, input aside). The bare loop
calls the same compiled step back to back on those device batches. On a CPU the host and the
"device" share the cores, so the input pipeline's host work shows in the first ratio; on an
accelerator it overlaps the step.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from typing import Any

from jaxmed.benchmarks.e2e import benchmark_crops_file
from jaxmed.benchmarks.step import describe_run

_DEVICE_BATCHES = 4  # Distinct batches the device-fed loops cycle through.


def benchmark_loop(config, workdir: str, steps: int = 200, warmup: int = 3,
                   repeats: int = 3) -> dict[str, Any]:
  """Median steps/s over `repeats` rounds of `steps` steps of each loop, interleaved (a busy
  machine slows all three alike), and the loops' ratios to the bare loop."""
  import jax

  from jaxmed import train
  config = config.copy_and_resolve_references()
  config.data.crops_file = benchmark_crops_file(config, workdir)
  config.train.steps = 1 << 30  # No last step (with its evaluation and checkpoint) in sight.
  config.train.eval_every_steps = 0
  config.checkpoint.every_steps = 0
  run_dir = os.path.join(workdir, 'loop_run')
  shutil.rmtree(run_dir, ignore_errors=True)  # A fresh run, not a resume.
  rates = {'loop': [], 'loop_on_device': [], 'bare': []}

  def timed(name, run_steps):
    t0 = time.perf_counter()
    run_steps()
    jax.block_until_ready((loop.leaves, loop.stats))
    rates[name].append(steps / (time.perf_counter() - t0))

  def bare():
    leaves, stats = loop.leaves, loop.stats
    for i in range(steps):
      leaves, stats = loop.step_fn(leaves, stats, on_device[i % _DEVICE_BATCHES])
    # The state was donated to these steps: hand the result back to the loop.
    loop.leaves, loop.stats, loop.step = leaves, stats, loop.step + steps

  with train.training_loop(config, run_dir) as loop:
    loop.run(max(warmup, 1))  # Compiles.
    on_device = [next(loop.batches) for _ in range(_DEVICE_BATCHES)]
    jax.block_until_ready((loop.leaves, loop.stats, on_device))
    pipeline = loop.batches
    for _ in range(repeats):
      timed('loop', lambda: loop.run(loop.step + steps))
      loop.batches = itertools.cycle(on_device)
      timed('loop_on_device', lambda: loop.run(loop.step + steps))
      loop.batches = pipeline
      timed('bare', bare)
  median = {name: statistics.median(r) for name, r in rates.items()}
  return {**describe_run(config), 'crops_file': config.data.crops_file,
          'data_workers': config.data.workers, 'log_every_steps': config.train.log_every_steps,
          'max_steps_in_flight': config.train.max_steps_in_flight, 'steps_per_repeat': steps,
          **{f'{name}_steps_per_s': rate for name, rate in median.items()},
          'loop_over_bare': median['loop'] / median['bare'],
          'loop_on_device_over_bare': median['loop_on_device'] / median['bare'],
          **{f'{name}_steps_per_s_all': r for name, r in rates.items()}}
