"""What a run tells people: metrics.jsonl, TensorBoard events, and a progress line with ETA.

Only process 0 writes; every other process gets writers that do nothing, so call sites need no
`if jax.process_index() == 0`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np
from absl import logging


def _to_python(value: Any) -> Any:
  value = np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep the jsonl parseable.
  return value


class MetricWriter:
  """Appends one JSON object per call to workdir/metrics.jsonl and mirrors scalars to TensorBoard.

  The jsonl contract: keys step, split and the metrics (loss; for eval auc, accuracy, cpm).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # Event files without TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{split}/{key}', value, int(step))
    self._tb.flush()

  def write_image(self, step: int, tag: str, image_hwc: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, image_hwc, int(step), dataformats='HWC')
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Steps/s, examples/s and ETA since the last report; the first (compiling) step is excluded."""

  def __init__(self, total_steps: int, examples_per_step: int, enabled: bool = True):
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self.enabled = enabled
    self._last_step = None
    self._last_time = None

  def start(self, step: int) -> None:
    self._last_step, self._last_time = step, time.perf_counter()

  def report(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """Logs one progress line; returns the rates (for metrics.jsonl)."""
    now = time.perf_counter()
    rates = {}
    if self._last_step is not None and step > self._last_step:
      steps_per_s = (step - self._last_step) / (now - self._last_time)
      rates = {'steps_per_s': steps_per_s,
               'examples_per_s': steps_per_s * self.examples_per_step}
    self._last_step, self._last_time = step, now
    if self.enabled:
      shown = ' '.join(f'{k} {float(v):.4g}' for k, v in metrics.items())
      line = f'step {step}/{self.total_steps} | {shown}'
      if rates:
        eta = (self.total_steps - step) / rates['steps_per_s']
        line += (f' | {rates["steps_per_s"]:.2f} steps/s {rates["examples_per_s"]:.0f} ex/s'
                 f' | ETA {format_seconds(eta)}')
      logging.info(line)
    return rates
