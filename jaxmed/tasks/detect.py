"""The detect task: find nodule centres in patches of whole scans with a centre-point detector
(jaxmed/models/detector3d.py), trained on patches of the volumes file.

Batches (data/patch_loader.py): patches int16 (B, D, H, W) HU (batch over the batch axes, depth
over 'spatial'), centers float32 (B, K, 3) patch voxels (z, y, x), diameters_mm (B, K), valid
(B, K), index int32 (B,) = step * B + i. Inside the jitted step the patches are augmented on the
device (detect.augment), the heatmap targets built from the (moved) centres
(detection/targets.py) and the loss taken over the global batch (detection/loss.py).

Validation: detection over the whole data.val_subsets scans of the volumes file, as --mode=eval
scores it (sensitivity at 1, 2, 4 and 8 false positives per scan, CPM, candidate recall:
detection/validation.py), and the loss on detect.val_batches batches of validation patches (the
same patches at every evaluation: sampling is a pure function of (seed, step)).
"""

from __future__ import annotations

import hashlib
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmed import checkpointing
from jaxmed.data import augment
from jaxmed.detection import loss as loss_lib
from jaxmed.detection import targets as targets_lib
from jaxmed.errors import ConfigError
from jaxmed.models import communication_plan as model_communication_plan
from jaxmed.models import create_model as create_model_from_config
from jaxmed.models import detector3d
from jaxmed.parallel import sharding as sharding_lib

# The output stride decides the decoder's depth, hence the saved arrays.
MODEL_KEYS = ('model', 'detect.stride')

# What decides the patches of step N, their augmentation and targets, and the schedule.
DATA_STREAM_KEYS = (
    'seed', 'train.global_batch_size', 'train.steps', 'train.learning_rate',
    'train.warmup_steps', 'train.weight_decay', 'train.grad_clip_norm', 'data.train_subsets',
    'data.val_subsets', 'data.hu_window', 'data.augment', 'detect.spacing_mm',
    'detect.patch_size', 'detect.positive_fraction', 'detect.margin_vox',
    'detect.max_nodules_per_patch', 'detect.augment', 'detect.sigma_per_radius',
    'detect.min_sigma', 'detect.diameter_loss_weight', 'detect.offset_loss_weight')


def check_patch_size(config, spatial_devices: int) -> None:
  """ConfigError (one line) unless every patch edge is a multiple of the detector's size
  divisor and the output depth (D / stride) divides over the spatial axis."""
  detect = config.detect
  divisor = detector3d.size_divisor(config.model, detect.stride)
  patch = tuple(int(n) for n in detect.patch_size)
  if len(patch) != 3 or any(n <= 0 or n % divisor for n in patch):
    raise ConfigError(
        f'detect.patch_size={patch} must be three positive multiples of {divisor} (the '
        f'deepest stride of this detector); set --config.detect.patch_size accordingly')
  if (patch[0] // detect.stride) % spatial_devices:
    raise ConfigError(
        f'detect.patch_size depth {patch[0]} does not divide by detect.stride x the spatial '
        f'axis ({detect.stride} x {spatial_devices}); pick a depth that is a multiple of '
        f'{detect.stride * spatial_devices} or change --config.mesh.ici_spatial')


def prepare(config) -> None:
  """Checks the patch shape against the mesh, then makes sure the volumes file exists."""
  from jaxmed.data import prepare as prepare_lib
  from jaxmed.parallel import mesh as mesh_lib
  ici, dcn = mesh_lib.mesh_shape(config.mesh, jax.device_count())
  spatial = mesh_lib.MESH_AXES.index('spatial')
  check_patch_size(config, ici[spatial] * dcn[spatial])
  prepare_lib.ensure_volumes_file(config)


def create_model(config, rngs: nnx.Rngs) -> nnx.Module:
  return create_model_from_config(config.model, rngs=rngs, output_stride=config.detect.stride)


def train_batches(config, batch_sharding, start_step: int, reserved_bytes: int = 0):
  """reserved_bytes is the crops cache's (classify); patches have no device cache."""
  del reserved_bytes
  from jaxmed.data import patch_loader
  return patch_loader.make_patch_train_iterator(config, batch_sharding, start_step)


def abstract_batch(config, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch's shapes, dtypes and shardings (for compiling the step without data)."""
  b, k = config.train.global_batch_size, config.detect.max_nodules_per_patch
  patch = tuple(config.detect.patch_size)

  def array(shape, dtype, axes):
    spec = sharding_lib.logical_sharding(axes + (None,) * (len(shape) - len(axes)), mesh, rules,
                                         shape)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

  return {'patches': array((b, *patch), jnp.int16, ('batch', 'depth', 'height', 'width')),
          'centers': array((b, k, 3), jnp.float32, ('batch',)),
          'diameters_mm': array((b, k), jnp.float32, ('batch',)),
          'valid': array((b, k), jnp.float32, ('batch',)),
          'index': array((b,), jnp.int32, ('batch',))}


def _targets(images, centers, batch, config):
  detect = config.detect
  grid = tuple(n // detect.stride for n in images.shape[1:4])
  return targets_lib.build_targets(
      centers, batch['diameters_mm'], batch['valid'], grid, stride=detect.stride,
      spacing_mm=detect.spacing_mm, sigma_per_radius=detect.sigma_per_radius,
      min_sigma=detect.min_sigma)


def model_inputs(batch, step, config):
  """(patches augmented on the device (B, D, H, W, 1) in [0, 1], the targets of their nodules)."""
  if config.detect.augment:
    images, centers = augment.augment_patches(
        batch['patches'], batch['centers'], batch['valid'], batch['index'], config.seed, step,
        config.data.augment, config.data.hu_window)
  else:
    images, centers = augment.hu_to_unit(batch['patches'], config.data.hu_window)[..., None], \
        batch['centers']
  return images, _targets(images, centers, batch, config)


def loss(outputs, targets, config):
  value, _ = loss_lib.detection_loss(outputs, targets,
                                     diameter_weight=config.detect.diameter_loss_weight,
                                     offset_weight=config.detect.offset_loss_weight)
  return value


def eval_step(graphdef, state, batch, *, config) -> dict[str, jax.Array]:
  """The loss and its terms on a batch of unaugmented patches, BatchNorm's running statistics."""
  images = augment.hu_to_unit(batch['patches'], config.data.hu_window)[..., None]
  targets = _targets(images, batch['centers'], batch, config)
  ts = nnx.merge(graphdef, state)
  ts.model.eval()
  value, terms = loss_lib.detection_loss(ts.model(images), targets,
                                         diameter_weight=config.detect.diameter_loss_weight,
                                         offset_weight=config.detect.offset_loss_weight)
  return {'loss': value, **{f'{k}_loss': v for k, v in terms.items()},
          'nodules': jnp.sum(targets['valid'])}


def validate(eval_fn, state, config, batch_sharding) -> dict[str, Any]:
  """Detection over the whole validation scans (sensitivity at 1, 2, 4 and 8 false positives
  per scan, CPM and candidate recall: detection/validation.py, the numbers --mode=eval gives),
  and the mean loss (and its terms) over detect.val_batches batches of validation patches
  (data.val_subsets sampled as training samples them, without augmentation)."""
  from jaxmed.data import patch_loader
  val_config = config.copy_and_resolve_references()
  val_config.data.train_subsets = tuple(config.data.val_subsets)
  totals: dict[str, float] = {}
  with patch_loader.make_patch_train_iterator(val_config, batch_sharding, 0) as batches:
    for _ in range(config.detect.val_batches):
      for key, value in jax.device_get(eval_fn(state, next(batches))).items():
        totals[key] = totals.get(key, 0.0) + float(value)
  count = max(config.detect.val_batches, 1)
  return {**_detect_validation_scans(state, config, batch_sharding.mesh),
          **{k: v / count for k, v in totals.items() if k != 'nodules'},
          'nodules': int(totals.get('nodules', 0)), 'patches': count *
          config.train.global_batch_size}


def _detect_validation_scans(state, config, mesh) -> dict[str, Any]:
  """validation.validate_volumes over the volumes file's data.val_subsets scans, with the
  current weights (BatchNorm on its running statistics). Call inside use_rules."""
  from jaxmed import detect as detect_mode
  from jaxmed import train
  from jaxmed.data import volumes_file
  from jaxmed.detection import validation
  rules = sharding_lib.current_rules()
  graphdef, _, _ = train.abstract_train_state(config, mesh, rules)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  detector = detect_mode.volume_detector(config, graphdef, state, shardings, mesh, rules)
  source = volumes_file.VolumesSource(config.data.volumes_file)
  indices = volumes_file.scans_in_subsets(source, config.data.val_subsets)
  return validation.validate_volumes(detector, detect_mode.peaks_fn(config),
                                     validation.volumes_of(source, indices))


def volumes_identity(path: str) -> dict[str, Any]:
  """What names a volumes file's content: a digest of its `sources` attribute (every source
  file's sha256) and its spacing. A rebuilt file from the same sources keeps it."""
  with h5py.File(path, 'r') as f:
    sources = f.attrs['sources']
    spacing = float(np.asarray(f.attrs['spacing_mm']))
  if isinstance(sources, bytes):
    sources = sources.decode()
  return {'sources_sha256': hashlib.sha256(str(sources).encode()).hexdigest()[:16],
          'spacing_mm': spacing}


def data_stream(config) -> dict[str, Any]:
  """The DATA_STREAM_KEYS of the config and the volumes file's identity."""
  stream = checkpointing.config_values(config, DATA_STREAM_KEYS)
  stream.update({f'volumes_file.{k}': v
                 for k, v in volumes_identity(config.data.volumes_file).items()})
  return stream


def communication_plan(config):
  return model_communication_plan(config.model, tuple(config.detect.patch_size),
                                  config.train.global_batch_size, config.detect.stride)
