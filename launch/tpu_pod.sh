#!/usr/bin/env bash
# jaxmed on a Cloud TPU VM slice (one or many hosts): the same command on every worker.
#
#   export TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-gcp-project
#   launch/tpu_pod.sh setup                          # once: code + venv with '.[tpu]' on all workers
#   CONFIG=configs/default.py SHARED_DIR=/mnt/shared launch/tpu_pod.sh run \
#       --config.train.steps=5000                    # extra args go to jaxmed.main
#   launch/tpu_pod.sh stop                           # kill a leftover jaxmed on every worker
#
# Subcommands (each runs `gcloud compute tpus tpu-vm ssh ... --worker=all`):
#   setup  puts the code in REPO_DIR on every worker: `git clone REPO_URL` (and checks out
#          REPO_REF) when REPO_URL is set, else copies this checkout (tracked + untracked files,
#          git-ignored ones left out) with `gcloud ... scp`; then makes REPO_DIR/.venv with uv
#          (Python >= 3.11, fetched by uv if the image has an older one) and installs '.[tpu]'.
#   run    starts `python -m jaxmed.main --config=$CONFIG --workdir=$WORKDIR "$@"` on every
#          worker. Each worker reads its id, the worker list and so the coordinator (worker 0)
#          from the TPU VM metadata server and exports JAXMED_COORDINATOR_ADDRESS,
#          JAXMED_NUM_PROCESSES and JAXMED_PROCESS_ID for jaxmed.parallel.distributed.
#   stop   kills `python -m jaxmed.main` on every worker (a run left behind by a lost ssh
#          session keeps the TPU busy: "TPU in use by another process").
#
# Environment: TPU_NAME, ZONE, PROJECT (required); CONFIG (default configs/default.py);
# WORKDIR, a directory every worker shares (Orbax multi-host checkpoints need one shared
# directory), default SHARED_DIR/workdirs/<TPU_NAME>: `run` needs WORKDIR or SHARED_DIR, the
# path where every worker mounts the same storage (a Filestore/NFS share, or a Cloud Storage
# bucket mounted with gcsfuse); the crops file (--config.data.crops_file) must exist on every
# worker: a copy on each worker's disk, or on the shared mount; REPO_DIR on the workers (default
# jaxmed, relative to the home directory); REPO_URL / REPO_REF for setup; COORDINATOR_PORT
# (default 8476); DRY_RUN=1 prints the gcloud commands instead of running them.
#
# Mesh: one slice is one ICI domain, so keep every dcn_* axis at 1 and let the ici axes span all
# chips of the slice (the default ici_data=-1 does). Multi-slice (Multislice / DCN) runs need
# queued resources and MEGASCALE_* settings and are not covered by this script.
set -euo pipefail

PROG=tpu_pod.sh
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

SUBCOMMAND="${1:-}"
case "$SUBCOMMAND" in
  setup | run | stop) shift ;;
  -h | --help | help) usage; exit 0 ;;
  '') echo "$PROG: say what to do: setup, run or stop (see $0 --help)" >&2; exit 2 ;;
  *) echo "$PROG: unknown subcommand '$SUBCOMMAND': use setup, run or stop" >&2; exit 2 ;;
esac

missing=()
for name in TPU_NAME ZONE PROJECT; do
  if [[ -z "${!name:-}" ]]; then missing+=("$name"); fi
done
if (( ${#missing[@]} )); then
  echo "$PROG: set ${missing[*]} first, e.g." \
       "TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-gcp-project $0 $SUBCOMMAND" >&2
  exit 2
fi

CONFIG="${CONFIG:-configs/default.py}"
SHARED_DIR="${SHARED_DIR:-}"
if [[ "$SUBCOMMAND" == run && -z "${WORKDIR:-}" && -z "$SHARED_DIR" ]]; then
  echo "$PROG: set SHARED_DIR (where every worker mounts the same storage: Filestore/NFS," \
       "or a bucket mounted with gcsfuse) or WORKDIR (a directory every worker shares):" \
       "Orbax multi-host checkpoints need one shared directory" >&2
  exit 2
fi
WORKDIR="${WORKDIR:-$SHARED_DIR/workdirs/$TPU_NAME}"
REPO_DIR="${REPO_DIR:-jaxmed}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8476}"
DRY_RUN="${DRY_RUN:-0}"

if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud > /dev/null; then
  echo "$PROG: gcloud not found: install the Google Cloud CLI and run 'gcloud auth login'" >&2
  exit 2
fi

run_or_print() {  # The command itself, or (DRY_RUN=1) one shell-quoted line of it.
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_all_workers() {  # on_all_workers SCRIPT: runs the bash SCRIPT on every worker of the slice.
  run_or_print gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --worker=all --command "bash -c $(sq "$1")"
}

# Quoting for the workers' shells, so values and jaxmed args arrive intact, spaces and all:
# q for the bash that runs the script, sq (POSIX single quotes) for the login shell around it.
q() { printf '%q' "$1"; }
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
EXTRA_ARGS=''
for arg in "$@"; do EXTRA_ARGS+=" $(q "$arg")"; done

case "$SUBCOMMAND" in
  setup)
    if [[ -n "$REPO_URL" ]]; then
      fetch="if [ -d $(q "$REPO_DIR")/.git ]; then git -C $(q "$REPO_DIR") fetch --all --tags;
else git clone $(q "$REPO_URL") $(q "$REPO_DIR"); fi"
      if [[ -n "$REPO_REF" ]]; then
        fetch+="
git -C $(q "$REPO_DIR") checkout $(q "$REPO_REF")"
      fi
    else
      # This checkout as it is now (uncommitted edits included), without git-ignored files.
      repo_root="$(cd "$(dirname "$0")/.." && pwd)"
      archive="$(mktemp "${TMPDIR:-/tmp}/jaxmed_src.XXXXXX")"
      trap 'rm -f "$archive"' EXIT
      (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard \
        | tar czf "$archive" --null -T -)
      run_or_print gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:jaxmed_src.tgz" \
        --zone "$ZONE" --project "$PROJECT" --worker=all
      fetch="mkdir -p $(q "$REPO_DIR") && tar xzf jaxmed_src.tgz -C $(q "$REPO_DIR") && rm jaxmed_src.tgz"
    fi
    on_all_workers "set -euo pipefail
cd \"\$HOME\"
$fetch
cd $(q "$REPO_DIR")
python3 -m pip install --user --quiet --upgrade uv \
  || python3 -m pip install --user --quiet --upgrade --break-system-packages uv
export PATH=\"\$HOME/.local/bin:\$PATH\"
uv venv --allow-existing --python '>=3.11' .venv
uv pip install --python .venv/bin/python -e '.[tpu]'
.venv/bin/python -c 'import jax; print(\"worker ready:\", jax.__version__)'"
    ;;

  run)
    on_all_workers "set -euo pipefail
cd \"\$HOME\"/$(q "$REPO_DIR")
md() { curl -sf -H 'Metadata-Flavor: Google' \\
  \"http://metadata.google.internal/computeMetadata/v1/instance/attributes/\$1\"; }
# The worker list is ordered by worker id; worker 0 hosts the coordinator. Entries are either a
# hostname or name:id:ip. Without metadata, jaxmed falls back to JAX's own TPU detection.
if endpoints=\"\$(md worker-network-endpoints)\" && worker_id=\"\$(md agent-worker-number)\"; then
  IFS=, read -r -a workers <<< \"\$endpoints\"
  coordinator=\"\${workers[0]##*:}\"
  export JAXMED_COORDINATOR_ADDRESS=\"\$coordinator:\"$(q "$COORDINATOR_PORT")
  export JAXMED_NUM_PROCESSES=\"\${#workers[@]}\"
  export JAXMED_PROCESS_ID=\"\$worker_id\"
  echo \"worker \$worker_id of \${#workers[@]}, coordinator \$JAXMED_COORDINATOR_ADDRESS\" >&2
fi
exec .venv/bin/python -m jaxmed.main --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")$EXTRA_ARGS"
    ;;

  stop)
    # [p]ython: the pattern must not match the command line of the shell that runs pkill.
    on_all_workers "pkill -f '[p]ython -m jaxmed.main' || true; sleep 2
pkill -9 -f '[p]ython -m jaxmed.main' || true; echo stopped"
    ;;
esac
