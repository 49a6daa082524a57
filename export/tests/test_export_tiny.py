"""Export both tiny variants from scratch: parity with PyTorch at two shapes, the official I/O contract, and the
schnell/dev defaults in the manifest."""

from __future__ import annotations

import json
import math

import onnx
import pytest

from export import onnx_export as ox
from export.validate import Result

from .conftest import VARIANTS

GRAPH_NAMES = ["clip", "t5", "transformer", "vae_decoder", "vae_encoder"]
CLIP_DIM, T5_DIM = 8, 16  # the tiny presets' text dims


def io(name, shape, dtype="float32"):
    return {"name": name, "dtype": dtype, "shape": shape}


def expected_io(variant: str) -> dict:
    """The official contract, exactly: names, dtypes, symbolic dims B/L/S/h/w/H/W and the fixed dims."""
    transformer_in = [
        io("hidden_states", ["B", "S", 64]),
        io("encoder_hidden_states", ["B", "L", T5_DIM]),
        io("pooled_projections", ["B", CLIP_DIM]),
        io("timestep", ["B"]),
        io("img_ids", ["S", 3]),
        io("txt_ids", ["L", 3]),
    ]
    if variant == "dev":
        transformer_in.append(io("guidance", ["B"]))
    return {
        "clip": {
            "inputs": [io("input_ids", ["B", 77], "int32")],
            "outputs": [io("text_embeddings", ["B", 77, CLIP_DIM]), io("pooled_embeddings", ["B", CLIP_DIM])],
        },
        "t5": {
            "inputs": [io("input_ids", ["B", "L"], "int32")],
            "outputs": [io("text_embeddings", ["B", "L", T5_DIM])],
        },
        "transformer": {"inputs": transformer_in, "outputs": [io("latent", ["B", "S", 64])]},
        "vae_decoder": {
            "inputs": [io("latent", ["B", 16, "h", "w"])],
            "outputs": [io("images", ["B", 3, "H", "W"])],
        },
        "vae_encoder": {
            "inputs": [io("images", ["B", 3, "H", "W"])],
            "outputs": [io("latent", ["B", 16, "h", "w"]), io("latent_std", ["B", 16, "h", "w"])],
        },
    }


def test_validation_shapes_cover_batch_resolution_and_text_length():
    shapes = ox.VALIDATION_SHAPES
    assert len(shapes) == 2
    assert {s.batch for s in shapes} == {1, 2}
    assert len({(s.width, s.height) for s in shapes}) == 2
    assert len({s.text_len for s in shapes}) == 2
    assert ox.EXPORT_SHAPE not in shapes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_graph_matches_pytorch_at_both_shapes(validation, variant):
    results = validation[variant]
    assert all(isinstance(r, Result) for r in results)
    assert sorted({r.graph for r in results}) == sorted(GRAPH_NAMES)
    for g in GRAPH_NAMES:
        assert [r.shape for r in results if r.graph == g] == ox.VALIDATION_SHAPES, g
    bad = [r.line() for r in results if not (r.ok and math.isfinite(r.max_abs) and r.max_abs <= 1e-4)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_model_validated_every_graph(exported, variant):
    """export_model(validate=True) logged one passing line per graph and shape."""
    lines = [ln for ln in exported[variant]["log"] if ln.startswith("validate ")]
    assert len(lines) == len(GRAPH_NAMES) * len(ox.VALIDATION_SHAPES)
    assert all(ln.rstrip().endswith(" ok") for ln in lines), lines


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifest_has_the_official_io(exported, variant):
    m = exported[variant]["manifest"]
    want = expected_io(variant)
    assert list(m["graphs"]) == GRAPH_NAMES
    for g, spec in want.items():
        entry = m["graphs"][g]
        assert entry["inputs"] == spec["inputs"], g
        assert entry["outputs"] == spec["outputs"], g
        assert entry["file"] == f"{g}.onnx" and entry["precision"] == "fp32" and entry["external_data"] is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_files_declare_what_the_manifest_says(exported, variant):
    model_dir, m = exported[variant]["dir"], exported[variant]["manifest"]
    on_disk = json.loads((model_dir / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    for g, entry in m["graphs"].items():
        model = onnx.load(str(model_dir / entry["file"]))
        onnx.checker.check_model(model)
        assert ox.read_io(model_dir / entry["file"]) == {"inputs": entry["inputs"], "outputs": entry["outputs"]}
        ids = [i for i in model.graph.input if i.name == "input_ids"]
        for i in ids:
            assert i.type.tensor_type.elem_type == onnx.TensorProto.INT32
            assert len(i.type.tensor_type.shape.dim) == 2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformer_guidance_input_only_for_dev(exported, variant):
    names = [i["name"] for i in exported[variant]["manifest"]["graphs"]["transformer"]["inputs"]]
    assert ("guidance" in names) == (variant == "dev")


@pytest.mark.parametrize(
    "variant, steps, guidance, t5_len, dynamic, shift",
    [("schnell", 4, None, 256, False, 1.0), ("dev", 28, 3.5, 512, True, 3.0)],
)
def test_variant_defaults(exported, variant, steps, guidance, t5_len, dynamic, shift):
    m = exported[variant]["manifest"]
    assert m["variant"] == variant
    assert m["guidance_embeds"] is (variant == "dev")
    assert m["latent_channels"] == 16
    assert m["defaults"] == {"steps": steps, "guidance": guidance, "t5_max_length": t5_len, "width": 256, "height": 256}
    assert m["scheduler"]["use_dynamic_shifting"] is dynamic
    assert m["scheduler"]["shift"] == shift
    assert m["vae"] == {"scaling_factor": 0.3611, "shift_factor": 0.1159, "downsample_factor": 8}
    assert m["tokenizers"]["clip"]["max_length"] == 77 and m["tokenizers"]["t5"]["max_length"] == 512
    assert m["tokenizers"]["clip"]["file"] == "tokenizer/tokenizer.json"
    assert m["tokenizers"]["t5"]["file"] == "tokenizer_2/tokenizer.json"
    assert m["source"] == {"checkpoint": VARIANTS[variant], "preset": VARIANTS[variant]}
    # JSON null, not a string or 0, for schnell's guidance
    text = (exported[variant]["dir"] / "manifest.json").read_text()
    assert ('"guidance": null' in text) == (variant == "schnell")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_graphs_follow_the_contract_file(exported, variant):
    """Every graph's declared I/O is contract/flux-onnx.json's: same names in order, element types, fixed numbers and
    dimension symbols (the model widths *_dim fixed to this model's sizes)."""
    from export.contract import contract_for

    m = exported[variant]["manifest"]
    for graph, entry in m["graphs"].items():
        want = contract_for(graph, m["guidance_embeds"])
        for side in ("inputs", "outputs"):
            got = entry[side]
            assert [io["name"] for io in got] == [io.name for io in want[side]], (graph, side)
            for g, w in zip(got, want[side]):
                assert g["dtype"] == w.dtype, (graph, g["name"])
                assert len(g["shape"]) == len(w.shape), (graph, g["name"])
                for gd, wd in zip(g["shape"], w.shape):
                    if isinstance(wd, str) and wd.endswith("_dim"):
                        assert isinstance(gd, int), (graph, g["name"], gd)
                    else:
                        assert gd == wd, (graph, g["name"], g["shape"], w.shape)
