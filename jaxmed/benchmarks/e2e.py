"""--what=e2e: training by train.TrainLoop fed from an HDF5 crops file through the input pipeline,
against the step on synthetic input; and a writer of synthetic crops files for it (and for the
input and loop benchmarks)."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxmed.benchmarks.step import benchmark_step
from jaxmed.benchmarks.step import describe_run


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


def benchmark_crops_file(config, workdir: str) -> str:
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


class _TimedBatches:
  """The loop's input iterator, counting the seconds spent in next(): the time the loop waited
  for its input (taking a batch and starting its transfer to the device)."""

  def __init__(self, batches):
    self.batches = batches
    self.seconds = 0.0

  def __iter__(self):
    return self

  def __next__(self):
    t0 = time.perf_counter()
    try:
      return next(self.batches)
    finally:
      self.seconds += time.perf_counter() - t0


def benchmark_e2e(config, workdir: str, steps: int = 10, warmup: int = 3,
                  repeats: int = 3) -> dict[str, Any]:
  """Training fed from the crops file by train.TrainLoop, the loop a training run uses, against
  the step alone on synthetic on-device input.

  The loop is set up by train.training_loop as a run is (input pipeline, checkpointer, metric
  writer, log steps as configured), with no evaluation or checkpoint in sight. e2e_samples_per_s
  is the median over `repeats` rounds of `steps` steps, each round waited on to the end;
  input_wait_fraction is the share of the timed rounds the loop spent in next() on its input.
  config.data.cache picks the input: the HDF5 file through Grain ('none'), host RAM ('host') or
  device memory ('device').
  """
  import jax

  from jaxmed import train
  config = config.copy_and_resolve_references()
  config.data.crops_file = benchmark_crops_file(config, workdir)
  step_result = benchmark_step(config, steps, warmup, repeats)
  config.train.steps = 1 << 30  # No last step (with its evaluation and checkpoint) in sight.
  config.train.eval_every_steps = 0
  config.checkpoint.every_steps = 0
  run_dir = os.path.join(workdir, 'e2e_run')
  shutil.rmtree(run_dir, ignore_errors=True)  # A fresh run, not a resume.
  rates, waited, timed = [], 0.0, 0.0
  with train.training_loop(config, run_dir) as loop:
    loop.run(max(warmup, 1))  # Compiles.
    jax.block_until_ready((loop.leaves, loop.stats))
    loop.batches = batches = _TimedBatches(loop.batches)
    for _ in range(repeats):
      batches.seconds = 0.0
      t0 = time.perf_counter()
      loop.run(loop.step + steps)
      jax.block_until_ready((loop.leaves, loop.stats))
      seconds = time.perf_counter() - t0
      rates.append(steps * config.train.global_batch_size / seconds)
      waited, timed = waited + batches.seconds, timed + seconds
  samples = statistics.median(rates)
  return {**describe_run(config), 'crops_file': config.data.crops_file,
          'cache': config.data.cache, 'data_workers': config.data.workers,
          'log_every_steps': config.train.log_every_steps,
          'e2e_samples_per_s': samples,
          'step_samples_per_s': step_result['samples_per_s'],
          'fraction_of_step': samples / step_result['samples_per_s'],
          'input_wait_fraction': waited / timed, 'e2e_steps': steps * repeats,
          'e2e_samples_per_s_all': rates, 'step': step_result}
