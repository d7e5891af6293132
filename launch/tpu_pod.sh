#!/usr/bin/env bash
# Run `bidirlm train` on every worker of a Cloud TPU VM slice (single host or pod).
# usage: launch/tpu_pod.sh TPU_NAME ZONE WORKDIR CONFIG[:PRESET] [--config.key=value ...]
# Assumes the repository is checked out at ~/bidirlm-jax on every worker with `make` run once
# (or `pip install -r requirements.lock "jax[tpu]" && pip install -e .`), and WORKDIR on a shared mount.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,5p' "$0"; exit 2
fi
tpu=$1 zone=$2 workdir=$3 config=$4
shift 4
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/bidirlm-jax && .venv/bin/bidirlm train --config $config --workdir $workdir$overrides"
