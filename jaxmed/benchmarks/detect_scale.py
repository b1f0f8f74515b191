"""--what=detect_scale: whole-scan detection on one LUNA16-size synthetic scan, per mesh.

One synthetic scan of data.synthetic.shape_xyz (default here 512 x 512 x 260 voxels at the
synthetic spacings, about 360^3 at 1 mm once resampled) goes through detection/inference.py's
VolumeDetector with config.model (an untrained detector: speed and memory do not depend on the
weights) on data 1 x spatial n for n = 1, 2, 4, 8, then as windows along depth
on one device (windows just deep enough for twice the receptive field plus a core). For each: compile seconds,
seconds per scan (median of --repeats after one warm-up), the compiled program's per-device
bytes (arguments + outputs + temporaries, from memory_analysis) and its FLOPs (cost_analysis).
The H200 line is a PROJECTION, not a measurement: FLOPs / 70 TFLOP/s (the rate the seed's 3D
ResNet-18 training step reached on a lent H200 in bf16) and FLOPs / 790 TFLOP/s (that card's
measured bf16 matmul peak), i.e. a range from plain-model efficiency to the hardware limit.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxmed import train
from jaxmed.detection import inference
from jaxmed.models import create_model
from jaxmed.models import detector3d
from jaxmed.parallel import mesh as mesh_lib
from jaxmed.parallel import sharding as sharding_lib
from jaxmed.scans import luna16
from jaxmed.scans import resample
from jaxmed.scans import synthetic

H200_MODEL_TFLOPS = 70.0  # The seed's ResNet-18 train step in bf16 on a lent H200.
H200_PEAK_TFLOPS = 790.0  # That card's measured bf16 matmul rate.


def _scan(config: ml_collections.ConfigDict, workdir: str) -> resample.Volume:
  raw = os.path.join(workdir, 'detect_scale_raw')
  scan_config = config.copy_and_resolve_references()
  scan_config.data.raw_dir = raw
  scan_config.data.synthetic.num_scans = 1
  scan_config.data.synthetic.num_subsets = 1
  scan_config.data.overwrite = True
  synthetic.synthesize(scan_config)
  path = next(iter(luna16.find_scans(raw).values())).mhd_path
  return resample.resample_scan(luna16.read_scan(path), config.detect.spacing_mm)


def _row(config, state_host, graphdef, volume, spatial: int, windowed: bool,
         repeats: int) -> dict[str, Any]:
  cfg = config.copy_and_resolve_references()
  cfg.mesh.ici_data, cfg.mesh.ici_fsdp, cfg.mesh.ici_model = 1, 1, 1
  cfg.mesh.ici_spatial = spatial
  mesh = mesh_lib.create_mesh(cfg.mesh, jax.devices()[:spatial])
  rules = train.logical_rules(cfg)
  with sharding_lib.use_rules(mesh, rules):
    shardings = sharding_lib.state_shardings(state_host, mesh, rules)
    state = jax.device_put(state_host, shardings)
    detector = inference.VolumeDetector(
        inference.model_apply_from(graphdef), state, shardings, mesh, rules,
        size_divisor=detector3d.size_divisor(cfg.model, cfg.detect.stride),
        stride=cfg.detect.stride, hu_window=cfg.data.hu_window)
    if windowed:  # The shallowest windows that still cover the receptive field exactly.
      multiple = detector.size_divisor * spatial
      depth = inference.round_up(2 * detector.overlap + multiple, multiple)
      padded = [inference.round_up(n, detector.size_divisor) for n in volume.shape[1:]]
      detector.max_voxels = depth // spatial * padded[0] * padded[1]
    t0 = time.perf_counter()
    plan = detector.plan([volume.shape])
    shape = (1, plan.window_depth) + plan.padded_shape[1:]
    compiled, _ = detector._forward(shape)
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) * len(plan.windows) if cost else None
    detector([volume.hu])  # Warm-up.
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      detector([volume.hu])
      times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  return {'mesh': f'data 1 x spatial {spatial}', 'windows': len(plan.windows),
          'window_depth': plan.window_depth, 'padded_shape': plan.padded_shape,
          'slab_voxels': plan.slab_voxels, 'device_bytes': plan.device_bytes,
          'compile_s': compile_s, 'seconds_per_scan': seconds, 'flops_per_scan': flops,
          'h200_projection_s': (None if not flops else
                                (flops / (H200_PEAK_TFLOPS * 1e12),
                                 flops / (H200_MODEL_TFLOPS * 1e12)))}


def benchmark_detect_scale(config: ml_collections.ConfigDict, workdir: str,
                           repeats: int = 1, spatial_sizes=(1, 2, 4, 8)) -> dict[str, Any]:
  """Rows of the scale table (module docstring)."""
  volume = _scan(config, workdir)
  model = nnx.eval_shape(lambda: create_model(config.model, rngs=nnx.Rngs(0),
                                              output_stride=config.detect.stride))
  graphdef, abstract = nnx.split(model)
  # One compiled init on the default device; every mesh gets the same weights.
  state_host = jax.jit(lambda: nnx.split(create_model(
      config.model, rngs=nnx.Rngs(0), output_stride=config.detect.stride))[1])()
  del abstract
  rows = []
  for spatial in spatial_sizes:
    if spatial <= jax.device_count():
      rows.append(_row(config, state_host, graphdef, volume, spatial, False, repeats))
  # Windows where they fit: one device (on more, depth multiples of size_divisor x devices
  # plus twice the receptive field can exceed a LUNA16 scan's depth).
  rows.append(_row(config, state_host, graphdef, volume, 1, True, repeats))
  # FLOPs of the whole scan from the unsplit program (XLA counts a split one per device).
  whole = rows[0]['flops_per_scan']
  for row in rows:
    row['h200_projection_s'] = (None if not whole else (whole / (H200_PEAK_TFLOPS * 1e12),
                                                        whole / (H200_MODEL_TFLOPS * 1e12)))
  return {'volume_shape': volume.shape, 'flops_per_scan': whole, 'spacing_mm': float(volume.spacing_mm),
          'model': dict(config.model), 'devices': jax.device_count(),
          'platform': jax.devices()[0].platform, 'rows': rows,
          'h200_note': 'projection from FLOPs, not measured: FLOPs / 790 TFLOP/s (peak) to '
                       'FLOPs / 70 TFLOP/s (the 3D ResNet\'s measured rate)'}


def table_rows(r: dict) -> list[tuple[str, str]]:
  rows = [('scan', f"{' x '.join(map(str, r['volume_shape']))} voxels at {r['spacing_mm']} mm"),
          ('model', f"{r['model']['name']}-{r['model']['depth']} width {r['model']['width']} "
                    f"{r['model']['dtype']}"),
          ('devices', f"{r['devices']} x {r['platform']}"),
          ('FLOPs', f"{r['flops_per_scan'] / 1e9:.0f} GFLOP per scan (XLA's count)"
                    if r['flops_per_scan'] else '-')]
  for row in r['rows']:
    h200 = row['h200_projection_s']
    mem = row['device_bytes']
    rows.append((f"{row['mesh']}" + (f", {row['windows']} windows of {row['window_depth']}"
                                     if row['windows'] > 1 else ''),
                 f"{row['seconds_per_scan']:.2f} s/scan, {mem / 2**30 if mem else float('nan'):.2f}"
                 f" GiB/device, slab {row['slab_voxels'] / 1e6:.1f} M voxels, compile "
                 f"{row['compile_s']:.1f} s"
                 + (f"; H200 projection {h200[0] * 1e3:.1f}-{h200[1] * 1e3:.1f} ms" if h200 else '')))
  return rows
