"""manifest.json: everything the runtime needs about an exported model, so it guesses nothing.

Schema version 1 (documented in the README, read by src/model/manifest.rs):
{
  "schema_version": 1,
  "name": str, "variant": "schnell"|"dev", "guidance_embeds": bool,
  "latent_channels": int,
  "vae": {"scaling_factor": f, "shift_factor": f, "downsample_factor": int},
  "defaults": {"steps": int, "guidance": f|null, "t5_max_length": int, "width": int, "height": int},
  "scheduler": {"shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"},
  "tokenizers": {"clip"|"t5": {"file", "kind", "max_length", "pad_id", "bos_id", "eos_id", "vocab_size"}},
  "graphs": {name: {"file", "precision", "opset", "external_data", "islands",
                    "inputs"/"outputs": [{"name", "dtype", "shape"}],
                    "lora_slots": [{"module", "in", "out"}]}},  # transformer, only when exported with --lora-slots
  "source": {"checkpoint": str, "preset": str|null},
  "exporter": {"fluxrt_export", "torch", "diffusers", "transformers", "onnx", "onnxruntime"}
}
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_VERSION = 1
FILE_NAME = "manifest.json"

# FLUX.1 defaults per variant (BFL's sampling defaults; T5 length 256 for schnell, 512 for dev).
VARIANT_DEFAULTS = {
    "schnell": {"steps": 4, "guidance": None, "t5_max_length": 256, "width": 1024, "height": 1024},
    "dev": {"steps": 28, "guidance": 3.5, "t5_max_length": 512, "width": 1024, "height": 1024},
}


# FLUX.1 scheduler configs as shipped in the official repos' scheduler/scheduler_config.json.
SCHEDULER_CONFIGS = {
    "schnell": dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "dev": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
}


def scheduler_section(cfg: dict | None, variant: str) -> dict:
    cfg = dict(cfg or SCHEDULER_CONFIGS[variant])
    base = SCHEDULER_CONFIGS[variant]
    return {
        "shift": float(cfg.get("shift", base["shift"])),
        "use_dynamic_shifting": bool(cfg.get("use_dynamic_shifting", base["use_dynamic_shifting"])),
        "base_shift": float(cfg.get("base_shift", base["base_shift"])),
        "max_shift": float(cfg.get("max_shift", base["max_shift"])),
        "base_image_seq_len": int(cfg.get("base_image_seq_len", base["base_image_seq_len"])),
        "max_image_seq_len": int(cfg.get("max_image_seq_len", base["max_image_seq_len"])),
    }


def versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    from . import __version__

    return {
        "fluxrt_export": __version__,
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / FILE_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read(model_dir: Path) -> dict:
    m = json.loads((Path(model_dir) / FILE_NAME).read_text())
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"manifest schema {m.get('schema_version')} is not {SCHEMA_VERSION}")
    for name, g in m.get("graphs", {}).items():
        check_lora_slots(name, g.get("lora_slots"))
    return m


def check_lora_slots(graph: str, slots) -> None:
    """`lora_slots` (optional, transformer only): [{"module": str, "in": int > 0, "out": int > 0}], modules unique.
    Each slot is the pair of optional graph inputs `<module>.lora_A` [in, r] / `<module>.lora_B` [r, out]."""
    if slots is None:
        return
    if graph != "transformer":
        raise ValueError(f"graph {graph}: lora_slots is only defined for the transformer graph")
    if not isinstance(slots, list):
        raise ValueError("graphs.transformer.lora_slots must be a list")
    seen = set()
    for s in slots:
        ok = (isinstance(s, dict) and set(s) == {"module", "in", "out"} and isinstance(s["module"], str)
              and s["module"] and all(isinstance(s[k], int) and s[k] > 0 for k in ("in", "out")))
        if not ok:
            raise ValueError(f"graphs.transformer.lora_slots: bad entry {s!r} (want module, in, out)")
        if s["module"] in seen:
            raise ValueError(f"graphs.transformer.lora_slots: module {s['module']} listed twice")
        seen.add(s["module"])
