"""The img2img (FluxImg2ImgPipeline) and true-CFG (negative prompt + true_cfg_scale) goldens: they regenerate to the
committed values from a freshly built tiny checkpoint, and each committed file is consistent with the facts its
index.json "notes" state (generator order and mt19937 use, strength -> sigmas, x_t mix, CFG combination)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from export.fixtures import goldens, presets
from export.graph_io import cpu_session

from .conftest import GOLDENS, MODELS, VARIANTS
from .tolerance import assert_golden_matches, assert_matches_fixture

TEXT_KEYS = {"clip_input_ids", "t5_input_ids", "prompt_embeds", "pooled_prompt_embeds"}
IMG2IMG_KEYS = TEXT_KEYS | {"init_image", "image_latent_mean", "image_latent_std", "posterior_eps",
                            "image_latents_sample", "image_latents", "sigmas_full", "timesteps_full", "sigmas",
                            "timesteps", "noise", "x_t", "x_t_packed", "latents", "image"}
TRUE_CFG_KEYS = TEXT_KEYS | {f"negative_{k}" for k in TEXT_KEYS} | {
    "noise", "noise_packed", "sigmas", "timesteps", "noise_pred_cond", "noise_pred_uncond", "latents", "image"}
KINDS = {"img2img": IMG2IMG_KEYS, "true_cfg": TRUE_CFG_KEYS}


def model_dir(variant: str) -> Path:
    return GOLDENS / presets.PRESETS[VARIANTS[variant]].name


def index(variant: str, kind: str) -> dict:
    return json.loads((model_dir(variant) / kind / "index.json").read_text())


def load_case(variant: str, kind: str, case: dict) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir(variant) / kind / case["file"]))


def t5_len(variant: str) -> int:
    manifest = json.loads((MODELS / presets.PRESETS[VARIANTS[variant]].name / "manifest.json").read_text())
    return manifest["defaults"]["t5_max_length"]


def all_cases(kind: str):
    return [(v, c["name"]) for v in VARIANTS for c in index(v, kind)["cases"]]


def pack(x: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


# ---------------------------------------------------------------- the mt19937 recipe, independently of torch


def mt19937_u32(seed: int, count: int) -> np.ndarray:
    """The first `count` outputs of the standard 32-bit mt19937 seeded with init_genrand(seed)."""
    rs = np.random.RandomState(seed)  # legacy seeding is init_genrand
    return rs.randint(0, 2**32, size=count, dtype=np.uint64).astype(np.uint32)


def randn_recipe(u32: np.ndarray) -> np.ndarray:
    """torch's CPU float32 randn for a multiple of 16 values, from its mt19937 outputs (PyTorch's normal_fill in
    aten/src/ATen/native/cpu/DistributionTemplates.h)."""
    assert len(u32) % 16 == 0
    u = (u32 & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)
    u = u.reshape(-1, 16)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u[:, :8]))
    theta = np.float32(2.0 * np.pi) * u[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)


# ---------------------------------------------------------------- index and inputs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_img2img_index_lists_the_generator_cases(variant):
    idx = index(variant, "img2img")
    assert idx["kind"] == "img2img" and set(idx["notes"]) == set(goldens.IMG2IMG_NOTES)
    assert idx["notes"] == goldens.IMG2IMG_NOTES
    want = goldens.img2img_cases(variant)
    got = idx["cases"]
    assert [c["name"] for c in got] == [c["name"] for c in want]
    for g, w in zip(got, want):
        assert {k: g[k] for k in w} == w
        assert g["file"] == f"{w['name']}.safetensors" and g["t5_max_length"] == t5_len(variant)
        n = 16 * (2 * (w["height"] // 16)) * (2 * (w["width"] // 16))
        assert g["mt19937_values_per_draw"] == g["noise_mt19937_offset"] == n
    assert {c["strength"] for c in got} >= {0.6, 1.0}
    assert any((c["width"], c["height"]) == (128, 96) for c in got)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_true_cfg_index_lists_the_generator_cases(variant):
    idx = index(variant, "true_cfg")
    assert idx["kind"] == "true_cfg" and idx["notes"] == goldens.TRUE_CFG_NOTES
    want = [{**c, "t5_max_length": t5_len(variant), "file": f"{c['name']}.safetensors"}
            for c in goldens.true_cfg_cases(variant)]
    assert idx["cases"] == want
    assert "v_uncond + true_cfg_scale * (v_cond - v_uncond)" in idx["notes"]["combine"]


@pytest.mark.parametrize("size", goldens.INIT_SIZES)
def test_init_image_png_holds_the_generated_pixels(size):
    w, h = size
    path = GOLDENS / "inputs" / goldens.init_image_name(w, h)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (w, h)
        assert np.array_equal(np.asarray(im), goldens.init_image_pixels(w, h))


# ---------------------------------------------------------------- regeneration


@pytest.fixture(scope="session")
def regenerated(checkpoints) -> dict:
    """(variant, kind, case name) -> tensors regenerated from the fresh checkpoint with the committed cases."""
    out = {}
    for v in VARIANTS:
        pipe = goldens.load_pipeline(checkpoints[v])
        i2i = goldens.img2img_pipeline(pipe)
        for c in index(v, "img2img")["cases"]:
            out[v, "img2img", c["name"]], facts = goldens.run_img2img_case(
                i2i, c, c["t5_max_length"], goldens.init_image_pixels(c["width"], c["height"]))
            assert {k: c[k] for k in facts} == facts
        for c in index(v, "true_cfg")["cases"]:
            out[v, "true_cfg", c["name"]] = goldens.run_true_cfg_case(pipe, c, c["t5_max_length"])
    return out


@pytest.mark.regeneration
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_regenerated_goldens_match_committed(regenerated, variant, kind):
    for case in index(variant, kind)["cases"]:
        want = load_case(variant, kind, case)
        got = regenerated[variant, kind, case["name"]]
        assert set(got) == set(want) == KINDS[kind], case["name"]
        assert_golden_matches(f"{variant}/{kind}/{case['name']}", got, want)


# ---------------------------------------------------------------- consistency of the committed img2img goldens


@pytest.mark.parametrize("variant, name", all_cases("img2img"))
def test_committed_img2img_golden_is_consistent(variant, name):
    case = next(c for c in index(variant, "img2img")["cases"] if c["name"] == name)
    path = model_dir(variant) / "img2img" / case["file"]
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta == {k: case[k] for k in meta} and meta["name"] == name
    w, h, steps, strength = case["width"], case["height"], case["steps"], case["strength"]
    hh, ww = 2 * (h // 16), 2 * (w // 16)
    n = 16 * hh * ww

    # preprocessing: the PNG's bytes as float32 / 255, then 2x - 1
    with Image.open((model_dir(variant) / "img2img" / case["init_image"]).resolve()) as im:
        px = np.asarray(im.convert("RGB"))
    want_img = torch.from_numpy(px.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None] * 2.0 - 1.0
    assert torch.equal(t["init_image"], want_img)

    # generator order: posterior sample first, then noise; each n values of the seed's one stream
    stream = torch.randn(2 * n, generator=torch.Generator("cpu").manual_seed(case["seed"]))
    assert_matches_fixture(f"{name} posterior_eps vs torch.randn here", stream[:n], t["posterior_eps"].flatten())
    assert_matches_fixture(f"{name} noise vs torch.randn here", stream[n:], t["noise"].flatten())
    text2img_noise = torch.randn((1, 16, hh, ww), generator=torch.Generator("cpu").manual_seed(case["seed"]))
    assert float((t["noise"] - text2img_noise).abs().max()) > 1.0, "img2img noise is the seed's second draw"
    recipe = randn_recipe(mt19937_u32(case["seed"], 2 * n))
    assert_matches_fixture(f"{name} posterior_eps vs the recipe", recipe[:n], t["posterior_eps"].numpy().ravel())
    assert_matches_fixture(f"{name} noise vs the recipe", recipe[n:], t["noise"].numpy().ravel())

    # latents of the init image
    assert t["image_latent_mean"].shape == t["image_latent_std"].shape == (1, 16, hh, ww)
    assert bool((t["image_latent_std"] > 0).all())
    assert torch.equal(t["image_latents_sample"], t["image_latent_mean"] + t["image_latent_std"] * t["posterior_eps"])
    assert torch.equal(t["image_latents"], (t["image_latents_sample"] - 0.1159) * 0.3611)

    # strength -> start index, in float64 like Python
    init_timestep = min(steps * strength, steps)
    t_start = int(max(steps - init_timestep, 0))
    assert case["t_start"] == t_start and case["steps_run"] == steps - t_start
    assert t["sigmas_full"].shape == (steps + 1,) and t["timesteps_full"].shape == (steps,)
    assert torch.equal(t["sigmas"], t["sigmas_full"][t_start:])
    assert torch.equal(t["timesteps"], t["timesteps_full"][t_start:])
    if variant == "schnell":
        assert torch.allclose(t["sigmas_full"], torch.linspace(1, 0, steps + 1), atol=1e-6)

    # x_t and the loop
    sigma0 = t["sigmas"][0]
    assert torch.equal(t["x_t"], sigma0 * t["noise"] + (1.0 - sigma0) * t["image_latents"])
    assert torch.equal(t["x_t_packed"], pack(t["x_t"]))
    if strength == 1.0:
        assert t_start == 0 and float(sigma0) == 1.0 and torch.equal(t["x_t"], t["noise"])
    assert t["latents"].shape == (steps - t_start, 1, (hh // 2) * (ww // 2), 64)
    assert t["image"].shape == (1, 3, h, w)
    assert 0.0 <= float(t["image"].min()) and float(t["image"].max()) <= 1.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_vae_encoder_reproduces_the_golden_posterior(variant):
    """The committed vae_encoder graph's (latent, latent_std) are the golden's image_latent_mean / _std."""
    graph = MODELS / presets.PRESETS[VARIANTS[variant]].name / "vae_encoder.onnx"
    sess = cpu_session(graph)
    for case in index(variant, "img2img")["cases"]:
        t = load_case(variant, "img2img", case)
        mean, std = sess.run(["latent", "latent_std"], {"images": t["init_image"].numpy()})
        # onnxruntime here against PyTorch on the fixture's machine: one evaluation each
        assert_matches_fixture(f"{case['name']} latent", mean, t["image_latent_mean"].numpy(), evaluations=1)
        assert_matches_fixture(f"{case['name']} latent_std", std, t["image_latent_std"].numpy(), evaluations=1)


# ---------------------------------------------------------------- consistency of the committed true-CFG goldens


@pytest.mark.parametrize("variant, name", all_cases("true_cfg"))
def test_committed_true_cfg_golden_is_consistent(variant, name):
    case = next(c for c in index(variant, "true_cfg")["cases"] if c["name"] == name)
    t = load_case(variant, "true_cfg", case)
    w, h, steps, scale = case["width"], case["height"], case["steps"], case["true_cfg_scale"]
    hh, ww = 2 * (h // 16), 2 * (w // 16)
    assert scale > 1 and case["negative_prompt"]
    assert_matches_fixture(f"{name} noise vs torch.randn here", torch.randn(
        (1, 16, hh, ww), generator=torch.Generator("cpu").manual_seed(case["seed"])), t["noise"])
    assert torch.equal(t["noise_packed"], pack(t["noise"]))
    assert t["negative_prompt_embeds"].shape == t["prompt_embeds"].shape == (1, case["t5_max_length"], 16)
    assert t["negative_pooled_prompt_embeds"].shape == (1, 8)
    assert not torch.equal(t["negative_prompt_embeds"], t["prompt_embeds"])
    neg_clip, neg_t5 = t["negative_clip_input_ids"][0].tolist(), t["negative_t5_input_ids"][0].tolist()
    assert len(neg_clip) == 77 and neg_clip[0] == 49406 and 49407 in neg_clip
    assert len(neg_t5) == case["t5_max_length"] and 1 in neg_t5

    # the Euler loop with v = v_uncond + scale * (v_cond - v_uncond)
    sigmas, cond, uncond, lat = t["sigmas"], t["noise_pred_cond"], t["noise_pred_uncond"], t["latents"]
    assert cond.shape == uncond.shape == lat.shape == (steps, 1, (hh // 2) * (ww // 2), 64)
    x = t["noise_packed"]
    for i in range(steps):
        v = uncond[i] + scale * (cond[i] - uncond[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        assert float((x - lat[i]).abs().max()) <= 1e-6, f"step {i}"
        x = lat[i]
    assert float((cond - uncond).abs().max()) > 1e-3  # the negative prompt changes the prediction
