"""The one module that knows Orbax: when to save, save, find the latest complete step, restore
onto any mesh, and refuse a resume that would change the data stream.

A checkpoint step holds up to four items:
  state        the train state as a pure dict of arrays (parameters, optimizer state, BatchNorm
               statistics, step); restored into ShapeDtypeStructs that carry the CURRENT mesh's
               shardings, so a run saved on one mesh or process count resumes on another;
  config       the config that wrote it (JSON), to refuse a restore into a different model;
  data_stream  (training runs) what decides which examples form step N and the schedule
               (data_stream()), to refuse a resume that would silently change them;
  logged_sums  (training runs) the metric sums and their count since the last log step (JSON),
               so that the first log step after a resume averages the same steps as a run never
               stopped (a checkpoint without it, from before it existed, resumes with zeros).
The data position is the step itself (the input order is a pure function of seed and step), so
no iterator state is needed. Orbax writes each step into a temporary folder and renames it when
complete: a step that did not finish writing is never listed, hence never restored.

When to save is Orbax's decision (CheckpointManager.should_save): every checkpoint.every_steps,
the last step, and a preemption. Orbax's preemption check is JAX's preemption sync point: after
jax.distributed.initialize, XLA's preemption notifier catches SIGTERM and every process reaches
the same step to save at. A single process has no jax.distributed, hence no notifier: there, and
only there, a SIGTERM handler of this module raises the same request. Orbax never saves a step
that is not newer than the latest one, so a SIGTERM that lands on a checkpoint step, on the last
step or during evaluation saves that step once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxmed import files
from jaxmed.errors import UserError

# The named items of one checkpoint step.
ITEM_NAMES = ('state', 'config', 'data_stream', 'logged_sums')


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


def _lookup(d: dict, key: str) -> Any:
  for part in key.split('.'):
    d = d.get(part, {}) if isinstance(d, dict) else {}
  return d


def differing_model_keys(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Model config keys (the task's MODEL_KEYS) whose value differs between a saved config (dict)
  and the current one."""
  from jaxmed import tasks
  now = _normalise(current.to_dict())
  diffs = []
  for section in tasks.get(current).MODEL_KEYS:
    a, b = _flatten(_lookup(saved, section), f'{section}.'), _flatten(_lookup(now, section),
                                                                        f'{section}.')
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        diffs.append(f'{key} (checkpoint {a.get(key)!r}, config {b.get(key)!r})')
  return diffs


def config_values(config: ml_collections.ConfigDict, keys) -> dict[str, Any]:
  """{flattened key: value} of the config keys or sections `keys` ('data.augment.flip')."""
  flat = _flatten(_normalise(config.to_dict()))
  return {k: v for k, v in flat.items()
          if any(k == key or k.startswith(key + '.') for key in keys)}


def data_stream(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{key: value} of everything that decides the examples of each step and the schedule: the
  task's own list (jaxmed/tasks/), e.g. classify's keys and the crops file's identity."""
  from jaxmed import tasks
  return tasks.get(config).data_stream(config)


def _shown(value: Any) -> str:
  if value is None:
    return 'absent'
  return value if isinstance(value, str) else json.dumps(value)


def differing_data_stream(saved: dict, current: dict) -> list[str]:
  """'key saved -> current' for every data-stream key whose value differs."""
  return [f'{key} {_shown(saved.get(key))} -> {_shown(current.get(key))}'
          for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


_RECORD_BYTES = 2048  # One process's view of the checkpoint folder, as JSON.


def _steps_on_disk(directory: str) -> list[int]:
  """Complete checkpoint steps in `directory` (Orbax renames a step's folder to its number
  only once it is written), without Orbax: read before every process agrees to open it."""
  try:
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  except FileNotFoundError:
    return []


def check_every_process_sees_the_same(workdir: str, directory: str) -> None:
  """Every process's view of the checkpoint folder (the steps it holds, and a token process 0
  wrote into the workdir just now) compared across processes; CheckpointError naming the hosts
  if they differ. Without it, processes that see different folders (a workdir on local disks, not
  on shared storage) decide differently whether to restore, and hang in different collectives."""
  from jax.experimental import multihost_utils
  token_path = os.path.join(workdir, '.jaxmed-process-check')
  token = ''
  if jax.process_index() == 0:
    token = f'{socket.gethostname()}:{os.getpid()}:{time.time_ns()}'
    with files.atomic_write(token_path) as f:
      f.write(token)
  multihost_utils.sync_global_devices('jaxmed: workdir token written')
  try:
    with open(token_path) as f:
      seen_token = f.read()
  except OSError:
    seen_token = ''
  steps = _steps_on_disk(directory)
  record = {'host': socket.gethostname(), 'directory': directory, 'token': seen_token,
            'steps': steps[-20:], 'count': len(steps)}
  encoded = json.dumps(record).encode()[:_RECORD_BYTES]
  buffer = np.zeros(_RECORD_BYTES, np.uint8)
  buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, _RECORD_BYTES)
  records = [json.loads(bytes(row).rstrip(b'\0')) for row in gathered]
  first = records[0]
  if all(r['token'] == first['token'] and r['steps'] == first['steps']
         and r['count'] == first['count'] for r in records):
    return
  shown = lambda r: ', '.join(map(str, r['steps'])) if r['steps'] else 'no step'
  views = '; '.join(
      f"process {i} on host {r['host']} sees {shown(r)} in {r['directory']}"
      + ('' if r['token'] == first['token'] else ' (not the workdir process 0 writes to)')
      for i, r in enumerate(records))
  raise CheckpointError(
      f'the processes see different checkpoint folders: {views}; give every process the same '
      '--workdir on storage they all share (see launch/README.md)')


class Checkpointer:
  """Asynchronous, atomic checkpoints of the train state in `workdir/checkpoints/`.

  training=True (train_and_evaluate): every save records the data stream and a restore refuses
  a different one (unless config.checkpoint.allow_changed_data_stream); saves follow
  checkpoint.every_steps and train.steps; on a single process, SIGTERM requests a preemption
  save (close() puts the previous handler back once the last save has committed).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, training: bool = False):
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.config = config
    self._data_stream = data_stream(config) if training else None
    self._sigterm = False
    self._previous_handler = None
    if (training and jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      # Multi-process: XLA's preemption notifier owns SIGTERM; replacing it would blind Orbax.
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    if jax.process_count() > 1:  # Before Orbax: processes that disagree would call different
      check_every_process_sees_the_same(workdir, self.directory)  # collectives and hang.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        # Orbax adds its preemption policy to this one.
        should_save_fn=self._due if training else None,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=ITEM_NAMES)

  def _on_sigterm(self, signum, frame):
    # Only a flag: a second SIGTERM during the final save cannot interrupt (and corrupt) it.
    del signum, frame
    self._sigterm = True

  def _due(self, step: int, last_saved_step: int | None) -> bool:
    del last_saved_step  # Orbax itself refuses a step that is not newer than the latest.
    every = self.config.checkpoint.every_steps
    return (every > 0 and step % every == 0) or step == self.config.train.steps or self._sigterm

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True once the run is asked to stop: at JAX's preemption sync point (multi-process; call
    it at every step on every process), or after a SIGTERM (single process)."""
    return self._sigterm or self._manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    """Orbax's decision for `step`: a checkpoint step, the last step or a preemption, and newer
    than the latest checkpoint. Call it at every step (it is where multi-process preemption is
    noticed)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: dict, logged_sums: dict[str, float] | None = None) -> bool:
    """Starts saving `state` (a pure dict of jax.Arrays) at `step`; returns before it is done.

    logged_sums: {name: number} the loop has summed since its last log step (steps.logged_sums).
    A step already saved is left as it is (False): saving is idempotent.
    """
    if step in self.all_steps():
      return False
    items = {'state': ocp.args.StandardSave(state),
             'config': ocp.args.JsonSave(_normalise(self.config.to_dict()))}
    if self._data_stream is not None:
      items['data_stream'] = ocp.args.JsonSave(self._data_stream)
    if logged_sums is not None:
      items['logged_sums'] = ocp.args.JsonSave(logged_sums)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, int]:
    """Restores `step` (default: latest complete) into `abstract_state`'s shapes and shardings.

    Args:
      abstract_state: pure dict of jax.ShapeDtypeStruct with `.sharding` set for the current mesh.
    Returns:
      (state, step). Raises CheckpointError for a missing step, a different model config, or
      (training) a different data stream.
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
    if self._data_stream is not None:
      self._check_data_stream(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored['state'], step

  def logged_sums(self, step: int) -> dict[str, float] | None:
    """The logged-metric sums saved with `step`; None when there is no checkpoint at `step` (a
    new run) or it holds none (written before they were saved: logged, and the first log step
    after the resume averages only the steps run since it)."""
    if step not in self.all_steps():
      return None
    if 'logged_sums' not in self._manager.metadata(step).item_metadata:
      logging.warning('checkpoint step %d of %s holds no logged-metric sums: the first logged '
                      'means after the resume cover only the steps since step %d', step,
                      self.directory, step)
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        logged_sums=ocp.args.JsonRestore()))['logged_sums']

  def _check_data_stream(self, step: int) -> None:
    if 'data_stream' not in self._manager.metadata(step).item_metadata:
      logging.warning('checkpoint step %d of %s records no data stream: cannot check that it '
                      'continues the same one', step, self.directory)
      return
    saved = self._manager.restore(step, args=ocp.args.Composite(
        data_stream=ocp.args.JsonRestore()))['data_stream']
    diffs = differing_data_stream(saved, self._data_stream)
    if not diffs:
      return
    if self.config.checkpoint.allow_changed_data_stream:
      logging.warning('resuming step %d of %s with a different data stream, as '
                      'checkpoint.allow_changed_data_stream allows: %s', step, self.directory,
                      ', '.join(diffs))
      return
    raise CheckpointError(
        f'checkpoint in {self.workdir} was written with a different data stream: '
        f'{", ".join(diffs)}; start a new --workdir, or pass '
        '--config.checkpoint.allow_changed_data_stream=True to continue anyway')

  def wait(self) -> None:
    """Blocks until every save started so far is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last (asynchronous) save to commit, then puts the SIGTERM handler back:
    a SIGTERM while the final save is written must not kill it."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def saved_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """(the config a checkpoint was written with, as a dict; its step) of workdir's checkpoint at
  `step` (default: latest). Raises CheckpointError when workdir holds none."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise CheckpointError(f'no checkpoint in {directory}; train that run first or pass the '
                          'workdir of a trained one')
  manager = ocp.CheckpointManager(directory, item_names=ITEM_NAMES)
  try:
    steps = list(manager.all_steps())
    chosen = manager.latest_step() if step is None or step < 0 else step
    if chosen is None or chosen not in steps:
      raise CheckpointError(f'no checkpoint at step {chosen} in {directory} (available: '
                            f'{steps or "none"}); train first or pick one of them')
    config = manager.restore(chosen, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']
  finally:
    manager.close()
  return config, chosen
