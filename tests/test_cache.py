"""The crops caches (config.data.cache = 'host' | 'device') and the Grain workers' batch ring give
the batches of the plain in-process Grain path, bit for bit, on 8 CPU devices, so training from
the device cache gives the losses of training from the file; the device cache refuses, in one
line, a cache that does not fit.

The crops file is test_pipeline's: crop i is filled with the value i.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import default
from jaxmed.data import batch_ring
from jaxmed.data import cache
from jaxmed.data import loader
from test_pipeline import EVAL_SUBSETS, write_crops_file

STEPS = 3
START = 5  # Batches from a resumed step, past the first epoch of positives.


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('cache') / 'crops.h5')
  write_crops_file(path)
  config = default.get_config()
  config.seed = 7
  config.data.crops_file = path
  config.data.stored_crop_size = 8
  config.data.crop_size = 6
  config.data.train_subsets = (0, 1, 2, 3, 4, 5, 6, 7)
  config.data.positive_fraction = 0.25
  config.data.workers = 0
  config.train.global_batch_size = 16
  config.train.eval_batch_size = 16  # 24 examples in subsets 8-9: one full batch, one padded.
  yield config
  cache.clear()


MESHES = {  # The batch splits over data (and fsdp) only; model and spatial hold copies.
    'data8': ((8, 1, 1, 1), ('data', 'fsdp')),
    'data2_model4': ((2, 1, 4, 1), ('data', 'fsdp')),
    'fsdp2_spatial4': ((1, 2, 1, 4), ('data', 'fsdp')),
}


def batch_sharding(name):
  shape, batch_axes = MESHES[name]
  mesh = Mesh(np.array(jax.devices()).reshape(shape), ('data', 'fsdp', 'model', 'spatial'))
  return NamedSharding(mesh, PartitionSpec(batch_axes))


def batches(config, sharding, mode, workers=0):
  config = config.copy_and_resolve_references()
  config.data.cache, config.data.workers = mode, workers
  with loader.make_train_iterator(config, sharding, START) as train:
    train_batches = [next(train) for _ in range(STEPS)]
  with loader.make_eval_iterator(config, EVAL_SUBSETS, sharding) as evaluation:
    eval_batches = list(evaluation)
  return train_batches, eval_batches


def assert_same(got, expected):
  for got_batch, expected_batch in zip(got, expected, strict=True):
    assert sorted(got_batch) == sorted(expected_batch)
    for name, value in expected_batch.items():
      assert got_batch[name].sharding == value.sharding, name
      assert got_batch[name].dtype == value.dtype, name
      np.testing.assert_array_equal(np.asarray(got_batch[name]), np.asarray(value), name)


@pytest.mark.parametrize('mesh', sorted(MESHES))
def test_device_and_host_caches_give_the_grain_batches(config, mesh):
  sharding = batch_sharding(mesh)
  train, evaluation = batches(config, sharding, 'none')
  assert len(evaluation) == 2 and not np.asarray(evaluation[1]['mask']).all()  # Padding too.
  crops = np.asarray(train[0]['crops'])
  np.testing.assert_array_equal(crops[:, 0, 0, 0], np.asarray(train[0]['row']))  # Known truth.
  for mode in ('device', 'host'):
    got_train, got_eval = batches(config, sharding, mode)
    assert_same(got_train, train)
    assert_same(got_eval, evaluation)


def test_device_cache_gathers_on_the_devices_from_rows_split_over_all_of_them(config):
  sharding = batch_sharding('data2_model4')
  config = config.copy_and_resolve_references()
  config.data.cache = 'device'
  with loader.make_train_iterator(config, sharding, 0) as train:
    next(train)
    table = train._cache.table
  # Each device holds 1/8 of the crops (not a replica), and the batch comes from a compiled
  # gather over them: its output is split over data only, as the train step expects.
  assert {s.data.shape[0] for s in table.addressable_shards} == {table.shape[0] // 8}
  assert len({s.index[0].start for s in table.addressable_shards}) == 8


def test_device_cache_refuses_what_does_not_fit(config):
  config = config.copy_and_resolve_references()
  config.data.cache = 'device'
  config.data.cache_max_bytes_per_device = 1000  # One 8^3 int16 crop is 1,024 bytes.
  config.data.train_subsets = (0, 1)  # Not a kept cache.
  with pytest.raises(cache.CacheError) as error:
    loader.make_train_iterator(config, batch_sharding('data8'), 0)
  message = str(error.value)
  assert '\n' not in message and 'per device' in message
  assert 'data.cache_max_bytes_per_device' in message and 'cache=host' in message


def test_device_cache_leaves_room_for_the_train_steps_temporaries(config):
  config = config.copy_and_resolve_references()
  config.data.cache = 'device'
  config.data.train_subsets = (0, 2)  # Not a kept cache.
  sharding = batch_sharding('data8')
  rows = loader.split_rows(config.data.crops_file, (0, 2), skip_excluded=True)
  per_device = -(-len(rows) // 8) * 8**3 * 2
  config.data.cache_max_bytes_per_device = per_device  # The cache alone fits exactly...
  with pytest.raises(cache.CacheError) as error:  # ...but not beside 1 MiB of temporaries.
    loader.make_train_iterator(config, sharding, 0, reserved_bytes=2**20)
  message = str(error.value)
  assert '\n' not in message
  assert 'beside the 1.0 MiB of temporaries the compiled train step needs' in message
  with loader.make_train_iterator(config, sharding, 0, reserved_bytes=0) as train:
    next(train)


def test_device_cache_refuses_rows_it_does_not_hold_and_moves_crops_as_bytes(config):
  config = config.copy_and_resolve_references()
  config.data.cache = 'device'
  sharding = batch_sharding('data2_model4')
  rows = loader.split_rows(config.data.crops_file, EVAL_SUBSETS, skip_excluded=False)
  crops = cache.device_crops(config, rows, sharding)
  not_cached = int(np.setdiff1d(np.arange(rows.max()), rows)[0])
  with pytest.raises(IndexError, match='not in the device crops cache'):
    crops.positions(np.array([rows[0], not_cached]))
  # The gather's collectives carry uint8 (int16 bytes, never widened to 32 bits).
  positions = crops.positions(rows[:16])
  gather = crops._make_gather(('data', 'fsdp'))
  hlo = gather.lower(crops.table, jax.numpy.asarray(positions)).compile().as_text()
  reductions = [line for line in hlo.splitlines() if ' all-reduce(' in line
                or ' reduce-scatter(' in line]
  assert reductions and all('u8[' in line and 's16[' not in line and 's32[' not in line
                            for line in reductions), reductions


@pytest.mark.slow  # Starts worker processes.
def test_workers_hand_over_crops_through_the_ring(config):
  sharding = batch_sharding('data2_model4')
  train, evaluation = batches(config, sharding, 'none')
  for mode, workers in (('host', 2),):  # 'none' with 1 and 2 workers: test_pipeline.py.
    got_train, got_eval = batches(config, sharding, mode, workers)
    assert_same(got_train, train)
    assert_same(got_eval, evaluation)
  # An evaluation pass's ring holds no more batches than the pass has (2 here, not 15 slots).
  config = config.copy_and_resolve_references()
  config.data.workers = 2
  with loader.make_eval_iterator(config, EVAL_SUBSETS, sharding) as evaluation:
    assert evaluation._ring.num_slots == len(evaluation) == 2


def test_ring_refuses_a_lapped_slot(tmp_path):
  ring = batch_ring.BatchRing(2, (2, 3), directory=str(tmp_path))
  ring.write(4)[...] = 4
  ring.written(4)
  ring.write(6)[...] = 6  # Same slot (6 % 2 == 4 % 2): a worker lapped the consumer.
  ring.written(6)
  with pytest.raises(RuntimeError, match='lapped'):
    ring.take(4)
  np.testing.assert_array_equal(ring.take(6), np.full((2, 3), 6))
  ring.close()
  assert not list(tmp_path.iterdir())


def test_training_from_the_device_cache_is_training_from_the_file(tiny_config):
  # The same batches give the same on-device augmentation, so the same losses, bit for bit
  # (data 2 x model 4: the crops are gathered over all 8 devices, the batch split over data).
  # The file run is test_train's own (shared, compiled once per session).
  from test_train import MESHES, STEPS, _set_mesh, mesh_run, run_steps
  from_file, _ = mesh_run('data2_model4', tiny_config)
  config = _set_mesh(tiny_config(data__cache='device'), MESHES['data2_model4'])
  from_cache, _ = run_steps(config, STEPS)
  np.testing.assert_array_equal(from_cache, from_file)
