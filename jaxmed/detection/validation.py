"""Scoring whole-scan detections against the nodules: LUNA16 sensitivities and CPM (the official
arithmetic of jaxmed/evaluation/froc.py) and candidate recall; and the detect task's validation,
which runs the detector over validation volumes and returns those metrics.

detections_by_scan: {seriesuid: (world_xyz (N, 3) mm, probability (N,))}
annotations_by_scan: {seriesuid: (K, 4) float: x, y, z mm, diameter_mm} (K may be 0)
A scan evaluated without detections counts (its nodules are missed); pass every scan evaluated.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from jaxmed.evaluation import froc
from jaxmed.evaluation.submission import Annotations, Predictions

SENSITIVITY_RATES = (1, 2, 4, 8)  # FPs per scan reported on their own (validation's metrics).
RECALL_COUNTS = (8, 32, 100)  # Detections per scan for candidate recall.


def _predictions(detections_by_scan) -> Predictions:
  uids, xyz, prob = [], [], []
  for uid, (world, probability) in detections_by_scan.items():
    uids += [uid] * len(probability)
    xyz.append(np.asarray(world, np.float64).reshape(-1, 3))
    prob.append(np.asarray(probability, np.float64).reshape(-1))
  return Predictions(np.asarray(uids, str), np.concatenate(xyz + [np.zeros((0, 3))]),
                     np.concatenate(prob + [np.zeros(0)]))


def annotations_from(annotations_by_scan) -> Annotations:
  uids, rows = [], []
  for uid, table in annotations_by_scan.items():
    table = np.asarray(table, np.float64).reshape(-1, 4)
    uids += [uid] * len(table)
    rows.append(table)
  rows = np.concatenate(rows + [np.zeros((0, 4))])
  return Annotations(np.asarray(uids, str), rows[:, :3], rows[:, 3])


def froc_result(detections_by_scan, annotations_by_scan, scans: Iterable[str],
                excluded_by_scan=None, arithmetic: str = 'official') -> froc.FROCResult:
  """froc.compute_froc of the detections over `scans` (the official per-scan cap of 100)."""
  excluded = annotations_from(excluded_by_scan) if excluded_by_scan else None
  return froc.compute_froc(_predictions(detections_by_scan), annotations_from(annotations_by_scan),
                           excluded, np.asarray(sorted(set(scans)), str), arithmetic=arithmetic)


def sensitivities(detections_by_scan, annotations_by_scan, scans: Iterable[str],
                  excluded_by_scan=None, arithmetic: str = 'official') -> dict[str, float]:
  """{'sens_at_1fp', 'sens_at_2fp', 'sens_at_4fp', 'sens_at_8fp', 'cpm'}: the FROC curve read at
  those FPs per scan (np.interp, as the CPM reads its seven points), and the CPM."""
  result = froc_result(detections_by_scan, annotations_by_scan, scans, excluded_by_scan,
                       arithmetic)
  metrics = {f'sens_at_{rate}fp': float(np.interp(rate, result.fps_per_scan, result.sensitivity))
             for rate in SENSITIVITY_RATES}
  metrics['cpm'] = result.cpm
  return metrics


def candidate_recall(detections_by_scan, annotations_by_scan,
                     counts: Iterable[int] = RECALL_COUNTS) -> dict[str, float]:
  """{'recall_at_<n>': fraction of nodules with one of their scan's n most probable detections
  strictly inside their radius (the LUNA16 hit rule)}, NaN without nodules."""
  counts = tuple(counts)
  hits = {n: 0 for n in counts}
  total = 0
  for uid, table in annotations_by_scan.items():
    table = np.asarray(table, np.float64).reshape(-1, 4)
    total += len(table)
    world, probability = detections_by_scan.get(uid, (np.zeros((0, 3)), np.zeros(0)))
    order = np.argsort(-np.asarray(probability), kind='stable')
    world = np.asarray(world, np.float64).reshape(-1, 3)[order]
    radius = np.where(table[:, 3] < 0, froc.UNKNOWN_DIAMETER_MM, table[:, 3]) / 2
    inside = np.sum((world[None] - table[:, None, :3]) ** 2, -1) < radius[:, None] ** 2
    for n in counts:
      hits[n] += int(inside[:, :n].any(axis=1).sum())
  return {f'recall_at_{n}': hits[n] / total if total else float('nan') for n in counts}


def validate_volumes(detector, find_peaks, volumes) -> dict[str, float]:
  """The detect task's validation metrics over `volumes`, an iterable of (seriesuid, Volume,
  annotations (K, 4)): sensitivities at 1/2/4/8 FPs per scan, CPM and candidate recall.

  detector: an inference.VolumeDetector; find_peaks: maps (with a leading batch axis of 1) ->
  peaks.find_peaks' output (a jitted closure over detect's settings). Call inside use_rules.
  """
  from jaxmed.detection import peaks
  detections, annotations = {}, {}

  def run(group):  # As many volumes at once as the batch axes hold.
    maps, _ = detector([volume.hu for _, volume, _ in group])
    for (uid, volume, table), scan_maps in zip(group, maps):
      found = peaks.to_numpy(find_peaks({k: v[None] for k, v in scan_maps.items()}))[0]
      inside = np.clip(found.center_zyx, 0, np.asarray(volume.hu.shape) - 1)
      detections[uid] = (volume.voxel_to_world(inside), found.score)
      annotations[uid] = table

  group = []
  for item in volumes:
    group.append(item)
    if len(group) == detector.batch_shards:
      run(group)
      group = []
  if group:
    run(group)
  return {**sensitivities(detections, annotations, detections),
          **candidate_recall(detections, annotations), 'scans': len(detections)}


def volumes_of(source, indices) -> Iterable:
  """(seriesuid, Volume, annotations) of the volumes file's scans `indices` (a VolumesSource)."""
  for i in indices:
    yield source.seriesuids[i], source.read_volume(i), source.annotations(i)
