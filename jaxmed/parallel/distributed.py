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

A lost process (killed, crashed, host gone): JAX's coordination service (hosted by process 0)
stops hearing its heartbeats. A survivor whose collective fails because of it (CPU / gloo: at
once) ends with one line, `jaxmed: error: lost process 1 of 2 ...`, and exit status 1. A survivor
that is not told (e.g. waiting in an NCCL collective) is ended by JAX itself within
config.distributed.heartbeat_timeout_s: "Terminating process because the JAX distributed service
detected fatal errors ... The following tasks are unhealthy (stopped sending heartbeats): 1",
exit status 134 (SIGABRT). Either way nobody waits forever.
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
# JAX's coordination service notices a lost process only after the heartbeat timeout, and then
# aborts every survivor itself (LOG(FATAL), exit status 134); jax.distributed gives Python no
# callback for it. A survivor learns of the loss sooner when a collective with the lost process
# fails (gloo on CPU: at once). To name the lost process then, every process ticks a counter of
# its own in the coordination service's key-value store each second; after an error, a process
# whose counter stops moving is gone (local clocks only: no clock skew between hosts matters).

_HEARTBEAT_PREFIX = 'jaxmed/alive/'
_HEARTBEAT_INTERVAL_S = 1.0
_LIVENESS_WINDOW_S = 5.0  # Watch the counters this long after an error (at most timeout / 2).


class _Heartbeat:
  """A daemon thread that ticks this process's counter in the coordination service's store."""

  def __init__(self, client, process_index: int, num_processes: int, interval_s: float):
    self.client = client
    self.process_index = process_index
    self.num_processes = num_processes
    self.interval_s = interval_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='jaxmed-heartbeat', daemon=True)
    self._thread.start()

  def _run(self):
    ticks = 0
    while not self._stop.is_set():
      ticks += 1
      try:
        self.client.key_value_set(f'{_HEARTBEAT_PREFIX}{self.process_index}', str(ticks),
                                  allow_overwrite=True)
      except Exception:  # The coordinator is unreachable: lost_processes() will say so.
        pass
      self._stop.wait(self.interval_s)

  def counters(self) -> dict[int, str] | None:
    """{process: its counter} as the coordinator has them; None if it cannot be reached."""
    try:
      entries = self.client.key_value_dir_get(_HEARTBEAT_PREFIX)
    except Exception:
      return None
    return {int(k.rsplit('/', 1)[-1]): v for k, v in entries}

  def stop(self):
    self._stop.set()
    self._thread.join(timeout=2 * self.interval_s)


_heartbeat: _Heartbeat | None = None


def lost_processes(window_s: float = _LIVENESS_WINDOW_S) -> list[int] | None:
  """Process indices whose heartbeat did not move for window_s (returns early when all moved).

  [] when every process is alive; [0] when process 0, which hosts the coordinator, cannot be
  reached; None outside a multi-process run.
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
    moved |= {p for p in everyone if p in now and now[p] != first.get(p)}
  return sorted(everyone - moved)


def lost_process_message(lost: list[int], error: BaseException | None = None) -> str:
  """The one line a survivor ends with, naming the lost process(es)."""
  names = ', '.join(str(p) for p in lost)
  what = f'process{"es" if len(lost) > 1 else ""} {names} of {jax.process_count()}'
  coordinator = ' (the coordinator)' if 0 in lost else ''
  cause = ''
  if error is not None and str(error).strip():
    cause = f' (here: {type(error).__name__}: {str(error).strip().splitlines()[0][:160]})'
  return (f'lost {what}{coordinator}: it stopped (killed, crashed, or its host failed), so '
          f'process {jax.process_index()} stops too{cause}; see the lost process\'s own log, '
          'then rerun the same command on every process to resume from the last checkpoint')


class _LostProcessHandler(app.ExceptionHandler):
  """An exception escaping main in a multi-process run: if a peer is gone, say so in one line.

  Then leave at once (os._exit): jax.distributed's shutdown barrier at exit would wait for the
  lost process until the heartbeat timeout aborts this one.
  """

  def __init__(self, window_s: float):
    super().__init__()
    self.window_s = window_s

  def wants(self, exc):
    return isinstance(exc, Exception) and _heartbeat is not None

  def handle(self, exc):
    lost = lost_processes(self.window_s)
    if not lost:
      return  # Every process is alive: not a loss; the usual traceback follows.
    message = lost_process_message(lost, exc)
    logging.error('%s', message)
    logging.flush()
    print(f'jaxmed: error: {message}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _watch_for_lost_processes(heartbeat_timeout_s: float) -> None:
  """Starts the heartbeat and installs the handler (once per process)."""
  global _heartbeat
  if _heartbeat is not None:
    return
  from jax._src import distributed as jax_distributed  # Holds jax.distributed's client.
  client = jax_distributed.global_state.client
  if client is None or jax.process_count() < 2 or not hasattr(client, 'key_value_dir_get'):
    return
  _heartbeat = _Heartbeat(client, jax.process_index(), jax.process_count(),
                          _HEARTBEAT_INTERVAL_S)
  # Registered after jax's own exit hook, so it runs first: stop ticking before the client goes.
  atexit.register(_heartbeat.stop)
  window = min(_LIVENESS_WINDOW_S, max(2 * _HEARTBEAT_INTERVAL_S, heartbeat_timeout_s / 2))
  app.install_exception_handler(_LostProcessHandler(window))
