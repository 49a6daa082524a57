"""`python -m export quantize`: the bundled tiny model's transformer to int8 / int4, run with onnxruntime against
the fp32 graph; the committed Rust fixtures (tests/data/quant) are what this command writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.graph_io import cpu_session
from export.quantize import signed_permutation_matmuls

from .conftest import MODELS, REPO, run_cli
from .tolerance import assert_matches_fixture

TINY = MODELS / "tiny-flux-schnell"


def _feeds(sess: ort.InferenceSession, seed: int = 0) -> dict:
    """Random transformer inputs: 16 image tokens, 12 text tokens, batch 1."""
    rng = np.random.default_rng(seed)
    shapes = {"hidden_states": [1, 16, None], "encoder_hidden_states": [1, 12, None], "pooled_projections": [1, None],
              "img_ids": [16, 3], "txt_ids": [12, 3], "timestep": [1], "guidance": [1]}
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if d is not None else i.shape[-1] for d in shapes[i.name]]
        feeds[i.name] = np.full(shape, 0.5, np.float32) if i.name in ("timestep", "guidance") else \
            rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for method in ("int8", "int4"):
        r = run_cli("quantize", TINY, root / method, "--to", method)
        assert r.returncode == 0, r.stderr
        assert f"quantized transformer to {method}" in r.stdout
        out[method] = root / method
    return out


@pytest.mark.parametrize("method,rel_tol,op", [("int8", 0.05, "MatMulInteger"), ("int4", 0.2, "MatMulNBits")])
def test_quantized_transformer_runs_close_to_fp32(quantized, method, rel_tol, op):
    folder = quantized[method]
    m = json.loads((folder / "manifest.json").read_text())
    entry = m["graphs"]["transformer"]
    assert entry["precision"] == method
    assert entry["quantization"]["method"] == method
    assert m["name"] == method
    # The other graphs are untouched.
    for g in ("clip", "t5", "vae_decoder"):
        assert (folder / m["graphs"][g]["file"]).read_bytes() == (TINY / m["graphs"][g]["file"]).read_bytes()
    graph = onnx.load(str(folder / "transformer.onnx"))
    assert any(n.op_type == op for n in graph.graph.node)
    # RoPE's pair swaps (q and k of the one double and the one single block) stay float MatMuls
    assert len(signed_permutation_matmuls(graph)) == 4 == entry["quantization"]["kept_float"]
    ref = cpu_session(TINY / "transformer.onnx")
    q = cpu_session(folder / "transformer.onnx")
    feeds = _feeds(ref)
    a = ref.run(None, feeds)[0]
    b = q.run(None, feeds)[0]
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < rel_tol, f"{method}: relative L2 error {rel:.3g}"


@pytest.mark.regeneration
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_committed_rust_fixtures_match_the_exporter(quantized, method):
    """tests/data/quant holds what this command writes (same ops, same weights)."""
    fixture = REPO / "tests" / "data" / "quant" / f"tiny-flux-schnell-transformer-{method}.onnx"
    # quantized from the committed fp32 weights with numpy's IEEE arithmetic: the same on every machine
    _assert_same_ops_and_weights(onnx.load(str(quantized[method] / "transformer.onnx")), onnx.load(str(fixture)),
                                 exact=True)


@pytest.mark.regeneration
def test_committed_fp16_fixture_matches_the_exporter(checkpoints, tmp_path):
    """tests/data/quant's fp16 transformer (the Rust device-loop test's fp16 graph) is what an fp16 export of the
    tiny checkpoint writes."""
    r = run_cli(checkpoints["schnell"], tmp_path / "fp16", "--precision", "fp16", "--components", "transformer")
    assert r.returncode == 0, r.stderr
    new = onnx.load(str(tmp_path / "fp16" / "transformer.onnx"))
    old = onnx.load(str(REPO / "tests" / "data" / "quant" / "tiny-flux-schnell-transformer-fp16.onnx"))
    assert [(i.name, i.type.tensor_type.elem_type) for i in new.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in old.graph.input]
    # a fresh checkpoint: its weights are torch's random draws, elementwise within the fixture tolerance
    _assert_same_ops_and_weights(new, old, exact=False)


def _assert_same_ops_and_weights(new, old, exact: bool):
    """A committed fixture is what the exporter writes now: the same nodes in order, the same weights (exactly, or
    within the elementwise fixture tolerance when they come from a checkpoint built on this machine)."""
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in old.graph.node]
    new_w = {i.name: onnx.numpy_helper.to_array(i) for i in new.graph.initializer}
    old_w = {i.name: onnx.numpy_helper.to_array(i) for i in old.graph.initializer}
    assert new_w.keys() == old_w.keys()
    for k in new_w:
        if exact:
            np.testing.assert_array_equal(new_w[k], old_w[k], err_msg=k)
        else:
            assert_matches_fixture(f"fp16 fixture weight {k}", new_w[k], old_w[k])


def test_quantize_bad_input(tmp_path):
    r = run_cli("quantize", tmp_path / "nowhere", tmp_path / "out", "--to", "int8")
    assert r.returncode == 2 and "no manifest.json" in r.stderr, r.stderr
    r = run_cli("quantize", TINY, tmp_path / "out", "--to", "int3")
    assert r.returncode == 2 and "invalid choice" in r.stderr, r.stderr
