"""LUNA16-layout scans + candidates_V2.csv -> one HDF5 crops file (schema v1, crops_file.py).

  python -m jaxmed.main --mode=preprocess [--config.data.raw_dir=...] [--config.data.overwrite=True]
  python -m jaxmed.benchmark --what=preprocess   # seconds per LUNA16-sized scan per worker

For every scan of `data.subsets` (one task per scan, in worker processes): read with SimpleITK
and resample an int16 cube of `stored_crop_size` voxels of `spacing_mm` around each candidate,
on an identity-direction grid (canonical orientation) centred exactly on the candidate's world
(x, y, z) mm, with air outside the scanned volume (luna16.crop_cubes). Each finished scan is kept in
`<crops_file>.parts/`, so an interrupted run resumes where it stopped; the crops file is written
under a temporary name and renamed when complete, with rows sorted by (subset, seriesuid) and
candidates in CSV order: the same inputs give the same file, interrupted or not.
This module imports no JAX: workers load it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time

import h5py
import numpy as np
import SimpleITK as sitk
from absl import logging

from jaxmed import leftovers
from jaxmed.data import crops_file as crops_schema
from jaxmed.scans import luna16
from jaxmed.scans.luna16 import DataError
from jaxmed.reporting import format_seconds

# LUNA16's evaluation reads an annotation's negative diameter as 10 mm.
UNKNOWN_DIAMETER_MM = 10.0
PART_VERSION = 1  # Bump when what a part holds changes: old parts are then recomputed.
# Test hook: SIGKILL this process after this many scans are newly finished (simulates a crash).
CRASH_AFTER_ENV = 'JAXMED_PREPROCESS_CRASH_AFTER_SCANS'


# ---- one scan (runs in a worker) ----------------------------------------------------------

def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def crop_scan(mhd_path: str, centers_world: np.ndarray, spacing_mm: float, interpolator: str,
              size: int) -> tuple[np.ndarray, dict]:
  """Reads one scan and resamples a cube around each candidate (luna16.crop_cubes).

  Args: centers_world (K, 3) world (x, y, z) mm; size: cube edge in voxels of `spacing_mm`.
  Returns (crops (K, size, size, size) int16 HU, axes (z, y, x) = world z, y, x, each candidate
  at the cube's centre (size - 1) / 2; info dict: padded / outside (K,) bool, timings in s).
  """
  t0 = time.perf_counter()
  image = luna16.read_scan(mhd_path)
  t1 = time.perf_counter()
  crops, padded, outside = luna16.crop_cubes(image, centers_world, size, spacing_mm,
                                             interpolator)
  t2 = time.perf_counter()
  return crops, {'padded': padded, 'outside': outside, 'read_s': t1 - t0, 'crop_s': t2 - t1}


def init_worker() -> None:
  # One ITK thread per worker: the workers are the parallelism; threads would fight for cores.
  sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _init_pool_worker() -> None:
  init_worker()
  # A kill -9 of the parent leaves no worker running. SIGTERM keeps its default: the pool
  # terminates the workers of a broken pool with it.
  leftovers.exit_with_parent(ignore_sigterm=False)


def process_scan(task: dict) -> dict:
  """Crops one scan and saves them to the task's part file (atomically). Runs in a worker."""
  start, cpu_start = time.perf_counter(), time.process_time()
  crops, info = crop_scan(task['mhd_path'], task['centers_world'], task['spacing_mm'],
                          task['interpolator'], task['size'])
  t_hash = time.perf_counter()
  sources = {task['mhd_rel']: _sha256(task['mhd_path']),
             task['raw_rel']: _sha256(os.path.splitext(task['mhd_path'])[0] + '.raw')}
  info['hash_s'] = time.perf_counter() - t_hash
  tmp = task['part_path'] + '.partial.npz'
  np.savez(tmp, crops=crops, padded=info['padded'], outside=info['outside'],
           key=np.array(task['key']), sources=np.array(json.dumps(sources, sort_keys=True)))
  os.replace(tmp, task['part_path'])
  info['seconds'] = time.perf_counter() - start
  info['cpu_s'] = time.process_time() - cpu_start  # Core-seconds: what other load cannot inflate.
  return {'seriesuid': task['seriesuid'], 'padded': int(info['padded'].sum()),
          'outside': int(info['outside'].sum()),
          **{k: v for k, v in info.items() if k.endswith('_s') or k == 'seconds'}}


def _load_part(path: str, key: str):
  """The cached crops of one scan, or None if absent, unreadable or made from other inputs."""
  try:
    with np.load(path) as part:
      if str(part['key']) != key:
        return None
      return {name: part[name] for name in ('crops', 'padded', 'outside')} | {
          'sources': json.loads(str(part['sources']))}
  except (OSError, KeyError, ValueError):
    return None


# ---- planning: which candidates, which rows -------------------------------------------------

def _scan_rows(candidates, annotations, uid_rows, scan, data, seed):
  """Rows of one scan (CSV order): indices, labels, diameters, exclude flags, negatives dropped.

  Also the number of positives inside no annotation's sphere (their diameter_mm is -1).
  """
  rows = np.asarray(uid_rows, np.int64)
  labels = (candidates['class'][rows] != 0).astype(np.uint8)
  if data.negatives_per_scan >= 0:
    negatives = rows[labels == 0]
    if len(negatives) > data.negatives_per_scan:
      # The sample depends only on (seed, seriesuid): the same whatever else is processed.
      uid_seed = int(hashlib.sha256(scan.seriesuid.encode()).hexdigest()[:8], 16)
      keep = np.random.default_rng([seed, uid_seed]).choice(
          len(negatives), size=int(data.negatives_per_scan), replace=False)
      drop = np.setdiff1d(negatives, negatives[keep])
      rows = rows[~np.isin(rows, drop)]
      labels = (candidates['class'][rows] != 0).astype(np.uint8)
  centers = np.stack([candidates['coordX'][rows], candidates['coordY'][rows],
                      candidates['coordZ'][rows]], axis=1)
  nodules, diameters = annotations.get(scan.seriesuid, (np.zeros((0, 3)), np.zeros(0)))
  # As LUNA16's evaluation: a nodule's sphere has its annotated diameter (10 mm if negative), and
  # a candidate is inside when its squared distance is strictly below the squared radius.
  radius = np.where(diameters < 0, UNKNOWN_DIAMETER_MM, diameters) / 2.0  # (M,) mm
  dist2 = np.sum((centers[:, None, :] - nodules[None, :, :]) ** 2, axis=-1)  # (K, M) mm^2
  inside = dist2 < radius[None, :] ** 2
  # A positive takes the diameter of the nearest annotation whose sphere holds it; none: -1.
  matched = np.full(len(rows), -1.0)
  if len(nodules):
    nearest = np.argmin(np.where(inside, dist2, np.inf), axis=1)
    matched = np.where(inside.any(axis=1), diameters[nearest], -1.0)
  matched = np.maximum(matched, -1.0)  # An annotation's own negative diameter is unknown too.
  diameter = np.where(labels == 1, matched, 0.0).astype(np.float32)
  unmatched = int(((labels == 1) & (matched < 0)).sum())
  # A negative near a nodule is no negative: within the configured distance (0: half a stored
  # crop) or the factor x that nodule's own radius, whichever is larger.
  distance = data.exclude_radius_mm or data.stored_crop_size * data.spacing_mm / 2
  reach = np.maximum(distance, data.exclude_radius_factor * radius)  # (M,) mm
  exclude = (labels == 0) & (dist2 < reach[None, :] ** 2).any(axis=1)
  return rows, labels, centers, diameter, exclude, unmatched


def _group_annotations(annotations):
  by_uid = {}
  for i, uid in enumerate(annotations['seriesuid']):
    by_uid.setdefault(uid, []).append(i)
  out = {}
  for uid, idx in by_uid.items():
    idx = np.asarray(idx)
    out[uid] = (np.stack([annotations['coordX'][idx], annotations['coordY'][idx],
                          annotations['coordZ'][idx]], 1), annotations['diameter_mm'][idx])
  return out


def _task_key(data, seed, scan, rows, centers, labels):
  """What a part's crops depend on: a cached part with another key is recomputed."""
  stats = [os.stat(p) for p in (scan.mhd_path, scan.raw_path)]
  digest = hashlib.sha256(json.dumps({
      'version': PART_VERSION, 'spacing_mm': float(data.spacing_mm),
      'interpolator': data.interpolator, 'size': int(data.stored_crop_size),
      'files': [[s.st_size, s.st_mtime_ns] for s in stats], 'seed': int(seed),
  }, sort_keys=True).encode())
  for array in (rows, centers, labels):
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


# ---- the run --------------------------------------------------------------------------------

def _check_existing_output(path: str, overwrite: bool) -> None:
  if os.path.isdir(path):
    raise DataError(f'crops file {path} is a folder; set --config.data.crops_file to a file path')
  if not os.path.exists(path) or overwrite:
    return
  try:
    n = crops_schema.check_crops_file(path)
  except crops_schema.CropsFileError as e:
    raise DataError(f'{path} already exists but is not a complete crops file ({e}); pass '
                    '--config.data.overwrite=True to replace it') from None
  raise DataError(f'crops file {path} is already complete ({n} crops); pass '
                  '--config.data.overwrite=True to rebuild it')


def preprocess(config) -> dict:
  """Writes config.data.crops_file from the scans of config.data.subsets; returns a summary.

  Raises DataError (one line: cause and fix) for bad inputs or an already complete output.
  """
  data = config.data
  start = time.perf_counter()
  out_path = data.crops_file
  _check_existing_output(out_path, data.overwrite)
  if data.interpolator not in luna16.INTERPOLATORS:
    raise DataError(f'data.interpolator is {data.interpolator!r}, not one of '
                    f'{sorted(luna16.INTERPOLATORS)}; set --config.data.interpolator')
  if not data.spacing_mm > 0:
    raise DataError(f'data.spacing_mm is {data.spacing_mm}, must be > 0 (mm); set '
                    '--config.data.spacing_mm')
  if not 0 < data.crop_size <= data.stored_crop_size:
    raise DataError(f'data.crop_size {data.crop_size} must be in 1..stored_crop_size '
                    f'({data.stored_crop_size}); fix --config.data.crop_size')
  scans = luna16.find_scans(data.raw_dir)
  candidates_csv = luna16.resolve(data.raw_dir, data.candidates_csv)
  annotations_csv = luna16.resolve(data.raw_dir, data.annotations_csv)
  candidates = luna16.read_candidates(candidates_csv)
  annotations = _group_annotations(luna16.read_annotations(annotations_csv))
  subsets = tuple(int(s) for s in data.subsets)
  selected = sorted((s for s in scans.values() if s.subset in subsets),
                    key=lambda s: (s.subset, s.seriesuid))
  if not selected:
    raise DataError(f'no scans of subsets {list(subsets)} under {data.raw_dir}/subset*/*.mhd; '
                    'check --config.data.raw_dir and --config.data.subsets')

  # Candidates by scan, CSV order; those whose scan is nowhere under raw_dir are skipped.
  rows_by_uid = {}
  for i, uid in enumerate(candidates['seriesuid']):
    rows_by_uid.setdefault(uid, []).append(i)
  missing = {uid: rows for uid, rows in rows_by_uid.items() if uid not in scans}
  skipped_missing = sum(len(rows) for rows in missing.values())
  if missing and data.strict:
    uid, rows = next(iter(missing.items()))
    raise DataError(
        f'{candidates_csv} line {rows[0] + 2}: scan {uid} is not under {data.raw_dir}/subset*/ '
        f'({skipped_missing} candidates of {len(missing)} scans lack their scan); add the scans '
        'or pass --config.data.strict=False to skip them')

  # Every file of every scan to crop, before any work: a missing .raw is named, not met mid-run.
  for scan in selected:
    for path in (scan.mhd_path, scan.raw_path):
      if scan.seriesuid in rows_by_uid and not os.path.isfile(path):
        raise DataError(f'scan file {path} (data of {scan.mhd_path}) does not exist; restore '
                        'it, or move the scan out of the subset folders')
  parts_dir = out_path + '.parts'
  try:
    os.makedirs(parts_dir, exist_ok=True)
  except OSError as e:
    raise DataError(f'cannot write next to crops file {out_path} ({parts_dir}: {e.strerror}); '
                    'set --config.data.crops_file to a writable path') from None
  plans, pending, unmatched_positives, dropped = [], [], 0, 0
  no_candidates = 0
  for scan in selected:
    if scan.seriesuid not in rows_by_uid:
      no_candidates += 1
      continue
    all_rows = rows_by_uid[scan.seriesuid]
    rows, labels, centers, diameter, exclude, unmatched = _scan_rows(
        candidates, annotations, all_rows, scan, data, config.seed)
    dropped += len(all_rows) - len(rows)
    unmatched_positives += unmatched
    part_path = os.path.join(parts_dir, f'subset{scan.subset}_{scan.seriesuid}.npz')
    key = _task_key(data, config.seed, scan, rows, centers, labels)
    plan = {'scan': scan, 'labels': labels, 'centers': centers, 'diameter': diameter,
            'exclude': exclude, 'part_path': part_path, 'key': key}
    plans.append(plan)
    if _load_part(part_path, key) is None:
      rel = os.path.relpath(scan.mhd_path, data.raw_dir)
      pending.append({'seriesuid': scan.seriesuid, 'mhd_path': scan.mhd_path,
                      'mhd_rel': rel, 'raw_rel': os.path.splitext(rel)[0] + '.raw',
                      'centers_world': centers, 'spacing_mm': float(data.spacing_mm),
                      'interpolator': data.interpolator, 'size': int(data.stored_crop_size),
                      'part_path': part_path, 'key': key})
  if not plans:
    raise DataError(f'no candidates in {candidates_csv} belong to the scans of subsets '
                    f'{list(subsets)} under {data.raw_dir}; check the CSV and '
                    '--config.data.subsets')
  cached = len(plans) - len(pending)
  logging.info('preprocess: %d scans in subsets %s (%d cached in %s), %d candidates -> %s',
               len(plans), list(subsets), cached, parts_dir,
               sum(len(p['labels']) for p in plans), out_path)

  results = _run_tasks(pending, int(data.preprocess_workers), len(plans), cached)
  summary = _write_crops_file(config, plans, out_path, candidates_csv, annotations_csv)
  shutil.rmtree(parts_dir, ignore_errors=True)

  worker_seconds = [r['seconds'] for r in results]
  summary.update({
      'scans_cached': cached, 'scans_without_candidates': no_candidates,
      'skipped': {'scan_missing': skipped_missing, 'negatives_over_cap': dropped},
      'positives_without_annotation': unmatched_positives,
      'seconds': time.perf_counter() - start,
      'seconds_per_scan_per_worker': float(np.mean(worker_seconds)) if results else None,
  })
  logging.info(
      'preprocess: done in %.1f s: %d scans (%d from cache), %d crops (%d positive, %d '
      'excluded negatives), %d padded at the volume edge (%d centred outside it); skipped: %d '
      'candidates whose scan is missing (%d scans), %d negatives over the per-scan cap; '
      '%s s/scan/worker', summary['seconds'], summary['scans'], cached, summary['crops'],
      summary['positives'], summary['excluded'], summary['padded'], summary['outside_volume'],
      skipped_missing, len(missing), dropped,
      f'{summary["seconds_per_scan_per_worker"]:.2f}' if results else 'n/a')
  if unmatched_positives:
    logging.warning('preprocess: %d positive candidates lie inside no nodule of %s '
                    '(diameter_mm=-1: unknown)', unmatched_positives, annotations_csv)
  return summary


def _run_tasks(pending: list[dict], workers: int, total: int, cached: int) -> list[dict]:
  """Runs the scans' tasks (0 workers = in this process), logging one progress line per scan."""
  crash_after = int(os.environ.get(CRASH_AFTER_ENV, '0') or 0)
  start = time.perf_counter()
  results = []

  def report(result):
    results.append(result)
    done = len(results)
    elapsed = time.perf_counter() - start
    logging.info('preprocess: %d/%d scans | %s | %.2f s read+crop | %.2f scans/s | ETA %s',
                 cached + done, total, result['seriesuid'], result['seconds'],
                 done / elapsed, format_seconds(elapsed / done * (len(pending) - done)))
    if crash_after and done >= crash_after:
      os.kill(os.getpid(), signal.SIGKILL)

  if workers <= 0 or len(pending) <= 1:
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    init_worker()  # Cubes are small: ITK threads cost more than they give.
    try:
      for task in pending:
        report(process_scan(task))
    finally:
      sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return results
  context = multiprocessing.get_context('spawn')  # No fork of a process that may hold JAX.
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(pending)), mp_context=context,
                                              initializer=_init_pool_worker) as pool:
    futures = [pool.submit(process_scan, task) for task in pending]
    try:
      for future in concurrent.futures.as_completed(futures):
        report(future.result())
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)  # Finished scans stay cached.
      raise
  return results


def _write_crops_file(config, plans: list[dict], out_path: str, candidates_csv: str,
                      annotations_csv: str) -> dict:
  """Assembles the parts into `out_path` (via a temporary file renamed at the end)."""
  data = config.data
  size = int(data.stored_crop_size)
  n = sum(len(p['labels']) for p in plans)
  uids = [p['scan'].seriesuid for p in plans]
  sources = {}
  for path in (candidates_csv, annotations_csv):
    rel = os.path.relpath(path, data.raw_dir)
    sources[rel if not rel.startswith('..') else path] = _sha256(path)
  tmp = out_path + '.partial'
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  if os.path.exists(tmp):
    os.remove(tmp)
  padded = outside = 0
  with h5py.File(tmp, 'w') as f:
    crops = f.create_dataset('crops', (n, size, size, size), np.int16,
                             chunks=(1, size, size, size), track_times=False)
    row = 0
    for plan in plans:
      part = _load_part(plan['part_path'], plan['key'])
      if part is None:
        raise RuntimeError(f'part {plan["part_path"]} vanished during preprocessing')
      k = len(plan['labels'])
      crops[row:row + k] = part['crops']
      padded += int(part['padded'].sum())
      outside += int(part['outside'].sum())
      sources.update(part['sources'])
      row += k

    def column(name, values, dtype):
      f.create_dataset(name, data=np.asarray(values, dtype), track_times=False)

    column('label', np.concatenate([p['labels'] for p in plans]), np.uint8)
    column('seriesuid', [p['scan'].seriesuid.encode() for p in plans
                         for _ in range(len(p['labels']))], f'S{max(map(len, uids))}')
    column('subset', np.concatenate([np.full(len(p['labels']), p['scan'].subset)
                                     for p in plans]), np.int8)
    column('center_world', np.concatenate([p['centers'] for p in plans]), np.float64)
    column('diameter_mm', np.concatenate([p['diameter'] for p in plans]), np.float32)
    column('exclude', np.concatenate([p['exclude'] for p in plans]), np.bool_)
    f.attrs['schema_version'] = crops_schema.SCHEMA_VERSION
    f.attrs['spacing_mm'] = float(data.spacing_mm)
    f.attrs['crop_shape'] = np.array([size] * 3, np.int64)
    f.attrs['sources'] = json.dumps(sources, sort_keys=True)
    f.attrs['config'] = config.to_json(sort_keys=True)
    crops_schema.check_crops_file(tmp, f)
    positives = int(f['label'][:].sum())
    excluded = int(f['exclude'][:].sum())
  os.replace(tmp, out_path)
  return {'crops_file': out_path, 'scans': len(plans), 'crops': n, 'positives': positives,
          'excluded': excluded, 'padded': padded, 'outside_volume': outside}
