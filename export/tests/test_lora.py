"""LoRA fused at export (`python -m export CKPT OUT --lora FILE:SCALE`): the exported transformer graph matches
diffusers' own load_lora_weights + fuse_lora on the same inputs, for diffusers and kohya key naming; kohya layers that
diffusers cannot place on a small model are fused with the textbook arithmetic; bad LoRA files are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from export import checkpoint as ckpt
from export import lora
from export import onnx_export as ox
from export.__main__ import main
from export.graph_io import cpu_session
from export.run import export_model
from export.wrappers import wrap

from .conftest import run_cli

SCALE = 0.7
SHAPES = ox.VALIDATION_SHAPES  # two batch sizes, two resolutions, two text lengths


@pytest.fixture(scope="session")
def lora_files(checkpoints, tmp_path_factory) -> dict:
    """Random LoRAs (fixed seeds) for each tiny transformer, in both namings."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for v in ("schnell", "dev"):
        tr = ckpt.load(checkpoints[v], ["transformer"]).transformer
        out[v, "diffusers"] = lora.make_random_lora(tr, root / f"{v}-diffusers.safetensors", "diffusers", seed=1)
        # only layers diffusers 0.42.1 itself places on a non-FLUX.1-sized model: the parity reference
        out[v, "kohya"] = lora.make_random_lora(tr, root / f"{v}-kohya.safetensors", "kohya", seed=2,
                                                single_linear1=False, top_level=False)
        out[v, "kohya_full"] = lora.make_random_lora(tr, root / f"{v}-kohya-full.safetensors", "kohya", seed=3)
    return out


def ort_outputs(path, parts) -> list[np.ndarray]:
    sess = cpu_session(path)
    d = ox.dims(parts)
    return [sess.run(None, ox.numpy_inputs("transformer", path, ox.example_inputs("transformer", d, s, seed=77)))[0]
            for s in SHAPES]


def diffusers_reference(checkpoint, lora_file, scale) -> list[np.ndarray]:
    """diffusers' own path: FluxPipeline.from_pretrained, load_lora_weights(file), fuse_lora(lora_scale=scale)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=scale)
    parts = ckpt.Checkpoint(root=checkpoint, model_index={}, transformer=pipe.transformer)
    module = wrap("transformer", parts)
    d = ox.dims(parts)
    with torch.no_grad():
        return [module(*ox.example_inputs("transformer", d, s, seed=77)).numpy() for s in SHAPES]


@pytest.fixture(scope="session")
def lora_exports(checkpoints, lora_files, tmp_path_factory) -> dict:
    """(variant, naming) -> (model dir, manifest) of a transformer-only export with that LoRA fused at SCALE."""
    root = tmp_path_factory.mktemp("lora-models")
    out = {}
    for v, naming in (("dev", "diffusers"), ("schnell", "kohya"), ("dev", "kohya")):
        d = root / f"{v}-{naming}"
        manifest = export_model(checkpoints[v], d, components=["transformer"], validate=True, log=lambda _: None,
                                loras=[lora.LoraSpec(lora_files[v, naming], SCALE)])
        out[v, naming] = (d, manifest)
    return out


@pytest.mark.parametrize("variant, naming", [("dev", "diffusers"), ("schnell", "kohya"), ("dev", "kohya")])
def test_fused_export_matches_diffusers_fuse_lora(checkpoints, lora_files, lora_exports, variant, naming):
    model_dir, manifest = lora_exports[variant, naming]
    parts = ckpt.load(checkpoints[variant], ["transformer"])
    got = ort_outputs(model_dir / "transformer.onnx", parts)
    want = diffusers_reference(checkpoints[variant], lora_files[variant, naming], SCALE)
    d = ox.dims(parts)
    with torch.no_grad():
        base = [wrap("transformer", parts)(*ox.example_inputs("transformer", d, s, seed=77)).numpy() for s in SHAPES]
    for g, w, b in zip(got, want, base):
        assert g.shape == w.shape
        assert float(np.abs(g - w).max()) <= 1e-4
        assert float(np.abs(w - b).max()) > 1e-2, "the LoRA must change the model"

    f = lora_files[variant, naming]
    (rec,) = manifest["source"]["loras"]
    assert {k: rec[k] for k in ("file", "sha256", "scale", "naming", "clip_layers")} == {
        "file": f.name, "sha256": lora.sha256(f), "scale": SCALE, "naming": naming, "clip_layers": 0}
    assert rec["transformer_layers"] == (24 if naming == "diffusers" else 16)
    on_disk = json.loads((model_dir / "manifest.json").read_text())
    assert on_disk["source"]["loras"] == manifest["source"]["loras"]


def _delta(path, module_name, transformer) -> torch.Tensor:
    """The textbook weight update of one LoRA file for one transformer Linear layer (unscaled by the user scale)."""
    sd = load_file(str(path))
    if lora.naming(sd) == "diffusers":
        a, b = sd.get(f"transformer.{module_name}.lora_A.weight"), sd.get(f"transformer.{module_name}.lora_B.weight")
        return None if a is None else b @ a  # no alpha: scaling 1
    for kname, targets in lora._kohya_targets(transformer, True, True):
        if module_name not in targets or f"{kname}.lora_down.weight" not in sd:
            continue
        down, up = sd[f"{kname}.lora_down.weight"], sd[f"{kname}.lora_up.weight"]
        full = (float(sd[f"{kname}.alpha"]) / down.shape[0]) * (up @ down)
        if kname.endswith("final_layer_adaLN_modulation_1"):  # BFL's (shift, scale) -> diffusers' (scale, shift)
            shift, scale = full.chunk(2, dim=0)
            full = torch.cat([scale, shift], dim=0)
        sizes = [dict(transformer.named_modules())[t].out_features for t in targets]
        return torch.split(full, sizes, dim=0)[targets.index(module_name)]
    return None


def test_several_loras_fuse_in_order_with_the_textbook_arithmetic(checkpoints, lora_files):
    """Every layer of a diffusers LoRA at 0.5 plus a full kohya LoRA (fused qkv, single-block linear1 split with this
    model's sizes, input/output layers, alpha) at -0.3: W = W0 + 0.5 dA + (-0.3) dB."""
    base = ckpt.load(checkpoints["dev"], ["transformer"]).transformer
    parts = ckpt.load(checkpoints["dev"], ["transformer"])
    specs = [lora.LoraSpec(lora_files["dev", "diffusers"], 0.5), lora.LoraSpec(lora_files["dev", "kohya_full"], -0.3)]
    records = lora.fuse_loras(parts, specs, log=lambda _: None)
    assert [r["naming"] for r in records] == ["diffusers", "kohya"]
    assert records[1]["transformer_layers"] == len(
        {t for _, ts in lora._kohya_targets(base, True, True) for t in ts})
    fused = dict(parts.transformer.named_modules())
    changed = 0
    for name, m in base.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        assert isinstance(fused[name], torch.nn.Linear)  # no PEFT wrapper left behind
        want = m.weight.detach().clone()
        for spec in specs:
            d = _delta(spec.path, name, base)
            if d is not None:
                want += spec.scale * d
        got = fused[name].weight.detach()
        assert float((got - want).abs().max()) <= 1e-6, name
        changed += not torch.equal(got, m.weight)
    targets = set(lora.diffusers_targets(base)) | {t for _, ts in lora._kohya_targets(base, True, True) for t in ts}
    assert changed == len(targets) == 25  # every block layer, the input/output layers and time_in


def test_clip_layers_fuse_into_the_text_encoder_when_it_is_exported(checkpoints, tmp_path):
    """kohya lora_te1_* layers: all attention and MLP layers of CLIP layer 0 and only q_proj of layer 1 (a form
    diffusers' own text-encoder conversion skips) fuse into CLIP; with no clip graph they are skipped."""
    layers = {f"encoder.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    layers.add("encoder.layers.1.self_attn.q_proj")
    parts = ckpt.load(checkpoints["dev"], ["transformer", "clip"])
    clip_modules = dict(parts.clip.named_modules())
    base = {n: m.weight.detach().clone() for n, m in clip_modules.items() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name in sorted(layers) + ["double_blocks_0_img_attn_proj"]:
        key = "lora_unet_" + name if name.startswith("double") else "lora_te1_text_model_" + name.replace(".", "_")
        m = clip_modules.get(name) or parts.transformer.transformer_blocks[0].attn.to_out[0]
        sd[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g)
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(tmp_path / "te.safetensors"))
    spec = lora.LoraSpec(tmp_path / "te.safetensors", 0.5)
    (rec,) = lora.fuse_loras(parts, [spec], log=lambda _: None)
    assert (rec["transformer_layers"], rec["clip_layers"]) == (1, len(layers))
    for name, w0 in base.items():
        key = "lora_te1_text_model_" + name.replace(".", "_")
        want = w0 + (0.5 * 0.5 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"] if name in layers else 0)
        got = dict(parts.clip.named_modules())[name].weight.detach()
        assert float((got - want).abs().max()) <= 1e-6, name

    no_clip = ckpt.load(checkpoints["dev"], ["transformer"])
    lines: list[str] = []
    (rec,) = lora.fuse_loras(no_clip, [spec], log=lines.append)
    assert (rec["transformer_layers"], rec["clip_layers"]) == (1, 0)
    assert any("CLIP text-encoder layers are skipped" in line for line in lines)


def test_parse_spec():
    assert lora.parse_spec("a/b.safetensors:0.5") == lora.LoraSpec(lora.Path("a/b.safetensors"), 0.5)
    assert lora.parse_spec("a/b.safetensors:-1") == lora.LoraSpec(lora.Path("a/b.safetensors"), -1.0)
    assert lora.parse_spec("a/b.safetensors") == lora.LoraSpec(lora.Path("a/b.safetensors"), 1.0)
    assert lora.parse_spec("C:/x:y.safetensors") == lora.LoraSpec(lora.Path("C:/x:y.safetensors"), 1.0)
    with pytest.raises(lora.ExportError, match="finite"):
        lora.parse_spec("x.safetensors:nan")


# ---------------------------------------------------------------- bad LoRA files


@pytest.fixture(scope="session")
def bad_loras(tmp_path_factory, lora_files) -> dict:
    d = tmp_path_factory.mktemp("bad-loras")
    good = lora_files["dev", "kohya"].read_bytes()
    (d / "garbage.safetensors").write_bytes(b"this is not a safetensors file")
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (d / "a-folder.safetensors").mkdir()
    save_file({"conv.weight": torch.zeros(2, 2)}, str(d / "not-a-lora.safetensors"))
    # a FLUX.1-sized LoRA in both namings (hidden 3072): the layers exist, their shapes do not fit
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(16, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 16)},
              str(d / "flux1-diffusers.safetensors"))
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(16, 3072),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 16),
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(16.0)},
              str(d / "flux1-kohya.safetensors"))
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(16, 3072),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(21504, 16)},
              str(d / "flux1-kohya-linear1.safetensors"))
    # layers this model does not have: block 7 (the tiny model has one) and a Stable Diffusion UNet LoRA
    save_file({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(d / "other-blocks.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
              str(d / "sd15-kohya.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)},
              str(d / "half-a-layer.safetensors"))
    return d


BAD = {
    # name: (file, extra args, words the one error line must contain)
    "missing": ("nothere.safetensors", [], ["does not exist"]),
    "folder": ("a-folder.safetensors", [], ["is not a file"]),
    "garbage": ("garbage.safetensors", [], ["not a valid safetensors file"]),
    "truncated": ("truncated.safetensors", [], ["not a valid safetensors file"]),
    "not_a_lora": ("not-a-lora.safetensors", [], ["no LoRA weights"]),
    "flux1_diffusers": ("flux1-diffusers.safetensors", [],
                        ["transformer_blocks.0.attn.to_q", "[32, 32]", "[3072, 3072]", "another model"]),
    "flux1_kohya": ("flux1-kohya.safetensors", [],
                    ["transformer_blocks.0.attn.to_out.0", "[32, 32]", "[3072, 3072]", "another model"]),
    "flux1_kohya_linear1": ("flux1-kohya-linear1.safetensors", [],
                            ["single_transformer_blocks.0", "[224, 32]", "[21504, 3072]", "another model"]),
    "other_blocks": ("other-blocks.safetensors", [], ["matches no layer", "transformer_blocks.7", "another model"]),
    "sd15": ("sd15-kohya.safetensors", [], ["cannot map", "lora_unet_down_blocks_0"]),
    "half_a_layer": ("half-a-layer.safetensors", [], ["no lora_B"]),
    "bad_scale": ("garbage.safetensors:inf", [], ["finite"]),
    "no_transformer": ("flux1-diffusers.safetensors", ["--components", "clip"], ["needs the transformer"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_is_one_error_line_with_exit_code_2(checkpoints, bad_loras, tmp_path, capsys, case):
    file, extra, words = BAD[case]
    out = tmp_path / "out"
    code = main([str(checkpoints["schnell"]), str(out), "--lora", str(bad_loras / file), *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in err, err
    assert err.strip().endswith(errors[0])
    for w in words:
        assert w in errors[0], errors[0]
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_cli_lora_shape_mismatch_exits_2_without_traceback(checkpoints, bad_loras, tmp_path):
    """The real command line, end to end."""
    r = run_cli(checkpoints["dev"], tmp_path / "m", "--components", "transformer",
                "--lora", f"{bad_loras / 'flux1-kohya.safetensors'}:0.8")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith(("error", "Traceback"))]
    assert lines == [lines[0]] and lines[0].startswith("error: LoRA file") and "Traceback" not in r.stderr
