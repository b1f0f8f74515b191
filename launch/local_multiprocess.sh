#!/usr/bin/env bash
# Runs N processes of one command on this machine, joined as one jax.distributed run over
# 127.0.0.1, to test multi-host code without a cluster (CPU devices only).
#
#   launch/local_multiprocess.sh -n 2 -d 4 -t 600 -l /tmp/mp_logs -- \
#       python -m jaxmed.main --config=configs/mesh_2x4.py --config.mesh.dcn_data=2 \
#       --config.mesh.ici_data=1 --workdir=/tmp/mp_run
#
# Each process i gets JAX_PLATFORMS=cpu, JAXMED_COORDINATOR_ADDRESS=127.0.0.1:<free port>,
# JAXMED_NUM_PROCESSES=N, JAXMED_PROCESS_ID=i, and the flag --config.distributed.cpu_devices=D
# appended to its command (-d 0: not appended, the config decides). Its output goes to
# LOG_DIR/process_<i>.log; process 0's is also shown here, each line prefixed "[process 0] ".
#
# Exit status: 0 when every process exits 0. As soon as one process exits non-zero, one line
# names it and its exit code, the others get SIGTERM, then SIGKILL after the grace period
# (a process stuck in a collective may ignore SIGTERM), and the script exits with that code.
# Past the timeout every process is killed the same way and the script exits 124.
# Ctrl-C / SIGTERM to this script stops every process it started.
set -euo pipefail

PROG=local_multiprocess
usage() {
  cat <<EOF
usage: $0 [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-t TIMEOUT_S] [-l LOG_DIR]
          [-g GRACE_S] [-p PORT] -- COMMAND [ARGS...]
  -n  processes to start (default 2)
  -d  virtual CPU devices per process, passed as --config.distributed.cpu_devices=D
      (default 1; 0 = do not append the flag)
  -t  overall timeout in seconds, then everything is killed and the exit status is 124
      (default 3600; 0 = none)
  -l  log directory, one process_<i>.log per process (default: a new directory under \$TMPDIR)
  -g  seconds between SIGTERM and SIGKILL when stopping processes (default 10)
  -p  coordinator port on 127.0.0.1 (default: a free port picked now)
EOF
}

NUM_PROCESSES=2
DEVICES=1
TIMEOUT_S=3600
LOG_DIR=''
GRACE_S=10
PORT=''
while getopts ':n:d:t:l:g:p:h' opt; do
  case "$opt" in
    n) NUM_PROCESSES="$OPTARG" ;;
    d) DEVICES="$OPTARG" ;;
    t) TIMEOUT_S="$OPTARG" ;;
    l) LOG_DIR="$OPTARG" ;;
    g) GRACE_S="$OPTARG" ;;
    p) PORT="$OPTARG" ;;
    h) usage; exit 0 ;;
    :) echo "$PROG: option -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "$PROG: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -eq 0 ]]; then
  echo "$PROG: no command given (put it after --)" >&2
  usage >&2
  exit 2
fi
for pair in "n:$NUM_PROCESSES" "d:$DEVICES" "t:$TIMEOUT_S" "g:$GRACE_S" "p:${PORT:-0}"; do
  if ! [[ "${pair#*:}" =~ ^[0-9]+$ ]]; then
    echo "$PROG: -${pair%%:*} needs a non-negative integer, got '${pair#*:}'" >&2
    exit 2
  fi
done
if (( NUM_PROCESSES < 1 )); then
  echo "$PROG: -n must be at least 1" >&2
  exit 2
fi

PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [[ -z "$PYTHON" ]]; then
  echo "$PROG: needs python3 on PATH (or PYTHON=...) to pick a port" >&2
  exit 2
fi
if [[ -z "$PORT" ]]; then
  # Port 0 asks the kernel for a free port; it stays free for the moment the coordinator needs.
  PORT="$("$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
fi
if [[ -z "$LOG_DIR" ]]; then
  LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/jaxmed_local_multiprocess.XXXXXX")"
fi
mkdir -p "$LOG_DIR"

EXTRA_ARGS=()
if (( DEVICES > 0 )); then
  EXTRA_ARGS=("--config.distributed.cpu_devices=$DEVICES")
fi
# Starts its arguments in a process group of their own (same pid), so that stopping a process
# also stops whatever it started, and Ctrl-C reaches the children only through this script.
NEW_GROUP=(
  "$PYTHON" -c 'import os, sys; os.setpgrp(); os.execvp(sys.argv[1], sys.argv[1:])'
)

PIDS=()
STOPPING=0

alive() { kill -0 "$1" 2>/dev/null; }

signal_all() {  # signal_all SIG: to each started process's group (or the process itself).
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill -"$1" -- "-$pid" 2>/dev/null || kill -"$1" "$pid" 2>/dev/null || true
  done
}

stop_all() {  # SIGTERM, up to GRACE_S seconds, then SIGKILL; reaps everything.
  local pid deadline any j
  (( STOPPING )) && return 0
  STOPPING=1
  (( ${#PIDS[@]} )) || return 0
  signal_all TERM
  deadline=$((SECONDS + GRACE_S))
  while (( SECONDS < deadline )); do
    any=0
    for pid in "${PIDS[@]}"; do
      if alive "$pid"; then any=1; fi
    done
    (( any )) || break
    sleep 0.2
  done
  for ((j = 0; j < ${#PIDS[@]}; j++)); do
    if alive "${PIDS[j]}"; then
      echo "$PROG: process $j (pid ${PIDS[j]}) ignored SIGTERM for ${GRACE_S}s; sending SIGKILL" >&2
    fi
  done
  signal_all KILL
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}

on_signal() {
  echo "$PROG: got SIG$1; stopping all processes (logs: $LOG_DIR)" >&2
  stop_all
  trap - EXIT
  if [[ "$1" == INT ]]; then exit 130; else exit 143; fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP
trap 'stop_all' EXIT

echo "$PROG: $NUM_PROCESSES processes x $DEVICES CPU devices, coordinator 127.0.0.1:$PORT," \
     "logs in $LOG_DIR" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$LOG_DIR/process_$i.log"
  : > "$log"
  (
    export JAX_PLATFORMS=cpu
    export JAXMED_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
    export JAXMED_NUM_PROCESSES="$NUM_PROCESSES"
    export JAXMED_PROCESS_ID="$i"
    export PYTHONUNBUFFERED=1
    if (( i == 0 )); then
      # The echo ignores Ctrl-C so the log keeps everything process 0 writes until it ends.
      # (A read loop, not awk or sed: those may hold lines back in their buffers.)
      exec "${NEW_GROUP[@]}" "$@" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} > >(
        trap '' INT
        tee -a "$log" | while IFS= read -r line || [[ -n "$line" ]]; do
          printf '[process 0] %s\n' "$line"
        done
      ) 2>&1
    else
      exec "${NEW_GROUP[@]}" "$@" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} >> "$log" 2>&1
    fi
  ) < /dev/null &
  PIDS+=("$!")
done

# Poll rather than `wait -n`: works on bash 4.x and tells which process ended.
FINISHED=()
remaining=$NUM_PROCESSES
while (( remaining > 0 )); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    pid="${PIDS[$i]}"
    if [[ -n "${FINISHED[i]:-}" ]] || alive "$pid"; then continue; fi
    rc=0
    wait "$pid" || rc=$?
    FINISHED[i]=1
    remaining=$((remaining - 1))
    if (( rc != 0 )); then
      if (( rc > 128 )); then how="was killed by signal $((rc - 128))"; else how="exited with code $rc"; fi
      echo "$PROG: process $i $how (log: $LOG_DIR/process_$i.log); stopping the others" >&2
      if (( i != 0 )); then
        tail -n 20 "$LOG_DIR/process_$i.log" | sed "s/^/[process $i] /" >&2 || true
      fi
      stop_all
      trap - EXIT
      exit "$rc"
    fi
  done
  if (( remaining > 0 )); then
    if (( TIMEOUT_S > 0 && SECONDS >= TIMEOUT_S )); then
      echo "$PROG: timeout: still running after ${TIMEOUT_S}s; killing all processes" \
           "(logs: $LOG_DIR)" >&2
      stop_all
      trap - EXIT
      exit 124
    fi
    sleep 0.2
  fi
done
trap - EXIT
sleep 0.1  # Lets the echo of process 0 drain before the last line.
echo "$PROG: all $NUM_PROCESSES processes exited 0 (logs: $LOG_DIR)" >&2
