"""PyTorch twin of jaxmed.models.resnet3d.ResNet3D, for the framework comparison (benchmark).

The same layers in the same order, with the same names: stem conv k^3 stride s -> BN -> ReLU ->
[max-pool 3^3 stride 2]; pre-activation basic blocks (BN-ReLU-conv3(stride)-BN-ReLU-conv3 +
shortcut, 1x1x1 projection where the shape changes, no BN-ReLU before the first block); head
BN -> ReLU -> global average pool (float32) -> dense -> one float32 logit.

Layout is PyTorch's (B, C, D, H, W); padding is XLA's 'SAME' (asymmetric, one more voxel at the
high end, for even sizes with stride 2; resnet3d.same_padding), so outputs match the Flax model
given the same weights (load_flax_state). BatchNorm: momentum 0.01 here == 0.99 in Flax, eps
1e-5; in training mode both normalise with the biased batch variance (torch's running variance
uses the unbiased one, a difference that only shows in the running statistics).

Needs torch, which jaxmed does not require: import this module only where torch is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxmed.models.resnet3d import STAGE_MULTIPLIERS, block_plan, same_padding


class SameConv3d(nn.Conv3d):
  """Bias-free k^3 conv with XLA 'SAME' padding: symmetric padding folded into the conv, the
  asymmetric remainder (even sizes with stride 2) padded explicitly."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
    super().__init__(in_channels, out_channels, kernel, stride, padding=0, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    k, s = self.kernel_size[0], self.stride[0]
    pads = [same_padding(size, k, s) for size in x.shape[2:]]
    if all(lo == hi for lo, hi in pads):
      return F.conv3d(x, self.weight, None, s, tuple(lo for lo, _ in pads))
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]  # F.pad: last dim first.
    return F.conv3d(F.pad(x, flat), self.weight, None, s, 0)


def same_max_pool3d(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
  """nnx.max_pool(x, k^3, stride, 'SAME'): padding never wins the max."""
  pads = [same_padding(size, kernel, stride) for size in x.shape[2:]]
  flat = [p for lo_hi in reversed(pads) for p in lo_hi]
  if any(flat):
    x = F.pad(x, flat, value=float('-inf'))
  return F.max_pool3d(x, kernel, stride)


def batch_norm(channels: int) -> nn.BatchNorm3d:
  return nn.BatchNorm3d(channels, eps=1e-5, momentum=0.01)


class ClassifierHead(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.norm = batch_norm(channels)
    self.dense = nn.Linear(channels, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.norm(x))
    features = x.float().mean(dim=(2, 3, 4))  # (B, C)
    with torch.autocast(device_type=features.device.type, enabled=False):
      return self.dense(features)[:, 0]


class PreActBasicBlock(nn.Module):

  def __init__(self, in_channels: int, out_channels: int, stride: int, preactivate: bool):
    super().__init__()
    self.preactivate = preactivate
    self.norm1 = batch_norm(in_channels) if preactivate else None
    self.conv1 = SameConv3d(in_channels, out_channels, 3, stride)
    self.norm2 = batch_norm(out_channels)
    self.conv2 = SameConv3d(out_channels, out_channels, 3, 1)
    needs_projection = stride != 1 or in_channels != out_channels
    self.projection = SameConv3d(in_channels, out_channels, 1, stride) if needs_projection \
        else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.norm1(x)) if self.preactivate else x
    shortcut = self.projection(y) if self.projection is not None else x
    y = self.conv1(y)
    y = self.conv2(F.relu(self.norm2(y)))
    return y + shortcut


class ResNet3D(nn.Module):
  """(B, 1, D, H, W) float in [0, 1] -> logits (B,) float32; mirrors the Flax ResNet3D."""

  def __init__(self, *, depth: int = 18, width: int = 64, stem_kernel: int = 7,
               stem_stride: int = 2, stem_pool: bool = True, in_channels: int = 1):
    super().__init__()
    self.stem_pool = stem_pool
    self.stem_conv = SameConv3d(in_channels, width, stem_kernel, stem_stride)
    self.stem_norm = batch_norm(width)
    blocks = [PreActBasicBlock(cin, cout, stride, preactivate=preactivate)
              for cin, cout, stride, preactivate in block_plan(depth, width)]
    channels = width * STAGE_MULTIPLIERS[-1]
    self.blocks = nn.ModuleList(blocks)
    self.head = ClassifierHead(channels)

  def forward(self, crops: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.stem_norm(self.stem_conv(crops)))
    if self.stem_pool:
      x = same_max_pool3d(x, 3, 2)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def from_model_config(model_config: Any) -> ResNet3D:
  """The twin of create_model(config.model) for name 'resnet3d' (space_to_depth is irrelevant:
  it does not change the function)."""
  if model_config['name'] != 'resnet3d':
    raise ValueError(f'no PyTorch twin for model {model_config["name"]!r}; the comparison '
                     'needs --config.model.name=resnet3d')
  return ResNet3D(depth=model_config['depth'], width=model_config['width'],
                  stem_kernel=model_config['stem_kernel'],
                  stem_stride=model_config['stem_stride'], stem_pool=model_config['stem_pool'])


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def torch_state_from_flax(flax_model_state: Mapping) -> dict[str, torch.Tensor]:
  """A torch state_dict for ResNet3D from the Flax model's pure dict (nnx.state(model)
  .to_pure_dict()): conv kernels (kd, kh, kw, Cin, Cout) -> (Cout, Cin, kd, kh, kw), BN scale /
  bias / mean / var -> weight / bias / running_mean / running_var, dense (F, 1) -> (1, F)."""
  renames = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
  state = {}
  for name, value in _flatten(flax_model_state).items():
    value = np.asarray(value, np.float32)
    module, leaf = name.rsplit('.', 1)
    if leaf == 'kernel' and value.ndim == 5:
      state[f'{module}.weight'] = torch.from_numpy(value.transpose(4, 3, 0, 1, 2).copy())
    elif leaf == 'kernel':
      state[f'{module}.weight'] = torch.from_numpy(value.T.copy())
    else:
      state[f'{module}.{renames[leaf]}'] = torch.from_numpy(value.copy())
  return state


def load_flax_state(model: ResNet3D, flax_model_state: Mapping) -> ResNet3D:
  """Copies the Flax model's parameters and BN statistics into `model` (strict: every tensor)."""
  state = torch_state_from_flax(flax_model_state)
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(f'Flax and PyTorch ResNet3D differ: missing {missing}, unexpected '
                     f'{unexpected}')
  return model
