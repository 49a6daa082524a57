"""The bench preset (~160M-parameter transformer, real text dims, real-size VAE) exports and validates through
the CLI exactly as the README says: `python -m export preset bench OUT --validate`. About 2.5 minutes here."""

from __future__ import annotations

import json

from .conftest import run_cli


def test_bench_preset_exports_and_validates(tmp_path):
    out = tmp_path / "bench"
    r = run_cli("preset", "bench", out, "--validate", "--work", tmp_path / "work", timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("validate ")]
    assert len(lines) == 10, r.stdout  # 5 graphs x 2 shapes
    assert all(ln.split()[-1] == "ok" for ln in lines), "\n".join(lines)
    m = json.loads((out / "manifest.json").read_text())
    t = {i["name"]: i["shape"] for i in m["graphs"]["transformer"]["inputs"]}
    # the real FLUX.1 text dims
    assert t["encoder_hidden_states"] == ["B", "L", 4096]
    assert t["pooled_projections"] == ["B", 768]
    assert m["vae"]["downsample_factor"] == 8
    assert m["source"]["preset"] == "bench"
