"""Run-time LoRA slots (export/lora_slots.py) and the `lora` goldens (export/fixtures/lora_goldens.py).

- the bundled transformer graphs have one optional (A, B) input pair per Linear, with zero-rank defaults, and the
  manifest lists them;
- fed nothing, a slot graph equals the plain graph; fed slot_factors(...) it equals diffusers' transformer with the
  same LoRA(s) loaded unfused (PEFT), for the diffusers and kohya namings and two stacked LoRAs;
- fp16 exports with slots validate, with fp16 slots;
- the committed lora goldens regenerate, and each LoRA visibly changes the image.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from export import checkpoint as ckpt
from export import lora_slots
from export.fixtures import goldens, lora_goldens, presets
from export import manifest as mf
from export import onnx_export as ox
from export.graph_io import cpu_session
from export.lora import LoraSpec, make_random_lora, read_lora_file, to_diffusers
from export.wrappers import TransformerGraph

from .conftest import GOLDENS, MODELS, REPO, VARIANTS
from .tolerance import assert_golden_matches, assert_matches_fixture


def model_name(variant: str) -> str:
    return presets.PRESETS[VARIANTS[variant]].name


def manifest(variant: str) -> dict:
    return json.loads((MODELS / model_name(variant) / "manifest.json").read_text())


def lora_index(variant: str) -> dict:
    return json.loads((GOLDENS / model_name(variant) / "lora" / "index.json").read_text())


session = cpu_session


@pytest.fixture(scope="module")
def transformers(checkpoints) -> dict:
    torch.set_grad_enabled(False)
    return {v: ckpt.load(checkpoints[v], ["transformer"]) for v in VARIANTS}


def inputs(parts, shape=ox.VALIDATION_SHAPES[1], seed=7) -> list[torch.Tensor]:
    return ox.example_inputs("transformer", ox.dims(parts), shape, seed=seed)


# ---------------------------------------------------------------- the contract of the bundled graphs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bundled_transformer_has_a_slot_per_linear(transformers, variant):
    tr = transformers[variant].transformer
    linears = [(n, m) for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    entry = manifest(variant)["graphs"]["transformer"]
    assert entry["lora_slots"] == [{"module": n, "in": m.in_features, "out": m.out_features} for n, m in linears]
    assert {"x_embedder", "context_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.ff.net.0.proj", "single_transformer_blocks.0.proj_out",
            "time_text_embed.timestep_embedder.linear_1"} <= {s["module"] for s in entry["lora_slots"]}
    # the other graphs have none; the manifest's inputs are still the ordinary ones
    assert all("lora_slots" not in g for name, g in manifest(variant)["graphs"].items() if name != "transformer")
    assert not any(i["name"].endswith((".lora_A", ".lora_B")) for i in entry["inputs"])
    mf.read(MODELS / model_name(variant))  # the schema check accepts it

    model = onnx.load(str(MODELS / model_name(variant) / entry["file"]))
    ins = {v.name: v.type.tensor_type for v in model.graph.input}
    inits = {t.name: t for t in model.graph.initializer}
    ranks = set()
    for i, s in enumerate(entry["lora_slots"]):
        a, b = f"{s['module']}.lora_A", f"{s['module']}.lora_B"
        dims_a = [d.dim_param or d.dim_value for d in ins[a].shape.dim]
        dims_b = [d.dim_param or d.dim_value for d in ins[b].shape.dim]
        assert dims_a == [s["in"], f"lora_rank_{i}"] and dims_b == [f"lora_rank_{i}", s["out"]]
        assert ins[a].elem_type == ins[b].elem_type == onnx.TensorProto.FLOAT
        assert list(inits[a].dims) == [s["in"], 0] and list(inits[b].dims) == [0, s["out"]]
        assert inits[a].data_type == inits[b].data_type == onnx.TensorProto.FLOAT
        ranks.add(dims_a[1])
    assert len(ranks) == len(entry["lora_slots"])
    sess = session(MODELS / model_name(variant) / entry["file"])
    assert [i.name for i in sess.get_inputs()] == [i["name"] for i in entry["inputs"]]
    assert len(sess.get_overridable_initializers()) == 2 * len(entry["lora_slots"])


def test_manifest_schema_check_refuses_bad_slots():
    mf.check_lora_slots("transformer", [{"module": "x_embedder", "in": 64, "out": 32}])
    for bad in ([{"module": "x", "in": 0, "out": 3}], [{"module": "x", "in": 2}],
                [{"module": "x", "in": 2, "out": 3}] * 2, {"module": "x"}):
        with pytest.raises(ValueError):
            mf.check_lora_slots("transformer", bad)
    with pytest.raises(ValueError):
        mf.check_lora_slots("clip", [])


def test_lora_slots_need_the_transformer(checkpoints, tmp_path):
    from export.checkpoint import ExportError
    from export.run import export_model

    with pytest.raises(ExportError, match="--lora-slots needs the transformer"):
        export_model(checkpoints["schnell"], tmp_path / "m", components=["vae_decoder"], lora_slots=True,
                     log=lambda *_: None)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_slot_graph_without_feeds_equals_plain_graph(transformers, variant, tmp_path):
    """Exported from the same weights on this machine, the slot graph fed nothing gives the plain graph's output bit
    for bit (docs/lora.md); the committed slot graph, exported on another machine, within the fixture tolerance."""
    parts = transformers[variant]
    plain, slotted = tmp_path / "plain.onnx", tmp_path / "slotted.onnx"
    ox.export_graph("transformer", parts, plain, lora_slots=False)
    ox.export_graph("transformer", parts, slotted, lora_slots=True)
    committed = MODELS / model_name(variant) / "transformer.onnx"
    for shape in ox.VALIDATION_SHAPES:
        feeds = ox.numpy_inputs("transformer", plain, inputs(parts, shape))
        a = session(plain).run(None, feeds)[0]
        np.testing.assert_array_equal(a, session(slotted).run(None, feeds)[0])
        assert_matches_fixture(f"{variant} committed slot graph at {shape}", session(committed).run(None, feeds)[0],
                               a, evaluations=1)


def _peft_reference(parts, specs: list[LoraSpec], example: list[torch.Tensor]) -> np.ndarray:
    """diffusers' transformer with the LoRAs loaded UNFUSED (PEFT adapters), as the lora goldens load them."""
    from diffusers import FluxPipeline

    tr = copy.deepcopy(parts.transformer)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)
    names = []
    for i, spec in enumerate(specs):
        sd, _ = to_diffusers(read_lora_file(spec.path), parts.transformer, spec.path)
        pipe.load_lora_weights({k: v for k, v in sd.items() if k.startswith("transformer.")}, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    with torch.no_grad():
        return TransformerGraph(tr).eval()(*example).numpy()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", ["diffusers", "kohya", "stacked", "top"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fed_slots_match_diffusers_with_the_lora_unfused(transformers, variant, case):
    parts = transformers[variant]
    c = next(c for c in lora_index(variant)["cases"] if c["name"] == case)
    specs = [LoraSpec(REPO / x["file"], x["scale"]) for x in c["loras"]]
    factors = lora_slots.slot_factors(specs, parts.transformer)
    path = MODELS / model_name(variant) / "transformer.onnx"
    example = inputs(parts)
    feeds = ox.numpy_inputs("transformer", path, example)
    sess = session(path)
    got = sess.run(None, {**feeds, **factors})[0]
    want = _peft_reference(parts, specs, example)
    plain = sess.run(None, feeds)[0]
    assert float(np.abs(want - plain).max()) > 0.05, "the LoRA should change the transformer's output"
    assert float(np.abs(got - want).max()) <= 1e-4
    # the factors' shapes and the delta golden
    for key, arr in factors.items():
        assert arr.dtype == np.float32 and arr.ndim == 2
    deltas = load_file(str(GOLDENS / model_name(variant) / "lora" / c["delta_file"]))
    assert set(deltas) == {k[: -len(".lora_A")] for k in factors if k.endswith(".lora_A")}


@pytest.mark.filterwarnings("ignore")
def test_partial_alphas_scale_like_diffusers_peft(transformers, tmp_path):
    """A diffusers-named file with `.alpha` on some layers only: each layer's alpha / r is the scaling PEFT gets
    when diffusers loads the file (the default alpha for layers without one, not their rank; suffix patterns)."""
    from diffusers import FluxPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    tr = transformers["schnell"].transformer
    path = tmp_path / "partial.safetensors"
    make_random_lora(tr, path, naming="diffusers", rank=4, seed=3)
    sd = load_file(str(path))
    alphas = {"norm_out.linear": 2.0, "proj_out": 8.0, "transformer_blocks.0.attn.to_q": 1.0,
              "transformer_blocks.0.attn.to_k": 1.0, "transformer_blocks.0.attn.to_v": 1.0,
              "single_transformer_blocks.0.attn.to_q": 2.0}
    for m, a in alphas.items():
        sd[f"transformer.{m}.alpha"] = torch.tensor(a)
    save_file(sd, str(path))

    factors = lora_slots.lora_pairs(LoraSpec(path, 1.0), tr)
    ref = copy.deepcopy(tr)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=ref)
    pipe.load_lora_weights(str(path), adapter_name="p")
    got_scaling = {}
    for name, module in ref.named_modules():
        if isinstance(module, BaseTunerLayer) and "p" in getattr(module, "scaling", {}):
            got_scaling[name] = float(module.scaling["p"])
    assert set(got_scaling) == set(factors)
    raw = {k[len("transformer."):-len(".lora_B.weight")]: v for k, v in sd.items() if k.endswith(".lora_B.weight")}
    for name, (_a, b) in factors.items():
        want = raw[name].float().t() * got_scaling[name]
        assert torch.allclose(b, want, atol=1e-6), name
    # the default is the first alpha in key order (norm_out.linear: 2), not the rank (4) nor the most common (1);
    # `proj_out` (8) also reaches single blocks' proj_out through PEFT's suffix match
    assert got_scaling["x_embedder"] == 2.0 / 4
    assert got_scaling["transformer_blocks.0.attn.to_k"] == 1.0 / 4
    assert got_scaling["single_transformer_blocks.0.proj_out"] == 8.0 / 4


def test_stacked_factors_concatenate_along_the_rank(transformers):
    tr = transformers["schnell"].transformer
    c = {x["name"]: x for x in lora_index("schnell")["cases"]}
    one = lambda case: lora_slots.slot_factors(  # noqa: E731
        [LoraSpec(REPO / x["file"], x["scale"]) for x in c[case]["loras"]], tr)
    d, k = one("diffusers"), one("kohya")
    both = lora_slots.slot_factors([LoraSpec(REPO / c["stacked"]["loras"][0]["file"], 0.8),
                                    LoraSpec(REPO / c["stacked"]["loras"][1]["file"], 1.0)], tr)
    for key in both:
        parts = [f[key] for f in (d, k) if key in f]
        np.testing.assert_array_equal(both[key], np.concatenate(parts, axis=1 if key.endswith("A") else 0))


def test_fp16_export_with_slots_validates(transformers, tmp_path):
    from export.validate import validate_graph

    parts = transformers["schnell"]
    path = tmp_path / "transformer.onnx"
    entry = ox.export_graph("transformer", parts, path, "fp16", lora_slots=True)
    assert entry["precision"] == "fp16" and len(entry["lora_slots"]) > 20
    results = validate_graph("transformer", path, parts, "fp16")
    assert all(r.ok for r in results), [r.line() for r in results]
    model = onnx.load(str(path))
    ins = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for s in entry["lora_slots"]:
        for name in (f"{s['module']}.lora_A", f"{s['module']}.lora_B"):
            assert ins[name] == inits[name] == onnx.TensorProto.FLOAT16
    # every weight MatMul / Gemm is fp16 (no Linear sits in an fp32 island), so fp16 is the weights' type
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            assert all(inits[i] == onnx.TensorProto.FLOAT16 for i in n.input if i in inits), n.name
    # fed fp16 factors, it follows the fp32 slot graph
    c = lora_index("schnell")["cases"][0]
    factors = lora_slots.slot_factors([LoraSpec(REPO / x["file"], x["scale"]) for x in c["loras"]],
                                      parts.transformer)
    example = inputs(parts)
    fp32_path = MODELS / model_name("schnell") / "transformer.onnx"
    f32 = session(fp32_path).run(None, {**ox.numpy_inputs("transformer", fp32_path, example), **factors})[0]
    f16 = session(path).run(None, {**ox.numpy_inputs("transformer", path, example),
                                   **{k: v.astype(np.float16) for k, v in factors.items()}})[0]
    assert float(np.abs(f16.astype(np.float32) - f32).max()) <= 5e-2 * float(np.abs(f32).max())


# ---------------------------------------------------------------- goldens


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_index_lists_the_generator_cases(variant):
    idx = lora_index(variant)
    assert idx["kind"] == "lora" and set(idx["notes"]) >= {"pipeline", "loading", "slots", "delta"}
    root = REPO
    files = {n: lora_goldens.lora_file(REPO / "tests" / "data" / "lora", model_name(variant), n)
             for n, *_ in lora_goldens.LORA_FILES}
    want = lora_goldens.lora_cases(variant, model_name(variant), files, root)
    assert len(idx["cases"]) == len(want)
    got = [{k: c[k] for k in w} for c, w in zip(idx["cases"], want)]
    assert got == want
    txt = next(c for c in goldens.cases(variant) if c["name"] == "p0_64x64")
    for c in idx["cases"]:
        assert {k: c[k] for k in ("prompt", "seed", "width", "height", "steps", "guidance")} == \
            {k: txt[k] for k in ("prompt", "seed", "width", "height", "steps", "guidance")}
        for x in c["loras"]:
            assert x["file"].startswith("tests/data/lora/") and (REPO / x["file"]).is_file()
    raw = {n: read_lora_file(p) for n, p in files.items()}
    assert any(k.endswith(".alpha") for k in raw["diffusers"]) and not any("lora_down" in k for k in raw["diffusers"])
    a = next(v for k, v in raw["diffusers"].items() if k.endswith(".alpha"))
    assert float(a) != next(v for k, v in raw["diffusers"].items() if k.endswith("lora_A.weight")).shape[0]
    kohya = {k.split(".")[0] for k in raw["kohya"]}
    for part in ("double_blocks_0_img_attn_qkv", "double_blocks_0_txt_attn_proj", "double_blocks_0_img_mlp_0",
                 "double_blocks_0_img_mod_lin", "single_blocks_0_linear1", "single_blocks_0_linear2",
                 "single_blocks_0_modulation_lin", "img_in", "txt_in", "final_layer_linear",
                 "final_layer_adaLN_modulation_1"):
        assert f"lora_unet_{part}" in kohya
    # every kohya top-level layer and every time_text_embed Linear is in some golden case (the `top` files)
    top = {k.split(".")[0] for k in raw["kohya-top"]}
    guidance = variant == "dev"
    for part in ("img_in", "txt_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer",
                 "vector_in_out_layer", "final_layer_linear", "final_layer_adaLN_modulation_1") + \
            (("guidance_in_in_layer", "guidance_in_out_layer") if guidance else ()):
        assert f"lora_unet_{part}" in top, part
    embedders = {k[len("transformer."):-len(".lora_A.weight")] for k in raw["diffusers-top"] if k.endswith("lora_A.weight")}
    assert {m["module"] for m in manifest(variant)["graphs"]["transformer"]["lora_slots"]
            if m["module"].startswith("time_text_embed.")} <= embedders
    alphas = [k for k in raw["diffusers-top"] if k.endswith(".alpha")]
    assert 0 < len(alphas) < len(embedders), "partial alphas"
    assert any(c.get("negative_prompt") and c.get("true_cfg_scale", 1) > 1 for c in idx["cases"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_lora_visibly_changes_the_image(variant):
    plain = load_file(str(GOLDENS / model_name(variant) / "p0_64x64.safetensors"))["image"]
    for c in lora_index(variant)["cases"]:
        img = load_file(str(GOLDENS / model_name(variant) / "lora" / c["file"]))["image"]
        assert img.shape == plain.shape
        assert float((img - plain).abs().max()) > 0.05, c["name"]


@pytest.mark.regeneration
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_regenerated_lora_goldens_match_committed(checkpoints, variant, tmp_path):
    """`python -m export tiny` / `goldens --kinds lora` rewrite the committed LoRA files and goldens."""
    name = model_name(variant)
    gold = tmp_path / "tests" / "goldens" / name
    data = tmp_path / "tests" / "data" / "lora"
    t5 = manifest(variant)["defaults"]["t5_max_length"]
    lora_goldens.write_lora_goldens(checkpoints[variant], gold, variant, t5, log=lambda *_: None)
    committed = GOLDENS / name / "lora"
    committed_data = REPO / "tests" / "data" / "lora"
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in committed_data.glob(f"{name}-*"))
    for p in sorted(data.iterdir()):  # random factors (torch.randn): elementwise
        got, want = load_file(str(p)), load_file(str(committed_data / p.name))
        assert set(got) == set(want), p.name
        for key in want:
            assert_matches_fixture(f"{p.name} {key}", got[key], want[key])
    assert (gold / "lora" / "index.json").read_text() == (committed / "index.json").read_text()
    assert sorted(p.name for p in (gold / "lora").iterdir()) == sorted(p.name for p in committed.iterdir())
    for p in sorted((gold / "lora").glob("*.safetensors")):
        got, want = load_file(str(p)), load_file(str(committed / p.name))
        if p.name.endswith(".delta.safetensors"):  # A @ B of those factors: one reduction each
            assert set(got) == set(want), p.name
            for key in want:
                assert_matches_fixture(f"{p.name} {key}", got[key], want[key], evaluations=1)
        else:
            assert_golden_matches(f"{variant}/lora/{p.name}", got, want)
    shutil.rmtree(tmp_path / "tests")
