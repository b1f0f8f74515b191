"""The detector model and its training step: output maps, initial prior, logical names, and every
mesh giving one device's losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxmed import checkpointing
from jaxmed import train
from jaxmed.errors import ConfigError
from jaxmed.models import create_model, detector3d
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib
from jaxmed.tasks import detect

PATCH = 16
NODULE_SLOTS = 3


def detect_config(**mesh_sizes):
  """The detect task with a ResNet-10 detector of width 4 on 16^3 patches, batch 8."""
  config = default.get_config()
  config.task = 'detect'
  config.model.update(name='detector3d', depth=10, width=4, stem_kernel=3, stem_stride=2,
                      stem_pool=False)
  config.detect.update(patch_size=(PATCH,) * 3, stride=4, max_nodules_per_patch=NODULE_SLOTS,
                       augment=False)
  config.train.update(global_batch_size=8, steps=100, warmup_steps=2, learning_rate=2e-3)
  for axis in mesh_lib.MESH_AXES:
    config.mesh[f'ici_{axis}'] = mesh_sizes.get(axis, 1)
  return config


def synthetic_batch(step: int, config) -> dict[str, np.ndarray]:
  """Patches of noisy lung (-800 HU) holding 0-3 solid spheres (+40 HU) at known centres."""
  rng = np.random.default_rng(step)
  b, k = config.train.global_batch_size, config.detect.max_nodules_per_patch
  grid = np.stack(np.meshgrid(*[np.arange(PATCH)] * 3, indexing='ij'), -1).astype(np.float32)
  patches = rng.normal(-800, 40, (b, PATCH, PATCH, PATCH)).astype(np.float32)
  centers = np.zeros((b, k, 3), np.float32)
  diameters = np.zeros((b, k), np.float32)
  valid = np.zeros((b, k), np.float32)
  for i in range(b):
    for j in range(rng.integers(0, k + 1)):
      centers[i, j] = rng.uniform(2, PATCH - 2, 3)
      diameters[i, j] = rng.uniform(3, 8)
      valid[i, j] = 1
      inside = np.linalg.norm(grid - centers[i, j], axis=-1) <= diameters[i, j] / 2
      patches[i][inside] = 40
  return {'patches': patches.astype(np.int16), 'centers': centers, 'diameters_mm': diameters,
          'valid': valid, 'index': np.arange(step * b, (step + 1) * b, dtype=np.int32)}


# ---- the model --------------------------------------------------------------------------------


_INITIAL = {}


def initial_train_state():
  """(graphdef, state) of the detect train state, initialised once on one device: XLA:CPU takes
  long to compile the initialisers, and initialisation depends on the seed only, not the mesh."""
  if not _INITIAL:
    config = detect_config()
    mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:1])
    graphdef, state, _ = train.init_sharded_state(config, mesh, train.logical_rules(config))
    _INITIAL.update(graphdef=graphdef, state=jax.device_get(state))  # Host copy: steps donate.
  return _INITIAL['graphdef'], _INITIAL['state']


def test_outputs_are_maps_at_the_output_stride_starting_at_the_prior():
  graphdef, state = initial_train_state()
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state).model(x))
  outputs = forward(state, jnp.full((2, 16, 32, 48, 1), 0.2))
  assert outputs['heatmap'].shape == (2, 4, 8, 12)
  assert outputs['log_diameter'].shape == (2, 4, 8, 12)
  assert outputs['offset'].shape == (2, 4, 8, 12, 3)
  assert all(v.dtype == jnp.float32 for v in outputs.values())
  # CenterNet's focal-loss prior: every cell starts near p = 0.01, diameters near 10 mm.
  np.testing.assert_allclose(jax.nn.sigmoid(outputs['heatmap']), 0.01, rtol=0.2)
  np.testing.assert_allclose(jnp.exp(outputs['log_diameter']), 10.0, rtol=0.2)


def test_every_parameter_has_logical_axis_names():
  model = nnx.eval_shape(lambda: create_model(detect_config().model, rngs=nnx.Rngs(0)))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = variable.get_metadata().get(sharding_lib.LOGICAL_AXES_KEY)
    assert axes and len(axes) == variable.get_value().ndim, path


def test_size_divisor_is_the_deepest_stride_and_a_stride_without_a_stage_is_refused():
  model = detect_config().model  # stem stride 2, no pool: stages at strides 2, 4, 8, 16
  assert detector3d.size_divisor(model, 4) == 16
  model.update(stem_stride=2, stem_pool=True)
  assert detector3d.size_divisor(model, 4) == 32
  with pytest.raises(ConfigError, match='detect.stride=3') as info:
    detector3d.size_divisor(model, 3)
  assert '\n' not in str(info.value)


def test_a_patch_the_detector_or_the_spatial_axis_cannot_split_is_one_line():
  config = detect_config()
  detect.check_patch_size(config, spatial_devices=4)
  config.detect.patch_size = (40, 32, 32)
  with pytest.raises(ConfigError, match='multiples of 16'):
    detect.check_patch_size(config, 1)
  config.detect.patch_size = (32, 32, 32)  # 8 output planes do not split over 16 devices
  with pytest.raises(ConfigError, match='detect.stride x the spatial axis'):
    detect.check_patch_size(config, 16)
  detect.check_patch_size(config, 8)


def test_a_detect_checkpoint_pins_the_output_stride_and_the_volumes_file(tmp_path):
  import h5py
  path = str(tmp_path / 'volumes.h5')
  with h5py.File(path, 'w') as f:
    f.attrs['sources'] = 'subset0/a.mhd sha256 0123'
    f.attrs['spacing_mm'] = 1.0
  config = detect_config()
  config.data.volumes_file = path
  stream = checkpointing.data_stream(config)
  assert stream['detect.patch_size'] == [PATCH] * 3 and 'volumes_file.sources_sha256' in stream
  other = detect_config()
  other.data.volumes_file = path
  other.detect.positive_fraction = 0.25
  assert checkpointing.differing_data_stream(stream, checkpointing.data_stream(other)) == [
      'detect.positive_fraction 0.5 -> 0.25']
  saved = checkpointing._normalise(config.to_dict())
  other.detect.stride = 8
  assert checkpointing.differing_model_keys(saved, other) == [
      'detect.stride (checkpoint 4, config 8)']


# ---- the training step on every mesh -------------------------------------------------------

MESHES = {
    'one_device': {},
    'data8': dict(data=8),
    'data2_model4': dict(data=2, model=4),
    'fsdp8': dict(fsdp=8),
    'data2_spatial4': dict(data=2, spatial=4),
}
STEPS = 5
_RUNS = {}


def run_steps(name):
  """Losses of the production detect train step over STEPS steps of synthetic_batch."""
  if name in _RUNS:
    return _RUNS[name]
  config = detect_config(**MESHES[name])
  devices = jax.devices()[:1] if name == 'one_device' else jax.devices()
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  rules = train.logical_rules(config)
  losses = []
  with sharding_lib.use_rules(mesh, rules):
    graphdef, _, shardings = train.abstract_train_state(config, mesh, rules)
    state = jax.device_put(initial_train_state()[1], shardings)
    step_fn = train.make_train_step(graphdef, shardings, config)
    leaves, stats = jax.tree.leaves(state), train.new_loop_stats(mesh, 0)
    placement = {k: v.sharding for k, v in detect.abstract_batch(config, mesh, rules).items()}
    for step in range(STEPS):
      batch = jax.device_put(synthetic_batch(step, config), placement)
      leaves, stats = step_fn(leaves, stats, batch)
      losses.append(train.logged_means(jax.device_get(stats))['loss'])
      stats = train.zero_logged_sums(stats)
  _RUNS[name] = np.array(losses), placement['patches'].spec
  return _RUNS[name]


@pytest.mark.slow  # 5 compilations of the step: minutes on 2 cores shared with other jobs.
@pytest.mark.parametrize('name', [
    m if m == 'data2_spatial4' else pytest.param(m, marks=pytest.mark.heavy)
    for m in MESHES if m != 'one_device'])
def test_every_detector_mesh_gives_one_devices_losses(name):
  losses, patch_spec = run_steps(name)
  reference, _ = run_steps('one_device')
  assert np.all(np.isfinite(losses)) and losses[0] != losses[-1]  # Parameters change.
  np.testing.assert_allclose(losses, reference, rtol=1e-4)
  if name == 'data2_spatial4':  # Patches arrive split over the batch and along depth.
    assert tuple(patch_spec)[:2] == ('data', 'spatial')
