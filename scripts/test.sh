#!/usr/bin/env bash
# Runs every test of fluxrt on a fresh machine: installs the export stack (Python venv, pinned), builds the
# crate, checks formatting and lints, runs the Rust tests (unit, parity with diffusers, CLI, layouts) and the
# export step's pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

export FLUXRT_VENV="${FLUXRT_VENV:-$HOME/.cache/fluxrt/venv}"
export FLUXRT_PYTHON="$FLUXRT_VENV/bin/python"

# Everything the tests write (pytest's temporary folders, the optimized-graph cache) goes under one scratch folder
# that is removed at the end, so repeated runs don't fill the disk or the user's own cache. No incremental build
# state either: it only pays off for edit-compile cycles, and costs about a GiB.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/fluxrt-test.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
export FLUXRT_OPTIMIZED_CACHE="$scratch/optimized"
export CARGO_INCREMENTAL=0

echo "== export stack: $FLUXRT_VENV"
if [ ! -x "$FLUXRT_PYTHON" ]; then
  python3 -m venv "$FLUXRT_VENV"
fi
stamp="$FLUXRT_VENV/.fluxrt-requirements"
if ! cmp -s export/requirements.txt "$stamp" 2>/dev/null; then
  # No pip cache: the torch wheels alone would keep several GiB of downloads on disk.
  "$FLUXRT_PYTHON" -m pip install --quiet --no-cache-dir --upgrade pip
  "$FLUXRT_PYTHON" -m pip install --quiet --no-cache-dir -r export/requirements.txt
  cp export/requirements.txt "$stamp"
fi

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --no-fail-fast
echo "== pytest export/tests"
"$FLUXRT_PYTHON" -m pytest export/tests -q -p no:cacheprovider --basetemp "$scratch/pytest"
