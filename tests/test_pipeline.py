"""The input pipeline (crops source, training order, Grain loader) over a small schema-v2 crops
file whose truth is known.

Crop i is filled with the value i, so every test can tell which file row landed where.
"""

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap

import h5py
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import default
from jaxmed.benchmarks import input as input_benchmark
from jaxmed.data import crops_file
from jaxmed.data import loader
from jaxmed.data import sampling
from jaxmed.data import source as source_lib

NUM_CROPS = 120
STORED = 8
BATCH = 16
POSITIVE_FRACTION = 0.25
TRAIN_SUBSETS = (0, 1, 2, 3, 4, 5, 6, 7)
EVAL_SUBSETS = (8, 9)
ROWS = np.arange(NUM_CROPS)
LABEL = (ROWS % 8 == 0).astype(np.uint8)
SUBSET = (ROWS % 10).astype(np.int8)
EXCLUDE = (LABEL == 0) & (ROWS % 3 == 1)


def write_crops_file(path, **layout):
  """The current schema; crops chunked one per crop unless `layout` (h5py create_dataset kwargs)
  says."""
  layout = layout or dict(chunks=(1, STORED, STORED, STORED))
  with h5py.File(path, 'w') as f:
    f.create_dataset('crops', data=np.broadcast_to(
        ROWS[:, None, None, None], (NUM_CROPS, STORED, STORED, STORED)).astype(np.int16), **layout)
    f['label'] = LABEL
    f['seriesuid'] = np.array([b'1.2.3.%d' % (i // 10) for i in ROWS])
    f['subset'] = SUBSET
    f['center_world'] = np.zeros((NUM_CROPS, 3))
    f['diameter_mm'] = np.where(LABEL == 1, 6.0, 0.0).astype(np.float32)
    f['exclude'] = EXCLUDE
    f.attrs.update(schema_version=crops_file.SCHEMA_VERSION, spacing_mm=1.0,
                   crop_shape=(STORED,) * 3, sources='{}', config='{}')


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('crops') / 'crops.h5')
  write_crops_file(path)
  config = default.get_config()
  config.seed = 7
  config.data.crops_file = path
  config.data.stored_crop_size = STORED
  config.data.crop_size = 6
  config.data.train_subsets = TRAIN_SUBSETS
  config.data.positive_fraction = POSITIVE_FRACTION
  config.data.workers = 0
  config.train.global_batch_size = BATCH
  config.train.eval_batch_size = BATCH
  return config


@pytest.fixture(scope='module')
def batch_sharding():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4, 1, 1), ('data', 'fsdp', 'model', 'spatial'))
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def train_rows(config):
  path = config.data.crops_file
  return source_lib.split_by_label(
      path, source_lib.split_rows(path, TRAIN_SUBSETS, skip_excluded=True))


def take(iterator, n):
  with iterator:
    return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def test_source_item_is_the_requested_row_and_survives_pickling(config):
  source = source_lib.CropsSource(config.data.crops_file)
  item = source[17]
  assert item['crops'].dtype == np.int16 and item['crops'].shape == (STORED,) * 3
  assert np.all(item['crops'] == 17) and item['label'] == LABEL[17] and item['index'] == 17
  clone = pickle.loads(pickle.dumps(source))  # After the file was opened here.
  assert np.all(clone.read([3, 4, 5, 40])['crops'][:, 0, 0, 0] == [3, 4, 5, 40])


def test_source_reads_the_same_crops_from_any_hdf5_layout(config, tmp_path):
  rows = np.array([5, 6, 7, 90, 3, 4, 119])  # Consecutive runs and single rows.
  expected = source_lib.CropsSource(config.data.crops_file).read(rows)['crops']
  for name, layout in (('gzip', dict(chunks=(2, 4, 8, 8), compression='gzip')),
                       ('contiguous', dict(chunks=None))):
    write_crops_file(tmp_path / f'{name}.h5', **layout)
    np.testing.assert_array_equal(
        source_lib.CropsSource(tmp_path / f'{name}.h5').read(rows)['crops'], expected)
  np.testing.assert_array_equal(expected[:, 1, 2, 3], rows)


def test_source_rejects_a_file_that_is_not_of_the_current_schema(tmp_path):
  path = tmp_path / 'old.h5'
  with h5py.File(path, 'w') as f:
    f['input'] = np.zeros((2, 4, 4, 4), np.float32)
  with pytest.raises(crops_file.CropsFileError, match='schema_version'):
    source_lib.CropsSource(path)


def test_split_rows_follow_subsets_and_training_drops_excluded(config):
  path = config.data.crops_file
  training = source_lib.split_rows(path, TRAIN_SUBSETS, skip_excluded=True)
  evaluation = source_lib.split_rows(path, EVAL_SUBSETS, skip_excluded=False)
  np.testing.assert_array_equal(training, ROWS[(SUBSET < 8) & ~EXCLUDE])
  np.testing.assert_array_equal(evaluation, ROWS[SUBSET >= 8])
  assert EXCLUDE[evaluation].any()  # Evaluation keeps every candidate.


def test_train_batch_rows_depend_only_on_seed_and_step(config):
  positive, negative = train_rows(config)
  batch = lambda seed, step: sampling.train_batch_rows(seed, step, BATCH, positive, negative,
                                                       POSITIVE_FRACTION)
  np.testing.assert_array_equal(batch(7, 5), batch(7, 5))
  assert not np.array_equal(batch(7, 5), batch(7, 6))
  assert not np.array_equal(batch(7, 5), batch(8, 5))


def test_positive_stream_visits_each_positive_once_per_epoch(config):
  positive, negative = train_rows(config)
  per_batch = sampling.positives_per_batch(BATCH, POSITIVE_FRACTION)
  steps_per_epoch = len(positive) // per_batch
  assert steps_per_epoch * per_batch == len(positive)  # The fixture is built so.
  for epoch in range(3):
    seen = np.concatenate([
        sampling.train_batch_rows(7, step, BATCH, positive, negative, POSITIVE_FRACTION)
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)])
    np.testing.assert_array_equal(np.sort(seen[LABEL[seen] == 1]), positive)


def test_process_batch_rows_follow_the_sharding(batch_sharding):
  np.testing.assert_array_equal(loader.process_batch_rows(batch_sharding, BATCH),
                                np.arange(BATCH))  # One process holds all 8 devices.
  with pytest.raises(ValueError, match='not divisible by the 8 shards'):
    loader.process_batch_rows(batch_sharding, 12)


def test_per_process_loaders_assemble_the_same_global_batch(config):
  positive, negative = train_rows(config)
  source = source_lib.CropsSource(config.data.crops_file)
  whole = loader._TrainBatchLoader(source, 7, BATCH, np.arange(BATCH), positive, negative,
                                   POSITIVE_FRACTION)(4)
  np.testing.assert_array_equal(whole['row'], sampling.train_batch_rows(
      7, 4, BATCH, positive, negative, POSITIVE_FRACTION))
  for process_count in (1, 2, 4):  # Each process's loader reads its own positions alone.
    parts = [loader._TrainBatchLoader(
        source, 7, BATCH, positions.astype(np.int64), positive, negative, POSITIVE_FRACTION)(4)
             for positions in np.array_split(np.arange(BATCH), process_count)]
    for name in whole:
      np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), whole[name])


@pytest.mark.slow  # Starts worker processes.
def test_same_batches_with_0_1_and_2_workers(config, batch_sharding):
  runs = []
  for workers in (0, 1, 2):
    config.data.workers = workers
    try:
      runs.append(take(loader.make_train_iterator(config, batch_sharding, 0), 3))
    finally:
      config.data.workers = 0
  positive, negative = train_rows(config)
  for step, batch in enumerate(runs[0]):
    np.testing.assert_array_equal(batch['row'], sampling.train_batch_rows(
        config.seed, step, BATCH, positive, negative, POSITIVE_FRACTION))
    np.testing.assert_array_equal(batch['crops'][:, 0, 0, 0], batch['row'])  # Known truth.
    np.testing.assert_array_equal(batch['label'], LABEL[batch['row']])
    np.testing.assert_array_equal(batch['index'], step * BATCH + np.arange(BATCH))
  for other in runs[1:]:
    for batch, same in zip(runs[0], other):
      for name in batch:
        np.testing.assert_array_equal(batch[name], same[name])


def test_training_batches_have_the_configured_positive_count_and_no_excluded(
    config, batch_sharding):
  batches = take(loader.make_train_iterator(config, batch_sharding, 0), 12)
  for batch in batches:
    assert batch['crops'].dtype == np.int16 and batch['crops'].shape == (BATCH,) + (STORED,) * 3
    assert batch['label'].sum() == round(BATCH * POSITIVE_FRACTION)
    assert not EXCLUDE[batch['row']].any()
    assert set(SUBSET[batch['row']]) <= set(TRAIN_SUBSETS)


def test_resuming_at_step_k_gives_the_same_batches(config, batch_sharding):
  from_zero = take(loader.make_train_iterator(config, batch_sharding, 0), 5)[3:]
  resumed = take(loader.make_train_iterator(config, batch_sharding, 3), 2)
  for batch, same in zip(from_zero, resumed):
    for name in batch:
      np.testing.assert_array_equal(batch[name], same[name])


def test_eval_visits_every_example_once_in_file_order(config, batch_sharding):
  iterator = loader.make_eval_iterator(config, EVAL_SUBSETS, batch_sharding)
  expected = ROWS[SUBSET >= 8]
  assert len(iterator) == loader.eval_num_batches(config, EVAL_SUBSETS) == -(
      -len(expected) // BATCH)
  batches = [jax.tree.map(np.asarray, batch) for batch in iterator]
  assert len(batches) == len(iterator)
  rows = np.concatenate([b['row'][b['mask']] for b in batches])
  np.testing.assert_array_equal(rows, expected)
  for b in batches:
    np.testing.assert_array_equal(b['crops'][b['mask'], 0, 0, 0], b['row'][b['mask']])
    np.testing.assert_array_equal(b['label'][b['mask']], LABEL[b['row'][b['mask']]])
  padding = ~batches[-1]['mask']
  assert padding.sum() == len(batches) * BATCH - len(expected) > 0
  assert np.all(batches[-1]['row'][padding] == -1) and not batches[-1]['mask'][-1]


@pytest.mark.slow  # Starts a Python process and its workers.
def test_workers_exit_without_leaks(config, tmp_path):
  script = tmp_path / 'run_workers.py'
  script.write_text(textwrap.dedent(f"""
      import os
      os.environ['JAX_PLATFORMS'] = 'cpu'
      import jax
      import numpy as np
      from configs import default
      from jaxmed.data import loader

      def workers():  # Live child processes, but multiprocessing's resource tracker.
        pids = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
          try:
            with open(f'/proc/{{pid}}/stat') as f:
              state, parent = f.read().rsplit(')', 1)[1].split()[:2]
            with open(f'/proc/{{pid}}/cmdline') as f:
              tracker = 'resource_tracker' in f.read()
          except OSError:
            continue
          if int(parent) == os.getpid() and state != 'Z' and not tracker:
            pids.append(pid)
        return pids

      if __name__ == '__main__':
        config = default.get_config()
        config.data.crops_file = {config.data.crops_file!r}
        config.data.train_subsets = {TRAIN_SUBSETS!r}
        config.data.positive_fraction = {POSITIVE_FRACTION!r}
        config.data.workers = 2
        config.train.global_batch_size = {BATCH}
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        with loader.make_train_iterator(config, sharding, 0) as batches:
          for _ in range(4):
            next(batches)['crops'].block_until_ready()
          assert len(workers()) == 2, workers()
        print('workers after close:', workers())
    """))
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300, env=env, cwd=os.getcwd())
  assert done.returncode == 0, done.stderr
  assert 'workers after close: []' in done.stdout, done.stdout + done.stderr
  assert 'leaked' not in done.stderr, done.stderr


def test_benchmark_input_reports_rates(config):
  results = input_benchmark.benchmark_input(config, crop_sizes=(6,), workers=(0,),
                                            seconds=0.05, file_mb=1,
                                            caches=('none', 'host', 'device'))
  assert {r['mode'] for r in results} == {'h5py', 'loader', 'loader+augment'}
  assert {r['cache'] for r in results if r['mode'] == 'loader'} == {'none', 'host', 'device'}
  assert all(r['crops_per_s'] > 0 and r['stored_size'] == STORED for r in results)


PROCESS_SCRIPT = """
import itertools, json, os, sys
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
jax.config.update('jax_num_cpu_devices', 4)
process_id, port, crops_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id,
                           initialization_timeout=120)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from configs import default
from jaxmed.data import loader

config = default.get_config()
config.seed = 7
config.data.crops_file = crops_path
config.data.train_subsets = (0, 1, 2, 3, 4, 5, 6, 7)
config.data.positive_fraction = 0.25
config.train.global_batch_size = 16
devices = np.array(jax.devices()).reshape(2, 4)  # Row p: the devices of process p.
meshes = {'data_across': devices.reshape(2, 4, 1, 1),  # Data axis spans the processes.
          'model_across': devices.T.reshape(4, 1, 2, 1)}  # Model axis spans them.
held = {}
for (name, mesh_devices), cache in itertools.product(meshes.items(), ('none', 'device')):
  config.data.cache = cache
  mesh = Mesh(mesh_devices, ('data', 'fsdp', 'model', 'spatial'))
  with loader.make_train_iterator(config, NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))),
                                  2) as batches:
    batch = next(batches)
  held[f'{name}/{cache}'] = {int(position): [int(shard_row), int(crop[0, 0, 0])]
                for row_shard, crop_shard in zip(batch['row'].addressable_shards,
                                                 batch['crops'].addressable_shards)
                for position, shard_row, crop in zip(range(16)[row_shard.index[0]],
                                                     np.asarray(row_shard.data),
                                                     np.asarray(crop_shard.data))}
with open(out, 'w') as f:
  json.dump(held, f)
jax.distributed.shutdown()
"""


@pytest.mark.slow  # Starts two JAX processes.
def test_two_real_processes_hold_their_rows_of_the_global_batch(config, tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'process.py'
  script.write_text(PROCESS_SCRIPT)
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  env.pop('XLA_FLAGS', None)
  outs = [tmp_path / f'held{p}.json' for p in range(2)]
  procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port),
                             config.data.crops_file, str(outs[p])], env=env, cwd=os.getcwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in range(2)]
  try:
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  assert all(proc.returncode == 0 for proc in procs), '\n'.join(logs)
  held = [json.loads(out.read_text()) for out in outs]
  positive, negative = train_rows(config)
  expected = sampling.train_batch_rows(7, 2, BATCH, positive, negative, POSITIVE_FRACTION)
  for cache in ('none', 'device'):  # The Grain path, and crops gathered from the device cache.
    data = [{int(k): v for k, v in h[f'data_across/{cache}'].items()} for h in held]
    assert set(data[0]) == set(range(BATCH // 2))
    assert set(data[1]) == set(range(BATCH // 2, BATCH))
    model = [{int(k): v for k, v in h[f'model_across/{cache}'].items()} for h in held]
    assert model[0] == model[1] and set(model[0]) == set(range(BATCH))
    for held_rows in data + model:
      for position, (row, crop_value) in held_rows.items():
        assert row == crop_value == expected[position]
