#!/usr/bin/env bash
# Runs every test of fluxrt on a fresh machine: installs the export stack (scripts/export-env.sh: a pinned Python
# venv), builds the crate, checks formatting and lints, runs the Rust tests (unit, parity with diffusers, CLI,
# layouts, server) and the export step's pytest suite, then the fixture-regeneration tests again on PyTorch's other
# CPU kernel path (docs/testing.md).
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

echo "== export stack"
bash scripts/export-env.sh

# tests/load_balancer.rs runs replicas behind a real HAProxy: Debian's package, installed here when missing.
echo "== haproxy"
if [ ! -x /usr/sbin/haproxy ] && ! command -v haproxy >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq haproxy >/dev/null 2>&1 || { $sudo apt-get update -qq && $sudo apt-get install -y -qq haproxy >/dev/null; }
fi
/usr/sbin/haproxy -v 2>/dev/null | head -1 || haproxy -v | head -1

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --no-fail-fast
echo "== pytest export/tests"
"$FLUXRT_PYTHON" -m pytest export/tests -q -p no:cacheprovider --basetemp "$scratch/pytest"
# The deployment files (deploy/): Kubernetes manifests against the Kubernetes schemas, offline; the Dockerfiles with
# hadolint; both against the server's real routes, flags and metrics (docs/deploy.md).
echo "== pytest deploy/tests"
"$FLUXRT_PYTHON" -m pip install --quiet --no-cache-dir -r deploy/tests/requirements.txt
"$FLUXRT_PYTHON" -m pytest deploy/tests -q -p no:cacheprovider --basetemp "$scratch/pytest-deploy"
# The committed fixtures must hold on any CPU (docs/testing.md): the tests that rebuild them run again on PyTorch's
# scalar kernels, which give other last bits than the AVX2/AVX-512 ones this machine picks by itself.
echo "== pytest -m regeneration, ATEN_CPU_CAPABILITY=default"
ATEN_CPU_CAPABILITY=default "$FLUXRT_PYTHON" -m pytest export/tests -q -p no:cacheprovider -m regeneration \
  --basetemp "$scratch/pytest-default"
