"""train_and_evaluate(config, workdir): the whole training run, readable top to bottom.

training_loop() sets a run up (mesh / input / model & optimizer, restored or created sharded /
the steps) and TrainLoop runs it (update, log, evaluate, checkpoint, preemption, NaN guard).
The loop reads nothing back from the device except on log steps and before a checkpoint, so the
device never waits for the host.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import signal
import time
import types
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

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


# Metrics the loop sums on the device between log steps; the host logs their means.
LOGGED_METRICS = ('loss', 'grad_norm', 'learning_rate')


def _initial_loop_stats(step: jax.Array) -> dict[str, jax.Array]:
  zero = lambda dtype=jnp.float32: jnp.zeros((), dtype)
  return {'step': jnp.asarray(step, jnp.int32), 'count': zero(jnp.int32),
          **{k: zero() for k in LOGGED_METRICS},
          'nonfinite': zero(jnp.int32), 'first_nonfinite_step': jnp.full((), -1, jnp.int32),
          'first_nonfinite_loss': zero(), 'first_nonfinite_grad_norm': zero()}


def new_loop_stats(mesh: jax.sharding.Mesh, step: int) -> dict[str, jax.Array]:
  """The small record the loop carries beside the state, on the device, replicated (scalars).

  step int32: the next step to run. count int32 and float32 sums of LOGGED_METRICS over the
  good steps since the last log step. nonfinite int32: steps whose loss or gradient norm was
  NaN or Inf; first_nonfinite_step int32 (-1 = none) with its loss and grad_norm.
  """
  return jax.jit(_initial_loop_stats, out_shardings=NamedSharding(mesh, PartitionSpec()))(step)


@jax.jit
def zero_logged_sums(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The stats with count and the LOGGED_METRICS sums zeroed, on the device (no transfer)."""
  return {**stats, 'count': jnp.zeros_like(stats['count']),
          **{k: jnp.zeros_like(stats[k]) for k in LOGGED_METRICS}}


def logged_means(host_stats: dict[str, Any]) -> dict[str, float]:
  """Means of LOGGED_METRICS since the last log step, from stats fetched with jax.device_get."""
  count = max(int(host_stats['count']), 1)
  return {k: float(host_stats[k]) / count for k in LOGGED_METRICS}


def guarded_train_step(graphdef: nnx.GraphDef, state: nnx.State, stats: dict[str, jax.Array],
                       batch: dict[str, jax.Array], *,
                       config: ml_collections.ConfigDict) -> tuple[nnx.State, dict]:
  """train_step at step stats['step'], with the NaN guard and the logged sums on the device.

  A step whose loss or gradient norm is not finite leaves the state as it was, and so does
  every step after it: the state stays the last good one, and stats record the first bad step
  for the host, which stops at its next log step or checkpoint without saving. Returns
  (state, stats), stats['step'] advanced by one.
  """
  step = stats['step']
  new_state, metrics = train_step(graphdef, state, batch, step, config=config)
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  clean = stats['nonfinite'] == 0
  good, first_bad = finite & clean, ~finite & clean
  state = jax.tree.map(lambda new, old: jnp.where(good, new, old), new_state, state)
  stats = {**stats, 'step': step + 1, 'count': stats['count'] + good.astype(jnp.int32),
           'nonfinite': stats['nonfinite'] + (~finite).astype(jnp.int32),
           'first_nonfinite_step': jnp.where(first_bad, step, stats['first_nonfinite_step']),
           **{k: stats[k] + jnp.where(good, metrics[k].astype(jnp.float32), 0.0)
              for k in LOGGED_METRICS},
           **{f'first_nonfinite_{k}': jnp.where(first_bad, metrics[k].astype(jnp.float32),
                                                stats[f'first_nonfinite_{k}'])
              for k in ('loss', 'grad_norm')}}
  return state, stats


def make_train_step(graphdef, state_shardings, config) -> Callable:
  """Jitted guarded_train_step as step(leaves, stats, batch) -> (leaves, stats).

  The state goes in and out as the list of its arrays, jax.tree.leaves(state) (rebuild it with
  jax.tree.unflatten(jax.tree.structure(state), leaves)), sharded as state_shardings says and
  donated: flattening nnx Variables in Python at every call cost about 0.4 ms of host time per
  step, as much as a tiny model's step on CPU. stats are replicated (new_loop_stats); the
  batch comes as it is. Call it (and trace / compile it) inside sharding.use_rules(mesh, rules).
  """
  treedef = jax.tree.structure(state_shardings)
  leaf_shardings = jax.tree.leaves(state_shardings)
  replicated = NamedSharding(leaf_shardings[0].mesh, PartitionSpec())

  def step(leaves, stats, batch):
    state, stats = guarded_train_step(graphdef, jax.tree.unflatten(treedef, leaves), stats, batch,
                                      config=config)
    return jax.tree.leaves(state), stats
  return jax.jit(step, in_shardings=(leaf_shardings, replicated, None),
                 out_shardings=(leaf_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef, state_shardings, mesh, config) -> Callable:
  """Jitted eval_step(state, batch), its outputs replicated so every host has all of them."""
  replicated = NamedSharding(mesh, PartitionSpec())
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


# ---- the loop --------------------------------------------------------------------------------

class TrainLoop:
  """train_and_evaluate's loop, from its step to any later one: log, evaluation, checkpoints,
  preemption and the NaN guard at step boundaries. The loop benchmark times this same object.

  Asynchronous: the host dispatches step N (jax returns at once), takes batch N + 1 from the
  input pipeline, which places it on the device while step N runs, and moves on. It reads
  results back only on log steps and before a checkpoint: one device_get of the small stats
  record (new_loop_stats), which also carries the NaN guard (guarded_train_step). It waits for
  step N - train.max_steps_in_flight to finish (block_until_ready on one scalar of it, not a
  transfer): enough steps stay queued to keep the device busy, and the queue of dispatched
  steps cannot grow without end (on CPU, about 100 unawaited steps with collectives hung two
  gloo processes; 30 did not).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step_fn: Callable,
               eval_fn: Callable, batches, batch_sharding: NamedSharding,
               checkpointer: checkpointing.Checkpointer, writer: reporting.MetricWriter,
               state: nnx.State, step: int):
    self.config = config
    self.workdir = workdir
    self.step_fn = step_fn  # make_train_step's; compiled on the first batch by compile().
    self.eval_fn = eval_fn
    self.batches = batches
    self.batch_sharding = batch_sharding
    self.checkpointer = checkpointer
    self.writer = writer
    self.leaves = jax.tree.leaves(state)  # The state, as the step takes it (make_train_step).
    self._treedef = jax.tree.structure(state)
    self.step = step  # Steps dispatched so far; the device may still be running the last few.
    self.stats = new_loop_stats(batch_sharding.mesh, step)
    self.batch = None  # The batch of `step`, already on its way to the device.
    self.val_metrics: dict[str, Any] = {}
    self.stopped = False  # Stopped by a preemption, its step saved.
    self.progress = reporting.Progress(config.train.steps, config.train.global_batch_size,
                                       jax.process_index() == 0)
    # config.train as plain attributes: a ConfigDict lookup costs microseconds, at every step.
    self._train = types.SimpleNamespace(**config.train.to_dict())
    self._in_flight = collections.deque()  # One scalar of each step not yet waited on.
    self._fetched = (None, None)  # (step, the stats as of that step on the host)
    # Process 0 traces train.profile_steps steps, after 5 of warm-up.
    profiling = config.train.profile_steps > 0 and jax.process_index() == 0
    self._profile_start = step + 5 if profiling else -1
    self._profile_stop = self._profile_start + config.train.profile_steps if profiling else -1

  @property
  def state(self) -> nnx.State:
    """The train state as of the last step dispatched."""
    return jax.tree.unflatten(self._treedef, self.leaves)

  def compile(self) -> None:
    """Takes the first batch and compiles the step for it ahead of time; logs its memory."""
    self.batch = next(self.batches)
    t0 = time.perf_counter()
    self.step_fn = self.step_fn.lower(self.leaves, self.stats, self.batch).compile()
    logging.info('compiled the train step in %.1f s; per device: %s',
                 time.perf_counter() - t0, _memory_summary(self.step_fn))

  def run(self, until: int) -> None:
    """Trains up to step `until` (at most train.steps), or until a preemption stop."""
    train = self._train
    until = min(until, train.steps)
    if self.step >= until or self.stopped:
      return
    if self.batch is None:
      self.compile()
    self.progress.start(self.step)
    profile_dir = os.path.join(self.workdir, 'profile')
    while self.step < until and not self.stopped:
      if self.step == self._profile_start:
        jax.profiler.start_trace(profile_dir)
      self.leaves, self.stats = self.step_fn(self.leaves, self.stats, self.batch)
      self._in_flight.append(self.stats['step'])
      self.step += 1
      if self.step < train.steps:
        self.batch = next(self.batches)  # Placed on the device while the step runs.
      if len(self._in_flight) > max(train.max_steps_in_flight, 1):
        self._in_flight.popleft().block_until_ready()
      if self.step == self._profile_stop:
        jax.block_until_ready(self.stats)
        jax.profiler.stop_trace()
        logging.info('wrote a profile of steps %d-%d to %s', self._profile_start, self.step - 1,
                     profile_dir)
      self._end_of_step()

  def _end_of_step(self) -> None:
    step, train = self.step, self._train
    if train.sigterm_at_step == step and not train.sigterm_during_eval:  # Test hook.
      signal.raise_signal(signal.SIGTERM)
    if step % train.log_every_steps == 0 or step == train.steps:
      self._log()
    if step == train.steps or (train.eval_every_steps and step % train.eval_every_steps == 0):
      self._evaluate()
    # Orbax decides when to save: a checkpoint step, the last step, or a preemption (JAX's
    # multi-process sync point, checked at every step on every process, or a SIGTERM).
    preempted = self.checkpointer.reached_preemption(step)
    if self.checkpointer.should_save(step):
      self._fetch_stats()  # The NaN guard: a non-finite step never reaches a checkpoint.
      self.checkpointer.save(step, nnx.to_pure_dict(self.state))
    if preempted:
      self.checkpointer.wait()
      logging.warning('stop requested (SIGTERM / preemption): saved step %d to %s; run the '
                      'same command to resume', step, self.checkpointer.directory)
      self.stopped = True

  def _fetch_stats(self) -> dict[str, Any]:
    """The stats as of this step on the host (one device_get per step at most); raises
    NonFiniteLossError, naming the first bad step, if any step was not finite."""
    if self._fetched[0] != self.step:
      self._fetched = (self.step, jax.device_get(self.stats))
    stats = self._fetched[1]
    if stats['nonfinite']:
      bad = [k for k in ('loss', 'grad_norm')
             if not math.isfinite(float(stats[f'first_nonfinite_{k}']))]
      self.checkpointer.wait()
      last = self.checkpointer.latest_step()
      raise NonFiniteLossError(
          f'{" and ".join(bad)} became {float(stats[f"first_nonfinite_{bad[0]}"])} at step '
          f'{int(stats["first_nonfinite_step"])}; stopped without saving it (last good '
          f'checkpoint: step {last}); lower --config.train.learning_rate, check the data, or use '
          '--config.model.dtype=float32')
    return stats

  def _log(self) -> None:
    means = logged_means(self._fetch_stats())
    self.stats = zero_logged_sums(self.stats)
    rates = self.progress.report(self.step, {'loss': means['loss'],
                                             'lr': means['learning_rate']})
    self.writer.write(self.step, 'train', {**means, **rates})

  def _evaluate(self) -> None:
    step, train = self.step, self._train
    eval_fn = self.eval_fn
    if train.sigterm_at_step == step and train.sigterm_during_eval:  # Test hook.
      eval_fn = _raises_sigterm_after_first_call(eval_fn)
    self.val_metrics = evaluate_split(eval_fn, self.state, self.config,
                                      self.config.data.val_subsets, self.batch_sharding)
    self.writer.write(step, 'val', self.val_metrics)
    logging.info('validation at step %d: %s', step,
                 ' '.join(f'{k} {v:.4g}' for k, v in self.val_metrics.items()
                          if not isinstance(v, str)))
    self.progress.start(step)  # Evaluation time is not training time.


def _raises_sigterm_after_first_call(fn: Callable) -> Callable:
  calls = []

  def wrapped(*args):
    out = fn(*args)
    if not calls:
      calls.append(True)
      signal.raise_signal(signal.SIGTERM)
    return out
  return wrapped


# ---- the run ----------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.train.steps steps (resuming from workdir if it holds checkpoints).

  Returns the final step and the last validation metrics (loss, auc, accuracy).
  """
  with training_loop(config, workdir) as loop:
    loop.run(config.train.steps)
  return {'step': loop.step, **loop.val_metrics}


@contextlib.contextmanager
def training_loop(config: ml_collections.ConfigDict, workdir: str) -> Iterator[TrainLoop]:
  """Everything a training run holds, as a TrainLoop at the run's first step; closes it all.

  The state is restored from workdir's latest checkpoint (the same command continues a run, on
  whatever mesh this config gives) or created directly sharded.
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

  with sharding_lib.use_rules(mesh, rules), contextlib.ExitStack() as to_close:
    # ---- model & optimizer: restored or created directly sharded
    checkpointer = to_close.enter_context(contextlib.closing(
        checkpointing.Checkpointer(workdir, config, training=True)))
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

    # ---- the steps, and the loop (it compiles the train step ahead of time on its first batch)
    writer = to_close.enter_context(contextlib.closing(
        reporting.MetricWriter(workdir, enabled=is_main)))
    train_iter = to_close.enter_context(contextlib.closing(
        loader.make_train_iterator(config, batch_sharding, start_step)))
    yield TrainLoop(config, workdir, make_train_step(graphdef, state_shardings, config),
                    make_eval_step(graphdef, state_shardings, mesh, config), train_iter,
                    batch_sharding, checkpointer, writer, state, start_step)


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
