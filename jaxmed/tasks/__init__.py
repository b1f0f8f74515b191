"""What differs between jaxmed's tasks, behind the one interface train.py, steps.py and
checkpointing.py call. A task is a module of jaxmed/tasks/ named by config.task:

  classify  score candidate points from crops around them (the crops file);
  detect    find nodule centres in patches of whole scans (the volumes file).

Each task module defines:
  MODEL_KEYS                    config keys (sections or dotted keys) that decide the saved
                                arrays' shapes: a checkpoint of another value is refused
  prepare(config)               makes sure the dataset file exists (built when allowed)
  create_model(config, rngs)    the model, in training mode
  train_batches(config, batch_sharding, start_step)
                                GlobalBatches (data/batches.py) of training steps start_step, ...
  abstract_batch(config, mesh, rules)
                                a training batch as jax.ShapeDtypeStructs with shardings
  model_inputs(batch, step, config) -> (inputs, targets)
                                on-device augmentation and targets, inside the jitted step
  loss(outputs, targets, config) -> float32 scalar, the mean over the GLOBAL batch
  eval_step(graphdef, state, batch, *, config) -> dict of arrays (jitted by steps)
  validate(eval_fn, state, config, batch_sharding) -> {metric: value} (the loop's validation)
  data_stream(config) -> {key: value}
                                what decides the examples of each step (checkpoints pin it)
  communication_plan(config)    parallel.communication's plan of the model on its inputs
"""

from __future__ import annotations

import importlib
from types import ModuleType

from jaxmed.errors import ConfigError

TASKS = ('classify', 'detect')


def get(config) -> ModuleType:
  """The task module config.task names; ConfigError (one line) for an unknown task."""
  name = config.get('task', 'classify')
  if name not in TASKS:
    raise ConfigError(f'unknown task {name!r}; set --config.task to one of: {", ".join(TASKS)}')
  return importlib.import_module(f'jaxmed.tasks.{name}')
