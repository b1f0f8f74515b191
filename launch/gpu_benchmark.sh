#!/usr/bin/env bash
# One device call (one H100 / H200, under 10 minutes): the seed ResNet-18 (configs/luna16.py,
# batch 256, bf16) at 32^3 and 64^3 through `python -m jaxmed.benchmark`:
#   compare  JAX train step vs the PyTorch eager twin (AMP bf16, channels_last_3d), same process
#   step     the space-to-depth rewrites (model.space_to_depth=stem / all), same shapes
#   e2e      training fed from an HDF5 crops file through the Grain pipeline vs the step alone
# then one table (and README-ready lines) from all the JSON. Runs are ordered by importance and
# a run is skipped when the time left could not hold it.
#
# The GPU image has jax 0.11.2, flax, optax, orbax-checkpoint, h5py, absl-py, matplotlib, torch,
# etils, cloudpickle, protobuf, psutil, pyyaml, packaging; it lacks these, carried as wheels
# (4.5 MB; SimpleITK is not needed for these runs and is 52 MB, so it stays behind):
#   grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5
# Fetch them once, here, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl grain==0.2.18 array_record==0.8.6 \
#     portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5
# Then one device call (tool `run`): command `bash launch/gpu_benchmark.sh`, carry [".whl"],
# timeout_s 600. Results: $OUT/<run>.json (one per run), $OUT/summary.txt, $OUT/log.txt.
# Elsewhere (a GPU box with jaxmed installed): OUT=somewhere bash launch/gpu_benchmark.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-workdirs/gpu_benchmark}
BUDGET_S=${BUDGET_S:-560}  # Leave time for the summary inside a 600 s call.
WORK=${WORK:-/tmp/jaxmed_gpu_benchmark}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"

LUNA="--config=configs/luna16.py --config.train.global_batch_size=256 --config.model.dtype=bfloat16"
C32="--config.data.crop_size=32 --config.data.stored_crop_size=40"
C64="--config.data.crop_size=64 --config.data.stored_crop_size=72"
T="--warmup=5 --repeats=3"

# bench NAME NEEDED_S ARGS...: runs one benchmark if NEEDED_S seconds are left of the budget.
bench() {
  local name=$1 needed=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt "$needed" ]; then
    echo "== $name: skipped (${left}s left, needs ~${needed}s)"; return
  fi
  echo "== $name (${left}s left)"
  timeout "$left" python3 -m jaxmed.benchmark --workdir="$WORK/$name" "$@"
  echo "== $name: exit $? at ${SECONDS}s"
  cp "$WORK/$name"/benchmark_*.json "$OUT/$name.json" 2>/dev/null
}

bench compare32 120 --what=compare $LUNA $C32 --steps=30 $T
bench compare64 150 --what=compare $LUNA $C64 --steps=10 $T
bench e2e32 120 --what=e2e $LUNA $C32 --steps=20 $T --config.data.workers=8
bench step32_s2d_stem 70 --what=step $LUNA $C32 --steps=30 $T --config.model.space_to_depth=stem
bench step32_s2d_all 70 --what=step $LUNA $C32 --steps=30 $T --config.model.space_to_depth=all
bench step64_s2d_stem 90 --what=step $LUNA $C64 --steps=10 $T --config.model.space_to_depth=stem

python3 -m jaxmed.benchmark --what=summary --workdir="$WORK" | tee "$OUT/summary.txt"
