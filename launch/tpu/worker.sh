#!/usr/bin/env bash
# The worker side of launch/tpu/launch.py: runs on every TPU VM worker, from the project's directory
# (~/bidirlm-jax), through `gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...`.
#
#   worker.sh install PYTHON PACKAGE...        venv in .venv, the pinned packages, the project (--no-deps)
#   worker.sh mount ROOT BUCKET...             gcsfuse-mount gs://BUCKET at ROOT/BUCKET (installs gcsfuse)
#   worker.sh start [--coordinator-port P] -- COMMAND...
#                                              run COMMAND detached (survives the ssh session), its output in
#                                              ~/bidirlm-logs/train-HOSTNAME.log, its exit status recorded;
#                                              with --coordinator-port on a multi-host slice, exports
#                                              JAX_COORDINATOR_ADDRESS=<worker 0>:P (see below)
#   worker.sh status                           prints "bidirlm-status: running|exited N|lost|none"
#   worker.sh stop [SECONDS]                   SIGTERM (the run checkpoints and exits), SIGKILL after SECONDS
#   worker.sh logs [LINES]                     the last LINES of this worker's log
#
# Why JAX_COORDINATOR_ADDRESS: `bidirlm train` joins a cluster (jax.distributed.initialize()) only when
# its environment says it is one of several processes; a Cloud TPU VM tells JAX through its metadata
# server, not through the environment. Setting the coordinator (worker 0, the address JAX itself would
# pick) makes the engine initialize, and JAX then reads the process count and index from the metadata.
set -euo pipefail

log_dir="${BIDIRLM_LOG_DIR:-$HOME/bidirlm-logs}"
metadata_url=http://metadata.google.internal/computeMetadata/v1/instance/attributes

die() {
  echo "worker.sh: $*" >&2
  exit 2
}

cmd_install() {
  [[ $# -ge 1 ]] || die "usage: worker.sh install PYTHON PACKAGE..."
  local python=$1
  shift
  if ! command -v "$python" >/dev/null; then
    echo "installing $python (apt)"
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$python" "$python-venv" >/dev/null
  fi
  [[ -x .venv/bin/python ]] || "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  if [[ $# -gt 0 ]]; then
    .venv/bin/python -m pip install --quiet "$@"
  fi
  .venv/bin/python -m pip install --quiet --no-deps -e .
  # Import only: touching the TPU here would start a backend that waits for the other workers.
  .venv/bin/python -c 'import jax, bidirlm_jax; print("bidirlm-install: jax", jax.__version__, "ok")'
}

install_gcsfuse() {
  local codename
  codename=$(lsb_release -cs)
  echo "installing gcsfuse (apt, gcsfuse-$codename)"
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$codename main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse >/dev/null
}

cmd_mount() {
  [[ $# -ge 2 ]] || die "usage: worker.sh mount ROOT BUCKET..."
  local root=$1 bucket dir
  shift
  command -v gcsfuse >/dev/null || install_gcsfuse
  for bucket in "$@"; do
    dir="$root/$bucket"
    if mountpoint -q "$dir"; then
      echo "bidirlm-mount: gs://$bucket already at $dir"
      continue
    fi
    sudo mkdir -p "$dir"
    sudo chown "$(id -u):$(id -g)" "$dir"
    # --implicit-dirs: folders made by other tools; --rename-dir-limit: orbax and the engine write into
    # a temporary folder and rename it into place; no metadata cache, so that every worker sees what the
    # others wrote (checkpoint shards, commit markers) at once.
    gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 "$bucket" "$dir"
    echo "bidirlm-mount: gs://$bucket at $dir"
  done
}

# The pid of a live run started by this script, or nothing.
live_pid() {
  local pid
  [[ -f "$log_dir/pid" ]] || return 0
  pid=$(<"$log_dir/pid")
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && ps -p "$pid" -o args= | grep -q "worker.sh _run"; then
    echo "$pid"
  fi
}

coordinator_address() {
  local port=$1 endpoints first
  endpoints=$(curl -fs -H "Metadata-Flavor: Google" "$metadata_url/worker-network-endpoints") ||
    die "cannot read worker-network-endpoints from the metadata server (not a Cloud TPU VM?)"
  [[ "$endpoints" == *,* ]] || return 0 # a single host: one process, nothing to coordinate
  first=${endpoints%%,*}                # "name:id:ip" (older images) or "hostname"
  echo "${first##*:}:$port"
}

cmd_start() {
  local port=""
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    case "$1" in
      --coordinator-port)
        [[ $# -ge 2 ]] || die "--coordinator-port needs a value"
        port=$2
        shift 2
        ;;
      *) die "unknown start option $1" ;;
    esac
  done
  [[ $# -ge 2 && "$1" == "--" ]] || die "usage: worker.sh start [--coordinator-port P] -- COMMAND..."
  shift
  mkdir -p "$log_dir"
  local pid log address
  pid=$(live_pid)
  if [[ -n "$pid" ]]; then
    echo "bidirlm-start: already running (pid $pid); not started again"
    return 0
  fi
  if [[ -n "$port" && -z "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
    address=$(coordinator_address "$port")
    if [[ -n "$address" ]]; then
      export JAX_COORDINATOR_ADDRESS=$address
    fi
  fi
  rm -f "$log_dir/exit-code" "$log_dir/pid"
  log="$log_dir/train-$(hostname).log"
  {
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) JAX_COORDINATOR_ADDRESS=${JAX_COORDINATOR_ADDRESS:-}"
    echo "=== $*"
  } >>"$log"
  nohup setsid bash "$(readlink -f "$0")" _run "$@" >>"$log" 2>&1 </dev/null &
  local i
  for i in $(seq 50); do
    [[ -s "$log_dir/pid" ]] && break
    [[ $i -lt 50 ]] || die "the run did not start; see $log"
    sleep 0.2
  done
  echo "bidirlm-start: pid $(<"$log_dir/pid"), log $log"
}

# Detached: records its pid, runs the command, records its exit status. SIGTERM is handled (not
# ignored, which the command would inherit) so that this wrapper outlives the command it forwards to.
cmd_run() {
  trap 'true' TERM INT
  echo "$$" >"$log_dir/pid"
  local rc=0
  "$@" || rc=$?
  echo "$rc" >"$log_dir/exit-code"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) exited $rc"
}

cmd_status() {
  local pid
  pid=$(live_pid)
  if [[ -f "$log_dir/exit-code" ]]; then
    echo "bidirlm-status: exited $(<"$log_dir/exit-code")"
  elif [[ -n "$pid" ]]; then
    echo "bidirlm-status: running"
  elif [[ -f "$log_dir/pid" ]]; then
    echo "bidirlm-status: lost" # started, no exit status: the VM restarted or the wrapper was killed
  else
    echo "bidirlm-status: none"
  fi
}

cmd_stop() {
  local seconds=${1:-300} pid waited=0
  pid=$(live_pid)
  if [[ -z "$pid" ]]; then
    echo "bidirlm-stop: nothing running"
    return 0
  fi
  # The run's process group: the wrapper (which ignores it) and `bidirlm train`, which checkpoints.
  kill -TERM -- "-$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [[ $waited -lt $seconds ]]; do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "bidirlm-stop: still running after ${seconds}s (a peer is gone?); SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  echo "bidirlm-stop: stopped"
}

cmd_logs() {
  local lines=${1:-50} f
  for f in "$log_dir"/train-*.log; do
    [[ -f "$f" ]] || continue
    echo "==> $f <=="
    tail -n "$lines" "$f"
  done
}

[[ $# -ge 1 ]] || die "usage: worker.sh install|mount|start|status|stop|logs ... (see the header)"
command=$1
shift
case "$command" in
  install) cmd_install "$@" ;;
  mount) cmd_mount "$@" ;;
  start) cmd_start "$@" ;;
  _run) cmd_run "$@" ;;
  status) cmd_status ;;
  stop) cmd_stop "$@" ;;
  logs) cmd_logs "$@" ;;
  *) die "unknown command $command" ;;
esac
