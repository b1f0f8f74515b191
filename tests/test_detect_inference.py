"""Whole-volume detector inference: every mesh gives one device's maps; windows give the
whole-volume maps where their overlap covers the receptive field."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import default
from jaxmed import train
from jaxmed.detection import inference
from jaxmed.models import create_model
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib

# A narrow detector with a stride-1 stem (size_divisor 8, output stride 4): cheap on CPU.
MODEL = {'name': 'detector3d', 'depth': 10, 'width': 4, 'stem_kernel': 3, 'stem_stride': 1,
         'stem_pool': False, 'dtype': 'float32', 'param_dtype': 'float32',
         'space_to_depth': 'none'}
SIZE_DIVISOR, STRIDE = 8, 4


def _volume(shape, seed=0):
  """HU noise with a few bright balls: structure the detector's maps respond to."""
  rng = np.random.default_rng(seed)
  hu = rng.normal(-800, 100, shape)
  zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing='ij')
  for _ in range(4):
    c = rng.uniform(0, 1, 3) * np.array(shape)
    hu[(zz - c[0])**2 + (yy - c[1])**2 + (xx - c[2])**2 < 16] = 50
  return hu.astype(np.int16)


def _detector(devices, spatial, max_voxels=0, overlap=None):
  config = default.get_config()
  config.mesh.ici_data, config.mesh.ici_spatial = len(devices) // spatial, spatial
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  rules = train.logical_rules(config)
  model = create_model(MODEL, rngs=nnx.Rngs(0))
  # Non-trivial running statistics, so BatchNorm in eval mode is not the identity.
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.BatchStat):
      var.set_value(var.get_value() + 0.1 * np.arange(var.get_value().size).reshape(
          var.get_value().shape) % 0.5)
  graphdef, state = nnx.split(model)
  shardings = sharding_lib.state_shardings(state, mesh, rules)
  context = sharding_lib.use_rules(mesh, rules)
  context.__enter__()
  state = jax.device_put(state, shardings)
  detector = inference.VolumeDetector(
      inference.model_apply_from(graphdef), state, shardings, mesh, rules,
      size_divisor=SIZE_DIVISOR, stride=STRIDE, hu_window=config.data.hu_window,
      max_voxels_per_device=max_voxels, overlap=overlap)
  return detector, context


def _run(devices, spatial, volumes, **kw):
  detector, context = _detector(devices, spatial, **kw)
  try:
    return detector(volumes)
  finally:
    context.__exit__(None, None, None)


def test_spatial_meshes_equal_one_device():
  devices = jax.devices()
  volumes = [_volume((64, 24, 20))]  # Depth a multiple of 8 x 8: every mesh pads alike.
  reference, plan = _run(devices[:1], 1, volumes)
  assert not plan.windowed and plan.padded_shape == (64, 24, 24)
  assert reference[0]['heatmap'].shape == (16, 6, 5)
  assert reference[0]['offset'].shape == (16, 6, 5, 3)
  assert np.ptp(reference[0]['heatmap']) > 1e-3  # The maps respond to the input.
  for n, spatial in ((4, 4), (8, 8)):
    maps, plan = _run(devices[:n], spatial, volumes)
    assert plan.slab_voxels == 64 // spatial * 24 * 24  # Depth really split per device.
    for name in inference.MAP_NAMES:
      np.testing.assert_allclose(maps[0][name], reference[0][name], atol=1e-4, err_msg=name)


def test_two_scans_over_the_batch_axis_equal_each_alone():
  devices = jax.devices()
  volumes = [_volume((32, 16, 16), 1), _volume((32, 16, 16), 2)]
  together, _ = _run(devices[:4], 2, volumes)  # data 2 x spatial 2
  for volume, maps in zip(volumes, together):
    alone, _ = _run(devices[:1], 1, [volume])
    np.testing.assert_allclose(maps['heatmap'], alone[0]['heatmap'], atol=1e-4)


def test_windows_equal_whole_volume_where_overlap_covers_receptive_field():
  devices = jax.devices()
  volumes = [_volume((200, 16, 16), 3)]
  whole, plan = _run(devices[:2], 2, volumes)
  detector, context = _detector(devices[:2], 2, max_voxels=64 * 16 * 16)
  try:
    radius = detector.overlap
    windowed, wplan = detector(volumes)
  finally:
    context.__exit__(None, None, None)
  assert wplan.windowed and len(wplan.windows) >= 3 and wplan.window_depth == 128
  assert wplan.slab_voxels <= 64 * 16 * 16
  for name in inference.MAP_NAMES:
    np.testing.assert_allclose(windowed[0][name], whole[0][name], atol=1e-4, err_msg=name)
  # An overlap short of the receptive field changes cells near the window ends: the test can fail.
  short, _ = _run(devices[:2], 2, volumes, max_voxels=64 * 16 * 16, overlap=radius // 4)
  assert np.abs(short[0]['heatmap'] - whole[0]['heatmap']).max() > 1e-4


def test_receptive_radius_of_a_known_stack():
  # Three 3^3 stride-1 convs then output stride 1: radius 3 planes.
  kernel = np.ones((3, 3, 3, 1, 1), np.float32)

  def apply(x):
    for _ in range(3):
      x = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME',
                                       dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    return {name: x[..., 0] for name in inference.MAP_NAMES}

  assert inference.receptive_radius(apply, 1, 8, 8, 1) == 3


def test_plan_windows_cover_every_cell_once():
  windows = inference.plan_windows(208, 128, 40, 4)
  kept = np.concatenate([np.arange(w.keep_start, w.keep_stop) for w in windows])
  np.testing.assert_array_equal(kept, np.arange(52))
  for w in windows:  # Kept cells lie `overlap` inside the window or at the volume's ends.
    assert w.keep_start * 4 - w.start >= 40 or w.start == 0
    assert w.start + 128 - w.keep_stop * 4 >= 40 or w.start + 128 == 208
