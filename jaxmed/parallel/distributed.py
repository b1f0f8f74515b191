"""Joining the processes of a multi-host run through jax.distributed, before any backend starts.

Where the coordinator, process count and process id come from, first match wins:
  1. the config: --config.distributed.coordinator_address / num_processes / process_id;
  2. the environment: JAXMED_COORDINATOR_ADDRESS, JAXMED_NUM_PROCESSES, JAXMED_PROCESS_ID
     (launch/kubernetes and launch/local_multiprocess.sh set these);
  3. JAX's own cluster detection, when a multi-process cluster is visible (SLURM with several
     tasks, Open MPI, TPU pod slices); it reads everything from the scheduler. Under SLURM with
     one task per node, the task gets every GPU of its node (JAX alone would give it only the
     GPU numbered SLURM_LOCALID) unless JAX_LOCAL_DEVICE_IDS says otherwise.
Otherwise the run is a single process and nothing is initialised.

A lost process (killed, crashed, host gone) never leaves the others waiting:
  - every survivor ends with one line on stderr, naming it, and exit status 1:
      jaxmed: error: lost process 1 of 2: it stopped responding (killed, crashed, hung, or its
      host failed), so process 0 stops too (...); see the lost process's own log, then rerun ...
    within about 5 s when a collective with it fails (gloo on CPU, usually at once), otherwise
    (blocked in a collective that never fails) after 0.3 x config.distributed.heartbeat_timeout_s;
  - behind that, JAX's coordination service (in process 0) aborts any survivor 0.5-1 x
    heartbeat_timeout_s after the loss: exit status 134, "Terminating process because the JAX
    distributed service detected fatal errors ... The following tasks are unhealthy (stopped
    sending heartbeats):" followed by the lost process's index;
  - when process 0 (the coordinator) is lost, JAX ends the others at once: exit status 134,
    "Failed to send RPC to coordination service. Either the leader task was
    preempted/died/restarted unexpectedly ...".
"""

from __future__ import annotations

import atexit
import math
import os
import re
import socket
import sys
import threading
import time

import jax
from absl import app
from absl import logging

from jaxmed.errors import ConfigError

def cpu_devices_needed(config) -> int:
  """Virtual CPU devices this process should expose: enough for the configured mesh.

  Only the CPU backend reads this setting, so it is harmless on GPU and TPU hosts.
  """
  if config.distributed.cpu_devices > 0:
    return config.distributed.cpu_devices
  sizes = [config.mesh[f'{part}_{axis}'] for part in ('ici', 'dcn')
           for axis in ('data', 'fsdp', 'model', 'spatial')]
  if any(s == -1 for s in sizes):
    return 1  # The mesh fills itself from whatever devices exist.
  # The mesh spans every process; each holds an equal share of its devices.
  return max(1, math.prod(sizes) // _num_processes_hint(config))


def _num_processes_hint(config) -> int:
  if config.distributed.num_processes:
    return config.distributed.num_processes
  for name in ('JAXMED_NUM_PROCESSES', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if os.environ.get(name):
      return int(os.environ[name])
  return 1


def _cluster_visible() -> bool:
  """True when a scheduler that JAX can read describes a run of several processes."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
    return True
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  # Multi-host TPU VMs list their workers; JAX reads the rest from the metadata server.
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1


# ---- SLURM: one task per node owns all the node's GPUs ----------------------------------------

def _slurm_one_task_per_node(env=os.environ) -> bool:
  """True when this SLURM step runs exactly one task on every node."""
  if 'SLURM_JOB_ID' not in env:
    return False
  # '1(x4)' or '1,1': tasks on each node of the step (the job's value when the step's is absent).
  per_node = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  if per_node:
    counts = [int(m) for m in re.findall(r'(\d+)(?:\(x\d+\))?', per_node)]
    return bool(counts) and all(c == 1 for c in counts)
  if env.get('SLURM_NTASKS_PER_NODE'):
    return env['SLURM_NTASKS_PER_NODE'] == '1'
  nodes = env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_JOB_NUM_NODES') or env.get(
      'SLURM_NNODES')
  return bool(nodes) and env.get('SLURM_NTASKS') == nodes


def _visible_gpu_count(env=os.environ) -> int:
  """GPUs this process may use (0 = unknown or none), without starting a backend."""
  visible = env.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    ids = [v for v in visible.split(',') if v.strip()]
    return 0 if not ids or ids == ['NoDevFiles'] or ids[0].startswith('-') else len(ids)
  gpus = env.get('SLURM_GPUS_ON_NODE', '')
  if gpus.isdigit():
    return int(gpus)
  try:
    return len([n for n in os.listdir('/dev') if re.fullmatch(r'nvidia\d+', n)])
  except OSError:
    return 0


def slurm_local_device_ids(env=os.environ) -> list[int] | None:
  """Every visible GPU, when SLURM runs one task per node and JAX_LOCAL_DEVICE_IDS is unset.

  None leaves the choice to JAX (which takes GPU SLURM_LOCALID only: right for one task per GPU).
  """
  if env.get('JAX_LOCAL_DEVICE_IDS') or not _slurm_one_task_per_node(env):
    return None
  count = _visible_gpu_count(env)
  return list(range(count)) if count > 0 else None


# ---- start ------------------------------------------------------------------------------------

def initialize(config) -> None:
  """Sets the CPU device count and joins the other processes; a no-op for a single process."""
  jax.config.update('jax_num_cpu_devices', cpu_devices_needed(config))
  dist = config.distributed
  address = dist.coordinator_address or os.environ.get('JAXMED_COORDINATOR_ADDRESS', '')
  num = dist.num_processes or int(os.environ.get('JAXMED_NUM_PROCESSES', '0') or 0)
  pid = dist.process_id if dist.process_id >= 0 else int(
      os.environ.get('JAXMED_PROCESS_ID', '-1') or -1)
  timeouts = dict(initialization_timeout=dist.initialization_timeout_s,
                  heartbeat_timeout_seconds=dist.heartbeat_timeout_s)
  if address and num > 1:
    if not 0 <= pid < num:
      raise ConfigError(f'distributed run of {num} processes needs a process id in 0..{num - 1}, '
                        f'got {pid}: set JAXMED_PROCESS_ID or --config.distributed.process_id')
    jax.distributed.initialize(address, num_processes=num, process_id=pid, **timeouts)
  elif _cluster_visible():
    local_ids = slurm_local_device_ids()
    if local_ids is not None:
      logging.info('SLURM runs one task per node: this task takes GPUs %s', local_ids)
      timeouts['local_device_ids'] = local_ids
    jax.distributed.initialize(**timeouts)
  else:
    return
  _watch_for_lost_processes(dist.heartbeat_timeout_s)
  logging.info('process %d of %d (pid %d on %s): %d local devices %s, %d global devices',
               jax.process_index(), jax.process_count(), os.getpid(), socket.gethostname(),
               jax.local_device_count(), [d.id for d in jax.local_devices()], jax.device_count())


# ---- a lost process ---------------------------------------------------------------------------
#
# JAX's coordination service (in process 0) notices a lost process only after 0.5-1x the
# heartbeat timeout, then aborts every survivor itself (LOG(FATAL), exit status 134); jax gives
# Python no callback for it. So jaxmed keeps its own watch, through the same service: every
# process ticks a counter of its own in the service's key-value store each second and reads the
# others' (two small RPCs a second). Judged on local clocks only (no skew between hosts matters),
# a peer whose counter stopped moving is lost:
#   - after an error (a collective with the lost process fails; gloo on CPU: usually at once),
#     within _LIVENESS_WINDOW_S;
#   - otherwise (a survivor blocked in a collective that never fails), after
#     _LOST_AFTER_FRACTION x heartbeat_timeout_s, before JAX's own abort.
# Either way the survivor prints one line naming the lost process and exits with status 1.
# A process that leaves through a normal exit says so first (value 'exited'): never "lost".

_HEARTBEAT_PREFIX = 'jaxmed/alive/'
_HEARTBEAT_INTERVAL_S = 1.0
_LIVENESS_WINDOW_S = 5.0  # After an error: watch the counters this long (at most timeout / 2).
_LOST_AFTER_FRACTION = 0.3  # No error: a peer silent this fraction of the heartbeat timeout.
_MIN_LOST_AFTER_S = 3.0
_EXITED = 'exited'  # A process's last value when it leaves through Python's exit.


class _Heartbeat:
  """A daemon thread: ticks this process's counter, and ends the process if a peer goes silent."""

  def __init__(self, client, process_index: int, num_processes: int, interval_s: float,
               lost_after_s: float):
    self.client = client
    self.process_index = process_index
    self.num_processes = num_processes
    self.interval_s = interval_s
    self.lost_after_s = lost_after_s
    self._changed = {}  # peer -> (its last value, local time that value was first seen)
    self._last_look = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='jaxmed-heartbeat', daemon=True)
    self._thread.start()

  def _run(self):
    ticks = 0
    while not self._stop.is_set():
      ticks += 1
      self._set(str(ticks))
      silent = self._silent_peers()
      if silent and not self._stop.is_set():
        _exit_lost(silent, f'no heartbeat for {self.lost_after_s:.0f} s')
      self._stop.wait(self.interval_s)
    self._set(_EXITED)  # Leaving on purpose (at exit): not lost.

  def _set(self, value: str):
    try:
      self.client.key_value_set(f'{_HEARTBEAT_PREFIX}{self.process_index}', value,
                                allow_overwrite=True)
    except Exception:  # The coordinator is unreachable: JAX ends this process itself.
      pass

  def counters(self) -> dict[int, str] | None:
    """{process: its counter} as the coordinator has them; None if it cannot be reached."""
    try:
      entries = self.client.key_value_dir_get(_HEARTBEAT_PREFIX)
    except Exception:
      return None
    return {int(k.rsplit('/', 1)[-1]): v for k, v in entries}

  def _silent_peers(self) -> list[int]:
    """Peers seen ticking before whose counter has not moved for lost_after_s."""
    values = self.counters()
    now = time.monotonic()
    if values is None:
      return []
    if self._last_look is None or now - self._last_look > 3 * self.interval_s:
      self._changed = {}  # This thread itself did not run for a while: judge from now on.
    self._last_look = now
    for p, value in values.items():
      if p != self.process_index and self._changed.get(p, (None,))[0] != value:
        self._changed[p] = (value, now)
    return sorted(p for p, (value, since) in self._changed.items()
                  if value != _EXITED and now - since > self.lost_after_s)

  def stop(self):
    self._stop.set()
    self._thread.join(timeout=2 * self.interval_s)


_heartbeat: _Heartbeat | None = None
_exit_lock = threading.Lock()


def lost_processes(window_s: float = _LIVENESS_WINDOW_S) -> list[int] | None:
  """Process indices whose counter did not move for window_s (returns early when all moved).

  [] when every process is alive or left through a normal exit; [0] when process 0, which hosts
  the coordinator, cannot be reached; None outside a multi-process run.
  """
  beat = _heartbeat
  if beat is None or beat.num_processes < 2:
    return None
  everyone = set(range(beat.num_processes))
  coordinator_lost = [0] if beat.process_index != 0 else None
  first = beat.counters()
  if first is None:
    return coordinator_lost
  moved = {beat.process_index}
  deadline = time.monotonic() + window_s
  while moved != everyone and time.monotonic() < deadline:
    time.sleep(beat.interval_s / 4)
    now = beat.counters()
    if now is None:
      return coordinator_lost
    moved |= {p for p in everyone if p in now and (now[p] != first.get(p) or now[p] == _EXITED)}
  return sorted(everyone - moved)


def lost_process_message(lost: list[int], detail: str = '') -> str:
  """The one line a survivor ends with, naming the lost process(es)."""
  names = ', '.join(str(p) for p in lost)
  what = f'process{"es" if len(lost) > 1 else ""} {names} of {jax.process_count()}'
  coordinator = ' (the coordinator)' if 0 in lost else ''
  detail = f' ({detail})' if detail else ''
  return (f'lost {what}{coordinator}: it stopped responding (killed, crashed, hung, or its host '
          f'failed), so process {jax.process_index()} stops too{detail}; see the lost process\'s '
          'own log, then rerun the same command on every process to resume from the last '
          'checkpoint')


def _exit_lost(lost: list[int], detail: str) -> None:
  """Prints the one line and leaves at once, from any thread.

  os._exit: jax.distributed's shutdown barrier at a normal exit would wait for the lost process
  until JAX's heartbeat timeout aborts this one; a collective with it may never return.
  """
  with _exit_lock:  # The watch and the exception handler may both get here.
    message = lost_process_message(lost, detail)
    logging.error('%s', message)
    logging.flush()
    sys.stdout.flush()
    print(f'jaxmed: error: {message}', file=sys.stderr, flush=True)
    os._exit(1)


class _LostProcessHandler(app.ExceptionHandler):
  """An exception escaping main in a multi-process run: if a peer is gone, say so in one line."""

  def __init__(self, window_s: float):
    super().__init__()
    self.window_s = window_s

  def wants(self, exc):
    return isinstance(exc, Exception) and _heartbeat is not None

  def handle(self, exc):
    lost = lost_processes(self.window_s)
    if not lost:
      return  # Every process is alive: not a loss; the usual traceback follows.
    text = str(exc).strip()
    _exit_lost(lost, f'here: {type(exc).__name__}: {text.splitlines()[0][:160]}' if text else '')


def _watch_for_lost_processes(heartbeat_timeout_s: float) -> None:
  """Starts the heartbeat and its watch, and installs the handler (once per process)."""
  global _heartbeat
  if _heartbeat is not None:
    return
  try:
    from jax._src import distributed as jax_distributed  # Holds jax.distributed's client.
    client = jax_distributed.global_state.client
  except (ImportError, AttributeError):  # Another JAX layout: JAX's own heartbeat still applies.
    return
  if client is None or jax.process_count() < 2 or not hasattr(client, 'key_value_dir_get'):
    return
  lost_after = max(_MIN_LOST_AFTER_S, _LOST_AFTER_FRACTION * heartbeat_timeout_s)
  _heartbeat = _Heartbeat(client, jax.process_index(), jax.process_count(),
                          _HEARTBEAT_INTERVAL_S, lost_after)
  # Registered after jax's own exit hook, so it runs first: stop ticking before the client goes.
  atexit.register(_heartbeat.stop)
  window = min(_LIVENESS_WINDOW_S, max(2 * _HEARTBEAT_INTERVAL_S, heartbeat_timeout_s / 2))
  app.install_exception_handler(_LostProcessHandler(window))
