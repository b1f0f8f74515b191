"""python -m jaxmed.benchmark: how fast jaxmed trains, and where the time goes.

  python -m jaxmed.benchmark --config=configs/X.py --what=WHAT [--workdir=DIR] [--config.k=v ...]
      [--steps=10 --warmup=3 --repeats=3]

WHAT (each prints a short table and writes WORKDIR/benchmark_<what>.json):
  step        samples/s of the real jitted train step (train.make_train_step, sharded as the
              config's mesh says) on synthetic on-device int16 crops of the stored crop size;
              analytic model FLOPs (flops.model_flops), TFLOP/s, MFU against a matmul peak
              measured in the same run (bf16 on accelerators for a bf16 model, else f32),
              compile time and peak device memory.
  input       crops/s of the Grain loader alone and with augmentation (benchmarks/input.py),
              per worker count (--workers=0,1,2) and crops cache (--caches=none,host,device).
  patches     patches/s of the detection input (benchmarks/input.py: the volumes file through
              the Grain patch loader, alone and with augment_patches; plain h5py patch reads),
              per worker count (--workers, default 0,1,2), config.detect.patch_size.
  e2e         training by the run's own loop (train.TrainLoop) fed from the HDF5 crops file
              against the step rate on synthetic input: the fraction kept, and the share of
              the time the loop waited in next() on its input.
              Uses config.data.crops_file when it exists (or auto_prepare builds it), else
              writes a synthetic crops file of the stored crop size into the workdir.
              --config.data.cache=none|host|device picks the input path.
  loop        steps/s of train.py's own loop (train.TrainLoop, set up as a training run: Grain
              input from the crops file as e2e finds it, log steps as configured) against a bare
              loop over the same compiled step on batches already on the device; use a small
              model (cnn3d at 8^3) so that host overhead shows, and --steps of a few hundred.
  compare     the step above, then the same architecture in PyTorch eager
              (models/resnet3d_torch.py; AMP bf16 + channels_last_3d + cudnn.benchmark on CUDA,
              float32 on CPU), same shapes and batch, same process; both and their ratio.
  comms       ring bytes per device per step of each collective kind in the compiled train
              step's HLO for the configured mesh, beside the cost of jaxmed's scheme
              (parallel/communication.py) and the lower bound over the ways any program could
              serve each layer (parallel/bound.py), with the ratios; per-device parameters,
              optimizer state and temporaries (compiled.memory_analysis()). Compiles, never
              runs.
  meshes      comms for every shipped mesh config (mesh_8x1, mesh_2x4, mesh_1x8, fsdp_8,
              spatial_2x4) with the seed's ResNet-18 (width 64, batch 64) at each of
              --crop_sizes and --dtypes: the README's parallelism and memory tables.
  checkpoint  save and restore seconds of the train state (checkpointing.Checkpointer).
  preprocess  seconds per LUNA16-sized scan per worker (benchmarks/preprocess.py).
  profile     a jax.profiler trace of a few train steps in WORKDIR/profile (TensorBoard /
              Perfetto), after warm-up.
  detect_scale  whole-scan detection of a LUNA16-size synthetic scan (about 360^3 at 1 mm) on
              data 1 x spatial 1, 2, 4, 8 and as windows: seconds per scan, per-device bytes of
              the compiled program, and an H200 projection from FLOPs (benchmarks/detect_scale.py).
  summary     one table (and a README line) from every benchmark_*.json under --workdir.

The default workdir is workdirs/<config.name>. Figures are medians of --repeats timed runs of
--steps steps each, after --warmup steps, every run waited on with block_until_ready.
This module is the command line (flags, run, main); the benchmarks live in jaxmed/benchmarks/,
one module per family, and the tables in benchmarks/tables.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxmed.benchmarks import checkpoint as checkpoint_bench
from jaxmed.benchmarks import comms as comms_bench
from jaxmed.benchmarks import compare as compare_bench
from jaxmed.benchmarks import e2e as e2e_bench
from jaxmed.benchmarks import loop as loop_bench
from jaxmed.benchmarks import preprocess as preprocess_bench
from jaxmed.benchmarks import step as step_bench
from jaxmed.benchmarks import tables

WHATS = ('step', 'input', 'patches', 'e2e', 'loop', 'compare', 'comms', 'meshes', 'checkpoint',
         'preprocess', 'profile', 'detect_scale', 'summary')

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the JSON goes (default workdirs/<name>).')
_WHAT = flags.DEFINE_enum('what', 'step', WHATS, 'What to measure.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per repeat.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats; the median is reported.')
_SECONDS = flags.DEFINE_float('seconds', 5.0, 'input, patches: seconds per measurement.')
_WORKERS = flags.DEFINE_string('workers', '', 'input, patches: comma-separated Grain worker counts '
                               '(default: 0 and config.data.workers).')
_CROP_SIZES = flags.DEFINE_string('crop_sizes', '32,64', 'meshes: crop edges to compile for.')
_DTYPES = flags.DEFINE_string('dtypes', 'float32', 'meshes: comma-separated compute dtypes '
                              '(float32, bfloat16).')
_CACHES = flags.DEFINE_string('caches', '', 'input: comma-separated crops caches to measure, of '
                              'none, host, device (default: config.data.cache).')
_PEAK_SIZE = flags.DEFINE_integer('peak_size', 0, 'Matmul edge for the peak (0: 8192 on '
                                  'accelerators, 1024 on CPU).')


def run(what: str, config, workdir: str, *, steps: int = 10, warmup: int = 3, repeats: int = 3,
        seconds: float = 5.0, workers: Sequence[int] = (), peak_size: int = 0,
        crop_sizes: Sequence[int] = (32, 64), caches: Sequence[str] = (),
        dtypes: Sequence[str] = ('float32',)) -> dict:
  """Runs one benchmark, writes workdir/benchmark_<what>.json, prints its table; returns it."""
  os.makedirs(workdir, exist_ok=True)
  if what == 'step':
    result = step_bench.benchmark_step(config, steps, warmup, repeats, peak_size)
  elif what == 'input':
    from jaxmed.benchmarks import input as input_bench  # Loads JAX and Grain: only when asked.
    workers = tuple(workers) or tuple(sorted({0, int(config.data.workers)}))
    rows = input_bench.benchmark_input(config, crop_sizes=(config.data.crop_size,),
                                       workers=workers, seconds=seconds,
                                       caches=tuple(caches) or (config.data.cache,))
    result = {**step_bench.describe_run(config), 'rows': rows}
  elif what == 'patches':
    from jaxmed.benchmarks import input as input_bench  # Loads JAX and Grain: only when asked.
    rows = input_bench.benchmark_patches(config, workers=tuple(workers) or (0, 1, 2),
                                         seconds=seconds)
    result = {**step_bench.describe_run(config), 'rows': rows}
  elif what == 'e2e':
    result = e2e_bench.benchmark_e2e(config, workdir, steps, warmup, repeats)
  elif what == 'loop':
    result = loop_bench.benchmark_loop(config, workdir, steps, warmup, repeats)
  elif what == 'compare':
    result = compare_bench.benchmark_compare(config, steps, warmup, repeats, peak_size)
  elif what == 'comms':
    result = comms_bench.benchmark_comms(config)
  elif what == 'meshes':
    result = comms_bench.benchmark_meshes(crop_sizes, dtypes=tuple(dtypes))
  elif what == 'checkpoint':
    result = checkpoint_bench.benchmark_checkpoint(config, workdir, max(repeats, 1))
  elif what == 'preprocess':
    result = preprocess_bench.benchmark_preprocess(config)
  elif what == 'detect_scale':
    from jaxmed.benchmarks import detect_scale  # The detector: only when asked.
    result = detect_scale.benchmark_detect_scale(config, workdir, max(repeats, 1))
  elif what == 'profile':
    result = step_bench.benchmark_profile(config, workdir, max(steps // 2, 1), warmup)
  else:
    raise ValueError(f'unknown --what={what}; one of {", ".join(WHATS)}')
  result['what'] = what
  path = os.path.join(workdir, f'benchmark_{what}.json')
  import jax
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(result, f, indent=1, default=str)
    print(tables.format_table(f'jaxmed benchmark --what={what}', tables.table_rows(what, result)))
    print(f'wrote {path}')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('workdirs', config.name)
  if _WHAT.value == 'summary':
    text, readme = tables.summarize(workdir)
    print(text)
    for line in readme:
      print('README:', line)
    return
  if _WHAT.value == 'compare':
    # JAX and PyTorch share the accelerator: keep JAX from taking 75% of its memory up front.
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
  if _WHAT.value in ('meshes', 'detect_scale') and not config.distributed.cpu_devices:
    config.distributed.cpu_devices = 8  # The shipped meshes span 8 devices.
  from jaxmed.errors import exit_with_one_line
  from jaxmed.parallel import distributed
  with exit_with_one_line():
    distributed.initialize(config)
    workers = tuple(int(w) for w in _WORKERS.value.split(',') if w.strip())
    caches = tuple(c.strip() for c in _CACHES.value.split(',') if c.strip())
    run(_WHAT.value, config, workdir, steps=_STEPS.value, warmup=_WARMUP.value,
        repeats=_REPEATS.value, seconds=_SECONDS.value, workers=workers,
        peak_size=_PEAK_SIZE.value, caches=caches,
        crop_sizes=tuple(int(c) for c in _CROP_SIZES.value.split(',') if c.strip()),
        dtypes=tuple(d.strip() for d in _DTYPES.value.split(',') if d.strip()))


if __name__ == '__main__':
  app.run(main)
