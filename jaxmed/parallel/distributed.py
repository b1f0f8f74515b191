"""Joining the processes of a multi-host run through jax.distributed, before any backend starts.

Where the coordinator, process count and process id come from, first match wins:
  1. the config: --config.distributed.coordinator_address / num_processes / process_id;
  2. the environment: JAXMED_COORDINATOR_ADDRESS, JAXMED_NUM_PROCESSES, JAXMED_PROCESS_ID
     (launch/kubernetes and launch/local_multiprocess.sh set these);
  3. JAX's own cluster detection, when a multi-process cluster is visible (SLURM with several
     tasks, Open MPI, TPU pod slices); it reads everything from the scheduler.
Otherwise the run is a single process and nothing is initialised.
"""

from __future__ import annotations

import math
import os

import jax
from absl import logging


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
    if pid < 0:
      raise ValueError('distributed run needs a process id: set JAXMED_PROCESS_ID or '
                       '--config.distributed.process_id')
    jax.distributed.initialize(address, num_processes=num, process_id=pid, **timeouts)
  elif _cluster_visible():
    jax.distributed.initialize(**timeouts)
  else:
    return
  logging.info('process %d of %d: %d local devices, %d global devices (%s)',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
