"""`python -m export layout bfl|optimum`: the folder layout, the I/O names, and identical onnxruntime outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from .conftest import MODELS, run_cli_many
from export.graph_io import cpu_session

SCHNELL, DEV = MODELS / "tiny-flux-schnell", MODELS / "tiny-flux-dev"

BFL_FILES = {
    "clip": "clip.opt/model.onnx",
    "t5": "t5.opt/model.onnx",
    "transformer": "transformer.opt/fp32/model.onnx",
    "vae_decoder": "vae.opt/model.onnx",
}
OPTIMUM_FILES = {
    "clip": "text_encoder/model.onnx",
    "t5": "text_encoder_2/model.onnx",
    "transformer": "transformer/model.onnx",
    "vae_decoder": "vae_decoder/model.onnx",
    "vae_encoder": "vae_encoder/model.onnx",
}
TRANSFORMER_IN = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"]
# graph -> (input names, output names) in the optimum layout
OPTIMUM_IO = {
    "clip": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "t5": (["input_ids"], ["last_hidden_state"]),
    "transformer": (TRANSFORMER_IN, ["out_hidden_states"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
    "vae_encoder": (["sample"], ["latent_parameters", "latent_std"]),
}
# concrete values for the symbolic dims: latent 8x8 -> 64x64 pixels, 16 image tokens
DIMS = {"B": 2, "L": 24, "S": 16, "h": 8, "w": 8, "H": 64, "W": 64}


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    runs = {
        ("bfl", "schnell"): ("layout", "bfl", SCHNELL, root / "bfl-schnell"),
        ("optimum", "schnell"): ("layout", "optimum", SCHNELL, root / "optimum-schnell"),
        ("optimum", "dev"): ("layout", "optimum", DEV, root / "optimum-dev"),
    }
    futures = run_cli_many(runs)
    out = {}
    for key, fut in futures.items():
        proc = fut.result()
        assert proc.returncode == 0, proc.stderr
        out[key] = runs[key][3]
    return out


def io_names(path):
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits], [o.name for o in m.graph.output]


def feeds_for(path, seed=0):
    """Random inputs for a graph, keyed by its input names, at the DIMS sizes."""
    rng = np.random.default_rng(seed)
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    feeds = []
    for v in m.graph.input:
        if v.name in inits:  # overridable initializers (the transformer's LoRA slots) keep their defaults
            continue
        t = v.type.tensor_type
        shape = [DIMS[d.dim_param] if d.dim_param else d.dim_value for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.INT32:
            arr = rng.integers(0, 32000, size=shape).astype(np.int32)
        else:
            arr = rng.standard_normal(shape).astype(np.float32)
        feeds.append((v.name, arr))
    return feeds


def run(path, feeds):
    return cpu_session(path).run(None, dict(feeds))


def onnx_files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*.onnx")}


def test_bfl_layout_files_and_names(layouts):
    out = layouts["bfl", "schnell"]
    manifest = json.loads((SCHNELL / "manifest.json").read_text())
    assert onnx_files(out) == set(BFL_FILES.values())
    # The base repos' tokenizer folders as they are on the hub: CLIP as vocab.json + merges.txt (no
    # tokenizer.json), T5 with the hub's tokenizer.json (the pre-transformers-5 pipeline, no WhitespaceSplit).
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in (out / "tokenizer_2").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    t5_pre = json.loads((out / "tokenizer_2" / "tokenizer.json").read_text())["pre_tokenizer"]
    assert "WhitespaceSplit" not in json.dumps(t5_pre)
    for graph, rel in BFL_FILES.items():
        onnx.checker.check_model(str(out / rel))
        entry = manifest["graphs"][graph]
        want = ([i["name"] for i in entry["inputs"]], [o["name"] for o in entry["outputs"]])
        assert io_names(out / rel) == want, graph
        assert io_names(out / rel) == io_names(SCHNELL / entry["file"]), graph


@pytest.mark.parametrize("graph", list(BFL_FILES))
def test_bfl_graph_gives_the_same_outputs(layouts, graph):
    out = layouts["bfl", "schnell"]
    original = SCHNELL / f"{graph}.onnx"
    feeds = feeds_for(original)
    for got, want in zip(run(out / BFL_FILES[graph], feeds), run(original, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_optimum_layout_files_and_names(layouts, variant):
    out = layouts["optimum", variant]
    src = SCHNELL if variant == "schnell" else DEV
    assert onnx_files(out) == set(OPTIMUM_FILES.values())
    for folder in ("tokenizer", "tokenizer_2"):
        assert (out / folder / "tokenizer.json").read_bytes() == (src / folder / "tokenizer.json").read_bytes()
    for graph, rel in OPTIMUM_FILES.items():
        onnx.checker.check_model(str(out / rel))
        inputs, outputs = OPTIMUM_IO[graph]
        if graph == "transformer" and variant == "dev":
            inputs = inputs + ["guidance"]
        assert io_names(out / rel) == (inputs, outputs), graph


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize("graph", list(OPTIMUM_FILES))
def test_optimum_graph_gives_the_same_outputs(layouts, variant, graph):
    out = layouts["optimum", variant]
    original = (SCHNELL if variant == "schnell" else DEV) / f"{graph}.onnx"
    feeds = feeds_for(original, seed=len(graph))
    renamed = [name for name in io_names(out / OPTIMUM_FILES[graph])[0]]
    assert len(renamed) == len(feeds)
    # the optimum graph's inputs are the original ones, in the same order, under optimum's names
    new_feeds = [(new, arr) for new, (_, arr) in zip(renamed, feeds)]
    got, want = run(out / OPTIMUM_FILES[graph], new_feeds), run(original, feeds)
    assert len(got) == len(want) == len(OPTIMUM_IO[graph][1])
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.isfinite(w).all()
        np.testing.assert_array_equal(g, w)
