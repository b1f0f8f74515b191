"""Logical axis names -> mesh placement.

Model code names the axes of parameters and activations with logical names only ('batch',
'depth', 'channels', 'conv_in', ...). The config's `mesh.logical_rules` maps each logical name to
a mesh axis, a tuple of mesh axes, or None (replicated). This module is the one place that turns
those names into `PartitionSpec`s / `NamedSharding`s.

Resolution rules (the same for parameters, optimizer state, inputs and activations):
  - a logical name missing from the rules, or mapped to None, is replicated;
  - mesh axes of size 1 are dropped (they change nothing and keep specs readable);
  - when the dimension's size is known, a mesh axis is only used if the running product of the
    axes kept so far times its size divides the dimension; otherwise that axis is skipped, so a
    1-channel input on model=8 or a depth of 2 on spatial=4 is replicated instead of failing;
  - a mesh axis is used at most once per array (first dimension wins).

Activations are constrained with `constrain(x, logical_axes)`: a no-op unless `use_rules(mesh,
rules)` is active, so models run unsharded in plain code and tests.

Stages: a model may name the stages of its network (a variable's 'stage' metadata, and
`in_stage(name)` around the stage's forward pass). A rule named 'STAGE/NAME' replaces the rule
for NAME inside that stage only, for its activations and its variables alike; so the config can
say, stage by stage, what a mesh axis does (parallel/stages.py writes such rules).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.core.spmd as flax_spmd
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmed.errors import ConfigError

# (logical name, mesh axis | tuple of mesh axes | None), as in config.mesh.logical_rules.
LogicalRules = Sequence[tuple[str, str | Sequence[str] | None]]
LogicalAxes = Sequence[str | None]

# Variable metadata key holding a variable's logical axis names (the key nnx.with_partitioning
# writes, so flax's own nnx.get_partition_spec also sees the names).
LOGICAL_AXES_KEY = 'out_sharding'


def _rules_dict(rules: LogicalRules | Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """Normalises rules to {logical name: tuple of mesh axes}."""
  items = rules.items() if isinstance(rules, Mapping) else rules
  normalised = {}
  for item in items:
    if len(item) != 2:
      raise ConfigError(
          f'logical rule {item!r} is not a (logical name, mesh axes) pair; fix '
          'config.mesh.logical_rules')
    name, target = item
    if target is None:
      axes = ()
    elif isinstance(target, str):
      axes = (target,)
    else:
      axes = tuple(target)
    normalised[str(name)] = axes
  return normalised


def rules_dict(rules: LogicalRules | Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """{logical name: tuple of mesh axes} of `rules` (config.mesh.logical_rules form)."""
  return _rules_dict(rules)


def _axis_sizes(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes))


def mesh_axes_for(logical_name: str, mesh: Mesh | jax.sharding.AbstractMesh,
                  rules: LogicalRules) -> tuple[str, ...]:
  """Mesh axes (size > 1) that `logical_name` maps to, ignoring divisibility."""
  sizes = _axis_sizes(mesh)
  axes = _rules_dict(rules).get(logical_name, ())
  for axis in axes:
    if axis not in sizes:
      raise ConfigError(
          f'logical rule {logical_name!r} -> {axis!r} names a mesh axis that is not in the mesh '
          f'{tuple(sizes)}; fix config.mesh.logical_rules')
  return tuple(a for a in axes if sizes[a] > 1)


def logical_to_spec(logical_axes: LogicalAxes, mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: LogicalRules, shape: Sequence[int] | None = None) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions have these logical names.

  With `shape`, mesh axes that do not divide a dimension are skipped (that dimension is then
  replicated over them); without it, every mapped mesh axis of size > 1 is used.
  """
  if shape is not None and len(shape) != len(logical_axes):
    raise ConfigError(
        f'logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}')
  sizes = _axis_sizes(mesh)
  used: set[str] = set()
  entries = []
  for dim, name in enumerate(logical_axes):
    kept: list[str] = []
    product = 1
    if name is not None:
      for axis in mesh_axes_for(name, mesh, rules):
        if axis in used:
          continue
        if shape is not None and shape[dim] % (product * sizes[axis]) != 0:
          continue
        kept.append(axis)
        product *= sizes[axis]
    used.update(kept)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while entries and entries[-1] is None:  # P(None, 'model') == P(None, 'model', None, ...)
    entries.pop()
  return PartitionSpec(*entries)


def logical_sharding(logical_axes: LogicalAxes, mesh: Mesh, rules: LogicalRules,
                     shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding on `mesh` for an array with these logical axis names (see logical_to_spec)."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules, shape))


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
  """Sharding of a (B, ...) array of `ndim` dims: leading axis 'batch', the rest replicated.

  Use for model inputs and labels, e.g. crops (B, D, H, W, 1) and labels (B,). The batch must be
  divisible by the batch axes (see jaxmed.parallel.mesh.check_batch_divisible).
  """
  return logical_sharding(('batch',) + (None,) * (ndim - 1), mesh, rules)


# Variable metadata key holding the name of the model stage a variable belongs to.
STAGE_KEY = 'stage'


def stage_rules(rules: LogicalRules, stage: str | None) -> LogicalRules:
  """`rules` as they apply inside `stage`: an entry 'stage/name' replaces the entry 'name'.

  The stage entries themselves are kept, so the result resolves any other stage as well.
  """
  if not stage:
    return rules
  items = list(_rules_dict(rules).items())
  prefix = f'{stage}/'
  overrides = {name[len(prefix):]: axes for name, axes in items if name.startswith(prefix)}
  if not overrides:
    return rules
  known = {name for name, _ in items}
  return (tuple((name, overrides.get(name, axes)) for name, axes in items)
          + tuple((name, axes) for name, axes in overrides.items() if name not in known))


def _variable_spec(variable: nnx.Variable, mesh: Mesh, rules: LogicalRules) -> PartitionSpec:
  shape = getattr(variable.get_value(), 'shape', ())
  logical_axes = variable.get_metadata().get(LOGICAL_AXES_KEY)
  if not logical_axes or len(shape) == 0:
    return PartitionSpec()
  rules = stage_rules(rules, variable.get_metadata().get(STAGE_KEY))
  return logical_to_spec(tuple(logical_axes), mesh, rules, shape)


def state_shardings(state: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for every variable of an nnx model / optimizer state, from its logical names.

  `state` is an nnx.State (e.g. the second output of nnx.split(nnx.eval_shape(make_fn))), an
  nnx Module / Optimizer (abstract or concrete: its nnx.state is used), or any pytree of arrays.
  Returns the same tree structure as nnx.state / the pytree, each Variable holding a
  NamedSharding instead of an array: usable directly as jax.jit in/out_shardings for that state.
  Variables without logical names (step counters, scalars) and plain arrays are replicated.
  """
  if isinstance(state, nnx.Pytree):  # a Module or Optimizer, not an nnx.State
    state = nnx.state(state)

  def to_sharding(leaf):
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(NamedSharding(mesh, _variable_spec(leaf, mesh, rules)))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- activation constraints -----------------------------------------------------------------


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Makes `mesh` the current mesh (jax.set_mesh) and `rules` the current logical rules.

  Enter it OUTSIDE jax.jit, around the calls that trace the model (init, train/eval step):
  `constrain` reads both at trace time. The rules live in flax's logical-rules context, so
  nnx.get_partition_spec also resolves the model's names (without the divisibility fallback).
  """
  rules = tuple((name, axes) for name, axes in _rules_dict(rules).items())
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    yield


@contextlib.contextmanager
def in_stage(stage: str) -> Iterator[None]:
  """Inside it, `constrain` resolves names by the rules of `stage` (stage_rules). A no-op
  outside use_rules. Enter it at trace time, around the stage's forward pass."""
  rules = current_rules()
  if not rules:
    yield
    return
  with flax_spmd.logical_axis_rules(stage_rules(rules, stage)):
    yield


def current_rules() -> LogicalRules:
  """The logical rules of the innermost use_rules (empty outside it)."""
  return tuple(flax_spmd.get_logical_axis_rules())


def is_sharded(logical_name: str) -> bool:
  """Whether `logical_name` maps to a mesh axis of size > 1 under the current use_rules."""
  rules = current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  return bool(rules) and not mesh.empty and bool(mesh_axes_for(logical_name, mesh, rules))


def constrain(x: jax.Array, logical_axes: LogicalAxes,
              cotangent_axes: LogicalAxes | None = None) -> jax.Array:
  """Constrains activation `x` to the sharding its logical axis names resolve to.

  Inside use_rules (and under jit) this is jax.lax.with_sharding_constraint with the resolved
  spec, dimensions not divisible by their mesh axes replicated; with no mesh or no rules active
  it returns x unchanged. With `cotangent_axes`, the backward pass constrains x's cotangent to
  those names instead of `logical_axes`: e.g. the output of a row-parallel conv is
  reduce-scattered onto channel shards forward, and its gradient all-gathered once backward
  for both uses (the input and the kernel gradient) rather than once per use.
  """
  rules = current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  sharding = NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules, x.shape))
  if cotangent_axes is not None:
    # Resolved now, under the rules in force here (a stage's): the backward pass is traced
    # after this function's stage scope has closed.
    cotangent = NamedSharding(mesh, logical_to_spec(cotangent_axes, mesh, rules, x.shape))
    return _constrain_both_ways(x, sharding, cotangent)
  return jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _constrain_both_ways(x, sharding, cotangent_sharding):
  return jax.lax.with_sharding_constraint(x, sharding)


def _constrain_both_ways_fwd(x, sharding, cotangent_sharding):
  return jax.lax.with_sharding_constraint(x, sharding), None


def _constrain_both_ways_bwd(sharding, cotangent_sharding, _, cotangent):
  return (jax.lax.with_sharding_constraint(cotangent, cotangent_sharding),)


_constrain_both_ways.defvjp(_constrain_both_ways_fwd, _constrain_both_ways_bwd)


def _constrain_variables(tree: Any, drop_batch_axes: bool) -> Any:
  """Constrains every Variable of `tree` that a batch mesh axis shards (module doc of callers)."""
  all_rules = current_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not all_rules or mesh.empty:
    return tree

  def constrain_variable(variable):
    if not isinstance(variable, nnx.Variable):
      return variable
    value = variable.get_value()
    axes = variable.get_metadata().get(LOGICAL_AXES_KEY)
    if not axes or not getattr(value, 'ndim', 0):
      return variable
    rules = stage_rules(all_rules, variable.get_metadata().get(STAGE_KEY))
    batch_axes = set(mesh_axes_for('batch', mesh, rules))
    if not batch_axes:
      return variable
    compute_rules = tuple((name, tuple(a for a in axes if a not in batch_axes))
                          for name, axes in _rules_dict(rules).items())
    spec = logical_to_spec(tuple(axes), mesh, rules, value.shape)
    if not batch_axes & {a for e in spec if e for a in (e if isinstance(e, tuple) else (e,))}:
      return variable
    if drop_batch_axes:
      spec = logical_to_spec(tuple(axes), mesh, compute_rules, value.shape)
    return variable.replace(jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec)))

  return jax.tree.map(constrain_variable, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def gather_parameters(params: Any) -> Any:
  """Parameters placed as the forward and backward passes use them (the ZeRO-3 all-gather).

  `params` is an nnx.State of Variables carrying logical axis names. Each one that a batch mesh
  axis (data, fsdp) shards is constrained to its placement without those axes: all-gathered
  once, before the forward pass, and the same gathered copy serves the backward pass. A no-op
  outside use_rules and for every other variable.
  """
  return _constrain_variables(params, drop_batch_axes=True)


def scatter_gradients(grads: Any) -> Any:
  """Gradients placed as their parameters are stored: the ZeRO-3 reduce-scatter.

  Without it the summed gradient of a gathered weight may be kept whole for the gradient norm
  and the update, costing an all-reduce (twice the bytes) instead of a reduce-scatter.
  """
  return _constrain_variables(grads, drop_batch_axes=False)
