"""Shared, session-scoped fixtures: each tiny checkpoint is built ONCE and exported ONCE per test session.

Run from the repo root: python -m pytest export/tests -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
GOLDENS = REPO / "tests" / "goldens"
PYTHON = sys.executable

# FLUXRT_THREADS sets the intra-op threads of every engine the suite runs: onnxruntime (graph_io.cpu_session, the Rust
# runtime) and PyTorch, whose thread pool reads OMP_NUM_THREADS when it starts (here and in CLI subprocesses).
if os.environ.get("FLUXRT_THREADS") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = os.environ["FLUXRT_THREADS"]

# variant -> preset name; the committed model folders are models/<Preset.name>
VARIANTS = {"schnell": "tiny-schnell", "dev": "tiny-dev"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "regeneration: rebuilds committed fixtures and compares them (.ci/run repeats these under "
        "ATEN_CPU_CAPABILITY=default, PyTorch's other CPU kernel path)")


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m export ARGS` from the repo root, as a user runs it."""
    return subprocess.run([PYTHON, "-m", "export", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def run_cli_many(cases: dict[str, tuple], workers: int = 2) -> dict[str, "object"]:
    """Starts every CLI run at once on a small pool (each run is mostly a single-threaded Python import);
    returns name -> Future of CompletedProcess, so each test waits only for its own run."""
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {name: pool.submit(run_cli, *args) for name, args in cases.items()}
    pool.shutdown(wait=False)
    return futures


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """variant -> freshly built diffusers checkpoint folder, named like `python -m export tiny` names it
    (the manifest records the folder name)."""
    from export.fixtures import presets

    root = tmp_path_factory.mktemp("checkpoints")
    return {v: presets.build_checkpoint(p, root / p) for v, p in VARIANTS.items()}


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """variant -> {"dir", "manifest", "log"}: export_model(validate=True) of the fresh checkpoint into a tmp dir
    named like the committed model folder."""
    from export.fixtures import presets
    from export.run import export_model

    root = tmp_path_factory.mktemp("models")
    out = {}
    for v, p in VARIANTS.items():
        lines: list[str] = []
        model_dir = root / presets.PRESETS[p].name
        manifest = export_model(checkpoints[v], model_dir, validate=True, log=lines.append)
        out[v] = {"dir": model_dir, "manifest": manifest, "log": lines}
    return out


@pytest.fixture(scope="session")
def validation(checkpoints, exported) -> dict[str, list]:
    """variant -> validate.validate_model results for the exported model (onnxruntime vs PyTorch, two shapes)."""
    from export import checkpoint as ckpt
    from export.onnx_export import GRAPHS
    from export.validate import validate_model

    out = {}
    for v in VARIANTS:
        parts = ckpt.load(checkpoints[v], list(GRAPHS))
        out[v] = validate_model(exported[v]["dir"], exported[v]["manifest"], parts)
    return out


def pytest_terminal_summary(terminalreporter):
    """The largest differences from committed fixtures of this run, against their tolerances (tolerance.py)."""
    from .tolerance import RECORDED

    if not RECORDED:
        return
    worst, seen = [], set()
    for c in sorted(RECORDED, key=lambda c: c.share, reverse=True):
        if (c.max_abs, c.tolerance) not in seen:  # the same tensor compared in several goldens counts once
            seen.add((c.max_abs, c.tolerance))
            worst.append(c)
    terminalreporter.section("largest differences from committed fixtures (docs/testing.md)")
    nonzero = sum(1 for c in RECORDED if c.max_abs > 0)
    terminalreporter.write_line(f"{len(RECORDED)} float comparisons, {nonzero} not bit-identical; the largest:")
    for c in worst[:8]:
        terminalreporter.write_line(f"  {c.share:6.1%} of tolerance  max abs {c.max_abs:.3e} <= {c.tolerance:.3e}  "
                                    f"{c.what}")
