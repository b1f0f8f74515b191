"""LUNA16-layout scans + annotations.csv -> one HDF5 volumes file (schema v1, volumes_file.py).

  python -m jaxmed.main --mode=preprocess --config.task=detect [--config.data.overwrite=True]

For every scan of `data.subsets` (one task per scan, in worker processes): read with SimpleITK,
resample the whole scan to `detect.spacing_mm` isotropic on the identity-direction grid covering
it (scans/resample.py), measure the body's box. Each finished scan is kept in
`<volumes_file>.parts/`, so an interrupted run resumes where it stopped; the file is written
under a temporary name and renamed when complete, scans sorted by (subset, seriesuid): the same
inputs give the same file, interrupted or not (the machinery is scan_tasks.py, shared with the
crops file). This module imports no JAX: workers load it.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import h5py
import numpy as np
from absl import logging

from jaxmed.data import scan_tasks
from jaxmed.data import volumes_file as schema
from jaxmed.data.preprocess import group_annotations
from jaxmed.scans import luna16
from jaxmed.scans.luna16 import DataError
from jaxmed.scans.resample import check_spacing, resample_scan

PART_VERSION = 1  # Bump when what a part holds changes: old parts are then recomputed.
_PART_ARRAYS = ('hu', 'origin_xyz', 'body_box')


def body_box(hu: np.ndarray) -> np.ndarray:
  """int64 (2, 3): the [low, high) (z, y, x) voxel box of voxels above BODY_HU (the whole volume
  if there are none)."""
  box = np.stack([np.zeros(3, np.int64), np.asarray(hu.shape, np.int64)])
  for axis in range(3):
    others = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero((hu > schema.BODY_HU).any(axis=others))
    if len(present):
      box[:, axis] = present[0], present[-1] + 1
  return box


def process_volume(task: dict) -> dict:
  """Resamples one scan and saves it to the task's part file (atomically). Runs in a worker."""
  start = time.perf_counter()
  image = luna16.read_scan(task['mhd_path'])
  volume = resample_scan(image, task['spacing_mm'], task['interpolator'])
  sources = scan_tasks.scan_sources(task['mhd_path'], task['mhd_rel'])
  scan_tasks.save_part(task['part_path'], task['key'], sources, hu=volume.hu,
                       origin_xyz=volume.origin_xyz, body_box=body_box(volume.hu))
  return {'seriesuid': task['seriesuid'], 'seconds': time.perf_counter() - start}


def _annotation_rows(by_uid: dict, uids: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(float64 (M, 4) x, y, z mm, diameter_mm; int32 (M,) scan row) in scan order."""
  rows, scans = [np.zeros((0, 4))], [np.zeros(0, np.int32)]
  for i, uid in enumerate(uids):
    if uid in by_uid:
      centers, diameters = by_uid[uid]
      rows.append(np.concatenate([centers, np.asarray(diameters)[:, None]], axis=1))
      scans.append(np.full(len(diameters), i, np.int32))
  return np.concatenate(rows).astype(np.float64), np.concatenate(scans)


def preprocess_volumes(config) -> dict:
  """Writes config.data.volumes_file from the scans of config.data.subsets; returns a summary.

  Raises DataError (one line: cause and fix) for bad inputs or an already complete output.
  """
  data = config.data
  start = time.perf_counter()
  out_path = data.volumes_file
  scan_tasks.check_existing_output(out_path, data.overwrite, 'volumes file',
                                   'data.volumes_file', schema.check_volumes_file,
                                   schema.VolumesFileError, 'scans')
  spacing = check_spacing(config.detect.spacing_mm)
  if data.interpolator not in luna16.INTERPOLATORS:
    raise DataError(f'data.interpolator is {data.interpolator!r}, not one of '
                    f'{sorted(luna16.INTERPOLATORS)}; set --config.data.interpolator')
  scans = luna16.find_scans(data.raw_dir)
  annotations_csv = luna16.resolve(data.raw_dir, data.annotations_csv)
  annotations = group_annotations(luna16.read_annotations(annotations_csv))
  csvs = [annotations_csv]
  excluded = {}
  if data.annotations_excluded_csv:
    excluded_csv = luna16.resolve(data.raw_dir, data.annotations_excluded_csv)
    excluded = group_annotations(luna16.read_csv(excluded_csv, luna16.ANNOTATION_COLUMNS,
                                                 'annotations_excluded_csv'))
    csvs.append(excluded_csv)
  subsets = tuple(int(s) for s in data.subsets)
  selected = sorted((s for s in scans.values() if s.subset in subsets),
                    key=lambda s: (s.subset, s.seriesuid))
  if not selected:
    raise DataError(f'no scans of subsets {list(subsets)} under {data.raw_dir}/subset*/*.mhd; '
                    'check --config.data.raw_dir and --config.data.subsets')
  for scan in selected:  # Every file first: a missing .raw is named, not met mid-run.
    if not os.path.isfile(scan.raw_path):
      raise DataError(f'scan file {scan.raw_path} (data of {scan.mhd_path}) does not exist; '
                      'restore it, or move the scan out of the subset folders')
  parts_dir = scan_tasks.make_parts_dir(out_path, 'volumes file', 'data.volumes_file')
  plans, pending = [], []
  for scan in selected:
    part_path = os.path.join(parts_dir, f'subset{scan.subset}_{scan.seriesuid}.npz')
    key = scan_tasks.files_key([scan.mhd_path, scan.raw_path], {
        'version': PART_VERSION, 'spacing_mm': spacing,
        'interpolator': data.interpolator}).hexdigest()
    plans.append({'scan': scan, 'part_path': part_path, 'key': key})
    if scan_tasks.load_part(part_path, key, ()) is None:
      pending.append({'seriesuid': scan.seriesuid, 'mhd_path': scan.mhd_path,
                      'mhd_rel': os.path.relpath(scan.mhd_path, data.raw_dir),
                      'spacing_mm': spacing, 'interpolator': data.interpolator,
                      'part_path': part_path, 'key': key})
  cached = len(plans) - len(pending)
  logging.info('preprocess volumes: %d scans in subsets %s (%d cached in %s) at %g mm -> %s',
               len(plans), list(subsets), cached, parts_dir, spacing, out_path)
  # In this process ITK may use every core: one whole scan is a big resampling job.
  scan_tasks.run_tasks(process_volume, pending, int(data.preprocess_workers), len(plans),
                       cached, label='preprocess volumes', in_process_threads=None)
  summary = _write_volumes_file(config, plans, out_path, annotations, excluded, csvs, spacing)
  shutil.rmtree(parts_dir, ignore_errors=True)
  summary['seconds'] = time.perf_counter() - start
  summary['scans_cached'] = cached
  summary.update(scan_tasks.throughput(out_path, summary['scans'], summary['seconds']))
  logging.info('preprocess volumes: done in %.1f s: %d scans (%d from cache), %d annotations '
               '(%d excluded), %.1f MB/scan, %.2f scans/s -> %s', summary['seconds'],
               summary['scans'], cached, summary['annotations'], summary['excluded'],
               summary['bytes_per_scan'] / 1e6, summary['scans_per_s'], out_path)
  return summary


def _write_volumes_file(config, plans: list[dict], out_path: str, annotations: dict,
                        excluded: dict, csvs: list[str], spacing: float) -> dict:
  """Assembles the parts into `out_path` (via a temporary file renamed at the end)."""
  uids = [p['scan'].seriesuid for p in plans]
  sources = scan_tasks.csv_sources(csvs, config.data.raw_dir)
  tmp = scan_tasks.fresh_temporary(out_path)
  shapes, origins, boxes = [], [], []
  with h5py.File(tmp, 'w') as f:
    volumes = f.create_group('volumes')
    for plan, uid in zip(plans, uids):
      part = scan_tasks.load_part(plan['part_path'], plan['key'], _PART_ARRAYS)
      if part is None:
        raise RuntimeError(f'part {plan["part_path"]} vanished during preprocessing')
      hu = part['hu']
      chunks = tuple(min(schema.CHUNK_EDGE, n) for n in hu.shape)
      volumes.create_dataset(uid, data=hu, chunks=chunks, track_times=False)
      shapes.append(hu.shape)
      origins.append(part['origin_xyz'])
      boxes.append(part['body_box'])
      sources.update(part['sources'])

    def column(name, values, dtype):
      f.create_dataset(name, data=np.asarray(values, dtype), track_times=False)

    column('seriesuid', [uid.encode() for uid in uids], f'S{max(map(len, uids))}')
    column('subset', [p['scan'].subset for p in plans], np.int8)
    column('shape', shapes, np.int64)
    column('origin_xyz', origins, np.float64)
    column('body_box', boxes, np.int64)
    rows, scan_of = _annotation_rows(annotations, uids)
    column('annotations', rows, np.float64)
    column('annotation_scan', scan_of, np.int32)
    excluded_rows, excluded_scan = _annotation_rows(excluded, uids)
    column('excluded', excluded_rows, np.float64)
    column('excluded_scan', excluded_scan, np.int32)
    f.attrs['schema_version'] = schema.SCHEMA_VERSION
    f.attrs['spacing_mm'] = spacing
    f.attrs['direction'] = np.eye(3).ravel()
    f.attrs['chunk_edge'] = schema.CHUNK_EDGE
    f.attrs['sources'] = json.dumps(sources, sort_keys=True)
    f.attrs['config'] = config.to_json(sort_keys=True)
    schema.check_volumes_file(tmp, f)
  os.replace(tmp, out_path)
  return {'volumes_file': out_path, 'scans': len(plans), 'annotations': len(rows),
          'excluded': len(excluded_rows),
          'voxels': int(sum(int(np.prod(s)) for s in shapes))}
