"""train_and_evaluate(config, workdir): the whole training run, readable top to bottom.

Sections: mesh / input / model & optimizer / shard & compile / restore / loop (update, log,
evaluate, checkpoint, preemption, NaN guard).
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from jaxmed import checkpointing
from jaxmed import reporting
from jaxmed.data import augment
from jaxmed.data import loader
from jaxmed.data import prepare
from jaxmed.errors import UserError
from jaxmed.evaluation import roc
from jaxmed.models import create_model, count_params
from jaxmed.parallel import communication
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib


class NonFiniteLossError(UserError):
  """Training produced NaN or Inf; the last good checkpoint is kept."""


class TrainState(nnx.Module):
  """The model and its optimizer as one NNX graph, so one split gives one state pytree."""

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer):
    self.model = model
    self.optimizer = optimizer


# ---- optimizer --------------------------------------------------------------------------------

def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to the peak, then cosine decay to 1% of it at the last step."""
  train = config.train
  warmup = min(train.warmup_steps, max(train.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
      decay_steps=max(train.steps, warmup + 1), end_value=train.learning_rate * 0.01)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (decay on kernels only, not on BatchNorm scales or biases), with gradient clipping."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  adamw = optax.adamw(learning_rate_schedule(config), weight_decay=config.train.weight_decay,
                      mask=decay_mask)
  if config.train.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.train.grad_clip_norm), adamw)
  return adamw


def create_train_state(config: ml_collections.ConfigDict) -> TrainState:
  model = create_model(config.model, rngs=nnx.Rngs(config.seed))
  return TrainState(model, nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param))


def abstract_train_state(config, mesh, rules) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """(graphdef, abstract state, shardings): shapes and placements, no arrays allocated.

  The abstract state's leaves are jax.ShapeDtypeStructs that carry their NamedSharding, ready to
  be a restore target. Call inside sharding.use_rules(mesh, rules).
  """
  abstract = nnx.eval_shape(lambda: create_train_state(config))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding_lib.state_shardings(abstract_state, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  return graphdef, abstract_state, shardings


def restore_state(checkpointer: checkpointing.Checkpointer, abstract_state: nnx.State,
                  step: int | None = None) -> tuple[nnx.State, int]:
  """The checkpointed state at `step` (default latest), placed as `abstract_state` says."""
  pure, step = checkpointer.restore(nnx.to_pure_dict(abstract_state), step)
  state = jax.tree.map(lambda x: x, abstract_state)  # A copy; the abstract one stays abstract.
  nnx.replace_by_pure_dict(state, pure)
  return state, step


def init_sharded_state(config, mesh, rules) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """Builds the train state directly in its shardings: abstract -> shardings -> jit(init).

  Returns (graphdef, state, state_shardings); no device ever holds the whole unsharded state
  unless the rules say to replicate it.
  """
  with sharding_lib.use_rules(mesh, rules):
    graphdef, _, shardings = abstract_train_state(config, mesh, rules)
    state = jax.jit(lambda: nnx.split(create_train_state(config))[1], out_shardings=shardings)()
  return graphdef, state, shardings


# ---- the steps --------------------------------------------------------------------------------

def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean sigmoid binary cross-entropy in float32; logits and labels (B,)."""
  return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                            labels.astype(jnp.float32)).mean()


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array],
               step: jax.Array, *, config: ml_collections.ConfigDict) -> tuple[nnx.State, dict]:
  """One optimisation step on a global batch: augment on device, forward, backward, AdamW.

  batch: crops int16 (B, S, S, S) HU, label int32 (B,), index int32 (B,) global example position.
  """
  data = config.data
  images = augment.augment_crops(batch['crops'], batch['index'], config.seed, step, data.augment,
                                 data.crop_size, data.hu_window)
  ts = nnx.merge(graphdef, state)
  ts.model.train()

  def loss_fn(model):
    # fsdp: every sharded weight is gathered once here, for the forward and the backward pass;
    # batch-norm statistics stay the model's own variables, so their updates land in it.
    model_graphdef, model_state = nnx.split(model)
    compute_model = nnx.merge(model_graphdef, sharding_lib.gather_parameters(model_state))
    loss = bce_loss(compute_model(images), batch['label'])
    if config.train.nan_at_step >= 0:  # Test hook: poison this one step; absent otherwise.
      loss = loss * jnp.where(step == config.train.nan_at_step, jnp.nan, 1.0)
    return loss

  loss, grads = nnx.value_and_grad(loss_fn)(ts.model)
  grads = sharding_lib.scatter_gradients(grads)
  ts.optimizer.update(ts.model, grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': learning_rate_schedule(config)(step)}
  return nnx.state(ts), metrics


def eval_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array], *,
              config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Scores the centre crops of an evaluation batch (BatchNorm with its running statistics).

  Returns probability float32 (B,) with the batch's label, row and mask, so one replicated
  output carries everything the host needs.
  """
  images = augment.center_crop_window(batch['crops'], config.data.crop_size, config.data.hu_window)
  ts = nnx.merge(graphdef, state)
  ts.model.eval()
  probability = jax.nn.sigmoid(ts.model(images).astype(jnp.float32))
  return {'probability': probability, 'label': batch['label'], 'row': batch['row'],
          'mask': batch['mask']}


def make_train_step(graphdef, state_shardings, config) -> Callable:
  """Jitted train_step(state, batch, step): state sharded as given and donated, batch as it comes.

  Call it (and trace / compile it) inside sharding.use_rules(mesh, rules).
  """
  return jax.jit(functools.partial(train_step, graphdef, config=config),
                 in_shardings=(state_shardings, None, None),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def make_eval_step(graphdef, state_shardings, mesh, config) -> Callable:
  """Jitted eval_step(state, batch), its outputs replicated so every host has all of them."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(eval_step, graphdef, config=config),
                 in_shardings=(state_shardings, None), out_shardings=replicated)


def predict(eval_fn: Callable, state: nnx.State, config, subsets, batch_sharding,
            skip_excluded: bool = False) -> dict[str, np.ndarray]:
  """Scores every example of `subsets` once: file row, label and probability (N,), file order."""
  scored = []
  with loader.make_eval_iterator(config, subsets, batch_sharding, skip_excluded) as batches:
    for batch in batches:
      out = jax.device_get(eval_fn(state, batch))
      scored.append({k: v[out['mask']] for k, v in out.items() if k != 'mask'})
  empty = {'row': np.int64, 'label': np.int32, 'probability': np.float32}
  return {k: np.concatenate([b[k] for b in scored]) if scored else np.zeros((0,), dtype)
          for k, dtype in empty.items()}


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  eps = 1e-7
  p = np.clip(probs.astype(np.float64), eps, 1 - eps)
  loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)) if len(p) else float('nan')
  return {'loss': float(loss), 'auc': roc.roc_auc(labels, probs),
          'accuracy': roc.accuracy(labels, probs), 'examples': int(len(labels))}


# ---- preemption -------------------------------------------------------------------------------

class PreemptionWatch:
  """True once the job is asked to stop (SIGTERM, or JAX's multi-host preemption notice).

  A second SIGTERM while the final checkpoint is written only sets the flag again, so it cannot
  interrupt (and corrupt) the save.
  """

  def __init__(self):
    self._requested = False
    self._multi_host = jax.process_count() > 1
    self._previous = None
    if not self._multi_host:  # Multi-host: XLA's preemption notifier owns SIGTERM.
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if self._multi_host:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---- the run ----------------------------------------------------------------------------------

def _mean_metrics(history: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([float(h[k]) for h in history])) for k in history[0]}


def _check_finite(step: int, metrics: dict[str, float], checkpointer) -> None:
  bad = [k for k in ('loss', 'grad_norm') if not math.isfinite(float(metrics[k]))]
  if bad:
    checkpointer.wait()
    last = checkpointer.latest_step()
    raise NonFiniteLossError(
        f'{" and ".join(bad)} became {float(metrics[bad[0]])} at step {step}; stopped without '
        f'saving it (last good checkpoint: step {last}); lower --config.train.learning_rate, '
        'check the data, or use --config.model.dtype=float32')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.train.steps steps (resuming from workdir if it holds checkpoints).

  Returns the final step and the last validation metrics (loss, auc, accuracy).
  """
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  # ---- mesh
  mesh, rules = create_mesh_and_rules(config)

  # ---- input
  prepare.ensure_crops_file(config)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules, ndim=1)

  with sharding_lib.use_rules(mesh, rules):
    # ---- model & optimizer: restored (the same command continues from the latest complete
    # step of its workdir, on whatever mesh this config gives) or created directly sharded
    checkpointer = checkpointing.Checkpointer(workdir, config)
    graphdef, abstract_state, state_shardings = abstract_train_state(config, mesh, rules)
    if checkpointer.latest_step() is not None:
      state, start_step = restore_state(checkpointer, abstract_state)
      logging.info('resumed from step %d of %s', start_step, checkpointer.directory)
    else:
      _, state, _ = init_sharded_state(config, mesh, rules)
      start_step = 0
    logging.info('model %s (depth %d, width %d): %.3fM parameters', config.model.name,
                 config.model.depth, config.model.width,
                 count_params(nnx.merge(graphdef, state).model) / 1e6)

    train_step_fn = make_train_step(graphdef, state_shardings, config)
    eval_step_fn = make_eval_step(graphdef, state_shardings, mesh, config)
    writer = reporting.MetricWriter(workdir, enabled=is_main)
    watch = PreemptionWatch()
    train_iter = loader.make_train_iterator(config, batch_sharding, start_step)
    val_metrics: dict[str, Any] = {}
    step = start_step
    try:
      if step < config.train.steps:
        # ---- compile ahead of time; report memory before the first step
        batch = next(train_iter)
        t0 = time.perf_counter()
        train_step_fn = train_step_fn.lower(state, batch, jnp.int32(step)).compile()
        logging.info('compiled the train step in %.1f s; per device: %s',
                     time.perf_counter() - t0, _memory_summary(train_step_fn))
      progress = reporting.Progress(config.train.steps, config.train.global_batch_size, is_main)
      progress.start(step)
      history = []

      # ---- loop
      profile_start = start_step + 5 if config.train.profile_steps > 0 else -1  # After warm-up.
      while step < config.train.steps:
        if step == profile_start and is_main:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        state, metrics = train_step_fn(state, batch, jnp.int32(step))
        # Waiting on each step's scalars keeps multi-host collectives from piling up (on CPU,
        # about 100 un-awaited collective steps hung two gloo processes) and lets the NaN guard stop before a bad state is ever checkpointed.
        metrics = jax.device_get(metrics)
        _check_finite(step, metrics, checkpointer)
        history.append(metrics)
        step += 1
        if step == profile_start + config.train.profile_steps and is_main:
          jax.profiler.stop_trace()
          logging.info('wrote a profile of steps %d-%d to %s', profile_start, step - 1,
                       os.path.join(workdir, 'profile'))
        if step < config.train.steps:
          batch = next(train_iter)  # Grain workers prepare it while the device works.

        if step % config.train.log_every_steps == 0 or step == config.train.steps:
          mean = _mean_metrics(history)
          history = []
          rates = progress.report(step, {'loss': mean['loss'], 'lr': mean['learning_rate']})
          writer.write(step, 'train', {**mean, **rates})

        every = config.train.eval_every_steps
        if step == config.train.steps or (every and step % every == 0):
          val_metrics = evaluate_split(eval_step_fn, state, config, config.data.val_subsets,
                                       batch_sharding)
          writer.write(step, 'val', val_metrics)
          logging.info('validation at step %d: %s', step,
                       ' '.join(f'{k} {v:.4g}' for k, v in val_metrics.items()
                                if not isinstance(v, str)))
          progress.start(step)  # Evaluation time is not training time.

        if step % config.checkpoint.every_steps == 0 or step == config.train.steps:
          checkpointer.save(step, nnx.to_pure_dict(state))
        if watch.should_stop(step):
          checkpointer.save(step, nnx.to_pure_dict(state))
          checkpointer.wait()
          logging.warning('stop requested (SIGTERM / preemption): saved step %d to %s; run the '
                          'same command to resume', step, checkpointer.directory)
          break
    finally:
      watch.close()
      train_iter.close()
      checkpointer.close()
      writer.close()
  return {'step': step, **val_metrics}


def create_mesh_and_rules(config) -> tuple[jax.sharding.Mesh, tuple]:
  """The configured mesh and logical rules, with the batch sizes checked against the mesh."""
  mesh = mesh_lib.create_mesh(config.mesh)
  rules = logical_rules(config)
  mesh_lib.check_batch_divisible(config.train.global_batch_size, mesh, rules)
  mesh_lib.check_batch_divisible(config.train.eval_batch_size, mesh, rules)
  logging.info('mesh %s on %d %s devices, %d process(es)', mesh_lib.describe(mesh), mesh.size,
               jax.devices()[0].platform, jax.process_count())
  split = communication.spatial_summary(config.model, config.data.crop_size,
                                        config.train.global_batch_size, dict(mesh.shape))
  if split:  # Which layers the spatial axis splits, and which fall back to replication, why.
    logging.info(split)
  return mesh, rules


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.mesh.logical_rules)


# Validation and test (--mode=eval) report loss, AUC and accuracy over this population.
AUC_POPULATION = 'excluded negatives left out'


def evaluate_split(eval_fn, state, config, subsets, batch_sharding) -> dict[str, Any]:
  """Validation: loss, AUC and accuracy over `subsets`, excluded negatives left out."""
  scores = predict(eval_fn, state, config, subsets, batch_sharding, skip_excluded=True)
  return {**classification_metrics(scores['label'], scores['probability']),
          'auc_population': AUC_POPULATION}


def _memory_summary(compiled) -> str:
  try:
    m = compiled.memory_analysis()
    size = lambda b: f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.1f} MiB'
    return (f'arguments {size(m.argument_size_in_bytes)}, outputs {size(m.output_size_in_bytes)}'
            f', temporaries {size(m.temp_size_in_bytes)}')
  except Exception:  # Not every backend reports it.
    return 'not reported by this backend'
