#!/usr/bin/env bash
# Installs the export step's Python stack (export/requirements.txt, pinned) into its own virtual environment and
# prints the Python to run `python -m export` with. scripts/test.sh uses the same environment.
#   FLUXRT_VENV   where the environment goes (default ~/.cache/fluxrt/venv)
# Safe to re-run: it reinstalls only when export/requirements.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${FLUXRT_VENV:-$HOME/.cache/fluxrt/venv}"
python="$venv/bin/python"
stamp="$venv/.fluxrt-requirements"

if [ -x "$python" ] && cmp -s export/requirements.txt "$stamp" 2>/dev/null; then
  echo "export stack: up to date in $venv"
else
  echo "export stack: installing export/requirements.txt into $venv"
  echo "  (PyTorch with its CUDA wheels: about 2.8 GB to download, 5.8 GB on disk, 2-5 minutes; nothing is cached)"
  if [ ! -x "$python" ]; then
    python3 -m venv "$venv"
  fi
  # No pip cache: the torch wheels alone would keep several GiB of downloads on disk. pip prints each package as
  # it is collected and installed, so a slow download shows as such.
  # (pipefail: a failing pip fails the pipe, whatever grep keeps of its output)
  "$python" -m pip install --quiet --no-cache-dir --upgrade pip
  "$python" -m pip install --no-cache-dir --progress-bar off -r export/requirements.txt 2>&1 \
    | { grep -E '^(Collecting|  Downloading|Installing|Successfully|ERROR)' || true; }
  "$python" -c "import torch, diffusers, transformers, onnx, onnxruntime"
  cp export/requirements.txt "$stamp"
  echo "export stack: installed ($(du -sh "$venv" | cut -f1) in $venv)"
fi
echo "run the export step with: $python -m export --help"
