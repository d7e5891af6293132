# shellcheck shell=bash
# Sourced by the launch scripts: `find_bidirlm REPO` prints the `bidirlm` command to run, or fails with a
# message saying how to point to one. In order: $BIDIRLM (the override), the active environment's
# ($VIRTUAL_ENV, $CONDA_PREFIX), this repository's .venv, then `bidirlm` on the PATH.
find_bidirlm() {
  local repo=$1 candidate
  if [[ -n "${BIDIRLM:-}" ]]; then
    [[ -x "$BIDIRLM" ]] || command -v "$BIDIRLM" >/dev/null ||
      { echo "BIDIRLM=$BIDIRLM is not an executable; point it to a bidirlm command" >&2 && return 2; }
    echo "$BIDIRLM"
    return 0
  fi
  for candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/bidirlm"} ${CONDA_PREFIX:+"$CONDA_PREFIX/bin/bidirlm"} \
    "$repo/.venv/bin/bidirlm"; do
    if [[ -x "$candidate" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  if command -v bidirlm >/dev/null; then
    command -v bidirlm
    return 0
  fi
  echo "no bidirlm command: not in \$VIRTUAL_ENV, \$CONDA_PREFIX, $repo/.venv nor on the PATH; activate the" \
    "environment you installed the project in (pip install -e .), or set BIDIRLM=/path/to/bidirlm" >&2
  return 2
}
