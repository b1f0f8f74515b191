"""Make sure the configured crops file (task classify) or volumes file (task detect) exists before
training or evaluation starts, and what --mode=preprocess builds (`preprocess`).

With `data.auto_prepare` (the default), a missing file is built by synthesizing the
default synthetic dataset (if `data.raw_dir` holds no scans) and preprocessing it, so that
`python -m jaxmed.main --config=configs/mesh_2x4.py` works on a fresh machine. In a multi-process
run every process checks its own copy (hosts need not share a filesystem), and all of them stop
with the same line, naming each host whose copy is missing, broken or different.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import h5py
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxmed.data import crops_file, volumes_file
from jaxmed.errors import ConfigError

_RECORD_BYTES = 2048  # One process's check result, JSON, gathered from every process.


def _has_scans(raw_dir: str) -> bool:
  return bool(glob.glob(os.path.join(raw_dir, 'subset*', '*.mhd')))


@dataclasses.dataclass(frozen=True)
class _Output:
  """One file preprocessing writes: how to build it, check it and name its content."""
  what: str  # 'crops file' / 'volumes file'
  path: str
  build: Callable[[Any], dict]
  check: Callable[[str], int]  # Returns the count of `unit`; raises `error`.
  unit: str
  error: type[Exception]
  fingerprint_datasets: tuple[str, ...]  # Their shapes + the sources attribute name a copy.


def _crops_output(config) -> _Output:
  from jaxmed.data import preprocess
  return _Output('crops file', config.data.crops_file, preprocess.preprocess,
                 crops_file.check_crops_file, 'crops', crops_file.CropsFileError, ('crops',))


def _volumes_output(config) -> _Output:
  from jaxmed.data import preprocess_volumes
  return _Output('volumes file', config.data.volumes_file, preprocess_volumes.preprocess_volumes,
                 volumes_file.check_volumes_file, 'scans', volumes_file.VolumesFileError,
                 ('shape', 'annotations'))


def outputs_to_build(config) -> tuple[str, ...]:
  """What --mode=preprocess writes: config.data.build if set, else what config.task reads
  ('classify' -> ('crops',), 'detect' -> ('volumes',))."""
  build = tuple(config.data.build) if config.data.get('build') else ()
  if not build:
    build = {'classify': ('crops',), 'detect': ('volumes',)}.get(config.task, ())
  unknown = [b for b in build if b not in ('crops', 'volumes')] or (
      [] if build else [config.task])
  if unknown:
    raise ConfigError(f'data.build {build} / task {config.task!r}: cannot build {unknown[0]!r}; '
                      "set --config.data.build to some of ('crops', 'volumes')")
  return build


def preprocess(config) -> list[dict]:
  """--mode=preprocess: writes every file outputs_to_build names; returns their summaries."""
  makers = {'crops': _crops_output, 'volumes': _volumes_output}
  return [makers[name](config).build(config) for name in outputs_to_build(config)]


def ensure_crops_file(config) -> int:
  """Returns the number of crops in config.data.crops_file, building it first if allowed."""
  return _ensure(config, _crops_output(config))


def ensure_volumes_file(config) -> int:
  """Returns the number of scans in config.data.volumes_file, building it first if allowed."""
  return _ensure(config, _volumes_output(config))


def _ensure(config, output: _Output) -> int:
  path = output.path
  if config.data.auto_prepare:
    if jax.process_index() == 0 and not os.path.exists(path):  # One writer; others wait below.
      from jaxmed.scans import synthetic
      if not _has_scans(config.data.raw_dir):
        logging.warning('no scans in %s: synthesizing the synthetic LUNA16-format dataset first',
                        config.data.raw_dir)
        synthetic.synthesize(config)
      logging.warning('%s does not exist: preprocessing %s into it first', path,
                      config.data.raw_dir)
      output.build(config)
    if jax.process_count() > 1:
      # Every process waits, whether or not it saw the file: a process that started after process
      # 0 had written it would otherwise skip the barrier process 0 waits at, and both would hang.
      multihost_utils.sync_global_devices(f'jaxmed: {output.what} ready')
  if jax.process_count() > 1:
    return _check_on_every_host(output)
  return output.check(path)


def _fingerprint(output: _Output) -> str:
  """What makes two copies the same data: the datasets' shapes and the sources' sha256s."""
  with h5py.File(output.path, 'r') as f:
    identity = (tuple(f[name].shape for name in output.fingerprint_datasets),
                str(f.attrs['sources']))
  return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]


def _check_on_every_host(output: _Output) -> int:
  """Checks this process's copy of the file and compares it with every other process's."""
  path = output.path
  record = {'host': socket.gethostname(), 'path': os.path.abspath(path), 'count': -1,
            'fingerprint': '', 'problem': ''}
  if not os.path.exists(path):
    record['problem'] = 'missing'
  else:
    try:
      record['count'] = output.check(path)
      record['fingerprint'] = _fingerprint(output)
    except (output.error, OSError, KeyError) as e:
      record['problem'] = str(e)[:_RECORD_BYTES // 2]
  encoded = json.dumps(record).encode()[:_RECORD_BYTES]
  buffer = np.zeros(_RECORD_BYTES, np.uint8)
  buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, _RECORD_BYTES)
  records = [json.loads(bytes(row).rstrip(b'\0')) for row in gathered]
  where = lambda i: f"host {records[i]['host']} (process {i} of {len(records)})"
  fix = ('every process reads its own copy: put the same file at that path on every host\'s '
         'local disk, or on storage every host shares (see launch/README.md)')
  missing = [i for i, r in enumerate(records) if r['problem'] == 'missing']
  if missing:
    raise output.error(
        f'{output.what} ' + ', '.join(f"{records[i]['path']} does not exist on {where(i)}"
                                  for i in missing) + f'; {fix}')
  broken = [i for i, r in enumerate(records) if r['problem']]
  if broken:
    raise output.error(
        f"on {where(broken[0])}: {records[broken[0]]['problem']}")
  if len({(r['count'], r['fingerprint']) for r in records}) > 1:
    raise output.error(
        f'the {output.what} differs between hosts: ' + ', '.join(
            f"{where(i)}: {r['path']} with {r['count']} {output.unit}, sources {r['fingerprint']}"
            for i, r in enumerate(records)) + f'; {fix}')
  return records[jax.process_index()]['count']
