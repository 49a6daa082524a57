"""LoRA goldens (kind `lora`): diffusers FluxPipeline with LoRAs loaded UNFUSED (PEFT adapters), for the runtime's
LoRA-slot parity tests.

Written into GOLDENS/<model>/lora/ with an index.json {"kind", "notes", "cases"} like the img2img / true_cfg kinds.
The LoRA files are random (export.lora.make_random_lora, fixed seeds) and committed under tests/data/lora/: per
model one diffusers/PEFT-named file with alpha != rank and one kohya-named file (double-block qkv/proj/mlp/mod,
single-block linear1/linear2/modulation, and the input/output layers incl. final_layer); plus, so every slot mapping
is compared with diffusers, a kohya file of only the top-level layers (img_in, txt_in, time_in, vector_in,
guidance_in on dev, final_layer) and a diffusers file of the `time_text_embed.*` embedders and the output layers
with alphas on some layers only (diffusers' partial-alpha rule). Cases, all at the prompt, seed, size and steps of
the text-to-image case p0_64x64 (so its image is the no-LoRA reference): the diffusers file alone at 0.8, the kohya
file alone at 1.0, both stacked at 0.6 and 0.5 (diffusers first), the two top-level files stacked at 1.0 and 0.7,
and the diffusers file at 0.8 with true CFG (the true_cfg goldens' negative prompt and true_cfg_scale).

Per case: `<case>.safetensors` with the same tensors as the text-to-image goldens (ids, embeddings, sigmas,
timesteps, noise, per-step latents, image), and `<case>.delta.safetensors` with, for every transformer Linear the
case's LoRAs touch, A @ B [in, out] float32 keyed by the module path (alpha / rank and the scales folded in, stacked
LoRAs summed): what the runtime's slot factors must multiply out to. Files are only rewritten when their values
change.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from . import goldens
from .lora import LoraSpec, make_random_lora, read_lora_file, to_diffusers
from .lora_slots import slot_deltas, slot_factors

# Partial alphas (diffusers naming): the first alpha in key order (norm_out.linear) is diffusers' default for the
# layers without one; proj_out's also reaches single_transformer_blocks.0.proj_out through PEFT's suffix match.
TOP_ALPHAS = {"norm_out.linear": 2.0, "proj_out": 6.0, "time_text_embed.timestep_embedder.linear_1": 3.0}
# (file name, naming, rank, alpha: None for make_random_lora's own, a number for every layer, a dict for some,
#  seed, make_random_lora options); alpha != rank for the diffusers file.
LORA_FILES = [("diffusers", "diffusers", 4, 8.0, 11, {}), ("kohya", "kohya", 6, None, 12, {}),
              ("kohya-top", "kohya", 3, None, 13, {"blocks": False, "all_top_level": True}),
              ("diffusers-top", "diffusers", 4, TOP_ALPHAS, 14, {"targets": "top"})]
UP_STD = 0.3
SCALES = {"diffusers": [("diffusers", 0.8)], "kohya": [("kohya", 1.0)],
          "stacked": [("diffusers", 0.6), ("kohya", 0.5)],
          "top": [("kohya-top", 1.0), ("diffusers-top", 0.7)],
          "true_cfg": [("diffusers", 0.8)]}
TRUE_CFG = {"true_cfg"}  # cases run with the true_cfg goldens' negative prompt and true_cfg_scale

LORA_NOTES = {
    "pipeline": "diffusers FluxPipeline (diffusers 0.42.1), fp32 on CPU, output_type='pt', generator "
                "torch.Generator('cpu').manual_seed(seed); prompt, seed, size and steps of the text-to-image case "
                "p0_64x64, whose image is the no-LoRA reference.",
    "loading": "Each LoRA file is converted to diffusers naming by export/lora.py (to_diffusers: kohya qkv / linear1 "
               "splits and alphas folded in, the input/output layers kept) and loaded UNFUSED with "
               "load_lora_weights(adapter_name=...); then set_adapters(names, adapter_weights=scales). PEFT computes "
               "y = W x + b + sum_i scale_i * (alpha_i / r_i) * B_i (A_i x).",
    "slots": "The runtime feeds the transformer graph's slot inputs M.lora_A [in, r] = A^T and M.lora_B [r, out] = "
             "(scale * alpha / r) * B^T, several LoRAs concatenated along r in the listed order; export/lora_slots.py "
             "slot_factors() is the reference implementation.",
    "delta": "<case>.delta.safetensors: for every Linear the case's LoRAs touch, key = module path M (relative to "
             "the transformer), value = lora_A @ lora_B as fed, [in, out] float32 (computed in float64), i.e. the "
             "sum over the case's LoRAs of scale * alpha / r * (B A)^T.",
    "tensors": "<case>.safetensors holds the same tensors as the text-to-image goldens: clip_input_ids, "
               "t5_input_ids, prompt_embeds, pooled_prompt_embeds, sigmas, timesteps, noise, noise_packed, "
               "latents [steps, 1, S, 64] after every step, image [1, 3, H, W] in [0, 1]; a case with "
               "negative_prompt and true_cfg_scale holds the true_cfg goldens' tensors instead (FluxPipeline with "
               "negative_prompt and true_cfg_scale, the LoRAs acting on both transformer passes).",
    "alphas": "A diffusers-named file with .alpha on some layers only loads as diffusers 0.42.1 configures PEFT "
              "(get_peft_kwargs): the first alpha in key order is the default for the layers without one (meant "
              "as the most common alpha, but counted by tensor identity), and alpha_pattern entries match module "
              "paths as suffixes (PEFT get_pattern_key).",
    "files": "loras[].file is relative to the repository root.",
}


def data_dir_for(model_goldens_dir: Path) -> Path:
    """GOLDENS/<model> -> the LoRA files' folder, tests/data/lora beside tests/goldens."""
    return Path(model_goldens_dir).resolve().parent.parent / "data" / "lora"


def lora_file(data_dir: Path, model: str, naming: str) -> Path:
    return Path(data_dir) / f"{model}-{naming}.safetensors"


def _top_targets(transformer) -> list[str]:
    """The diffusers-named top-level file's layers: the time/text/guidance embedders and the output layers, and one
    single block's proj_out (which PEFT's suffix match gives proj_out's alpha)."""
    emb = [n for n, m in transformer.named_modules()
           if isinstance(m, torch.nn.Linear) and n.startswith("time_text_embed.")]
    return emb + ["norm_out.linear", "proj_out", "single_transformer_blocks.0.proj_out"]


def _make_file(transformer, path: Path, naming: str, rank: int, alpha, seed: int, options: dict) -> None:
    options = dict(options)
    if options.get("targets") == "top":
        options["targets"] = _top_targets(transformer)
    make_random_lora(transformer, path, naming=naming, rank=rank, seed=seed, up_std=UP_STD, **options)
    if alpha is not None:  # diffusers/PEFT naming with `.alpha` keys: every layer, or the ones a dict names
        from safetensors.torch import load_file, save_file

        sd = load_file(str(path))
        for k in [k for k in sd if k.endswith(".lora_A.weight")]:
            module = k[len("transformer."): -len(".lora_A.weight")]
            value = alpha.get(module) if isinstance(alpha, dict) else alpha
            if value is not None:
                sd[k[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(value, dtype=torch.float32)
        save_file(sd, str(path))


def write_lora_files(transformer, model: str, variant: str, data_dir: Path, log=print) -> dict[str, Path]:
    """The random LoRA files for one model (naming -> path); a file is only rewritten when its bytes change."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, naming, rank, alpha, seed, options in LORA_FILES:
        path = lora_file(data_dir, model, name)
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            new = Path(tmp) / path.name
            _make_file(transformer, new, naming, rank, alpha, seed + (100 if variant == "dev" else 0), options)
            if path.is_file() and path.read_bytes() == new.read_bytes():
                log(f"LoRA {path.name}: unchanged")
            else:
                os.replace(new, path)
                log(f"LoRA {path.name}: written")
        out[name] = path
    return out


def lora_cases(variant: str, model: str, files: dict[str, Path], root: Path) -> list[dict]:
    base = next(c for c in goldens.cases(variant) if c["name"] == "p0_64x64")
    out = []
    for name, loras in SCALES.items():
        case = {
            "name": name,
            "prompt": base["prompt"],
            "width": base["width"],
            "height": base["height"],
            "seed": base["seed"],
            "steps": base["steps"],
            "guidance": base["guidance"],
            "loras": [{"file": Path(os.path.relpath(files[n], root)).as_posix(), "scale": s} for n, s in loras],
        }
        if name in TRUE_CFG:
            case.update(negative_prompt=goldens.NEGATIVE_PROMPT, true_cfg_scale=goldens.TRUE_CFG_SCALE)
        out.append(case)
    return out


def _specs(case: dict, root: Path) -> list[LoraSpec]:
    return [LoraSpec(Path(root) / spec["file"], float(spec["scale"])) for spec in case["loras"]]


def run_lora_case(pipe, case: dict, t5_max_length: int, root: Path) -> tuple[dict, dict]:
    """(golden tensors, delta tensors) for one case; the pipeline's transformer is left without adapters."""
    from diffusers.utils import logging as dlogging

    specs = _specs(case, root)
    transformer = pipe.transformer
    deltas = {k: torch.from_numpy(v) for k, v in slot_deltas(slot_factors(specs, transformer)).items()}
    converted = []
    for spec in specs:
        sd, _missing = to_diffusers(read_lora_file(spec.path), transformer, spec.path)
        converted.append({k: v for k, v in sd.items() if k.startswith("transformer.")})
    names = [f"lora_{i}" for i in range(len(specs))]
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        for name, sd in zip(names, converted):
            with warnings.catch_warnings():  # PEFT warns that a second adapter makes "multiple adapters": intended
                warnings.simplefilter("ignore")
                pipe.load_lora_weights(sd, adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
        if "negative_prompt" in case:
            tensors = goldens.run_true_cfg_case(pipe, case, t5_max_length)
        else:
            tensors = goldens.run_case(pipe, case, t5_max_length)
    finally:
        pipe.unload_lora_weights()
        dlogging.set_verbosity(verbosity)
    return tensors, {k: v.contiguous() for k, v in sorted(deltas.items())}


def write_lora_goldens(checkpoint_dir: Path, model_goldens_dir: Path, variant: str, t5_max_length: int,
                       data_dir: Path | None = None, pipe=None, log=print) -> Path:
    """GOLDENS/<model>/lora/: the LoRA cases (LoRA files in `data_dir`, default tests/data/lora)."""
    model_goldens_dir = Path(model_goldens_dir)
    model = model_goldens_dir.name
    data_dir = Path(data_dir) if data_dir else data_dir_for(model_goldens_dir)
    ups = data_dir.resolve().parents
    root = ups[min(2, len(ups) - 1)]  # tests/data/lora -> the repository root, which loras[].file is relative to
    out_dir = model_goldens_dir / "lora"
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipe or goldens.load_pipeline(checkpoint_dir)
    files = write_lora_files(pipe.transformer, model, variant, data_dir, log=log)
    entries = []
    for case in lora_cases(variant, model, files, root):
        tensors, deltas = run_lora_case(pipe, case, t5_max_length, root)
        case = {**case, "t5_max_length": t5_max_length, "delta_file": f"{case['name']}.delta.safetensors"}
        meta = {k: json.dumps(v) for k, v in case.items()}
        wrote = goldens.save_if_changed(deltas, out_dir / case["delta_file"], meta)
        log(f"golden {model}/lora/{case['delta_file']}: {len(deltas)} layers, {'written' if wrote else 'unchanged'}")
        entries.append((case, tensors))
    goldens._write_kind(out_dir, "lora", LORA_NOTES, entries, log)
    return out_dir
