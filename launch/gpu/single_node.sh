#!/usr/bin/env bash
# One machine, several GPUs: a single `bidirlm train` process drives every GPU it sees.
# usage: launch/gpu/single_node.sh CONFIG[:PRESET] WORKDIR [--config.key=value ...]
#
# No distributed start-up: the mesh (--config.mesh.*, default data-parallel over all devices) spans the
# local GPUs and XLA uses NCCL between them. Choose GPUs with CUDA_VISIBLE_DEVICES=0,1,2,3. JAX takes 75 %
# of each GPU's memory up front; XLA_PYTHON_CLIENT_MEM_FRACTION=.9 gives it more. Rerunning the same
# command resumes from WORKDIR's latest checkpoint; SIGTERM (kill, Ctrl-\) checkpoints and exits 0.
# The `bidirlm` it runs: $BIDIRLM when set, else the active environment's ($VIRTUAL_ENV, $CONDA_PREFIX),
# else this repository's .venv, else the one on the PATH (launch/find_bidirlm.sh).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '3p' "$0" | sed 's/^# //' >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=launch/find_bidirlm.sh
source "$repo/launch/find_bidirlm.sh"
bidirlm=$(find_bidirlm "$repo") || exit $?
# Inside an `salloc` of several tasks, SLURM's variables would make this one process wait for the others.
unset JAX_COORDINATOR_ADDRESS SLURM_NTASKS
if command -v nvidia-smi >/dev/null; then
  echo "single_node.sh: $(nvidia-smi -L | wc -l) GPU(s) on this machine; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all}" >&2
fi
exec "$bidirlm" train --config "$config" --workdir "$workdir" "$@"
