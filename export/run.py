"""Export a whole checkpoint: graphs, tokenizers and the manifest, into a fresh model folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import manifest as mf
from . import onnx_export as ox
from . import flux_tokenizers as tok
from .checkpoint import ExportError
from .checkpoint import PRESET_FILE


def prepare_out_dir(out_dir: Path, force: bool) -> Path:
    """Never overwrites what a user has without --force; writes into a sibling temp folder first."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"output folder {out_dir} exists and is not empty; pass --force to replace it")
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.exists():
        parent.mkdir(parents=True)
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write into {parent}; choose another output folder")
    staging = parent / f".{out_dir.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def commit_out_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def export_model(
    checkpoint_dir: Path,
    out_dir: Path,
    precision: str = "fp32",
    opset: int = ox.DEFAULT_OPSET,
    components: list[str] | None = None,
    validate: bool = False,
    force: bool = False,
    name: str | None = None,
    log=print,
    loras: list | None = None,
    lora_slots: bool | None = None,
) -> dict:
    """lora_slots: give the transformer graph run-time LoRA slot inputs (export/lora_slots.py); None = what the
    checkpoint's preset file says (the tiny presets: yes), else no."""
    components = components or list(ox.GRAPHS)
    unknown = [c for c in components if c not in ox.GRAPHS]
    if unknown:
        raise ExportError(f"unknown component(s) {unknown}; choose from {ox.GRAPHS}")
    if precision not in ox.PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {ox.PRECISIONS}")
    checkpoint_dir = Path(checkpoint_dir)
    ckpt.check_folder(checkpoint_dir, components)
    if lora_slots and "transformer" not in components:
        raise ExportError("--lora-slots needs the transformer graph; add transformer to --components")
    if lora_slots is None:  # the preset's default (tiny: slots), for whichever graphs are exported
        preset_file = checkpoint_dir / PRESET_FILE
        lora_slots = bool(preset_file.is_file() and json.loads(preset_file.read_text()).get("lora_slots", False))
    if loras:
        from .lora import precheck

        precheck(loras, components)  # unreadable or malformed LoRA files fail before anything is loaded
    out_dir = Path(out_dir)
    staging = prepare_out_dir(out_dir, force)
    try:
        torch.set_grad_enabled(False)
        t0 = time.time()
        parts = ckpt.load(checkpoint_dir, components)
        log(f"loaded {checkpoint_dir} ({parts.variant}) in {time.time() - t0:.1f}s")
        applied = []
        if loras:  # LoraSpec list (export.lora): fused into the weights before any graph is exported
            from .lora import fuse_loras

            applied = fuse_loras(parts, loras, log=log)
        graphs = {}
        for g in components:
            t = time.time()
            path = staging / f"{g}.onnx"
            entry = ox.export_graph(g, parts, path, precision, opset, lora_slots=lora_slots)
            slots = entry.pop("lora_slots", None)
            entry = {"file": path.name, **entry, **ox.read_io(path)}
            if slots is not None:
                entry["lora_slots"] = slots
            graphs[g] = entry
            size = path.stat().st_size + ((staging / entry["external_data"]).stat().st_size if entry["external_data"] else 0)
            log(f"exported {g:12s} {size / 1e6:9.2f} MB  {time.time() - t:6.1f}s  ({entry['precision']})")
        tokenizers = {}
        if "clip" in components:
            tokenizers["clip"] = _tokenizer(parts.part_dir("tokenizer"), staging / "tokenizer", "clip")
        if "t5" in components:
            tokenizers["t5"] = _tokenizer(parts.part_dir("tokenizer_2"), staging / "tokenizer_2", "t5")
        manifest = build_manifest(parts, checkpoint_dir, graphs, tokenizers, name or out_dir.name)
        if applied:
            manifest["source"]["loras"] = applied
        mf.write(staging, manifest)
        if validate:
            from .validate import validate_model

            results = validate_model(staging, manifest, parts)
            for r in results:
                log("validate " + r.line())
            if not all(r.ok for r in results):
                raise ExportError("validation failed: an exported graph disagrees with PyTorch (see above)")
        commit_out_dir(staging, out_dir)
        log(f"wrote {out_dir} in {time.time() - t0:.1f}s")
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _tokenizer(src: Path, dst: Path, kind: str) -> dict:
    try:
        meta = tok.export_tokenizer_json(src, dst, kind)
    except RuntimeError as e:  # a missing, corrupt or wrong tokenizer folder: one line, not a traceback
        raise ExportError(str(e).strip().splitlines()[0]) from e
    return {"file": f"{dst.name}/tokenizer.json", **meta}


def build_manifest(parts, checkpoint_dir: Path, graphs: dict, tokenizers: dict, name: str) -> dict:
    variant = parts.variant
    defaults = dict(mf.VARIANT_DEFAULTS[variant])
    if "t5" in tokenizers:
        defaults["t5_max_length"] = min(defaults["t5_max_length"], tokenizers["t5"]["max_length"])
    vae_cfg = parts.vae.config if parts.vae is not None else None
    preset_file = Path(checkpoint_dir) / PRESET_FILE
    preset = json.loads(preset_file.read_text()) if preset_file.is_file() else None
    if preset:
        defaults["width"] = defaults["height"] = preset["default_size"]
    return {
        "schema_version": mf.SCHEMA_VERSION,
        "name": name,
        "variant": variant,
        "guidance_embeds": variant == "dev",
        "latent_channels": int(parts.transformer.config.in_channels) // 4,
        "vae": {
            "scaling_factor": float(vae_cfg.scaling_factor) if vae_cfg else 0.3611,
            "shift_factor": float(vae_cfg.shift_factor) if vae_cfg else 0.1159,
            "downsample_factor": 2 ** (len(vae_cfg.block_out_channels) - 1) if vae_cfg else 8,
        },
        "defaults": defaults,
        "scheduler": mf.scheduler_section(parts.scheduler_config, variant),
        "tokenizers": tokenizers,
        "graphs": graphs,
        "source": {
            "checkpoint": Path(checkpoint_dir).name,
            "preset": preset["preset"] if preset else None,
        },
        "exporter": mf.versions(),
    }


