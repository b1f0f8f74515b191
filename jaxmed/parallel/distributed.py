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

A lost process (killed, crashed, hung, host gone) never leaves the others waiting; detection is
jax.distributed's own heartbeat (config.distributed.heartbeat_timeout_s):
  - JAX's coordination service (in process 0) ends every survivor within heartbeat_timeout_s of
    the last heartbeat (measured: 10 s after a SIGKILL with a 10 s timeout): exit status 134,
    "Terminating process because the JAX distributed service detected fatal errors ... The
    following tasks are unhealthy (stopped sending heartbeats):" and the lost process's index;
  - when a collective with the lost process fails first (gloo on CPU: at once), the survivor
    prints one line before that verdict:
      jaxmed: error: process 0 of 2: a collective with another process failed (...), so another
      process stopped (...); JAX's coordination service names it ... within
      distributed.heartbeat_timeout_s = 60 s: see the lost process's own log, then rerun ...
  - when process 0 (the coordinator) is lost, JAX ends the others at once: exit status 134,
    "Failed to send RPC to coordination service. Either the leader task was
    preempted/died/restarted unexpectedly ...".
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time

import jax
from absl import app
from absl import logging

from jaxmed.errors import ConfigError, UserError


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
                  heartbeat_timeout_seconds=dist.heartbeat_timeout_s,
                  shutdown_timeout_seconds=dist.shutdown_timeout_s)
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
  _report_lost_processes(dist.heartbeat_timeout_s)
  logging.info('process %d of %d (pid %d on %s): %d local devices %s, %d global devices',
               jax.process_index(), jax.process_count(), os.getpid(), socket.gethostname(),
               jax.local_device_count(), [d.id for d in jax.local_devices()], jax.device_count())


# ---- a lost process ---------------------------------------------------------------------------
#
# JAX's coordination service (in process 0) receives every process's heartbeat; a process silent
# for heartbeat_timeout_s is declared lost, and the service ends every survivor itself
# (LOG(FATAL), exit status 134) with a message naming the lost process's index. Python gets no
# callback for it, and the service's client is not public API, so jaxmed names nothing itself:
# when a collective with the lost process fails first (gloo on CPU: at once), the survivor says
# so in one line and then waits for JAX's verdict, which names the process.

_COLLECTIVE_FAILURE = re.compile(
    r'gloo|nccl|connection (reset|closed|refused)|broken pipe|unavailable|deadline_exceeded|'
    r'coordination service|heartbeat', re.IGNORECASE)
_VERDICT_MARGIN_S = 10.0  # JAX acts on a missed heartbeat within about this of the timeout.


def lost_process_message(exc: BaseException, heartbeat_timeout_s: float) -> str:
  """The one line a survivor prints when a collective with another process failed."""
  text = str(exc).strip()
  detail = f'{type(exc).__name__}: {text.splitlines()[0][:160]}' if text else type(exc).__name__
  return (f'process {jax.process_index()} of {jax.process_count()}: a collective with another '
          f'process failed ({detail}), so another process stopped (killed, crashed, hung, or '
          "its host failed); JAX's coordination service names it ('The following tasks are "
          "unhealthy') and ends this process within distributed.heartbeat_timeout_s = "
          f"{heartbeat_timeout_s:g} s: see the lost process's own log, then rerun the same "
          'command on every process to resume from the last checkpoint')


class _LostProcessHandler(app.ExceptionHandler):
  """A failed collective escaping main in a multi-process run: one line, then JAX's verdict."""

  def __init__(self, heartbeat_timeout_s: float):
    super().__init__()
    self.heartbeat_timeout_s = heartbeat_timeout_s

  def wants(self, exc):
    return (isinstance(exc, Exception) and not isinstance(exc, UserError)
            and jax.process_count() > 1 and bool(_COLLECTIVE_FAILURE.search(str(exc))))

  def handle(self, exc):
    logging.flush()
    sys.stdout.flush()
    print(f'jaxmed: error: {lost_process_message(exc, self.heartbeat_timeout_s)}',
          file=sys.stderr, flush=True)
    # JAX's service ends this process (naming the lost one) once the heartbeat times out; a
    # normal exit would wait in jax.distributed's shutdown barrier for the lost process instead.
    time.sleep(self.heartbeat_timeout_s + _VERDICT_MARGIN_S)
    os._exit(1)


def _report_lost_processes(heartbeat_timeout_s: float) -> None:
  """Installs the handler (once per process)."""
  global _handler_installed
  if not _handler_installed:
    app.install_exception_handler(_LostProcessHandler(heartbeat_timeout_s))
    _handler_installed = True


_handler_installed = False
