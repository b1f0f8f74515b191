"""The classify task: score candidate points from the crops around them (false-positive
reduction). Its batches, loss, validation and data stream, as jaxmed has always trained them;
the step functions themselves are in jaxmed/steps.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmed import checkpointing
from jaxmed import steps
from jaxmed.data import augment
from jaxmed.data import crops_file
from jaxmed.data import loader
from jaxmed.data import prepare as prepare_lib
from jaxmed.models import communication_plan as model_communication_plan
from jaxmed.models import create_model as create_model_from_config
from jaxmed.parallel import sharding as sharding_lib

MODEL_KEYS = ('model',)

# Config keys (or sections) that decide which examples form step N, how they are augmented and
# normalised, and the learning-rate schedule. Not the eval batch size: validation covers every
# example whatever its batch size.
DATA_STREAM_KEYS = (
    'seed', 'train.global_batch_size', 'train.steps', 'train.learning_rate',
    'train.warmup_steps', 'train.weight_decay', 'train.grad_clip_norm', 'data.train_subsets',
    'data.val_subsets', 'data.positive_fraction', 'data.crop_size', 'data.stored_crop_size',
    'data.hu_window', 'data.augment')

# Validation and test (--mode=eval) report loss, AUC and accuracy over this population.
AUC_POPULATION = 'excluded negatives left out'


def prepare(config) -> None:
  prepare_lib.ensure_crops_file(config)


def create_model(config, rngs: nnx.Rngs) -> nnx.Module:
  return create_model_from_config(config.model, rngs=rngs)


def train_batches(config, batch_sharding, start_step: int, reserved_bytes: int = 0):
  """reserved_bytes: per device, what a device crops cache must leave free (the step's
  temporaries)."""
  return loader.make_train_iterator(config, batch_sharding, start_step, reserved_bytes)


def abstract_batch(config, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch's shapes, dtypes and shardings (for compiling the step without data)."""
  b, s = config.train.global_batch_size, config.data.stored_crop_size

  def array(shape, dtype):  # As the input pipeline shards: the batch axis only.
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=sharding_lib.batch_sharding(mesh, rules, len(shape)))

  return {'crops': array((b, s, s, s), jnp.int16), 'label': array((b,), jnp.int32),
          'index': array((b,), jnp.int32), 'row': array((b,), jnp.int32)}


def model_inputs(batch, step, config):
  """(crops augmented on the device (B, c, c, c, 1) in [0, 1], labels (B,))."""
  data = config.data
  images = augment.augment_crops(batch['crops'], batch['index'], config.seed, step, data.augment,
                                 data.crop_size, data.hu_window)
  return images, batch['label']


def loss(logits, labels, config):
  del config
  return steps.bce_loss(logits, labels)


eval_step = steps.eval_step


def validate(eval_fn, state, config, batch_sharding) -> dict[str, Any]:
  """Loss, AUC and accuracy over data.val_subsets, excluded negatives left out."""
  scores = steps.predict(eval_fn, state, config, config.data.val_subsets, batch_sharding,
                         skip_excluded=True)
  return {**steps.classification_metrics(scores['label'], scores['probability']),
          'auc_population': AUC_POPULATION}


def data_stream(config) -> dict[str, Any]:
  """The DATA_STREAM_KEYS of the config, and the crops file's identity: a digest of the source
  files' sha256 it stores, and its number of crops."""
  stream = checkpointing.config_values(config, DATA_STREAM_KEYS)
  stream.update({f'crops_file.{k}': v
                 for k, v in crops_file.identity(config.data.crops_file).items()})
  return stream


def communication_plan(config):
  return model_communication_plan(config.model, config.data.crop_size,
                                  config.train.global_batch_size)
