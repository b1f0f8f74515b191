"""Make sure the configured crops file exists before training or evaluation starts.

With `data.auto_prepare` (the default), a missing crops file is built by synthesizing the
default synthetic dataset (if `data.raw_dir` holds no scans) and preprocessing it, so that
`python -m jaxmed.main --config=configs/mesh_2x4.py` works on a fresh machine.
"""

from __future__ import annotations

import glob
import os

import jax
from absl import logging
from jax.experimental import multihost_utils

from jaxmed.data import crops_file


def _has_scans(raw_dir: str) -> bool:
  return bool(glob.glob(os.path.join(raw_dir, 'subset*', '*.mhd')))


def ensure_crops_file(config) -> int:
  """Returns the number of crops in config.data.crops_file, building it first if allowed."""
  path = config.data.crops_file
  if config.data.auto_prepare:
    if jax.process_index() == 0 and not os.path.exists(path):  # One writer; others wait below.
      from jaxmed.data import preprocess
      from jaxmed.data import synthetic
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
  return crops_file.check_crops_file(path)
