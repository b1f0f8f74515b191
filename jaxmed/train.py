"""train_and_evaluate(config, workdir): the whole training run, readable top to bottom.

training_loop() sets a run up (mesh / input / model & optimizer, restored or created sharded /
the steps) and TrainLoop runs it (update, log, evaluate, checkpoint, preemption, NaN guard).
What differs between tasks (classify, detect: dataset, model, batches, loss, validation, the
data stream a checkpoint pins) comes from the task module config.task names (jaxmed/tasks/).
The loop reads nothing back from the device except on log steps and before a checkpoint, so the
device never waits for the host. The optimizer and the jitted steps are in jaxmed/steps.py.
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
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from jaxmed import checkpointing
from jaxmed import reporting
from jaxmed import tasks
from jaxmed.errors import UserError
from jaxmed.models import communication_plan, count_params
from jaxmed.parallel import communication
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib
from jaxmed.parallel import stages
# The optimizer and the steps live in jaxmed/steps.py; train.<name> reaches them as before.
from jaxmed.steps import (learning_rate_schedule, make_optimizer, bce_loss, train_step, eval_step,
                          LOGGED_METRICS, new_loop_stats, zero_logged_sums, logged_means,
                          logged_sums,
                          guarded_train_step, make_train_step, make_eval_step, predict,
                          classification_metrics)


class NonFiniteLossError(UserError):
  """Training produced NaN or Inf; the last good checkpoint is kept."""


class TrainState(nnx.Module):
  """The model and its optimizer as one NNX graph, so one split gives one state pytree."""

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer):
    self.model = model
    self.optimizer = optimizer


def create_train_state(config: ml_collections.ConfigDict) -> TrainState:
  model = tasks.get(config).create_model(config, nnx.Rngs(config.seed))
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


def restore_for_eval(config, workdir: str, mesh, rules) -> tuple[nnx.GraphDef, nnx.State, Any,
                                                                 int]:
  """(graphdef, state, shardings, step) of workdir's checkpoint (config.checkpoint.step, or the
  latest), placed on `mesh`: what --mode=eval and --mode=predict score with. Call inside
  sharding.use_rules(mesh, rules)."""
  checkpointer = checkpointing.Checkpointer(workdir, config)
  try:
    graphdef, abstract_state, shardings = abstract_train_state(config, mesh, rules)
    step_wanted = config.checkpoint.step if config.checkpoint.step >= 0 else None
    state, step = restore_state(checkpointer, abstract_state, step_wanted)
  finally:
    checkpointer.close()
  return graphdef, state, shardings, step


def init_sharded_state(config, mesh, rules) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """Builds the train state directly in its shardings: abstract -> shardings -> jit(init).

  Returns (graphdef, state, state_shardings); no device ever holds the whole unsharded state
  unless the rules say to replicate it.
  """
  with sharding_lib.use_rules(mesh, rules):
    graphdef, _, shardings = abstract_train_state(config, mesh, rules)
    state = jax.jit(lambda: nnx.split(create_train_state(config))[1], out_shardings=shardings)()
  return graphdef, state, shardings


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
    # A resumed run continues the sums its checkpoint saved since the last log step.
    self.stats = new_loop_stats(batch_sharding.mesh, step, checkpointer.logged_sums(step))
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
    if not config.data.val_subsets:  # An AUC over no examples would be NaN: no val rows at all.
      logging.info('no validation subsets: validation skipped')

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
      _send_sigterm(train)
    if step % train.log_every_steps == 0 or step == train.steps:
      self._log()
    if step == train.steps or (train.eval_every_steps and step % train.eval_every_steps == 0):
      self._evaluate()
    # Orbax decides when to save: a checkpoint step, the last step, or a preemption (JAX's
    # multi-process sync point, checked at every step on every process, or a SIGTERM).
    preempted = self.checkpointer.reached_preemption(step)
    if self.checkpointer.should_save(step):
      # The NaN guard: a non-finite step never reaches a checkpoint.
      sums = logged_sums(self._fetch_stats())
      self.checkpointer.save(step, nnx.to_pure_dict(self.state), sums)
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
    stats = self._fetch_stats()
    means = logged_means(stats)
    self.stats = zero_logged_sums(self.stats)
    # A checkpoint of this step saves the zeroed sums, without fetching them again.
    self._fetched = (self.step, {**stats, 'count': 0, **{k: 0.0 for k in LOGGED_METRICS}})
    rates = self.progress.report(self.step, {'loss': means['loss'],
                                             'lr': means['learning_rate']})
    self.writer.write(self.step, 'train', {**means, **rates})

  def _evaluate(self) -> None:
    if not self.config.data.val_subsets:
      return
    step, train = self.step, self._train
    eval_fn = self.eval_fn
    if train.sigterm_at_step == step and train.sigterm_during_eval:  # Test hook.
      eval_fn = _raises_sigterm_after_first_call(eval_fn, train)
    self.val_metrics = tasks.get(self.config).validate(eval_fn, self.state, self.config,
                                                       self.batch_sharding)
    self.writer.write(step, 'val', self.val_metrics)
    logging.info('validation at step %d: %s', step,
                 ' '.join(f'{k} {v:.4g}' for k, v in self.val_metrics.items()
                          if not isinstance(v, str)))
    self.progress.start(step)  # Evaluation time is not training time.


def _send_sigterm(train) -> None:
  """Test hook: SIGTERM to this process, or to its whole process group (as SLURM and Kubernetes
  send it: Grain workers included) when train.sigterm_to_group."""
  if train.sigterm_to_group:
    os.killpg(os.getpgrp(), signal.SIGTERM)
  else:
    signal.raise_signal(signal.SIGTERM)


def _raises_sigterm_after_first_call(fn: Callable, train) -> Callable:
  calls = []

  def wrapped(*args):
    out = fn(*args)
    if not calls:
      calls.append(True)
      _send_sigterm(train)
    return out
  return wrapped


# ---- the run ----------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.train.steps steps (resuming from workdir if it holds checkpoints).

  Returns the final step and the last validation metrics (the task's: classify's loss, auc,
  accuracy).
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

  # ---- input: the task's dataset (built when missing and allowed) and batches
  task = tasks.get(config)
  task.prepare(config)
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
    step_fn = make_train_step(graphdef, state_shardings, config)
    reserved = _device_cache_reserve(config, step_fn, state, mesh, rules)
    train_iter = to_close.enter_context(contextlib.closing(
        task.train_batches(config, batch_sharding, start_step, reserved_bytes=reserved)))
    yield TrainLoop(config, workdir, step_fn,
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
  split = (communication.spatial_summary(tasks.get(config).communication_plan(config),
                                         dict(mesh.shape))
           if mesh.shape.get('spatial', 1) > 1 else None)
  if split:  # Which layers the spatial axis splits, and which fall back to replication, why.
    logging.info(split)
  placed = stages.describe(rules)
  if placed:  # What the model axis does in each stage.
    logging.info(placed)
  return mesh, rules


def logical_rules(config, mesh_shape: dict[str, int] | None = None) -> tuple[tuple[str, Any], ...]:
  """config.mesh.logical_rules, plus the per-stage rules of config.mesh.model_axis_by_stage
  ('auto': the cost model's choice for this model, crop, batch and mesh; parallel/stages.py).
  mesh_shape: the mesh's axis sizes (default: config.mesh on all devices)."""
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in config.mesh.logical_rules)
  strategies = stages.parse(config.mesh.get('model_axis_by_stage', 'auto'))
  if mesh_shape is None:
    try:
      ici, dcn = mesh_lib.mesh_shape(config.mesh, jax.device_count())
    except mesh_lib.MeshError:  # create_mesh reports it, in one line.
      return rules
    mesh_shape = {a: i * d for a, i, d in zip(mesh_lib.MESH_AXES, ici, dcn)}
  if mesh_shape.get('model', 1) < 2:
    return rules
  if strategies is None and config.get('task', 'classify') != 'classify':
    return rules  # 'auto' is the cost model of the classifier's ResNet stages; see README.
  if strategies is None:
    strategies = _cheapest_strategies(tuple(sorted(config.model.to_dict().items())),
                                      config.data.crop_size,
                                      config.train.global_batch_size,
                                      tuple(sorted(mesh_shape.items())), rules)
  return stages.with_strategies(rules, strategies)


@functools.lru_cache(maxsize=16)
def _cheapest_strategies(model_items, crop_size, batch, mesh_items, rules):
  plan = communication_plan(dict(model_items), crop_size, batch)
  return stages.choose(plan, dict(mesh_items), rules)[0]


def _device_cache_reserve(config, step_fn, state, mesh, rules) -> int:
  """Bytes per device the compiled train step's temporaries take, that a device crops cache
  must leave free (0 without one, or where the backend does not report it)."""
  if config.data.get('cache', 'none') != 'device':
    return 0
  compiled = step_fn.lower(jax.tree.leaves(state), new_loop_stats(mesh, 0),
                           tasks.get(config).abstract_batch(config, mesh, rules)).compile()
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # Not every backend reports it.
    return 0


def _memory_summary(compiled) -> str:
  try:
    m = compiled.memory_analysis()
    size = lambda b: f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.1f} MiB'
    return (f'arguments {size(m.argument_size_in_bytes)}, outputs {size(m.output_size_in_bytes)}'
            f', temporaries {size(m.temp_size_in_bytes)}')
  except Exception:  # Not every backend reports it.
    return 'not reported by this backend'
