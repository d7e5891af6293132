#!/usr/bin/env bash
# The pod command on this machine's CPU, for debugging a config before it costs anything.
# usage: launch/local.sh [--processes P] [--devices D] [--port PORT] CONFIG[:PRESET] WORKDIR [--config.key=value ...]
#
# Runs `bidirlm train --config CONFIG --workdir WORKDIR ...` exactly as a TPU worker or a SLURM task does,
# on D fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, default 8) split over P
# processes (default 1). With P > 1 every process joins a local cluster through --config.distributed.*
# (coordinator 127.0.0.1:PORT, default 12355), reads only its share of each batch and writes its
# checkpoint shards, as the workers of a pod slice do; their output is prefixed with [process i].
# Rerunning the same command resumes from WORKDIR's latest checkpoint, as after a preemption.
# The `bidirlm` it runs: $BIDIRLM when set, else the active environment's ($VIRTUAL_ENV, $CONDA_PREFIX),
# else this repository's .venv, else the one on the PATH (launch/find_bidirlm.sh).
set -euo pipefail

usage() { sed -n '2,3p' "$0" | sed 's/^# //'; }
die() {
  echo "local.sh: $*" >&2
  usage >&2
  exit 2
}

processes=1
devices=8
port=${BIDIRLM_PORT:-12355}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes | --devices | --port)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 takes a positive integer, not '$2'"
      case "$1" in
        --processes) processes=$2 ;;
        --devices) devices=$2 ;;
        --port) port=$2 ;;
      esac
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    --) shift && break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || die "missing CONFIG[:PRESET] WORKDIR"
(( devices % processes == 0 )) || die "--devices $devices does not split over --processes $processes"
config=$1 workdir=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/find_bidirlm.sh
source "$repo/launch/find_bidirlm.sh"
bidirlm=$(find_bidirlm "$repo") || exit $?

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$((devices / processes))${XLA_FLAGS:+ $XLA_FLAGS}"
# A process that the environment marks as one of several would try to join that cluster instead.
unset JAX_COORDINATOR_ADDRESS TPU_WORKER_HOSTNAMES SLURM_NTASKS
train=(train --config "$config" --workdir "$workdir")

if ((processes == 1)); then
  exec "$bidirlm" "${train[@]}" "$@"
fi

pids=()
# Ctrl-C / SIGTERM: every process checkpoints at its next step and exits, as on a preemption.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < processes; i++)); do
  "$bidirlm" "${train[@]}" --config.metrics.progress_bar=False "$@" \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$processes" \
    --config.distributed.process_id="$i" > >(sed -u "s/^/[process $i] /") 2>&1 &
  pids+=("$!")
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || rc=$?
done
exit "$rc"
