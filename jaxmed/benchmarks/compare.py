"""--what=compare: the JAX train step beside its PyTorch eager twin's (models/resnet3d_torch.py),
same shapes, batch and optimiser, in the same process."""

from __future__ import annotations

import statistics
import time
from typing import Any

from jaxmed.benchmarks.step import benchmark_step
from jaxmed.benchmarks.step import describe_run


def torch_step_rate(config, steps: int = 10, warmup: int = 3, repeats: int = 3) -> dict[str, Any]:
  """Samples/s of the PyTorch twin's training step on the same shapes, batch and optimiser.

  Per step: centre window of the int16 stored crops + HU window on the device (the JAX step also
  draws a random rotation/flip/offset: one gather, a small share), forward, BCE, backward,
  global-norm clip, AdamW. CUDA: cudnn.benchmark, channels_last_3d, AMP bf16 autocast when
  config.model.dtype is bfloat16, fused AdamW. CPU: float32.
  """
  import torch
  import torch.nn.functional as F

  from jaxmed.models import resnet3d_torch
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  amp = cuda and config.model.dtype == 'bfloat16'
  torch.manual_seed(config.seed)
  if cuda:
    torch.backends.cudnn.benchmark = True
  model = resnet3d_torch.from_model_config(config.model).to(device)
  layout = torch.channels_last_3d if cuda else torch.contiguous_format
  model = model.to(memory_format=layout)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate,
                                weight_decay=config.train.weight_decay,
                                **({'fused': True} if cuda else {}))
  b, s, c = (config.train.global_batch_size, config.data.stored_crop_size,
             config.data.crop_size)
  crops = torch.randint(-1000, 400, (b, s, s, s), dtype=torch.int16, device=device)
  labels = (torch.arange(b, device=device) % 2).float()
  low, high = config.data.hu_window
  o = (s - c) // 2

  def step():
    x = crops[:, o:o + c, o:o + c, o:o + c].float().sub_(low).div_(high - low).clamp_(0, 1)
    x = x.unsqueeze(1).contiguous(memory_format=layout)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.train.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip_norm)
    optimizer.step()
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(max(warmup, 1)):
    step()
  sync()
  per_step = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = step()
    loss.item()
    sync()
    per_step.append((time.perf_counter() - t0) / steps)
  seconds = statistics.median(per_step)
  return {'torch': torch.__version__, 'device': torch.cuda.get_device_name() if cuda else 'cpu',
          'precision': 'amp_bf16' if amp else 'float32', 'channels_last_3d': cuda,
          'samples_per_s': b / seconds, 'step_ms': 1e3 * seconds,
          'step_ms_all_repeats': [1e3 * t for t in per_step],
          'peak_bytes_allocated': torch.cuda.max_memory_allocated() if cuda else None}


def benchmark_compare(config, steps: int = 10, warmup: int = 3, repeats: int = 3,
                      peak_size: int = 0) -> dict[str, Any]:
  """The JAX step and the PyTorch twin's step, same shapes, same process; ratio JAX / torch."""
  jax_result = benchmark_step(config, steps, warmup, repeats, peak_size)
  result = {**describe_run(config), 'jax_samples_per_s': jax_result['samples_per_s'],
            'jax': jax_result}
  try:
    import torch  # noqa: F401
  except ImportError:
    result['torch'] = None
    result['note'] = 'torch is not installed: pip install torch to compare'
    return result
  torch_result = torch_step_rate(config, steps, warmup, repeats)
  result.update(torch=torch_result, torch_samples_per_s=torch_result['samples_per_s'],
                jax_over_torch=jax_result['samples_per_s'] / torch_result['samples_per_s'])
  return result
