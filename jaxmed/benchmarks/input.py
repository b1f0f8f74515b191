"""--what=input: crops/s of the training input (jaxmed/data/loader.py: Grain workers, or a crops
cache) alone and with on-device augmentation, against plain h5py reads of single crops;
--what=patches: the same for detection patches from the volumes file (data/patch_loader.py)."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxmed.benchmarks.e2e import write_synthetic_crops_file
from jaxmed.data import augment as augment_lib
from jaxmed.data.loader import make_train_iterator
from jaxmed.data.source import CropsSource


def _rate(run_batch, seconds: float, crops_per_batch: int) -> tuple[float, int]:
  start, batches = time.perf_counter(), 0
  while batches < 2 or time.perf_counter() - start < seconds:
    run_batch()
    batches += 1
  return batches * crops_per_batch / (time.perf_counter() - start), batches


def benchmark_input(config, crop_sizes: Sequence[int] = (32, 64),
                    workers: Sequence[int] = (0, 1, 2), seconds: float = 5.0,
                    file_mb: int = 256, caches: Sequence[str] = ('none',)) -> list[dict]:
  """Crops/s of the training input alone and with on-device augmentation.

  For each crop size c a temporary crops file is written with stored edge
  ceil(c * stored_crop_size / crop_size) (the config's margin ratio) and at most `file_mb` MB
  (page cache warm, like a file read repeatedly). Rows: one 'h5py' row per size (plain random
  reads of single crops in this process, the reader's ceiling) and, per worker count, 'loader'
  (global int16 batches on the devices) and 'loader+augment' (plus jitted augment_crops, waited on),
  for each of `caches` (config.data.cache; 'device' once, with 0 workers: it has none).
  Batches are config.train.global_batch_size crops over a 1-D mesh of the local devices.
  """
  results = []
  devices = jax.local_devices()
  global_batch_size = config.train.global_batch_size
  if global_batch_size % len(devices):
    devices = devices[:1]
  batch_sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), ('data',)),
                                 PartitionSpec('data'))
  with tempfile.TemporaryDirectory(prefix='jaxmed_input_benchmark_') as tmp:
    for crop_size in crop_sizes:
      stored = -(-crop_size * config.data.stored_crop_size // config.data.crop_size)
      num_crops = int(max(global_batch_size, min(4096, file_mb * 2**20 // (2 * stored**3))))
      path = os.path.join(tmp, f'crops_{stored}.h5')
      write_synthetic_crops_file(path, num_crops, stored, subsets=(0,))
      common = dict(crop_size=crop_size, stored_size=stored, file_crops=num_crops)

      source = CropsSource(path)
      rows = iter(np.random.default_rng(0).integers(0, num_crops, 10**7))
      rate, batches = _rate(lambda: source[next(rows)], seconds, 1)
      source.close()
      results.append(dict(common, workers=0, mode='h5py', crops_per_s=rate, batches=batches))

      bench_config = config.copy_and_resolve_references()
      bench_config.data.crops_file = path
      bench_config.data.train_subsets = (0,)
      augment = jax.jit(functools.partial(
          augment_lib.augment_crops, seed=config.seed, aug_config=config.data.augment,
          crop_size=crop_size, hu_window=tuple(config.data.hu_window)))
      runs = [(cache, num_workers) for cache in caches if cache != 'device'
              for num_workers in workers] + [('device', 0)] * ('device' in caches)
      for cache, num_workers in runs:
        bench_config.data.cache = cache
        bench_config.data.workers = num_workers
        with make_train_iterator(bench_config, batch_sharding) as batches_it:
          step = [0]

          def load():
            step[0] += 1
            return jax.block_until_ready(next(batches_it))

          def load_and_augment():
            batch = load()
            jax.block_until_ready(augment(batch['crops'], batch['index'], step=step[0]))

          load_and_augment()  # Start the workers and compile outside the timing.
          for mode, run_batch in (('loader', load), ('loader+augment', load_and_augment)):
            rate, batches = _rate(run_batch, seconds, global_batch_size)
            results.append(dict(common, workers=num_workers, mode=mode, cache=cache,
                                crops_per_s=rate, batches=batches))
  return results


def _benchmark_volumes_file(config, tmp: str) -> str:
  """config.data.volumes_file if it exists; else a volumes file of config.data.synthetic.num_scans
  synthetic scans (config.data.synthetic.shape_xyz) written under `tmp`."""
  if os.path.exists(config.data.volumes_file):
    return config.data.volumes_file
  from jaxmed.data import preprocess_volumes
  from jaxmed.scans import synthetic
  bench = config.copy_and_resolve_references()
  bench.data.raw_dir = os.path.join(tmp, 'raw')
  bench.data.volumes_file = os.path.join(tmp, 'volumes.h5')
  bench.data.synthetic.num_subsets = 1
  synthetic.synthesize(bench)
  preprocess_volumes.preprocess_volumes(bench)
  return bench.data.volumes_file


def benchmark_patches(config, workers: Sequence[int] = (0, 1, 2),
                      seconds: float = 5.0) -> list[dict]:
  """Patches/s of the detection input (data/patch_loader.py) alone and with augment_patches,
  on the config's mesh.

  Reads config.data.volumes_file if it exists, else a volumes file of synthetic scans written to
  a temporary folder. Rows: 'h5py' (VolumesSource.read_patch at random corners of random scans in
  this process: the reader's ceiling) and, per worker count, 'loader' (global int16 patch
  batches of config.detect.patch_size) and 'loader+augment'
  (plus jitted augment_patches, waited on). Batches of config.train.global_batch_size.
  """
  from jaxmed.data.patch_loader import make_patch_train_iterator
  from jaxmed.data.volumes_file import VolumesSource
  from jaxmed.parallel import mesh as mesh_lib
  from jaxmed.parallel import sharding as sharding_lib
  results = []
  global_batch_size = config.train.global_batch_size
  mesh = mesh_lib.create_mesh(config.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh, config.mesh.logical_rules, 1)
  patch_size = tuple(int(s) for s in config.detect.patch_size)
  with tempfile.TemporaryDirectory(prefix='jaxmed_patches_benchmark_') as tmp:
    path = _benchmark_volumes_file(config, tmp)
    source = VolumesSource(path)
    common = dict(patch_size='x'.join(map(str, patch_size)), scans=len(source),
                  file_mb=os.path.getsize(path) / 2**20)
    rng = np.random.default_rng(0)

    def read_one():
      i = int(rng.integers(len(source)))
      corner = rng.integers(0, np.maximum(source.shapes[i] - patch_size, 0) + 1)
      source.read_patch(i, corner, patch_size)

    rate, batches = _rate(read_one, seconds, 1)
    source.close()
    results.append(dict(common, workers=0, mode='h5py', patches_per_s=rate, batches=batches))
    bench_config = config.copy_and_resolve_references()
    bench_config.data.volumes_file = path
    bench_config.data.train_subsets = tuple(sorted({int(s) for s in source.subsets}))
    augment = jax.jit(functools.partial(
        augment_lib.augment_patches, seed=config.seed, aug_config=config.data.augment,
        hu_window=tuple(config.data.hu_window)))
    for num_workers in workers:
      bench_config.data.workers = num_workers
      with make_patch_train_iterator(bench_config, batch_sharding) as batches_it:
        step = [0]

        def load():
          step[0] += 1
          return jax.block_until_ready(next(batches_it))

        def load_and_augment():
          batch = load()
          jax.block_until_ready(augment(batch['patches'], batch['centers'], batch['valid'],
                                        batch['index'], step=step[0]))

        load_and_augment()  # Start the workers and compile outside the timing.
        for mode, run_batch in (('loader', load), ('loader+augment', load_and_augment)):
          rate, batches = _rate(run_batch, seconds, global_batch_size)
          results.append(dict(common, workers=num_workers, mode=mode, patches_per_s=rate,
                              batches=batches))
  return results
