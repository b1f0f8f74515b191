"""--what=preprocess: seconds to read, resample and crop one LUNA16-sized scan in one worker, as
data/preprocess.py does it for every scan."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
from absl import logging

from jaxmed.benchmarks.step import describe_run


def benchmark_preprocess(config, repeats: int = 2) -> dict[str, Any]:
  """Seconds to read + resample + crop (+ hash) one LUNA16-sized scan in one worker.

  Generates (untimed, in a temporary folder) one 512x512x300 scan at 0.7x0.7x1.25 mm with about
  850 candidates, then times the worker's task with one ITK thread, as in preprocess. Returns the
  run's description (describe_run), the best of `repeats` runs and its breakdown.
  """
  import SimpleITK as sitk

  from jaxmed.scans import luna16
  from jaxmed.data import preprocess
  from jaxmed.data import scan_tasks
  from jaxmed.scans import synthetic as synthetic_lib
  synth = config.data.synthetic.copy_and_resolve_references()
  synth.nodules_per_scan = (4, 4)
  synth.positives_per_nodule = (2, 2)
  synth.negatives_per_scan = 842  # 850 candidates with the 8 positives.
  spec = synthetic_lib.ScanSpec(0, synthetic_lib.UID_PREFIX + '1' * 30, 0, (512, 512, 300),
                                (0.7, 0.7, 1.25), (1, 1, 1), (int(synth.seed), 99, 0))
  data = config.data
  with tempfile.TemporaryDirectory(prefix='jaxmed_bench_') as tmp:
    t0 = time.perf_counter()
    synthetic_lib.write_dataset(tmp, [spec], synth, os.path.join(tmp, 'candidates_V2.csv'),
                                os.path.join(tmp, 'annotations.csv'))
    generate_s = time.perf_counter() - t0
    cands = luna16.read_candidates(os.path.join(tmp, 'candidates_V2.csv'))
    centers = np.stack([cands['coordX'], cands['coordY'], cands['coordZ']], 1)
    mhd = os.path.join(tmp, 'subset0', spec.seriesuid + '.mhd')
    task = {'seriesuid': spec.seriesuid, 'mhd_path': mhd,
            'mhd_rel': os.path.relpath(mhd, tmp), 'centers_world': centers,
            'spacing_mm': float(data.spacing_mm),
            'interpolator': data.interpolator, 'size': int(data.stored_crop_size),
            'part_path': os.path.join(tmp, 'part.npz'), 'key': 'benchmark'}
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    scan_tasks.init_worker()
    try:
      runs = [preprocess.process_scan(task) for _ in range(repeats)]
    finally:
      sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
  best = min(runs, key=lambda r: r['seconds'])
  result = {'seconds_per_scan_per_worker': best['seconds'],
            'cpu_seconds_per_scan_per_worker': best['cpu_s'],
            'seconds_all_runs': [r['seconds'] for r in runs],
            **{k: best[k] for k in ('read_s', 'crop_s', 'hash_s')},
            'candidates': len(centers), 'shape_xyz': spec.shape_xyz,
            'spacing_xyz': spec.spacing_xyz, 'interpolator': data.interpolator,
            'stored_crop_size': int(data.stored_crop_size), 'generate_s': generate_s}
  logging.info('preprocess benchmark: %.2f s (%.2f s CPU) per 512x512x300 scan per worker (%d '
               'candidates, %s, %d^3 crops at %.1f mm): read %.2f, resample+crop %.2f, sha256 '
               '%.2f s', best['seconds'], best['cpu_s'], len(centers), data.interpolator,
               data.stored_crop_size, data.spacing_mm, best['read_s'], best['crop_s'],
               best['hash_s'])
  return {**describe_run(config), **result}
