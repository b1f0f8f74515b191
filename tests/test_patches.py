"""Detection patches: the pure (seed, step) sampling, the Grain patch loader's global arrays on
a data x spatial mesh, and on-device augmentation that moves the centres with the voxels."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import default
from conftest import TINY, apply_overrides
from jaxmed.data import augment, patch_loader
from jaxmed.data.patch_sampling import TrainScans, nodules_in_patches, train_patches
from jaxmed.errors import ConfigError
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib

PATCH = (32, 32, 32)
MARGIN = 4


def far_scans(num_scans=8) -> TrainScans:
  """Scans of (200, 64, 64) voxels, one nodule each near z = 30, bodies only at z >= 150: a
  patch without a nodule can never reach one, so the nodules a batch holds are its positives."""
  rng = np.random.default_rng(0)
  zyx = np.stack([rng.uniform(20, 40, num_scans), rng.uniform(10, 54, num_scans),
                  rng.uniform(10, 54, num_scans)], axis=1)
  body = np.array([[150, 0, 0], [200, 64, 64]])
  return TrainScans(rows=np.arange(num_scans) * 3, shapes=np.tile([200, 64, 64], (num_scans, 1)),
                    body_boxes=np.tile(body, (num_scans, 1, 1)),
                    nodule_scan=np.arange(num_scans), nodule_zyx=zyx,
                    nodule_diameter_mm=rng.uniform(3, 30, num_scans))


def test_sampling_is_a_pure_function_of_seed_and_step():
  scans = far_scans()
  first = train_patches(0, 5, 8, scans, PATCH, 0.5, MARGIN)
  again = train_patches(0, 5, 8, scans, PATCH, 0.5, MARGIN)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  for other in (train_patches(0, 6, 8, scans, PATCH, 0.5, MARGIN),
                train_patches(1, 5, 8, scans, PATCH, 0.5, MARGIN)):
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize('fraction', [0.0, 0.25, 0.5, 1.0])
def test_positive_fraction_of_patches_hold_a_nodule_inside_the_margin(fraction):
  scans = far_scans()
  batch, positives = 8, round(8 * fraction)
  seen, positions = [], []
  for step in range(4):
    scan, corner = train_patches(0, step, batch, scans, PATCH, fraction, MARGIN)
    centers, diameters, valid = nodules_in_patches(scans, scan, corner, PATCH, 2)
    held = valid[:, 0] == 1
    assert held.sum() == positives
    inner = centers[held, 0]
    assert np.all((inner >= MARGIN) & (inner <= PATCH[0] - 1 - MARGIN)), inner
    positions.append(inner)
    seen += list(scan[held])
    np.testing.assert_allclose(diameters[held, 0], scans.nodule_diameter_mm[scan[held]],
                               rtol=1e-6)
    # The centre in patch coordinates is the nodule's voxel position minus the corner.
    np.testing.assert_allclose(inner, scans.nodule_zyx[scan[held]] - corner[held], atol=1e-4)
  if positives:
    # Every nodule once per epoch (8 nodules), positions spread over the allowed range.
    assert np.bincount(seen, minlength=8).tolist() == [len(seen) // 8] * 8
    everywhere = np.concatenate(positions)
    assert everywhere.min() < MARGIN + 8 and everywhere.max() > PATCH[0] - 1 - MARGIN - 8


@pytest.mark.parametrize('fraction', [-0.1, 1.5])
def test_positive_fraction_outside_0_1_is_one_line(fraction):
  with pytest.raises(ConfigError) as e:
    train_patches(0, 0, 8, far_scans(), PATCH, fraction, MARGIN)
  assert '\n' not in str(e.value) and '--config.detect.positive_fraction' in str(e.value)


def test_patch_too_small_for_its_margin_is_one_line():
  with pytest.raises(ConfigError, match='detect.patch_size'):
    train_patches(0, 0, 8, far_scans(), (8, 32, 32), 0.5, 4)


# ---- the Grain loader ------------------------------------------------------------------------


def loader_config(tiny_volumes, **overrides):
  config = apply_overrides(default.get_config(), {**TINY, **tiny_volumes})
  config.task = 'detect'
  config.train.global_batch_size = 8
  config.detect.patch_size = (16, 16, 16)
  config.detect.margin_vox = 2
  config.detect.max_nodules_per_patch = 4
  config.data.train_subsets = tuple(range(10))
  return apply_overrides(config, overrides)


def batches(config, mesh, steps=2, start_step=0):
  rules = config.mesh.logical_rules
  batch_sharding = sharding_lib.batch_sharding(mesh, rules, 1)
  with patch_loader.make_patch_train_iterator(config, batch_sharding, start_step) as it:
    return [next(it) for _ in range(steps)]


def one_device_mesh(config):
  one = apply_overrides(config.mesh.copy_and_resolve_references(),
                        {'ici_data': -1, 'ici_spatial': 1})
  return mesh_lib.create_mesh(one, jax.devices()[:1])


def test_workers_give_the_same_batches_as_the_main_process(tiny_volumes):
  config = loader_config(tiny_volumes, **{'data.workers': 0})
  mesh = one_device_mesh(config)
  in_process = batches(config, mesh, steps=3)
  config.data.workers = 1
  with_worker = batches(config, mesh, steps=3)
  for a, b in zip(in_process, with_worker):
    for name in ('patches', 'centers', 'diameters_mm', 'valid', 'index'):
      np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
  later = batches(config, mesh, steps=1, start_step=2)[0]  # Resuming at a step replays nothing.
  np.testing.assert_array_equal(np.asarray(later['patches']), np.asarray(in_process[2]['patches']))


def test_patches_are_sharded_batch_by_depth_on_data_2_spatial_4(tiny_volumes):
  config = loader_config(tiny_volumes, **{'mesh.ici_data': 2, 'mesh.ici_spatial': 4})
  mesh = mesh_lib.create_mesh(config.mesh)
  batch = batches(config, mesh, steps=1)[0]
  patches = batch['patches']
  assert patches.shape == (8, 16, 16, 16) and patches.dtype == jnp.int16
  assert tuple(patches.sharding.spec)[:2] == ('data', 'spatial')
  assert {s.data.shape for s in patches.addressable_shards} == {(4, 4, 16, 16)}
  assert {s.data.shape for s in batch['centers'].addressable_shards} == {(4, 4, 3)}
  reference = batches(config, one_device_mesh(config), steps=1)[0]
  for name in ('patches', 'centers', 'diameters_mm', 'valid', 'index'):
    np.testing.assert_array_equal(np.asarray(batch[name]), np.asarray(reference[name]),
                                  err_msg=name)
  # The centres are patch voxel coordinates: each lands on its nodule's bright blob.
  hu, centers, valid = (np.asarray(batch[k]) for k in ('patches', 'centers', 'valid'))
  assert valid.sum() >= 4  # positive_fraction 0.5 of 8.
  for b, k in zip(*np.nonzero(valid)):
    z, y, x = np.rint(centers[b, k]).astype(int)
    assert hu[b, z, y, x] > -400, (b, k, hu[b, z, y, x])


def test_patch_depth_not_divisible_by_the_spatial_axis_is_one_line(tiny_volumes):
  config = loader_config(tiny_volumes, **{'mesh.ici_data': 2, 'mesh.ici_spatial': 4,
                                          'detect.patch_size': (18, 16, 16)})
  with pytest.raises(ConfigError) as e:
    batches(config, mesh_lib.create_mesh(config.mesh), steps=1)
  assert '\n' not in str(e.value) and 'multiple of 4' in str(e.value)


def test_patch_larger_than_a_scan_is_padded_and_said_once(tiny_volumes, caplog):
  config = loader_config(tiny_volumes, **{'detect.patch_size': (96, 96, 96),
                                          'detect.positive_fraction': 0.0})
  with caplog.at_level(logging.WARNING):
    batch = batches(config, one_device_mesh(config), steps=1)[0]
  said = [r.getMessage() for r in caplog.records if 'smaller than detect.patch_size' in
          r.getMessage()]
  assert len(said) == 1 and 'padded with -1000 HU' in said[0]
  patches = np.asarray(batch['patches'])
  assert (patches[:, 0] == -1000).all() and (patches[:, -1] == -1000).all()
  assert (patches > -500).any(axis=(1, 2, 3)).all(), 'the scan is inside each patch'


# ---- augmentation ----------------------------------------------------------------------------


def dots(shape, batch=16, seed=0):
  """(patches int16 (B, D, H, W) at -1000 HU with one 400 HU voxel, centers (B, 2, 3) whose
  slot 0 is that voxel, valid (B, 2))."""
  rng = np.random.default_rng(seed)
  centers = np.zeros((batch, 2, 3), np.float32)
  centers[:, 0] = rng.integers(0, shape, (batch, 3))
  centers[:, 1] = 1.0  # An empty slot moves too; valid masks it.
  patches = np.full((batch,) + shape, -1000, np.int16)
  for b in range(batch):
    patches[(b,) + tuple(centers[b, 0].astype(int))] = 400
  valid = np.tile(np.array([1.0, 0.0], np.float32), (batch, 1))
  return patches, centers, valid


def aug_config(**changes):
  aug = default.get_config().data.augment
  aug.intensity_scale = 0.0
  aug.intensity_shift_hu = 0.0
  return apply_overrides(aug, changes)


@pytest.mark.parametrize('shape', [(8, 12, 12), (8, 12, 10)])
def test_augmentation_moves_the_centres_with_the_voxels(shape):
  patches, centers, valid = dots(shape)
  index = np.arange(16, dtype=np.int32)
  images, moved = jax.jit(lambda p, c: augment.augment_patches(
      p, c, valid, index, 0, 3, aug_config(), (-1000.0, 400.0)))(patches, centers)
  images, moved = np.asarray(images), np.asarray(moved)
  assert images.shape == (16,) + shape + (1,) and images.dtype == np.float32
  for b in range(16):
    bright = np.unravel_index(np.argmax(images[b, ..., 0]), shape)
    np.testing.assert_array_equal(bright, moved[b, 0], err_msg=f'example {b}')
  changed = np.any(moved[:, 0] != centers[:, 0], axis=1)
  assert 4 <= changed.sum() <= 16, 'most examples are flipped or rotated'
  if shape[1] == shape[2]:
    swapped = moved[:, 0, 1] == centers[:, 0, 2]
    assert swapped.any(), 'some examples are rotated in the axial plane'


def test_augmentation_is_the_same_on_a_data_2_spatial_4_mesh():
  patches, centers, valid = dots((8, 12, 12), batch=8)
  index = np.arange(8, dtype=np.int32)
  fn = jax.jit(lambda p, c: augment.augment_patches(
      p, c, valid, index, 0, 1, aug_config(intensity_scale=0.1, intensity_shift_hu=20.0),
      (-1000.0, 400.0)))
  want = fn(patches, centers)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'spatial'))
  sharded = jax.device_put(patches, NamedSharding(mesh, PartitionSpec('data', 'spatial')))
  got = fn(sharded, centers)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  assert got[0].sharding.spec[:2] == ('data', 'spatial')


def test_patches_to_unit_is_the_hu_window():
  hu = jnp.array([[[[-1000, -300, 400, 1000]]]], jnp.int16)
  unit = augment.patches_to_unit(hu, (-1000.0, 400.0))
  assert unit.shape == (1, 1, 1, 4, 1)
  np.testing.assert_allclose(np.asarray(unit)[0, 0, 0, :, 0], [0.0, 0.5, 1.0, 1.0])
