"""The bytes of one training step under the scheme jaxmed runs, per mesh axis, for its CNNs.

This is the cost of jaxmed's own choices (batch over data and fsdp, Megatron pairs over model on
every block, depth over spatial where it divides), derived with the rules the program uses: the
compiled step matches it, which shows the program does what its scheme says, not that the scheme
is efficient. parallel/bound.py gives the lower bound over the ways any program could serve
each layer; the benchmarks print both.

Bytes are ring bytes per device (parallel/collectives.py): all-reduce of S over g devices
2 (g-1)/g S; all-gather or reduce-scatter of a full tensor S (g-1)/g S; a halo plane sent to a
neighbour its own size. n_b = data x fsdp shards the batch (B_l = B / n_b examples per device),
n_m = model, n_s = spatial. The layers (convolutions, pools, batch-norm statistics) are read
from the model's own forward pass (a jaxpr traced on the step's shapes), so the derivation holds
for any depth, width and crop size.

data (and every axis that holds the same parameters but different examples or voxels):
  each gradient is summed once over the devices that computed partial sums of it: an
  all-reduce of the parameter's per-device bytes over n_b (x n_s for layers split over depth).
  Batch norm adds, per layer, an all-reduce of its two (C,) float32 statistics forward and two
  backward, over the devices that share its channels.
fsdp (ZeRO-3): a parameter sharded over fsdp is all-gathered once per step, before the
  forward pass, and kept for the backward pass; its gradient is reduce-scattered back to the
  shards: (n_f-1)/n_f of its bytes each, the same total as the data-parallel all-reduce, with
  parameters and optimizer state cut n_f times.
Per stage (parallel/stages.py), the model axis may split the batch instead: the stage's layers
  then cost what data parallelism does over data x model (kernels whole on each model device),
  and entering it from a channel-split stage costs an all-to-all of the input each way.
tensor (model, Megatron's pairing with channel-sharded residual stream): every activation
  between blocks is sharded on channels. A block's first convolution (and the projection
  shortcut that reads the same input) is column-parallel (kernel sharded on output channels):
  its input is all-gathered forward and its input gradient reduce-scattered backward. Its
  second convolution is row-parallel (kernel sharded on input channels): its output is
  reduce-scattered forward and the output gradient all-gathered backward. Batch norm and ReLU
  run on channel shards with no communication. So each block moves (n_m-1)/n_m (|in| + |out|)
  per direction: exactly one all-reduce's worth, as a Megatron block does. The stem reads the
  1-channel crops (nothing to gather); the head's dense layer all-reduces (B_l,) logits.
spatial (activation depth split over n_s): a convolution or pool with kernel k, stride s and
  'SAME' padding (lo, hi) needs lo planes of its input from the left neighbour and k - s - lo
  from the right; backward, floor((k-1-lo)/s) and floor((lo+s-1)/s) planes of the output
  gradient. A layer whose depth does not divide by n_s runs replicated: its input is
  all-gathered once (forward). The global average pool all-reduces (B_l, C) over n_s.
Loss and gradient-norm scalars (a few bytes) are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxmed.parallel import sharding as sharding_lib
from jaxmed.parallel import spatial

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')


@dataclasses.dataclass(frozen=True)
class Layer:
  """A convolution or max-pool of the forward pass (global shapes, (B, D, H, W, C))."""
  op: str  # 'conv' or 'pool'
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  kernel_depth: int
  stride_depth: int
  pad_depth: tuple[int, int]
  input_id: int  # layers reading the same activation share it
  reads_model_input: bool  # the crops themselves: no gradient flows back
  kernel_axes: tuple[Any, ...] = ()  # logical names of a conv kernel's dimensions
  name: str = ''  # the kernel's path in the model ('blocks/2/conv1'), or 'max-pool'
  producer: int = -1  # the latest earlier layer whose output reaches this input (-1: the crops)
  kernel_itemsize: int = 4  # bytes per element of the kernel parameter (its gradient's dtype)
  stage: str = ''  # the model stage it belongs to (its kernel's 'stage' metadata)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the scheme's cost and the bound are computed from: layers, norms, parameters."""
  layers: list[Layer]
  norm_stats: list[tuple[int, int]]  # (C, depth) of every batch-norm statistic (2 per layer)
  pooled: list[tuple[int, int, int]]  # (B, C, depth) of every global average pool
  params: list[tuple[tuple[int, ...], int, tuple[Any, ...]]]  # (shape, itemsize, logical axes)
  conv_param_depths: dict[int, int]  # param index -> output depth of the conv that uses it
  activation_itemsize: int = 4  # bytes per element of the convolutions' inputs
  param_stages: tuple[str, ...] = ()  # the model stage of each of `params` ('' if none)
  norm_stages: tuple[str, ...] = ()  # the model stage of each of `norm_stats`


# Primitives that pass a value through unchanged in what it is (a parameter stays that parameter,
# the crops stay the crops): dtype casts, copies, sharding annotations.
_SAME_VALUE = ('convert_element_type', 'sharding_constraint', 'copy', 'copy_p')


def _inner_jaxprs(eqn) -> list[Any]:
  """The jaxprs an equation calls (jit, remat, custom_vjp / custom_jvp, shard_map ...)."""
  found = []
  for value in eqn.params.values():
    if hasattr(value, 'eqns'):
      found.append(value)
    elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
      found.append(value.jaxpr)
  return found


def trace_plan(model: nnx.Module, input_shape: tuple[int, ...]) -> Plan:
  """Layers and parameters of `model`'s forward pass (training mode) on inputs of `input_shape`
  ((B, D, H, W, 1) crops or patches). `model` may be abstract (nnx.eval_shape): only shapes are
  traced. The caller builds the model, so this package imports none. Nested jaxprs (jit,
  remat, custom_vjp, custom_jvp) are followed, so a layer inside any of them is read as the
  compiled program runs it; a parameter cast to the compute dtype is still that parameter."""
  graphdef, state = nnx.split(model)

  def forward(state, crops):
    model = nnx.merge(graphdef, state)
    model.train()
    return model(crops)

  is_variable = lambda x: isinstance(x, nnx.Variable)
  variables = jax.tree.leaves(state, is_leaf=is_variable)
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]]
  crops = jax.ShapeDtypeStruct(tuple(input_shape), np.float32)
  closed = jax.make_jaxpr(forward)(state, crops)
  jaxpr = closed.jaxpr
  # What each value is, as far as the plan cares: ('param', index), ('input',), or the index of
  # the latest layer whose output it derives from (through casts, norms, adds...).
  param_of = {v: i for i, v in enumerate(jaxpr.invars[:len(variables)])}
  model_input = jaxpr.invars[len(variables)]
  derived_from_input = {model_input}
  latest: dict[Any, int] = {}  # value -> index of the latest layer reaching it
  ids: dict[Any, int] = {}
  layers, norm_stats, pooled, conv_depths = [], [], [], {}
  activation_itemsizes, norm_next = [], []  # norm_next: the layer after each norm statistic
  stage_of = lambda variable: variable.get_metadata().get(sharding_lib.STAGE_KEY) or ''

  def known(var):
    try:
      hash(var)
    except TypeError:  # Literals
      return False
    return not hasattr(var, 'val')

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      inputs = [v for v in eqn.invars if known(v)]
      reach = max((latest[v] for v in inputs if v in latest), default=None)
      for inner in _inner_jaxprs(eqn):
        for inner_var, outer_var in zip(inner.invars[-len(eqn.invars):] if eqn.invars else [],
                                        eqn.invars):
          if not known(outer_var):
            continue
          if outer_var in param_of:
            param_of[inner_var] = param_of[outer_var]
          if outer_var in derived_from_input:
            derived_from_input.add(inner_var)
          if outer_var in latest:
            latest[inner_var] = latest[outer_var]
        before = len(layers)
        walk(inner)
        if len(inner.outvars) == len(eqn.outvars):
          for inner_var, outer_var in zip(inner.outvars, eqn.outvars):
            if known(inner_var) and inner_var in latest:
              latest[outer_var] = latest[inner_var]
            elif reach is not None or len(layers) > before:
              latest[outer_var] = len(layers) - 1 if len(layers) > before else reach
      if _inner_jaxprs(eqn):
        continue
      if name in _SAME_VALUE and inputs:
        if inputs[0] in derived_from_input:
          derived_from_input.add(eqn.outvars[0])
        if inputs[0] in param_of:
          param_of[eqn.outvars[0]] = param_of[inputs[0]]
      if name == 'conv_general_dilated':
        lhs, rhs = eqn.invars
        (lo, hi), stride = eqn.params['padding'][0], eqn.params['window_strides'][0]
        param = param_of.get(rhs)
        axes, label, itemsize = (), 'conv', np.dtype(rhs.aval.dtype).itemsize
        stage = ''
        if param is not None:
          variable = variables[param]
          stage = stage_of(variable)
          axes = tuple(variable.get_metadata().get(sharding_lib.LOGICAL_AXES_KEY) or ())
          conv_depths[param] = eqn.outvars[0].aval.shape[1]
          label = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                           for k in paths[param][:-1])
          itemsize = np.dtype(variable.get_value().dtype).itemsize
        activation_itemsizes.append(np.dtype(lhs.aval.dtype).itemsize)
        layers.append(Layer('conv', lhs.aval.shape, eqn.outvars[0].aval.shape,
                            rhs.aval.shape[0], stride, (lo, hi), ids.setdefault(lhs, len(ids)),
                            lhs in derived_from_input, axes, label,
                            latest.get(lhs, -1), itemsize, stage))
        latest[eqn.outvars[0]] = len(layers) - 1
        continue
      if name == 'reduce_window_max':
        (lo, hi) = eqn.params['padding'][1]
        source = eqn.invars[0]
        producer = latest.get(source, -1)
        layers.append(Layer('pool', source.aval.shape, eqn.outvars[0].aval.shape,
                            eqn.params['window_dimensions'][1], eqn.params['window_strides'][1],
                            (lo, hi), ids.setdefault(source, len(ids)), False,
                            name='max-pool', producer=producer,
                            stage=layers[producer].stage if producer >= 0 else ''))
        latest[eqn.outvars[0]] = len(layers) - 1
        continue
      if name == 'reduce_sum' and len(eqn.invars[0].aval.shape) == 5:
        shape, axes = eqn.invars[0].aval.shape, tuple(eqn.params['axes'])
        if axes == (0, 1, 2, 3):
          norm_stats.append((shape[4], shape[1]))
          norm_next.append(len(layers))
        elif axes == (1, 2, 3):
          pooled.append((shape[0], shape[4], shape[1]))
      if reach is not None:
        for out in eqn.outvars:
          latest[out] = reach

  walk(jaxpr)
  params = [(tuple(v.get_value().shape), np.dtype(v.get_value().dtype).itemsize,
             tuple(v.get_metadata().get(sharding_lib.LOGICAL_AXES_KEY) or ()))
            for v in variables if isinstance(v, nnx.Param)]
  param_stages = tuple(stage_of(v) for v in variables if isinstance(v, nnx.Param))
  last_stage = param_stages[-1] if param_stages else ''  # the head's, for norms after the layers
  norm_stages = tuple(layers[i].stage if i < len(layers) else last_stage for i in norm_next)
  param_index = [i for i, v in enumerate(variables) if isinstance(v, nnx.Param)]
  depths = {param_index.index(i): d for i, d in conv_depths.items() if i in param_index}
  itemsize = activation_itemsizes[0] if activation_itemsizes else 4
  return Plan(layers, norm_stats, pooled, params, depths, itemsize, param_stages, norm_stages)


def _ring_all_reduce(nbytes: float, group: int) -> float:
  return 2 * (group - 1) / group * nbytes if group > 1 else 0.0


def _ring_gather(nbytes: float, group: int) -> float:
  return (group - 1) / group * nbytes if group > 1 else 0.0


def halo_planes(kernel: int, stride: int, pad_low: int) -> tuple[int, int, int, int]:
  """(forward left, forward right, backward left, backward right) planes of a depth-split layer.

  Forward: input planes from the neighbours; backward: output-gradient planes (module doc).
  """
  return (max(pad_low, 0), max(kernel - stride - pad_low, 0),
          max((kernel - 1 - pad_low) // stride, 0), max((pad_low + stride - 1) // stride, 0))


def scheme_bytes(plan: Plan, mesh_shape: dict[str, int], rules: Any,
                 activation_itemsize: int | None = None) -> dict[str, Any]:
  """Ring bytes per device of one training step under jaxmed's scheme (module docstring).

  mesh_shape: {'data', 'fsdp', 'model', 'spatial'} sizes. rules: the logical rules (they say
  which parameter dimensions are sharded over which axes). Returns {'by_kind': {kind: bytes},
  'by_axis': {'data', 'fsdp', 'tensor', 'spatial': bytes}, 'total': bytes,
  'replicated_layers': [(layer index, depth), ...] (layers that do not split over spatial)}.
  """
  activation_itemsize = activation_itemsize or plan.activation_itemsize
  n_d, n_f, n_m, n_s = (mesh_shape.get(a, 1) for a in ('data', 'fsdp', 'model', 'spatial'))
  mesh = jax.sharding.AbstractMesh((n_d, n_f, n_m, n_s), ('data', 'fsdp', 'model', 'spatial'))
  by_kind = dict.fromkeys(KINDS, 0.0)
  by_axis = dict.fromkeys(('data', 'fsdp', 'tensor', 'spatial'), 0.0)

  def add(kind, axis, nbytes):
    by_kind[kind] += nbytes
    by_axis[axis] += nbytes

  def split(depth):  # batch-norm statistics and pools: their depth divides
    return n_s > 1 and depth % n_s == 0

  def placement(stage):
    """(rules, batch devices, channel axes, channel devices) inside `stage`: a stage may
    have the model axis split its batch instead of its channels (parallel/stages.py)."""
    stage_rules = sharding_lib.stage_rules(rules, stage)
    size = lambda axes: math.prod(mesh_shape.get(a, 1) for a in axes)
    batch = tuple(a for a in sharding_lib.mesh_axes_for('batch', mesh, stage_rules)
                  if a != 'spatial')
    channels = sharding_lib.mesh_axes_for('channels', mesh, stage_rules)
    return stage_rules, size(batch), channels, size(channels)

  # ---- gradients and fsdp weights
  param_stages = plan.param_stages or ('',) * len(plan.params)
  for index, ((shape, itemsize, axes), stage) in enumerate(zip(plan.params, param_stages)):
    stage_rules, n_b, _, _ = placement(stage)
    spec = sharding_lib.logical_to_spec(axes, mesh, stage_rules, shape) if axes else ()
    used = [a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
    per_device = math.prod(shape) * itemsize / math.prod(mesh_shape.get(a, 1) for a in used)
    depth = plan.conv_param_depths.get(index)
    group = n_b * (n_s if depth is not None and split(depth) else 1)
    if 'fsdp' in used:
      full = per_device * n_f  # Gathered over fsdp, still sharded over the other axes.
      add('all-gather', 'fsdp', _ring_gather(full, n_f))
      add('reduce-scatter', 'fsdp', _ring_gather(full, n_f))
      add('all-reduce', 'data', _ring_all_reduce(per_device, group // n_f))
    else:
      add('all-reduce', 'data', _ring_all_reduce(per_device, group))

  # ---- batch-norm statistics (forward and backward) and global pools
  norm_stages = plan.norm_stages or ('',) * len(plan.norm_stats)
  for (channels, depth), stage in zip(plan.norm_stats, norm_stages):
    _, n_b, _, n_c = placement(stage)
    local = channels // n_c if channels % n_c == 0 else channels
    group = n_b * (n_s if split(depth) else 1)
    add('all-reduce', 'data', 2 * _ring_all_reduce(4 * local, group))
  for batch, channels, depth in plan.pooled:
    _, n_b, _, n_c = placement(param_stages[-1] if param_stages else '')
    local = channels // n_c if channels % n_c == 0 else channels
    if split(depth):  # Partial sums over each device's depth slab.
      add('all-reduce', 'spatial', _ring_all_reduce(4 * local * batch // n_b, n_s))

  # ---- per-layer activations: tensor and spatial
  replicated, gathered, resharded = [], set(), set()
  for index, layer in enumerate(plan.layers):
    stage_rules, n_b, channel_axes, n_m = placement(layer.stage)
    before = plan.layers[layer.producer].stage if layer.producer >= 0 else None
    b, d, h, w, c_in = layer.input_shape
    _, d_out, h_out, w_out, c_out = layer.output_shape
    local_batch = b // n_b
    is_split = spatial.splits(d, layer.kernel_depth, layer.stride_depth, n_s)
    depth_local, out_depth_local = (d // n_s, d_out // n_s) if is_split else (d, d_out)
    in_sharded = c_in % n_m == 0 and c_in > 1
    c_in_local = c_in // n_m if n_m > 1 and in_sharded else c_in
    c_out_local = c_out // n_m if n_m > 1 and c_out % n_m == 0 else c_out
    input_bytes = local_batch * depth_local * h * w * c_in * activation_itemsize
    output_bytes = local_batch * out_depth_local * h_out * w_out * c_out * activation_itemsize
    if (before is not None and placement(before)[2] != channel_axes and not channel_axes
        and layer.input_id not in resharded):
      # From channel shards onto batch shards (a stage whose model axis splits the batch):
      # one all-to-all of the input forward, one of its gradient backward.
      resharded.add(layer.input_id)
      g = placement(before)[3]
      add('all-to-all', 'tensor', 2 * _ring_gather(input_bytes, g))
    if n_m > 1 and layer.op == 'conv':
      spec = sharding_lib.logical_to_spec(layer.kernel_axes, mesh, stage_rules,
                                          (layer.kernel_depth,) * 3 + (c_in, c_out))
      kernel_in, kernel_out = ((tuple(spec) + (None,) * 5)[3:5])
      on_channels = lambda entry: bool(entry) and set(
          entry if isinstance(entry, tuple) else (entry,)) == set(channel_axes)
      kernel_in, kernel_out = on_channels(kernel_in), on_channels(kernel_out)
      if kernel_out and not kernel_in:  # column-parallel
        if layer.input_id not in gathered:
          gathered.add(layer.input_id)
          if in_sharded:
            add('all-gather', 'tensor', _ring_gather(input_bytes, n_m))
            if not layer.reads_model_input:
              add('reduce-scatter', 'tensor', _ring_gather(input_bytes, n_m))
          elif not layer.reads_model_input:  # A whole input: its gradient's partial sums.
            add('all-reduce', 'tensor', _ring_all_reduce(input_bytes, n_m))
      elif kernel_in and not kernel_out:  # row-parallel
        add('reduce-scatter', 'tensor', _ring_gather(output_bytes, n_m))
        add('all-gather', 'tensor', _ring_gather(output_bytes, n_m))
    if n_s > 1:
      plane_in = local_batch * h * w * c_in_local * activation_itemsize
      plane_out = local_batch * h_out * w_out * c_out_local * activation_itemsize
      if is_split:
        f_left, f_right, b_left, b_right = halo_planes(layer.kernel_depth, layer.stride_depth,
                                                       layer.pad_depth[0])
        add('collective-permute', 'spatial', (f_left + f_right) * plane_in)
        if not layer.reads_model_input:
          add('collective-permute', 'spatial', (b_left + b_right) * plane_out)
      else:
        replicated.append((index, d))
        if split(d) and ('spatial', layer.input_id) not in gathered:  # Its input was split.
          gathered.add(('spatial', layer.input_id))
          add('all-gather', 'spatial', _ring_gather(plane_in * d, n_s))
  return {'by_kind': by_kind, 'by_axis': by_axis, 'total': sum(by_kind.values()),
          'replicated_layers': replicated}


minimum_bytes = scheme_bytes  # The name it had when the scheme was taken for the minimum.


def spatial_summary(plan: Plan, mesh_shape: dict[str, int]) -> str | None:
  """One line: which layers split over the spatial axis and which run replicated, and why."""
  devices = mesh_shape.get('spatial', 1)
  if devices < 2:
    return None
  crop_size = plan.layers[0].input_shape[1]
  replicated = []
  for layer in plan.layers:
    depth, out = layer.input_shape[1], layer.output_shape[1]
    if not spatial.splits(depth, layer.kernel_depth, layer.stride_depth, devices):
      left, right = spatial.halo(depth, layer.kernel_depth, layer.stride_depth)
      why = (f'depth {depth} -> {out} does not divide by {devices}'
             if depth % devices or out % devices else
             f'halo {max(left, right)} planes > {depth // devices} per device')
      replicated.append(f'{layer.name} ({why})')
  split = len(plan.layers) - len(replicated)
  return (f'spatial parallelism over {devices} devices at {crop_size}^3: {split} of '
          f'{len(plan.layers)} conv/pool layers split along depth; replicated: '
          + ('none' if not replicated else ', '.join(replicated)))
