"""Make sure the configured crops file exists before training or evaluation starts.

With `data.auto_prepare` (the default), a missing crops file is built by synthesizing the
default synthetic dataset (if `data.raw_dir` holds no scans) and preprocessing it, so that
`python -m jaxmed.main --config=configs/mesh_2x4.py` works on a fresh machine. In a multi-process
run every process checks its own copy (hosts need not share a filesystem), and all of them stop
with the same line, naming each host whose copy is missing, broken or different.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket

import h5py
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxmed.data import crops_file

_RECORD_BYTES = 2048  # One process's check result, JSON, gathered from every process.


def _has_scans(raw_dir: str) -> bool:
  return bool(glob.glob(os.path.join(raw_dir, 'subset*', '*.mhd')))


def ensure_crops_file(config) -> int:
  """Returns the number of crops in config.data.crops_file, building it first if allowed."""
  path = config.data.crops_file
  if config.data.auto_prepare:
    if jax.process_index() == 0 and not os.path.exists(path):  # One writer; others wait below.
      from jaxmed.data import preprocess
      from jaxmed.scans import synthetic
      if not _has_scans(config.data.raw_dir):
        logging.warning('no scans in %s: synthesizing the synthetic LUNA16-format dataset first',
                        config.data.raw_dir)
        synthetic.synthesize(config)
      logging.warning('%s does not exist: preprocessing %s into it first', path,
                      config.data.raw_dir)
      preprocess.preprocess(config)
    if jax.process_count() > 1:
      # Every process waits, whether or not it saw the file: a process that started after process
      # 0 had written it would otherwise skip the barrier process 0 waits at, and both would hang.
      multihost_utils.sync_global_devices('jaxmed: crops file ready')
  if jax.process_count() > 1:
    return _check_on_every_host(path)
  return crops_file.check_crops_file(path)


def _fingerprint(path: str) -> str:
  """What makes two copies the same data: crop count, crop shape and the sources' sha256s."""
  with h5py.File(path, 'r') as f:
    identity = (f['crops'].shape, str(f.attrs['sources']))
  return hashlib.sha256(repr(identity).encode()).hexdigest()[:16]


def _check_on_every_host(path: str) -> int:
  """Checks this process's copy of the crops file and compares it with every other process's."""
  record = {'host': socket.gethostname(), 'path': os.path.abspath(path), 'crops': -1,
            'fingerprint': '', 'problem': ''}
  if not os.path.exists(path):
    record['problem'] = 'missing'
  else:
    try:
      record['crops'] = crops_file.check_crops_file(path)
      record['fingerprint'] = _fingerprint(path)
    except (crops_file.CropsFileError, OSError, KeyError) as e:
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
    raise crops_file.CropsFileError(
        'crops file ' + ', '.join(f"{records[i]['path']} does not exist on {where(i)}"
                                  for i in missing) + f'; {fix}')
  broken = [i for i, r in enumerate(records) if r['problem']]
  if broken:
    raise crops_file.CropsFileError(
        f"on {where(broken[0])}: {records[broken[0]]['problem']}")
  if len({(r['crops'], r['fingerprint']) for r in records}) > 1:
    raise crops_file.CropsFileError(
        'the crops file differs between hosts: ' + ', '.join(
            f"{where(i)}: {r['path']} with {r['crops']} crops, sources {r['fingerprint']}"
            for i, r in enumerate(records)) + f'; {fix}')
  return records[jax.process_index()]['crops']
