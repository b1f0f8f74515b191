"""The seed's 3D ResNet (pre-activation basic blocks), in Flax NNX.

Input crops (B, D, H, W, 1) float in [0, 1] -> logits (B,) float32.

  stem:   conv k^3 stride s (default 7^3 / 2) -> BN -> ReLU -> [max-pool 3^3 stride 2]
  stages: 4 stages of pre-activation basic blocks, filters width x (1, 2, 4, 8),
          stride 2 at the start of stages 2..4, 1x1x1 projection shortcut where shape changes
  head:   BN -> ReLU -> global average pool -> dense -> one logit

Parameters and activations carry logical axis names only (see jaxmed.parallel.sharding):
  activations (B, D, H, W, C): ('batch', 'depth', 'height', 'width', 'channels')
  the input of a column-parallel conv, all its channels: (..., 'conv_in')
  conv kernel (kd, kh, kw, cin, cout): ('kernel_spatial',) * 3 + ('conv_in', 'conv_out') for
    the stem, a block's first conv and its projection (column-parallel: output channels on
    'conv_out'), and ('kernel_spatial',) * 3 + ('conv_out', 'conv_in') for a block's second conv
    (row-parallel: it contracts over the channels the first one split, Megatron's pairing)
  batch-norm scale / bias / mean / var (C,): ('channels',)
  dense kernel (F, 1): ('features', None); dense bias (1,): (None,)
With 'channels' and 'conv_out' on the model axis, a block all-gathers its (pre-activated) input
before its first conv and reduce-scatters its second conv's output: one all-reduce's worth of
bytes per block and direction, batch norm on channel shards (jaxmed/parallel/communication.py).
BatchNorm statistics are float32 means over batch and space; under jit with a batch-sharded
input they are global-batch statistics (GSPMD inserts the all-reduce), so every mesh computes
the same numbers. `model.train()` / `model.eval()` switch between batch statistics and the
running averages.

space_to_depth ('none' | 'stem' | 'all', default 'none') rewrites strided convolutions into
the same function with the same parameters (see strided_conv): 'stem' the k^3 stride-s stem,
'all' also the 3^3 stride-2 block convolutions and the 1x1x1 stride-2 projections. It changes
how XLA computes, not what: outputs agree with 'none' to float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmed.errors import ConfigError
from jaxmed.parallel import spatial
from jaxmed.parallel.sharding import STAGE_KEY, constrain, in_stage, is_sharded
from jaxmed.parallel.spatial import same_padding

ACTIVATION_AXES = ('batch', 'depth', 'height', 'width', 'channels')
CONV_INPUT_AXES = ('batch', 'depth', 'height', 'width', 'conv_in')
ROW_OUTPUT_AXES = CONV_INPUT_AXES  # a row-parallel conv's output dim is named 'conv_in' too
CONV_KERNEL_AXES = ('kernel_spatial',) * 3 + ('conv_in', 'conv_out')  # column-parallel
ROW_CONV_KERNEL_AXES = ('kernel_spatial',) * 3 + ('conv_out', 'conv_in')  # row-parallel
CHANNEL_AXES = ('channels',)
_NDHWC = ('NDHWC', 'DHWIO', 'NDHWC')
STAGE_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_MULTIPLIERS = (1, 2, 4, 8)


def _logical(init, axes):
  # Logical names only; placement happens from state_shardings via jit(init, out_shardings),
  # so construction never needs a mesh (eager_sharding off) and works in plain tests.
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def conv3d(in_channels: int, out_channels: int, kernel: int, stride: int = 1, *,
           dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
           row_parallel: bool = False) -> nnx.Conv:
  """k^3 convolution, SAME padding, no bias (a batch norm or a residual sum follows).

  row_parallel names the kernel for the second conv of a Megatron pair (module docstring).
  """
  axes = ROW_CONV_KERNEL_AXES if row_parallel else CONV_KERNEL_AXES
  return nnx.Conv(
      in_channels, out_channels, (kernel,) * 3, (stride,) * 3, padding='SAME', use_bias=False,
      dtype=dtype, param_dtype=param_dtype,
      kernel_init=_logical(nnx.initializers.he_normal(), axes), rngs=rngs)


def batch_norm(channels: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm over (B, D, H, W) with float32 statistics; every variable named ('channels',)."""
  bn = nnx.BatchNorm(
      channels, use_running_average=False, momentum=0.99, epsilon=1e-5, dtype=dtype,
      param_dtype=param_dtype,
      scale_init=_logical(nnx.initializers.ones, CHANNEL_AXES),
      bias_init=_logical(nnx.initializers.zeros, CHANNEL_AXES), rngs=rngs)
  bn.mean.set_metadata(out_sharding=CHANNEL_AXES)
  bn.var.set_metadata(out_sharding=CHANNEL_AXES)
  return bn


# ---- space-to-depth: strided convolutions as stride-1 convolutions (same math) ----------------

SPACE_TO_DEPTH_MODES = ('none', 'stem', 'all')


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """(B, D, H, W, C) -> (B, D/b, H/b, W/b, b^3 C); channels ordered (r_d, r_h, r_w, c)."""
  b = block
  n, d, h, w, c = x.shape
  x = x.reshape(n, d // b, b, h // b, b, w // b, b, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(n, d // b, h // b, w // b, b**3 * c)


def space_to_depth_kernel(kernel: jax.Array, block: int) -> jax.Array:
  """(k, k, k, Cin, Cout) stride-b kernel -> (t, t, t, b^3 Cin, Cout), t = ceil(k / b).

  Tap k_i = b * u + r moves to spatial tap u, channel block r; taps past k are zero.
  """
  b = block
  k = kernel.shape[:3]
  t = [-(-ki // b) for ki in k]
  cin, cout = kernel.shape[3:]
  kernel = jnp.pad(kernel, [(0, ti * b - ki) for ti, ki in zip(t, k)] + [(0, 0), (0, 0)])
  kernel = kernel.reshape(t[0], b, t[1], b, t[2], b, cin, cout)
  kernel = kernel.transpose(0, 2, 4, 1, 3, 5, 6, 7)
  return kernel.reshape(t[0], t[1], t[2], b**3 * cin, cout)


def strided_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """conv(x) for a bias-free 'SAME' nnx.Conv of equal strides s > 1, without a strided conv.

  k = 1: subsample x[::s] then a 1x1x1 convolution. k > 1: pad as 'SAME' would (plus zeros up
  to a multiple of s), space-to-depth by s, then a stride-1 'VALID' convolution with the kernel
  rearranged by space_to_depth_kernel (zero taps where k is not a multiple of s). Every output
  is the same sum of the same products as conv(x), so results agree to float rounding; the
  parameters are conv's own. Why: a stem with one input channel becomes an s^3-channel
  convolution (tensor-core friendly), and on XLA:CPU the input gradient of a strided conv3d is
  ~100x slower than that of a stride-1 one (one 32->64 stride-2 layer at 32^3, batch 16: 8 s
  fwd+bwd, against 0.18 s as space-to-depth + 1x1x1 conv).
  """
  strides = tuple(conv.strides) if not isinstance(conv.strides, int) else (conv.strides,) * 3
  if conv.use_bias or len(set(strides)) != 1 or strides[0] == 1 or conv.padding != 'SAME':
    return conv(x)
  x, kernel = x.astype(conv.dtype or x.dtype), conv.kernel[...].astype(conv.dtype or x.dtype)
  return conv_same(x, kernel, strides[0], True, conv.precision)


def conv_same(x: jax.Array, kernel: jax.Array, stride: int, space_to_depth_strided: bool,
              precision=None, depth_padding: tuple[int, int] | None = None) -> jax.Array:
  """'SAME' conv of (B, D, H, W, Cin) x by a (k, k, k, Cin, Cout) kernel, equal strides.

  depth_padding: (low, high) planes along depth instead of 'SAME' (a depth-split slab that
  already holds its halo uses (0, 0)). With space_to_depth_strided and stride s > 1 it computes
  the same sums without a strided conv (see strided_conv).
  """
  s, k = stride, kernel.shape[:3]
  pads = [same_padding(size, ki, s) for size, ki in zip(x.shape[1:4], k)]
  if depth_padding is not None:
    pads[0] = tuple(depth_padding)
  if s == 1 or not space_to_depth_strided:
    return jax.lax.conv_general_dilated(x, kernel, (s,) * 3, pads, dimension_numbers=_NDHWC,
                                        precision=precision)
  outs = [(size + lo + hi - ki) // s + 1 for size, (lo, hi), ki in zip(x.shape[1:4], pads, k)]
  if all(ki == 1 for ki in k):
    x = jnp.pad(x, [(0, 0)] + [(lo, max(hi, 0)) for lo, hi in pads] + [(0, 0)])
    x = x[:, :s * outs[0]:s, :s * outs[1]:s, :s * outs[2]:s]
  else:
    taps = [-(-ki // s) for ki in k]
    # Zeros up to a multiple of s past the end: only zero taps of the rearranged kernel read them.
    ends = [s * (out + t - 1) - size - lo for size, out, t, (lo, _) in zip(x.shape[1:4], outs,
                                                                         taps, pads)]
    x = space_to_depth(jnp.pad(x, [(0, 0)] + [(lo, end) for (lo, _), end in zip(pads, ends)]
                               + [(0, 0)]), s)
    kernel = space_to_depth_kernel(kernel, s)
  return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'VALID', dimension_numbers=_NDHWC,
                                      precision=precision)


def apply_conv(conv: nnx.Conv, x: jax.Array, space_to_depth_strided: bool) -> jax.Array:
  """conv(x) for jaxmed's bias-free 'SAME' convs, split along depth where the mesh says so
  (jaxmed/parallel/spatial.py), through space-to-depth when asked and the conv is strided."""
  stride = conv.strides[0] if not isinstance(conv.strides, int) else conv.strides
  dtype = conv.dtype or x.dtype

  def op(x, kernel, depth_padding):
    return conv_same(x, kernel, stride, space_to_depth_strided, conv.precision, depth_padding)

  return spatial.depth_parallel(op, x.astype(dtype), conv.kernel[...].astype(dtype),
                                kernel=conv.kernel_size[0], stride=stride)


def max_pool_same(x: jax.Array, window: int, stride: int) -> jax.Array:
  """'SAME' max-pool of (B, D, H, W, C), split along depth where the mesh says so."""

  def op(x, _, depth_padding):
    pads = [same_padding(size, window, stride) for size in x.shape[1:4]]
    if depth_padding is not None:
      pads[0] = tuple(depth_padding)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + (window,) * 3 + (1,),
                                 (1,) + (stride,) * 3 + (1,), [(0, 0)] + pads + [(0, 0)])

  return spatial.depth_parallel(op, x, (), kernel=window, stride=stride, pad_value=-jnp.inf)


# ---- a downsampling block's conv1 and projection: one gathered input, one gradient ------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def shared_input_convs(y: jax.Array, kernel: jax.Array, projection: jax.Array, stride: int,
                       space_to_depth_strided: bool) -> tuple[jax.Array, jax.Array]:
  """(conv_same(y, kernel), conv_same(y, projection)): a k^3 and a 1^3 conv of the same input.

  The same values as two convs. The difference is the backward pass: the two input gradients
  come out of ONE transposed conv (the 1^3 kernel embedded in the k^3 one at the tap 'SAME'
  aligns it with, the output channels of both interleaved), so under tensor parallelism their
  sum is reduce-scattered once, where XLA would all-reduce each partial sum on its own.
  """
  return (conv_same(y, kernel, stride, space_to_depth_strided),
          conv_same(y, projection, stride, space_to_depth_strided))


def _shared_input_convs_fwd(y, kernel, projection, stride, space_to_depth_strided):
  outputs = shared_input_convs(y, kernel, projection, stride, space_to_depth_strided)
  return outputs, (y, kernel, projection)


def _shared_input_convs_bwd(stride, space_to_depth_strided, residuals, cotangents):
  y, kernel, projection = residuals
  ct_main, ct_projection = cotangents
  conv = lambda x, k: conv_same(x, k, stride, space_to_depth_strided)
  d_kernel = jax.vjp(lambda k: conv(y, k), kernel)[1](ct_main)[0]
  d_projection = jax.vjp(lambda k: conv(y, k), projection)[1](ct_projection)[0]
  taps = tuple(same_padding(size, k, stride)[0] for size, k in zip(y.shape[1:4], kernel.shape))
  embedded = jnp.zeros_like(kernel).at[taps].set(projection[0, 0, 0])
  # (Cout, 2) -> 2 Cout keeps each device's output-channel shard contiguous: no resharding.
  combined = jnp.stack([kernel, embedded], -1).reshape(kernel.shape[:4] + (-1,))
  cts = jnp.stack([ct_main, ct_projection], -1).reshape(ct_main.shape[:4] + (-1,))
  d_y = jax.vjp(lambda x: conv(x, combined), y)[1](cts)[0]
  return d_y, d_kernel, d_projection


shared_input_convs.defvjp(_shared_input_convs_fwd, _shared_input_convs_bwd)


class ClassifierHead(nnx.Module):
  """BN -> ReLU -> global average pool -> dense -> one float32 logit per example."""

  def __init__(self, channels: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.norm = batch_norm(channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dense = nnx.Linear(
        channels, 1, dtype=jnp.float32, param_dtype=param_dtype,
        kernel_init=_logical(nnx.initializers.lecun_normal(), ('features', None)),
        bias_init=_logical(nnx.initializers.zeros, (None,)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.norm(x))
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))  # (B, C)
    return self.dense(features)[:, 0]


class PreActBasicBlock(nnx.Module):
  """BN-ReLU-conv3(stride)-BN-ReLU-conv3 + shortcut (1x1x1 projection when the shape changes).

  preactivate=False for the block right after the stem (its BN-ReLU already ran).
  space_to_depth=True computes the strided conv1 / projection through strided_conv (same math).
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int, *, preactivate: bool,
               dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
               space_to_depth: bool = False):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.preactivate = preactivate
    self.space_to_depth = space_to_depth
    self.norm1 = batch_norm(in_channels, **kw) if preactivate else None
    self.conv1 = conv3d(in_channels, out_channels, 3, stride, **kw)
    self.norm2 = batch_norm(out_channels, **kw)
    self.conv2 = conv3d(out_channels, out_channels, 3, 1, row_parallel=True, **kw)
    needs_projection = stride != 1 or in_channels != out_channels
    self.projection = conv3d(in_channels, out_channels, 1, stride, **kw) if needs_projection \
        else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.norm1(x)) if self.preactivate else x
    # Column-parallel convs read all input channels: gather them here, once for conv1 and the
    # projection, and before any padding or space-to-depth makes the tensor larger.
    y = constrain(y, CONV_INPUT_AXES)
    if self.projection is not None and is_sharded('conv_out'):
      dtype = self.conv1.dtype or y.dtype
      h, shortcut = shared_input_convs(
          y.astype(dtype), self.conv1.kernel[...].astype(dtype),
          self.projection.kernel[...].astype(dtype), self.conv1.strides[0], self.space_to_depth)
    else:
      shortcut = (apply_conv(self.projection, y, self.space_to_depth)
                  if self.projection is not None else x)
      h = apply_conv(self.conv1, y, self.space_to_depth)
    h = constrain(h, ACTIVATION_AXES)
    # Row-parallel: partial sums over the channel shards, reduce-scattered back onto channels;
    # backward, the output gradient is gathered once, for the input and the kernel gradient.
    out = constrain(apply_conv(self.conv2, nnx.relu(self.norm2(h)), False), ACTIVATION_AXES,
                    ROW_OUTPUT_AXES)
    return constrain(out + shortcut, ACTIVATION_AXES)


def check_settings(depth: int, space_to_depth: str) -> None:
  """One-line ConfigErrors for a ResNet depth or space_to_depth mode jaxmed does not build."""
  if depth not in STAGE_BLOCKS:
    raise ConfigError(
        f'ResNet depth {depth} is not supported; set --config.model.depth to one of '
        f'{sorted(STAGE_BLOCKS)}')
  if space_to_depth not in SPACE_TO_DEPTH_MODES:
    raise ConfigError(
        f'space_to_depth={space_to_depth!r} is not a mode; set --config.model.space_to_depth '
        f'to one of {", ".join(SPACE_TO_DEPTH_MODES)}')


class ResNet3D(nnx.Module):
  """Pre-activation 3D ResNet-10/18/34: (B, D, H, W, 1) in [0, 1] -> logits (B,) float32."""

  def __init__(self, *, depth: int = 18, width: int = 64, stem_kernel: int = 7,
               stem_stride: int = 2, stem_pool: bool = True, in_channels: int = 1,
               dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
               space_to_depth: str = 'none', rngs: nnx.Rngs):
    check_settings(depth, space_to_depth)
    self.stem_space_to_depth = space_to_depth != 'none'
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.stem_pool = stem_pool
    self.stem_conv = conv3d(in_channels, width, stem_kernel, stem_stride, **kw)
    self.stem_norm = batch_norm(width, **kw)
    blocks = [PreActBasicBlock(cin, cout, stride, preactivate=preactivate,
                               space_to_depth=space_to_depth == 'all', **kw)
              for cin, cout, stride, preactivate in block_plan(depth, width)]
    channels = width * STAGE_MULTIPLIERS[-1]
    self.blocks = nnx.List(blocks)
    self.head = ClassifierHead(channels, **kw)
    # Stage names (stem, stage1..4, head) on every variable: the config may place each stage
    # differently (jaxmed/parallel/stages.py).
    self.block_stages = tuple(f'stage{stage + 1}' for stage, count in
                              enumerate(STAGE_BLOCKS[depth]) for _ in range(count))
    for module, stage in [(self.stem_conv, 'stem'), (self.stem_norm, 'stem'),
                          (self.head, 'head'), *zip(blocks, self.block_stages)]:
      tag_stage(module, stage)

  def __call__(self, crops: jax.Array) -> jax.Array:
    with in_stage('stem'):
      x = constrain(crops.astype(self.dtype), ACTIVATION_AXES)
      x = nnx.relu(self.stem_norm(apply_conv(self.stem_conv, x, self.stem_space_to_depth)))
      if self.stem_pool:
        x = max_pool_same(x, 3, 2)
      x = constrain(x, ACTIVATION_AXES)
    for block, stage in zip(self.blocks, self.block_stages):
      with in_stage(stage):
        x = block(x)
    with in_stage('head'):
      return self.head(constrain(x, ACTIVATION_AXES))


def tag_stage(module: nnx.Module, stage: str) -> None:
  """Names `stage` in the metadata of every variable of `module`."""
  for _, value in nnx.iter_graph(module):
    if isinstance(value, nnx.Variable):
      value.set_metadata(**{STAGE_KEY: stage})


def block_plan(depth: int, width: int) -> list[tuple[int, int, int, bool]]:
  """(in channels, out channels, stride, pre-activate) of every basic block, in order.

  Stages 2-4 start with a stride-2 block; the very first block skips its pre-activation because
  the stem already ran BN-ReLU. Shared with the PyTorch twin so both build the same network.
  """
  plan, channels = [], width
  for stage, (num_blocks, multiplier) in enumerate(zip(STAGE_BLOCKS[depth], STAGE_MULTIPLIERS)):
    for index in range(num_blocks):
      out_channels = width * multiplier
      plan.append((channels, out_channels, 2 if stage > 0 and index == 0 else 1,
                   bool(stage or index)))
      channels = out_channels
  return plan
