"""Regenerating the tiny models and goldens reproduces what is committed in models/ and tests/goldens/, and the
committed goldens are internally consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.torch import load_file

from export.fixtures import goldens
from export import onnx_export as ox
from export.fixtures import presets
from export.flux_tokenizers import _MACHINE_SPECIFIC_CONFIG_KEYS

from .conftest import GOLDENS, MODELS, VARIANTS
from .tolerance import assert_golden_matches, assert_matches_fixture

GOLDEN_KEYS = {"noise", "noise_packed", "clip_input_ids", "t5_input_ids", "prompt_embeds", "pooled_prompt_embeds",
               "sigmas", "timesteps", "latents", "image"}
# At least two regenerated cases per variant; p1_128x96 is non-square and has the long (truncated) prompt.
REGEN_CASES = ["p1_128x96", "p2_64x64"]


def committed_dir(variant: str) -> Path:
    return MODELS / presets.PRESETS[VARIANTS[variant]].name


def committed_manifest(variant: str) -> dict:
    return json.loads((committed_dir(variant) / "manifest.json").read_text())


def graph_cases():
    return [(v, g) for v in VARIANTS for g in committed_manifest(v)["graphs"]]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- models


@pytest.mark.regeneration
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_regenerated_model_has_the_committed_files(exported, variant):
    assert files(exported[variant]["dir"]) == files(committed_dir(variant))


def constants(model) -> list[tuple[str, np.ndarray]]:
    """The tensor values of a graph's Constant nodes, in node order."""
    return [(n.output[0], numpy_helper.to_array(a.t)) for n in model.graph.node if n.op_type == "Constant"
            for a in n.attribute if a.name == "value"]


@pytest.mark.regeneration
@pytest.mark.parametrize("variant, graph", graph_cases())
def test_regenerated_graph_equals_committed(exported, variant, graph):
    """Same nodes, I/O and weights; the weights (normal_ / uniform_ draws, elementwise) and folded constants (e.g.
    time_proj's exp frequencies) within the elementwise tolerance, as torch's SIMD kernels differ between CPUs."""
    entry = committed_manifest(variant)["graphs"][graph]
    old_path = committed_dir(variant) / entry["file"]
    new_path = exported[variant]["dir"] / exported[variant]["manifest"]["graphs"][graph]["file"]
    old, new = onnx.load(str(old_path)), onnx.load(str(new_path))
    old_init = {t.name: numpy_helper.to_array(t) for t in old.graph.initializer}
    new_init = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert old_init, f"{old_path} has no initializers"
    assert sorted(new_init) == sorted(old_init)
    for name, want in old_init.items():
        assert_matches_fixture(f"{variant} {graph}: initializer {name}", new_init[name], want)
    assert ox.read_io(new_path) == ox.read_io(old_path)
    assert ox.read_io(old_path) == {"inputs": entry["inputs"], "outputs": entry["outputs"]}
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in old.graph.node]
    old_c, new_c = constants(old), constants(new)
    assert [n for n, _ in new_c] == [n for n, _ in old_c]
    for (name, want), (_, got) in zip(old_c, new_c):
        assert_matches_fixture(f"{variant} {graph}: constant {name}", got, want)


@pytest.mark.regeneration
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("folder", ["tokenizer", "tokenizer_2"])
def test_regenerated_tokenizer_files_match_committed(exported, variant, folder):
    old_dir, new_dir = committed_dir(variant) / folder, exported[variant]["dir"] / folder
    names = sorted(p.name for p in old_dir.iterdir())
    assert "tokenizer.json" in names
    assert sorted(p.name for p in new_dir.iterdir()) == names
    for name in names:
        old, new = (old_dir / name).read_bytes(), (new_dir / name).read_bytes()
        if name == "tokenizer_config.json":
            # keys save_pretrained writes per machine are dropped on export (tokenizers._MACHINE_SPECIFIC_CONFIG_KEYS)
            old, new = json.loads(old), json.loads(new)
            assert not set(new) & set(_MACHINE_SPECIFIC_CONFIG_KEYS)
            old = {k: v for k, v in old.items() if k not in _MACHINE_SPECIFIC_CONFIG_KEYS}
        assert new == old, f"{folder}/{name}"


@pytest.mark.regeneration
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_regenerated_manifest_equals_committed_except_versions(exported, variant):
    old = committed_manifest(variant)
    new = json.loads((exported[variant]["dir"] / "manifest.json").read_text())
    assert set(old.pop("exporter")) == set(new.pop("exporter")) == {
        "fluxrt_export", "torch", "diffusers", "transformers", "onnx", "onnxruntime"}
    assert new == old


def test_dev_shares_identical_files_with_schnell_through_relative_symlinks():
    schnell, dev = committed_dir("schnell"), committed_dir("dev")
    for rel in ["clip.onnx", "t5.onnx", "vae_decoder.onnx", "vae_encoder.onnx", "tokenizer/tokenizer.json",
                "tokenizer_2/tokenizer.json"]:
        link = dev / rel
        assert link.is_symlink() and not Path(link.readlink()).is_absolute(), rel
        assert link.resolve() == (schnell / rel).resolve(), rel
    assert not (dev / "transformer.onnx").is_symlink()
    assert (dev / "transformer.onnx").read_bytes() != (schnell / "transformer.onnx").read_bytes()


# ---------------------------------------------------------------- goldens


def golden_index(variant: str) -> list[dict]:
    return json.loads((GOLDENS / presets.PRESETS[VARIANTS[variant]].name / "index.json").read_text())


def golden_path(variant: str, case: dict) -> Path:
    return GOLDENS / presets.PRESETS[VARIANTS[variant]].name / case["file"]


def all_golden_cases():
    return [(v, c["name"]) for v in VARIANTS for c in golden_index(v)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_index_lists_the_generator_cases(variant):
    t5_len = committed_manifest(variant)["defaults"]["t5_max_length"]
    want = [{**c, "file": f"{c['name']}.safetensors", "t5_max_length": t5_len} for c in goldens.cases(variant)]
    assert golden_index(variant) == want
    assert any((c["width"], c["height"]) == (128, 96) for c in want)


@pytest.fixture(scope="session")
def regenerated_goldens(checkpoints) -> dict:
    """(variant, case name) -> tensors from goldens.run_case on the freshly built checkpoint."""
    out = {}
    for v in VARIANTS:
        pipe = goldens.load_pipeline(checkpoints[v])
        by_name = {c["name"]: c for c in golden_index(v)}
        for name in REGEN_CASES:
            c = by_name[name]
            case = {k: c[k] for k in ("name", "prompt", "width", "height", "seed", "steps", "guidance")}
            out[v, name] = goldens.run_case(pipe, case, c["t5_max_length"])
    return out


@pytest.mark.regeneration
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", REGEN_CASES)
def test_regenerated_golden_matches_committed(regenerated_goldens, variant, name):
    case = next(c for c in golden_index(variant) if c["name"] == name)
    want = load_file(str(golden_path(variant, case)))
    got = regenerated_goldens[variant, name]
    assert set(got) == set(want) == GOLDEN_KEYS
    assert_golden_matches(f"{variant}/{name}", got, want)


@pytest.mark.parametrize("variant, name", all_golden_cases())
def test_committed_golden_is_consistent(variant, name):
    from diffusers import FluxPipeline

    case = next(c for c in golden_index(variant) if c["name"] == name)
    path = golden_path(variant, case)
    t = load_file(str(path))
    assert set(t) == GOLDEN_KEYS
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta == {k: case[k] for k in meta} and meta["name"] == name

    steps, w, h = case["steps"], case["width"], case["height"]
    hh, ww = 2 * (h // 16), 2 * (w // 16)
    noise = t["noise"]
    assert noise.shape == (1, 16, hh, ww)
    expected_noise = torch.randn((1, 16, hh, ww), generator=torch.Generator("cpu").manual_seed(case["seed"]))
    assert_matches_fixture(f"{variant}/{name} noise vs torch.randn here", expected_noise, noise)
    packed = FluxPipeline._pack_latents(noise, 1, 16, hh, ww)
    assert packed.shape == (1, (hh // 2) * (ww // 2), 64)
    assert torch.equal(packed, t["noise_packed"])

    sigmas, timesteps = t["sigmas"], t["timesteps"]
    assert sigmas.shape == (steps + 1,)
    assert float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert timesteps.shape == (steps,)
    assert torch.allclose(timesteps, sigmas[:-1] * 1000, atol=1e-3)
    if variant == "schnell":
        assert float(sigmas[0]) == 1.0  # no shift for schnell

    assert t["latents"].shape == (steps, 1, (hh // 2) * (ww // 2), 64)
    assert t["image"].shape == (1, 3, h, w)
    assert float(t["image"].min()) >= 0.0 and float(t["image"].max()) <= 1.0
    assert t["prompt_embeds"].shape == (1, case["t5_max_length"], 16)
    assert t["pooled_prompt_embeds"].shape == (1, 8)

    clip_ids, t5_ids = t["clip_input_ids"][0].tolist(), t["t5_input_ids"][0].tolist()
    assert len(clip_ids) == 77 and clip_ids[0] == 49406 and 49407 in clip_ids
    assert len(t5_ids) == case["t5_max_length"] and 1 in t5_ids
    if case["prompt"] == goldens.PROMPTS[1]:  # the long prompt: truncated to 77, not padded
        assert clip_ids[-1] == 49407 and clip_ids.count(49407) == 1
    if case["prompt"] == "a photo of a cat":
        assert clip_ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(clip_ids[7:]) == {49407}
        assert t5_ids[:8] == [3, 9, 1202, 13, 3, 9, 1712, 1] and set(t5_ids[8:]) == {0}
