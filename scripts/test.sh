#!/usr/bin/env bash
# Runs every test of fluxrt on a fresh machine: installs the export stack (Python venv, pinned), builds the
# crate, checks formatting and lints, runs the Rust tests (unit, parity with diffusers, CLI, layouts) and the
# export step's pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

export FLUXRT_VENV="${FLUXRT_VENV:-$HOME/.cache/fluxrt/venv}"
export FLUXRT_PYTHON="$FLUXRT_VENV/bin/python"

echo "== export stack: $FLUXRT_VENV"
if [ ! -x "$FLUXRT_PYTHON" ]; then
  python3 -m venv "$FLUXRT_VENV"
fi
stamp="$FLUXRT_VENV/.fluxrt-requirements"
if ! cmp -s export/requirements.txt "$stamp" 2>/dev/null; then
  "$FLUXRT_PYTHON" -m pip install --quiet --upgrade pip
  "$FLUXRT_PYTHON" -m pip install --quiet -r export/requirements.txt
  cp export/requirements.txt "$stamp"
fi

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --no-fail-fast
echo "== pytest export/tests"
"$FLUXRT_PYTHON" -m pytest export/tests -q -p no:cacheprovider
