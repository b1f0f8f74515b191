"""A lower bound on the bytes of one training step: the fewest ring bytes per device over the
ways the mesh's axes could serve each layer, whatever jaxmed itself chooses.

communication.scheme_bytes prices the scheme jaxmed runs (batch over data and fsdp, Megatron
pairs over model, depth over spatial). This module asks what ANY program could do under a
stated model of ways. The mesh is seen as up to three axes: the batch axes (data x fsdp, one
axis of their product size; fsdp's gather + reduce-scatter costs what an all-reduce does), model
and spatial. Each axis of size g serves each convolution or max-pool in one of these ways
(layout of the layer's input -> layout of its output, on that axis):

  batch       B -> B  examples split; the kernel gradient is summed over the axis
  depth       D -> D  depth split (where spatial.splits allows); halo planes forward (input)
                      and backward (output gradient), as communication.halo_planes counts them;
                      the kernel gradient is summed over the axis
  column      R -> C  output channels split; needs the whole input; its input gradient comes
                      out as partial sums: reduced backward
  row         C -> P  input channels split; the output is a partial sum (P) to be reduced
  channels    C -> C  a max-pool on channel shards (pools only)
  replicated  R -> R  every device computes the whole layer; admitted only where the layer's
                      channels do not divide over the axis (elsewhere replicating would undo
                      the axis's division of work: without this rule the bound would
                      replicate the late stages, whose kernels are large and activations
                      small, and count no gradient for them)

Between a layer and the next one that reads its output, each axis reshards (ring bytes of a
tensor of A bytes per device of the other axes):
  split -> another split: all-to-all, (g-1)/g^2 A each way
  split -> R: all-gather forward (g-1)/g A; backward free (the consumer's gradient is whole) or,
              for a column consumer, a reduce-scatter (g-1)/g A of its partial sums
  R -> split: free forward; backward the producer needs its whole gradient: all-gather
  P -> split: reduce-scatter forward, all-gather backward; P -> R: all-reduce forward
              (and a column consumer all-reduces its partial input gradient backward)
A kernel's gradient is all-reduced over the axes that split its batch or depth, in the
parameter's dtype: 2 (G-1)/G of its bytes per device (divided by the axes that split its
channels). Activations move in the compute dtype.

The bound is the minimum over every assignment of ways (a dynamic programme along the chain of
layers, each layer's state the joint layout of its output). It is a relaxation, so it stays
below any program of these ways: resharding is charged only where a layer reads the previous
layer of the chain (the residual sum's other operand, and a projection shortcut that reads the
same activation as the block's first convolution, move free); batch-norm statistics, the
global pool and the dense head (a few KB) and the gradients of batch-norm scales and the dense
layer (under 0.1% of the seed's parameters) are not counted; partial sums left by the last
layer are reduced (the head needs whole values).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from jaxmed.parallel import spatial
from jaxmed.parallel.communication import Layer, Plan, halo_planes

SPLIT = frozenset('BDC')
WAYS = {'batch': ('B', 'B'), 'depth': ('D', 'D'), 'column': ('R', 'C'), 'row': ('C', 'P'),
        'channels': ('C', 'C'), 'replicated': ('R', 'R')}
CONV_WAYS = ('batch', 'depth', 'column', 'row', 'replicated')
POOL_WAYS = ('batch', 'depth', 'channels', 'replicated')


def bound_axes(mesh_shape: dict[str, int]) -> list[tuple[str, int]]:
  """[(name, size)] of the axes the bound assigns ways to: batch (data x fsdp), model,
  spatial; axes of size 1 left out."""
  batch = mesh_shape.get('data', 1) * mesh_shape.get('fsdp', 1)
  axes = [('batch', batch), ('model', mesh_shape.get('model', 1)),
          ('spatial', mesh_shape.get('spatial', 1))]
  return [(name, size) for name, size in axes if size > 1]


def _splits_depth(layer: Layer, devices: int) -> bool:
  return spatial.splits(layer.input_shape[1], layer.kernel_depth, layer.stride_depth, devices)


def _admissible(layer: Layer, ways: tuple[str, ...], sizes: tuple[int, ...]) -> bool:
  """Whether the joint ways (one per axis) can serve `layer` (module docstring)."""
  batch, _, _, _, c_in = layer.input_shape
  c_out = layer.output_shape[4]
  product = lambda name: math.prod(g for w, g in zip(ways, sizes) if w == name)
  if batch % product('batch') or ways.count('depth') > 1:
    return False
  if c_out % product('column') or c_out % product('channels'):
    return False
  if 'row' in ways and (c_in == 1 or c_in % product('row')):
    return False
  for way, g in zip(ways, sizes):
    if way == 'depth' and not _splits_depth(layer, g):
      return False
    if way == 'replicated':
      channels_split = c_out % g == 0 or (c_in > 1 and c_in % g == 0)
      if channels_split:
        return False
  return True


def _divisor(layouts: tuple[str, ...], sizes: tuple[int, ...], skip: int,
             other: tuple[str, ...] | None = None) -> int:
  """Product of the sizes of the axes (but `skip`) that split a tensor in `layouts` (or in
  `other`: a reshard can run where either side is split)."""
  total = 1
  for a, (layout, g) in enumerate(zip(layouts, sizes)):
    if a != skip and (layout in SPLIT or (other is not None and other[a] in SPLIT)):
      total *= g
  return total


def _layer_cost(layer: Layer, ways: tuple[str, ...], sizes: tuple[int, ...],
                itemsize: int) -> float:
  """Bytes inside the layer: the kernel gradient's all-reduce and depth halos."""
  cost = 0.0
  inputs = tuple(WAYS[w][0] for w in ways)
  outputs = tuple(WAYS[w][1] for w in ways)
  if layer.op == 'conv':
    kd, c_in, c_out = layer.kernel_depth, layer.input_shape[4], layer.output_shape[4]
    kernel = kd ** 3 * c_in * c_out * layer.kernel_itemsize
    kernel /= math.prod(g for w, g in zip(ways, sizes) if w in ('column', 'row'))
    group = math.prod(g for w, g in zip(ways, sizes) if w in ('batch', 'depth'))
    cost += 2 * (group - 1) / group * kernel
  for a, (way, g) in enumerate(zip(ways, sizes)):
    if way != 'depth':
      continue
    f_left, f_right, b_left, b_right = halo_planes(layer.kernel_depth, layer.stride_depth,
                                                   layer.pad_depth[0])
    plane_in = (math.prod(layer.input_shape) // layer.input_shape[1] * itemsize
                / _divisor(inputs, sizes, a))
    plane_out = (math.prod(layer.output_shape) // layer.output_shape[1] * itemsize
                 / _divisor(outputs, sizes, a))
    cost += (f_left + f_right) * plane_in
    if not layer.reads_model_input:
      cost += (b_left + b_right) * plane_out
  return cost


def _reshard_cost(before: tuple[str, ...], ways: tuple[str, ...], sizes: tuple[int, ...],
                  nbytes: float, no_gradient: bool) -> float:
  """Bytes to bring a tensor of `nbytes` (global) from layouts `before` to the input layouts
  of `ways`, forward and (unless no_gradient) backward (module docstring)."""
  after = tuple(WAYS[w][0] for w in ways)
  cost = 0.0
  for a, (x, y, way, g) in enumerate(zip(before, after, ways, sizes)):
    size = nbytes / _divisor(before, sizes, a, after)
    gather, swap = (g - 1) / g * size, (g - 1) / g ** 2 * size
    if x == y:
      forward = 0.0
    elif x in SPLIT:
      forward = swap if y in SPLIT else gather
    elif x == 'R':
      forward = 0.0
    else:  # P: reduce-scatter onto a split, all-reduce onto R.
      forward = gather if y in SPLIT else 2 * gather
    backward = 0.0
    if not no_gradient:
      if way == 'column':  # Its input gradient is a partial sum over the axis.
        backward = gather if x in SPLIT else 2 * gather
      elif y in SPLIT:
        backward = 0.0 if x == y else swap if x in SPLIT else gather
    cost += forward + backward
  return cost


def side_layers(plan: Plan) -> set[int]:
  """Layers off the chain: they read an activation another layer also reads, and no later
  layer reads their output first (a projection shortcut beside a block's first conv)."""
  producers = {layer.producer for layer in plan.layers}
  readers: dict[int, list[int]] = {}
  for index, layer in enumerate(plan.layers):
    readers.setdefault(layer.input_id, []).append(index)
  return {i for group in readers.values() if len(group) > 1 for i in group
          if i not in producers}


def lower_bound(plan: Plan, mesh_shape: dict[str, int],
                activation_itemsize: int | None = None) -> dict[str, Any]:
  """The lower bound (module docstring) of ring bytes per device per step on `mesh_shape`
  ({'data', 'fsdp', 'model', 'spatial'} sizes). Returns {'total': bytes, 'axes': [axis names],
  'ways': [(layer name, (way per axis))...] along the chain (the assignment that reaches it)}.
  activation_itemsize: bytes per activation element (default: the plan's compute dtype).
  """
  itemsize = activation_itemsize or plan.activation_itemsize
  axes = bound_axes(mesh_shape)
  names, sizes = tuple(n for n, _ in axes), tuple(g for _, g in axes)
  if not axes:
    return {'total': 0.0, 'axes': [], 'ways': []}
  side = side_layers(plan)
  # The crops arrive split over the batch axes and whole on the others.
  start = tuple('B' if name == 'batch' else 'R' for name in names)
  states: dict[tuple[str, ...], tuple[float, list]] = {start: (0.0, [])}
  previous = -1
  for index, layer in enumerate(plan.layers):
    if index in side:
      continue
    options = CONV_WAYS if layer.op == 'conv' else POOL_WAYS
    nbytes = math.prod(layer.input_shape) * itemsize
    linked = layer.producer == previous
    cheapest = min(states.values(), key=lambda s: s[0])
    new_states: dict[tuple[str, ...], tuple[float, list]] = {}
    for ways in itertools.product(options, repeat=len(axes)):
      if not _admissible(layer, ways, sizes):
        continue
      inside = _layer_cost(layer, ways, sizes, itemsize)
      if linked:
        best = min(((cost + _reshard_cost(before, ways, sizes, nbytes,
                                          layer.reads_model_input), path)
                    for before, (cost, path) in states.items()), key=lambda s: s[0])
      else:  # Not reading the previous layer of the chain: its resharding is not charged.
        best = cheapest
      total = best[0] + inside
      out = tuple(WAYS[w][1] for w in ways)
      if out not in new_states or total < new_states[out][0]:
        new_states[out] = (total, best[1] + [(layer.name, ways)])
    states, previous = new_states, index
  # The head reads whole values: partial sums left by a last row-split layer are reduced.
  last = plan.layers[previous]
  out_bytes = math.prod(last.output_shape) * itemsize
  finished = {}
  for layouts, (cost, path) in states.items():
    for a, (layout, g) in enumerate(zip(layouts, sizes)):
      if layout == 'P':  # reduce-scatter forward, all-gather backward
        cost += 2 * (g - 1) / g * out_bytes / _divisor(layouts, sizes, a)
    finished[layouts] = (cost, path)
  total, path = min(finished.values(), key=lambda s: s[0])
  return {'total': total, 'axes': list(names), 'ways': path}
