"""The one module that knows Orbax: save, find the latest complete step, restore onto any mesh.

A checkpoint step holds two items:
  state   the train state as a pure dict of arrays (parameters, optimizer state, BatchNorm
          statistics, step); restored into ShapeDtypeStructs that carry the CURRENT mesh's
          shardings, so a run saved on one mesh or process count resumes on another;
  config  the config that wrote it (JSON), to refuse a restore into a different model.
The data position is the step itself (the input order is a pure function of seed and step), so
no iterator state is needed. Orbax writes each step into a temporary folder and renames it when
complete: a step that did not finish writing is never listed, hence never restored.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from jaxmed.errors import UserError

# Config sections that decide the shapes and meaning of the saved arrays.
_MODEL_KEYS = ('model',)


class CheckpointError(UserError):
  """A checkpoint that cannot be restored into the current config."""


def _flatten(d: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: d}


def _normalise(value: Any) -> Any:
  # JSON turns tuples into lists; compare like with like.
  return json.loads(json.dumps(value))


def differing_model_keys(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Model config keys whose value differs between a saved config (dict) and the current one."""
  now = _normalise(current.to_dict())
  diffs = []
  for section in _MODEL_KEYS:
    a, b = _flatten(saved.get(section, {}), f'{section}.'), _flatten(now.get(section, {}),
                                                                       f'{section}.')
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        diffs.append(f'{key} (checkpoint {a.get(key)!r}, config {b.get(key)!r})')
  return diffs


class Checkpointer:
  """Asynchronous, atomic checkpoints of the train state in `workdir/checkpoints/`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'config'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: dict) -> None:
    """Starts saving `state` (a pure dict of jax.Arrays) at `step`; returns before it is done."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(_normalise(self.config.to_dict()))), force=True)

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, int]:
    """Restores `step` (default: latest complete) into `abstract_state`'s shapes and shardings.

    Args:
      abstract_state: pure dict of jax.ShapeDtypeStruct with `.sharding` set for the current mesh.
    Returns:
      (state, step). Raises CheckpointError for a missing step or a different model config.
    """
    steps = self.all_steps()
    if step is None or step < 0:
      step = self.latest_step()
    if step is None or step not in steps:
      raise CheckpointError(
          f'no checkpoint at step {step} in {self.directory} (available: {steps or "none"}); '
          'train first or set --config.checkpoint.step to one of them')
    saved_config = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']
    diffs = differing_model_keys(saved_config, self.config)
    if diffs:
      raise CheckpointError(
          f'checkpoint {self.directory} step {step} was written for a different model: '
          f'{"; ".join(diffs)}; use the same model config or another --workdir')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored['state'], step

  def wait(self) -> None:
    """Blocks until every save started so far is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

