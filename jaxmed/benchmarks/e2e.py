"""--what=e2e: training fed from an HDF5 crops file through the input pipeline, against the step
on synthetic input; and a writer of synthetic crops files for it (and for the input benchmark)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxmed.benchmarks.step import StepBench
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


def benchmark_e2e(config, workdir: str, steps: int = 10, warmup: int = 3,
                  repeats: int = 3) -> dict[str, Any]:
  """Training fed from the crops file, step by step as train.py's loop does, vs the step alone.

  The loop waits on each step's metrics and then takes the next batch, exactly as train.py;
  input_wait_fraction is the share of the time spent in next(iterator). config.data.cache picks
  the input: the HDF5 file through Grain ('none'), host RAM ('host') or device memory ('device').
  """
  import jax

  from jaxmed.data import loader
  config = config.copy_and_resolve_references()
  config.data.crops_file = benchmark_crops_file(config, workdir)
  bench = StepBench(config)
  step_result = benchmark_step(config, steps, warmup, repeats, bench=bench)
  iterator = loader.make_train_iterator(config, bench.batch_sharding, 0)
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
          'cache': config.data.cache, 'data_workers': config.data.workers,
          'e2e_samples_per_s': samples,
          'step_samples_per_s': step_result['samples_per_s'],
          'fraction_of_step': samples / step_result['samples_per_s'],
          'input_wait_fraction': waited / (seconds * total), 'e2e_steps': total,
          'step': step_result}
