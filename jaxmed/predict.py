"""--mode=predict: score candidates of scans without annotations (DICOM, NIfTI or MetaImage).
Without predict.candidates_csv, a detect config finds the candidates itself (jaxmed/detect.py).

  python -m jaxmed.main --config=configs/mesh_2x4.py --mode=predict \
      --config.predict.scans_dir=data/raw/synthetic_dicom/subset9 \
      --config.predict.candidates_csv=data/raw/synthetic_dicom/subset9/candidates.csv

Candidates are cut as preprocessing cuts them and scored by the workdir's checkpoint on the
config's mesh, one scan at a time; predictions.csv (LUNA16 submission format, in the CSV's order)
and montages/<seriesuid>.png go to predict.output_dir (default <workdir>/predict) once every input
has passed its checks, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxmed import checkpointing
from jaxmed import train
from jaxmed.scans import luna16
from jaxmed.data import loader
from jaxmed.scans import scan_formats
from jaxmed.scans.luna16 import DataError
from jaxmed.errors import ConfigError
from jaxmed.evaluation import plots
from jaxmed.evaluation import submission
from jaxmed.parallel import sharding as sharding_lib

COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ')


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.predict.output_dir or os.path.join(workdir, 'predict')


def _required_path(config, key: str) -> str:
  value = config.predict[key]
  if not value:
    raise ConfigError(f'predict.{key} is not set; pass --config.predict.{key}=PATH')
  return value


def read_candidates(path: str) -> dict[str, np.ndarray]:
  """seriesuid, coordX/Y/Z (world mm) and, if the CSV has it, class; rows in file order."""
  if not os.path.isfile(path):
    raise DataError(f'candidates CSV {path} does not exist; set --config.predict.candidates_csv '
                    'to a CSV with columns seriesuid,coordX,coordY,coordZ')
  with open(path, newline='', encoding='utf-8-sig') as f:
    header = [name.strip() for name in next(csv.reader(f), [])]
  columns = COLUMNS + (('class',) if 'class' in header else ())
  candidates = luna16.read_csv(path, columns)
  if not len(candidates['seriesuid']):
    raise DataError(f'candidates CSV {path} has no rows; add candidates (one row per point to '
                    'score)')
  return candidates


def _rows_by_scan(candidates, scans, csv_path: str, scans_dir: str) -> dict[str, np.ndarray]:
  """Candidate rows of each scan (CSV order); a seriesuid that names no scan is an error."""
  by_uid: dict[str, list[int]] = {}
  for i, uid in enumerate(candidates['seriesuid']):
    by_uid.setdefault(uid, []).append(i)
  unknown = [uid for uid in by_uid if uid not in scans]
  if unknown:
    first = by_uid[unknown[0]][0]
    raise DataError(
        f'{csv_path} line {first + 2}: seriesuid {unknown[0]} names no scan in {scans_dir} '
        f'({len(unknown)} of {len(by_uid)} seriesuids unknown; {len(scans)} scans found); add '
        'the scan or remove its candidates')
  return {uid: np.asarray(rows) for uid, rows in by_uid.items()}


def _check_outside(outside: np.ndarray, rows: np.ndarray, centers: np.ndarray,
                   geometry: scan_formats.Geometry, uid: str, csv_path: str) -> None:
  if not outside.any():
    return
  k = int(np.flatnonzero(outside)[0])
  corners = np.array([[0, 0, 0], np.asarray(geometry.size_xyz)[::-1] - 1], np.float64)
  ends = luna16.voxel_to_world(geometry.grid, corners)
  low, high = np.minimum(*ends), np.maximum(*ends)
  box = ', '.join(f'{a} {lo:.1f}..{hi:.1f}' for a, lo, hi in zip('xyz', low, high))
  raise DataError(
      f'{csv_path} line {rows[k] + 2}: candidate ({", ".join(f"{v:.2f}" for v in centers[k])}) '
      f'mm lies outside scan {uid} ({box} mm; {int(outside.sum())} of its {len(rows)} '
      'candidates lie outside); fix its coordinates (world mm, x y z) or remove it')


def score_crops(eval_fn, state, crops: np.ndarray, batch_size: int, batch_sharding,
           crop_sharding) -> np.ndarray:
  """Probabilities (K,) of int16 crops (K, S, S, S), batches of `batch_size` over the mesh."""
  # Every process cut every crop; each feeds the rows its devices hold, as the eval loader does.
  positions = loader.process_batch_rows(batch_sharding, batch_size)
  probabilities = []
  for start in range(0, len(crops), batch_size):
    chunk = crops[start:start + batch_size]
    mask = positions < len(chunk)  # A prefix: positions increase; the rest is padding.
    local = np.zeros((len(positions),) + crops.shape[1:], crops.dtype)
    local[mask] = chunk[positions[mask]]
    local_batch = {'crops': local, 'label': np.zeros(len(positions), np.int32),
                   'row': (start + positions).astype(np.int32), 'mask': mask}
    batch = {name: jax.make_array_from_process_local_data(
        crop_sharding if name == 'crops' else batch_sharding, value,
        (batch_size,) + value.shape[1:]) for name, value in local_batch.items()}
    out = jax.device_get(eval_fn(state, batch))
    probabilities.append(out['probability'][out['mask']])
  return np.concatenate(probabilities) if probabilities else np.zeros(0, np.float32)


def _montage_titles(probs, centers, labels) -> list[str]:
  titles = []
  for k, (p, c) in enumerate(zip(probs, centers)):
    label = '' if labels is None else f'  class {int(labels[k])}'
    titles.append(f'p={p:.3f}{label}\n({c[0]:.0f}, {c[1]:.0f}, {c[2]:.0f}) mm')
  return titles


def predict(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores every candidate of predict.candidates_csv; writes predictions.csv and montages.

  Returns {'step', 'scans', 'candidates', 'predictions_csv', 'seconds'}. Raises a UserError
  (one line: cause and fix) for a bad input, before anything is written.
  """
  start = time.perf_counter()
  settings, data = config.predict, config.data
  scans_dir = _required_path(config, 'scans_dir')
  if not config.predict.candidates_csv:
    if config.get('task', 'classify') == 'detect':  # No candidate list: find them.
      from jaxmed import detect
      return detect.predict_without_candidates(config, workdir, output_dir(config, workdir))
    raise ConfigError('predict.candidates_csv is not set; pass --config.predict.candidates_csv='
                      'PATH, or run a detect config (config.task=detect, e.g. configs/detect.py) '
                      'to find the nodules without a candidate list')
  csv_path = _required_path(config, 'candidates_csv')
  # ---- inputs, checked before the long part: folder, CSV, seriesuids, scan headers, checkpoint
  scans = scan_formats.find_scans(scans_dir)
  candidates = read_candidates(csv_path)
  rows_by_scan = _rows_by_scan(candidates, scans, csv_path, scans_dir)
  centers_all = np.stack([candidates['coordX'], candidates['coordY'], candidates['coordZ']], 1)
  geometries = {}  # From headers: a candidate outside its scan stops the run before it starts.
  for uid, rows in rows_by_scan.items():
    geometries[uid] = scan_formats.read_geometry(scans[uid])  # DICOM: checks the series too.
    _check_outside(geometries[uid].outside(centers_all[rows]), rows, centers_all[rows],
                   geometries[uid], uid, csv_path)
  checkpoints = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(checkpoints) or not os.listdir(checkpoints):
    raise checkpointing.CheckpointError(
        f'no checkpoint in {checkpoints}; train first (--mode=train) or pass the --workdir of a '
        'trained run')
  if luna16.INTERPOLATORS.get(data.interpolator) is None:
    raise ConfigError(f'data.interpolator is {data.interpolator!r}, not one of '
                      f'{sorted(luna16.INTERPOLATORS)}; set --config.data.interpolator')
  logging.info('predict: %d candidates of %d scans (%d scans in %s)', len(centers_all),
               len(rows_by_scan), len(scans), scans_dir)

  # ---- model: the checkpoint restored onto this config's mesh
  mesh, rules = train.create_mesh_and_rules(config)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules, ndim=1)
  crop_sharding = sharding_lib.batch_sharding(mesh, rules, ndim=4)
  probability = np.zeros(len(centers_all), np.float32)
  montage_size = max(int(settings.montage_size), 0)
  top = {}  # seriesuid -> (rows, crops) of its best candidates.
  with sharding_lib.use_rules(mesh, rules):
    graphdef, state, shardings, step = train.restore_for_eval(config, workdir, mesh, rules)
    eval_fn = train.make_eval_step(graphdef, shardings, mesh, config)

    # ---- scans, one at a time: read, cut as preprocessing does, score
    for n, (uid, rows) in enumerate(rows_by_scan.items(), start=1):
      scan = scans[uid]
      t0 = time.perf_counter()
      image = scan_formats.read_scan(scan, checked=True)
      centers = centers_all[rows]
      crops, _, outside = luna16.crop_cubes(image, centers, int(data.stored_crop_size),
                                            float(data.spacing_mm), data.interpolator)
      _check_outside(outside, rows, centers, geometries[uid], uid, csv_path)  # The pixel data's.
      probability[rows] = score_crops(eval_fn, state, crops, int(config.train.eval_batch_size),
                                 batch_sharding, crop_sharding)
      if montage_size:
        best = np.argsort(-probability[rows], kind='stable')[:montage_size]
        top[uid] = (rows[best], crops[best])
      logging.info('predict: %d/%d scans | %s (%s) | %d candidates | %.2f s', n,
                   len(rows_by_scan), uid, scan.format, len(rows), time.perf_counter() - t0)

  # ---- outputs (process 0): montages, then predictions.csv last
  out_dir = output_dir(config, workdir)
  csv_out = os.path.join(out_dir, 'predictions.csv')
  if jax.process_index() == 0:
    labels = candidates.get('class')
    for uid, (rows, crops) in top.items():
      titles = _montage_titles(probability[rows], centers_all[rows],
                               None if labels is None else labels[rows])
      plots.plot_montage(crops, titles, os.path.join(out_dir, 'montages', f'{uid}.png'))
    submission.write_predictions_csv(csv_out, candidates['seriesuid'], centers_all, probability)
  seconds = time.perf_counter() - start
  logging.info('predict: scored %d candidates of %d scans with step %d of %s in %.1f s -> %s',
               len(probability), len(rows_by_scan), step, workdir, seconds, csv_out)
  return {'step': step, 'scans': len(rows_by_scan), 'candidates': len(probability),
          'predictions_csv': csv_out, 'seconds': seconds}
