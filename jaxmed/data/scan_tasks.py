"""What the crops file and the volumes file share when they are built from scans: one task per
scan run in worker processes (or in this process), each finished scan saved atomically as a part
in `<output>.parts/` so that an interrupted run resumes, sha256 of the source files, and the
output written under a temporary name and renamed when complete.
This module imports no JAX: workers load it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
from absl import logging

from jaxmed import leftovers
from jaxmed.reporting import format_seconds
from jaxmed.scans import luna16
from jaxmed.scans.luna16 import DataError

# Test hook: SIGKILL this process after this many scans are newly finished (simulates a crash).
CRASH_AFTER_ENV = 'JAXMED_PREPROCESS_CRASH_AFTER_SCANS'


def sha256(path: str) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def scan_sources(mhd_path: str, mhd_rel: str) -> dict[str, str]:
  """{path relative to the raw folder: sha256} of a scan's .mhd and of the data file its
  ElementDataFile names (mhd_rel: the .mhd's relative path)."""
  data_path = luna16.data_file_path(mhd_path)
  data_rel = os.path.join(os.path.dirname(mhd_rel), os.path.relpath(data_path,
                                                                    os.path.dirname(mhd_path)))
  return {mhd_rel: sha256(mhd_path), os.path.normpath(data_rel): sha256(data_path)}


def csv_sources(paths: list[str], raw_dir: str) -> dict[str, str]:
  """{path relative to raw_dir (absolute if outside it): sha256} of the CSVs an output used."""
  sources = {}
  for path in paths:
    rel = os.path.relpath(path, raw_dir)
    sources[rel if not rel.startswith('..') else path] = sha256(path)
  return sources


def save_part(part_path: str, key: str, sources: dict[str, str], **arrays: np.ndarray) -> None:
  """Writes one scan's arrays to `part_path` (.npz) atomically, with its key and sources."""
  tmp = part_path + '.partial.npz'
  np.savez(tmp, key=np.array(key), sources=np.array(json.dumps(sources, sort_keys=True)),
           **arrays)
  os.replace(tmp, part_path)


def load_part(path: str, key: str, names: tuple[str, ...]) -> dict | None:
  """A saved part's arrays `names` and 'sources', or None if absent, unreadable or made from
  other inputs (another key)."""
  try:
    with np.load(path) as part:
      if str(part['key']) != key:
        return None
      return {name: part[name] for name in names} | {
          'sources': json.loads(str(part['sources']))}
  except (OSError, KeyError, ValueError):
    return None


def files_key(paths: list[str], settings: dict) -> hashlib._Hash:
  """A digest of the files' sizes and mtimes and the settings: update it with the arrays a part
  depends on, then take hexdigest()."""
  stats = [os.stat(p) for p in paths]
  return hashlib.sha256(json.dumps({
      **settings, 'files': [[s.st_size, s.st_mtime_ns] for s in stats]},
      sort_keys=True).encode())


def make_parts_dir(out_path: str, what: str, config_key: str) -> str:
  """Creates `<out_path>.parts/`; DataError (one line) when the place is not writable."""
  parts_dir = out_path + '.parts'
  try:
    os.makedirs(parts_dir, exist_ok=True)
  except OSError as e:
    raise DataError(f'cannot write next to {what} {out_path} ({parts_dir}: {e.strerror}); '
                    f'set --config.{config_key} to a writable path') from None
  return parts_dir


def check_existing_output(path: str, overwrite: bool, what: str, config_key: str,
                          check: Callable[[str], int], error_type: type[Exception],
                          unit: str) -> None:
  """DataError (one line) if `path` is a folder, or already a complete output (`check` returns
  its count of `unit`) or something else, unless `overwrite`."""
  if os.path.isdir(path):
    raise DataError(f'{what} {path} is a folder; set --config.{config_key} to a file path')
  if not os.path.exists(path) or overwrite:
    return
  try:
    n = check(path)
  except error_type as e:
    raise DataError(f'{path} already exists but is not a complete {what} ({e}); pass '
                    '--config.data.overwrite=True to replace it') from None
  raise DataError(f'{what} {path} is already complete ({n} {unit}); pass '
                  '--config.data.overwrite=True to rebuild it')


def init_worker() -> None:
  # One ITK thread per worker: the workers are the parallelism; threads would fight for cores.
  sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _init_pool_worker() -> None:
  init_worker()
  # A kill -9 of the parent leaves no worker running. SIGTERM keeps its default: the pool
  # terminates the workers of a broken pool with it.
  leftovers.exit_with_parent(ignore_sigterm=False)


def run_tasks(process: Callable[[dict], dict], pending: list[dict], workers: int, total: int,
              cached: int, label: str = 'preprocess',
              in_process_threads: int | None = 1) -> list[dict]:
  """Runs `process` (a picklable top-level function) on each task, one scan each, in `workers`
  processes (0 = in this process, with `in_process_threads` ITK threads; None = ITK's default),
  logging one progress line per scan. Each result needs 'seriesuid' and 'seconds'.
  """
  crash_after = int(os.environ.get(CRASH_AFTER_ENV, '0') or 0)
  start = time.perf_counter()
  results = []

  def report(result):
    results.append(result)
    done = len(results)
    elapsed = time.perf_counter() - start
    logging.info('%s: %d/%d scans | %s | %.2f s | %.2f scans/s | ETA %s', label, cached + done,
                 total, result['seriesuid'], result['seconds'], done / elapsed,
                 format_seconds(elapsed / done * (len(pending) - done)))
    if crash_after and done >= crash_after:
      os.kill(os.getpid(), signal.SIGKILL)

  if workers <= 0 or len(pending) <= 1:
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if in_process_threads is not None:
      sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(in_process_threads)
    try:
      for task in pending:
        report(process(task))
    finally:
      sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return results
  context = multiprocessing.get_context('spawn')  # No fork of a process that may hold JAX.
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(pending)), mp_context=context,
                                              initializer=_init_pool_worker) as pool:
    futures = [pool.submit(process, task) for task in pending]
    try:
      for future in concurrent.futures.as_completed(futures):
        report(future.result())
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)  # Finished scans stay cached.
      raise
  return results


def fresh_temporary(out_path: str) -> str:
  """`<out_path>.partial`, with any leftover of an earlier run removed, its folder created."""
  tmp = out_path + '.partial'
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  if os.path.exists(tmp):
    os.remove(tmp)
  return tmp


def throughput(out_path: str, scans: int, seconds: float) -> dict[str, float]:
  """The summary figures of a finished output: its bytes per scan and scans per second."""
  return {'bytes_per_scan': os.path.getsize(out_path) / max(scans, 1),
          'scans_per_s': scans / max(seconds, 1e-9)}
