"""The optimizer and the jitted steps: train_step (the task's augmentation and loss, forward,
backward, AdamW, the fsdp gather and scatter), its NaN-guarded form with the metrics summed on
the device, and the classify task's eval_step and predict over a split. train.py runs them; they are reachable as train.<name> too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmed import tasks
from jaxmed.data import augment
from jaxmed.data import loader
from jaxmed.evaluation import roc
from jaxmed.parallel import sharding as sharding_lib


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


# ---- the steps --------------------------------------------------------------------------------

def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean sigmoid binary cross-entropy in float32; logits and labels (B,)."""
  return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                            labels.astype(jnp.float32)).mean()


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array],
               step: jax.Array, *, config: ml_collections.ConfigDict) -> tuple[nnx.State, dict]:
  """One optimisation step on a global batch: augment on device, forward, backward, AdamW.

  batch: the task's training batch (jaxmed/tasks/), e.g. classify's crops int16 (B, S, S, S)
  HU, label int32 (B,), index int32 (B,) global example position. The task turns it into the
  model's inputs and the loss's targets, and gives the loss.
  """
  task = tasks.get(config)
  inputs, targets = task.model_inputs(batch, step, config)
  ts = nnx.merge(graphdef, state)
  ts.model.train()

  def loss_fn(model):
    # fsdp: every sharded weight is gathered once here, for the forward and the backward pass;
    # batch-norm statistics stay the model's own variables, so their updates land in it.
    model_graphdef, model_state = nnx.split(model)
    compute_model = nnx.merge(model_graphdef, sharding_lib.gather_parameters(model_state))
    loss = task.loss(compute_model(inputs), targets, config)
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
  """The classify task's evaluation step: scores the centre crops of an evaluation batch (BatchNorm with its running statistics).

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


def _initial_loop_stats(step: jax.Array, count: jax.Array,
                        sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  zero = lambda dtype=jnp.float32: jnp.zeros((), dtype)
  return {'step': jnp.asarray(step, jnp.int32), 'count': jnp.asarray(count, jnp.int32),
          **{k: jnp.asarray(sums[k], jnp.float32) for k in LOGGED_METRICS},
          'nonfinite': zero(jnp.int32), 'first_nonfinite_step': jnp.full((), -1, jnp.int32),
          'first_nonfinite_loss': zero(), 'first_nonfinite_grad_norm': zero()}


def new_loop_stats(mesh: jax.sharding.Mesh, step: int,
                   sums: dict[str, float] | None = None) -> dict[str, jax.Array]:
  """The small record the loop carries beside the state, on the device, replicated (scalars).

  step int32: the next step to run. count int32 and float32 sums of LOGGED_METRICS over the
  good steps since the last log step: zero, or `sums` (logged_sums of a checkpoint, so that the
  first log step after a resume averages the same steps as a run that was never stopped).
  nonfinite int32: steps whose loss or gradient norm was NaN or Inf; first_nonfinite_step int32
  (-1 = none) with its loss and grad_norm.
  """
  sums = sums or {}
  return jax.jit(_initial_loop_stats, out_shardings=NamedSharding(mesh, PartitionSpec()))(
      step, sums.get('count', 0), {k: sums.get(k, 0.0) for k in LOGGED_METRICS})


@jax.jit
def zero_logged_sums(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The stats with count and the LOGGED_METRICS sums zeroed, on the device (no transfer)."""
  return {**stats, 'count': jnp.zeros_like(stats['count']),
          **{k: jnp.zeros_like(stats[k]) for k in LOGGED_METRICS}}


def logged_sums(host_stats: dict[str, Any]) -> dict[str, float]:
  """{'count': int, metric: float} of stats fetched with jax.device_get: what a checkpoint
  keeps of the sums since the last log step (plain numbers; each float32 sum exactly)."""
  return {'count': int(host_stats['count']),
          **{k: float(host_stats[k]) for k in LOGGED_METRICS}}


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
  """The task's jitted eval_step(state, batch), its outputs replicated so every host has all of
  them."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(functools.partial(tasks.get(config).eval_step, graphdef, config=config),
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
