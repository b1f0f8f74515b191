"""--mode=detect: find nodules in whole scans (no candidate list), optionally re-scored by the crop
classifier; and --mode=predict's path without predict.candidates_csv.

  python -m jaxmed.main --config=configs/detect.py --mode=detect \
      --config.predict.scans_dir=data/raw/synthetic_dicom/subset9 \
      [--config.detect.classifier_workdir=workdirs/mesh_2x4]

Each scan of predict.scans_dir (.mhd/.raw, NIfTI or a DICOM series, found and checked as
--mode=predict finds them) is resampled onto the detector's isotropic identity-direction grid
(scans/resample.py: through its own origin, spacing and direction), the detector runs over the
whole volume in one jitted call split over the mesh (detection/inference.py), the heatmap's peaks
(detection/peaks.py) become world (x, y, z) mm points through the grid, with their diameters.
With detect.classifier_workdir each detection is re-scored by the crop classifier on a crop cut
as preprocessing cuts it, the probabilities combined by detect.combine (detection/rescoring.py).
Writes, once every scan has passed, into detect.output_dir (default <workdir>/detect):
  detections.csv          seriesuid,coordX,coordY,coordZ,probability,diameter_mm (world mm)
  montages/<uid>.png      the top detections of each scan (axial, coronal, sagittal slices)
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxmed import checkpointing
from jaxmed import files
from jaxmed import train
from jaxmed.detection import inference
from jaxmed.detection import peaks
from jaxmed.detection import rescoring
from jaxmed.errors import ConfigError
from jaxmed.evaluation import plots
from jaxmed.models import detector3d
from jaxmed.parallel import sharding as sharding_lib
from jaxmed.scans import luna16
from jaxmed.scans import resample
from jaxmed.scans import scan_formats
from jaxmed.scans.luna16 import DataError

DETECTION_COLUMNS = ('seriesuid', 'coordX', 'coordY', 'coordZ', 'probability', 'diameter_mm')
MONTAGE_EDGE = 32  # Voxels of the detector's grid shown around each detection.


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.detect.output_dir or os.path.join(workdir, 'detect')


def check_settings(config: ml_collections.ConfigDict) -> None:
  """One-line errors for detect settings, before anything runs."""
  settings = config.detect
  peaks.check_settings(settings.threshold, settings.max_per_scan, settings.nms_kernel)
  rescoring.check_combine(settings.combine)
  resample.check_spacing(settings.spacing_mm)
  if config.model.name != 'detector3d':
    raise ConfigError(f'config.model.name is {config.model.name!r}; detection needs the '
                      "detector: use a detect config (configs/detect.py) or set "
                      '--config.model.name=detector3d')


def restore_detector(config: ml_collections.ConfigDict, workdir: str, mesh, rules
                     ) -> tuple[Any, Any, Any, int]:
  """(graphdef, state, shardings, step) of the detector in workdir, placed on `mesh`: the one
  place detection restores its model (train.restore_for_eval with the detect config's model).
  Raises CheckpointError (one line) when workdir holds no checkpoint. Call inside use_rules."""
  check_detector_checkpoint(workdir)
  return train.restore_for_eval(config, workdir, mesh, rules)


def check_detector_checkpoint(workdir: str) -> None:
  checkpoints = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(checkpoints) or not os.listdir(checkpoints):
    raise checkpointing.CheckpointError(
        f'no detector checkpoint in {checkpoints}; train one first (--mode=train with a detect '
        'config, e.g. configs/detect.py) or pass the --workdir of a trained detector')


def volume_detector(config, graphdef, state, shardings, mesh, rules
                    ) -> inference.VolumeDetector:
  return inference.VolumeDetector(
      inference.model_apply_from(graphdef), state, shardings, mesh, rules,
      size_divisor=detector3d.size_divisor(config.model, config.detect.stride),
      stride=config.detect.stride, hu_window=config.data.hu_window,
      max_voxels_per_device=config.detect.max_voxels_per_device)


# ---- one scan's detections -------------------------------------------------------------------

@dataclasses.dataclass
class ScanDetections:
  """One scan's detections, best detector score first. world_xyz (N, 3) mm; detector and
  classifier probabilities (N,) (classifier None without re-scoring); probability (N,) the
  combined one; diameter_mm (N,); montage: (K, E, E, E) HU around the top K (or None)."""
  seriesuid: str
  world_xyz: np.ndarray
  detector: np.ndarray
  classifier: np.ndarray | None
  probability: np.ndarray
  diameter_mm: np.ndarray
  montage: np.ndarray | None = None


def _cube(hu: np.ndarray, center_zyx: np.ndarray, edge: int) -> np.ndarray:
  """(edge,)*3 int16 cube of `hu` around a voxel point, -1000 HU outside."""
  out = np.full((edge,) * 3, luna16.AIR_HU, np.int16)
  low = np.round(center_zyx).astype(int) - edge // 2
  src = [slice(max(l, 0), min(l + edge, n)) for l, n in zip(low, hu.shape)]
  dst = [slice(s.start - l, s.stop - l) for s, l in zip(src, low)]
  if all(s.stop > s.start for s in src):
    out[tuple(dst)] = hu[tuple(src)]
  return out


def peaks_fn(config):
  settings = config.detect
  return jax.jit(lambda maps: peaks.find_peaks(
      maps, stride=settings.stride, kernel=settings.nms_kernel, threshold=settings.threshold,
      max_per_scan=settings.max_per_scan))


def detect_scans(config: ml_collections.ConfigDict, scans: list[tuple[str, Callable]],
                 detector: inference.VolumeDetector, classifier: rescoring.Classifier | None,
                 montage_size: int = 0) -> list[ScanDetections]:
  """Detections of each (seriesuid, read) pair, read() -> the scan's sitk.Image in HU; scans
  go through the detector a batch-shards' group at a time. Call inside use_rules."""
  find = peaks_fn(config)
  results = []
  group = detector.batch_shards
  for first in range(0, len(scans), group):
    t0 = time.perf_counter()
    chunk = scans[first:first + group]
    images = [read() for _, read in chunk]
    volumes = [resample.resample_scan(image, config.detect.spacing_mm, config.data.interpolator)
               for image in images]
    maps, plan = detector([v.hu for v in volumes])
    for (uid, _), image, volume, scan_maps in zip(chunk, images, volumes, maps):
      found = peaks.to_numpy(find({k: v[None] for k, v in scan_maps.items()}))[0]
      # A centre decoded past the last voxel (a cell's offset in the padding) is clamped back:
      # the scan ends there.
      inside = np.clip(found.center_zyx, 0, np.asarray(volume.hu.shape) - 1)
      found = dataclasses.replace(found, center_zyx=inside)
      world = volume.voxel_to_world(found.center_zyx)
      classified = (classifier.score(image, world) if classifier is not None else None)
      probability = rescoring.combine(found.score, classified, config.detect.combine)
      montage = (np.stack([_cube(volume.hu, c, MONTAGE_EDGE)
                           for c in found.center_zyx[:montage_size]])
                 if montage_size and len(found) else None)
      results.append(ScanDetections(uid, world, found.score, classified, probability,
                                    found.diameter_mm, montage))
    logging.info('detect: %d/%d scans | %s | volume %s -> %s%s | %s detections | %.2f s',
                 min(first + group, len(scans)), len(scans), ', '.join(u for u, _ in chunk),
                 volumes[0].shape, plan.padded_shape,
                 f' in {len(plan.windows)} windows of {plan.window_depth}' if plan.windowed
                 else '', ', '.join(str(len(r.detector)) for r in results[-len(chunk):]),
                 time.perf_counter() - t0)
  return results


# ---- outputs ----------------------------------------------------------------------------------

def write_detections_csv(path: str, detections: Iterable[ScanDetections]) -> str:
  """detections.csv (DETECTION_COLUMNS), written atomically; rows by scan, best first."""
  with files.atomic_write(path, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(DETECTION_COLUMNS)
    for scan in detections:
      order = np.argsort(-scan.probability, kind='stable')
      for k in order:
        x, y, z = scan.world_xyz[k].tolist()
        writer.writerow((scan.seriesuid, repr(x), repr(y), repr(z),
                         repr(float(scan.probability[k])), repr(float(scan.diameter_mm[k]))))
  return path


def write_montages(out_dir: str, detections: Iterable[ScanDetections]) -> None:
  for scan in detections:
    if scan.montage is None:
      continue
    titles = [f'p={p:.3f} d={d:.0f} mm\n({w[0]:.0f}, {w[1]:.0f}, {w[2]:.0f}) mm'
              for p, d, w in zip(scan.probability, scan.diameter_mm, scan.world_xyz)]
    plots.plot_montage(scan.montage, titles[:len(scan.montage)],
                       os.path.join(out_dir, 'montages', f'{scan.seriesuid}.png'))


# ---- the mode ---------------------------------------------------------------------------------

def check_scan_size(uid: str, geometry: scan_formats.Geometry, spacing_mm: float,
                    stride: int, path: str) -> None:
  """DataError when the resampled scan would be thinner than the output stride on an axis."""
  size = np.asarray(geometry.size_xyz, np.float64)
  corners = np.array(np.meshgrid(*[[0, n - 1] for n in size], indexing='ij')).reshape(3, -1).T
  world = luna16.voxel_to_world(geometry.grid, corners[:, ::-1])
  voxels = np.floor((world.max(0) - world.min(0)) / spacing_mm + 1e-6).astype(int) + 1
  if voxels.min() < stride:
    raise DataError(f'scan {uid} ({path}) is {" x ".join(map(str, voxels))} voxels (x y z) at '
                    f'{spacing_mm} mm, smaller than the detector\'s output stride {stride} '
                    'along an axis; remove it from the folder')


def find_new_scans(config: ml_collections.ConfigDict) -> list[tuple[str, Callable]]:
  """(seriesuid, read) of every scan in predict.scans_dir, each header checked first."""
  if not config.predict.scans_dir:
    raise ConfigError('predict.scans_dir is not set; pass --config.predict.scans_dir=FOLDER of '
                      'the scans to detect in')
  scans = scan_formats.find_scans(config.predict.scans_dir)
  for uid, scan in scans.items():
    geometry = scan_formats.read_geometry(scan)  # DICOM: checks the whole series.
    check_scan_size(uid, geometry, float(config.detect.spacing_mm), int(config.detect.stride),
                    scan.path)
  return [(uid, lambda scan=scan: scan_formats.read_scan(scan, checked=True))
          for uid, scan in scans.items()]


def run(config: ml_collections.ConfigDict, workdir: str, scans: list[tuple[str, Callable]],
        montage_size: int = 0, then: Callable | None = None
        ) -> tuple[list[ScanDetections], int, Any]:
  """Detections (re-scored where detect.classifier_workdir is set) of `scans`: (list, step,
  then(classifier) or None), `then` called on the mesh after the scans (the classifier is None
  without detect.classifier_workdir). Every check that can fail on a user's input runs before
  the first scan is read."""
  check_settings(config)
  check_detector_checkpoint(workdir)
  classifier_config = (rescoring.classifier_config(config) if config.detect.classifier_workdir
                       else None)
  mesh, rules = train.create_mesh_and_rules(config)
  with sharding_lib.use_rules(mesh, rules):
    graphdef, state, shardings, step = restore_detector(config, workdir, mesh, rules)
    classifier = (rescoring.Classifier(config, classifier_config, mesh, rules)
                  if classifier_config is not None else None)
    detector = volume_detector(config, graphdef, state, shardings, mesh, rules)
    found = detect_scans(config, scans, detector, classifier, montage_size)
    return found, step, then(classifier) if then is not None else None


def detect(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=detect: detections.csv and montages of every scan in predict.scans_dir.

  Returns {'step', 'scans', 'detections', 'detections_csv', 'seconds'}. A bad input raises a
  UserError (one line) before anything is written.
  """
  start = time.perf_counter()
  check_settings(config)
  scans = find_new_scans(config)
  found, step, _ = run(config, workdir, scans, max(int(config.predict.montage_size), 0))
  out_dir = output_dir(config, workdir)
  csv_path = os.path.join(out_dir, 'detections.csv')
  if jax.process_index() == 0:
    write_montages(out_dir, found)
    write_detections_csv(csv_path, found)
  total = sum(len(s.probability) for s in found)
  seconds = time.perf_counter() - start
  logging.info('detect: %d detections in %d scans with step %d of %s in %.1f s -> %s', total,
               len(found), step, workdir, seconds, csv_path)
  return {'step': step, 'scans': len(found), 'detections': total, 'detections_csv': csv_path,
          'seconds': seconds}


def predict_without_candidates(config: ml_collections.ConfigDict, workdir: str,
                               out_dir: str) -> dict[str, Any]:
  """--mode=predict without predict.candidates_csv: detect (+ re-score) every scan of
  predict.scans_dir and write the LUNA16 submission predictions.csv (combined probability),
  detections.csv and montages into out_dir."""
  from jaxmed.evaluation import submission
  start = time.perf_counter()
  check_settings(config)
  scans = find_new_scans(config)
  found, step, _ = run(config, workdir, scans, max(int(config.predict.montage_size), 0))
  csv_path = os.path.join(out_dir, 'predictions.csv')
  if jax.process_index() == 0:
    write_montages(out_dir, found)
    write_detections_csv(os.path.join(out_dir, 'detections.csv'), found)
    uids = np.concatenate([[s.seriesuid] * len(s.probability) for s in found] + [np.zeros(0, str)])
    submission.write_predictions_csv(
        csv_path, uids.astype(str),
        np.concatenate([s.world_xyz.reshape(-1, 3) for s in found] + [np.zeros((0, 3))]),
        np.concatenate([s.probability for s in found] + [np.zeros(0)]))
  total = sum(len(s.probability) for s in found)
  seconds = time.perf_counter() - start
  logging.info('predict: %d detections in %d scans (no candidates CSV: detected, %s) with step '
               '%d of %s in %.1f s -> %s', total, len(found),
               f're-scored by {config.detect.classifier_workdir} ({config.detect.combine})'
               if config.detect.classifier_workdir else 'detector scores', step, workdir,
               seconds, csv_path)
  return {'step': step, 'scans': len(found), 'candidates': total, 'predictions_csv': csv_path,
          'seconds': seconds}
