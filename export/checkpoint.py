"""Load and check a diffusers-format Flux checkpoint folder (FLUX.1-schnell, FLUX.1-dev or a preset)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


# The marker a preset checkpoint (python -m export preset) carries: which preset made it.
PRESET_FILE = "fluxrt_preset.json"


class ExportError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


FLUX_PIPELINES = {"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline"}

# component -> (subfolder, what it must contain)
PARTS = {
    "transformer": ("transformer", "config.json"),
    "vae": ("vae", "config.json"),
    "clip": ("text_encoder", "config.json"),
    "t5": ("text_encoder_2", "config.json"),
    "tokenizer": ("tokenizer", None),
    "tokenizer_2": ("tokenizer_2", None),
    "scheduler": ("scheduler", "scheduler_config.json"),
}

# which checkpoint parts each exported graph needs
GRAPH_PARTS = {
    "clip": ["clip", "tokenizer"],
    "t5": ["t5", "tokenizer_2"],
    "transformer": ["transformer", "scheduler"],
    "vae_decoder": ["vae"],
    "vae_encoder": ["vae"],
}


@dataclass
class Checkpoint:
    root: Path
    model_index: dict
    transformer: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    clip: torch.nn.Module | None = None
    t5: torch.nn.Module | None = None
    scheduler_config: dict | None = None

    @property
    def variant(self) -> str:
        return "dev" if self.transformer.config.guidance_embeds else "schnell"

    def part_dir(self, part: str) -> Path:
        return self.root / PARTS[part][0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}; check the file's permissions") from e
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e}); re-download that file") from e


def check_folder(root: Path, graphs: list[str]) -> dict:
    """Checks the folder is a Flux checkpoint with every part the requested graphs need; returns model_index."""
    root = Path(root)
    if not root.is_dir():
        raise ExportError(f"checkpoint folder {root} does not exist; pass a diffusers-format Flux folder")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ExportError(
            f"{root} has no model_index.json, so it is not a diffusers pipeline folder; "
            "download the whole FLUX.1 repository (e.g. black-forest-labs/FLUX.1-schnell)"
        )
    index = _read_json(index_path)
    cls = index.get("_class_name")
    if cls not in FLUX_PIPELINES:
        raise ExportError(f"{root} holds a {cls!r} pipeline, not a Flux one (expected one of {sorted(FLUX_PIPELINES)})")
    needed = sorted({p for g in graphs for p in GRAPH_PARTS[g]})
    missing = []
    for part in needed:
        sub, must = PARTS[part]
        d = root / sub
        if not d.is_dir() or (must and not (d / must).is_file()):
            missing.append(f"{sub}/" + (must or ""))
    if missing:
        raise ExportError(f"checkpoint {root} is missing {', '.join(missing)}; download the complete checkpoint")
    return index


def _load(what: str, folder: Path, loader, dtype):
    from safetensors import SafetensorError  # transformers lets it through for a truncated model.safetensors

    try:
        return loader(folder, dtype).eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load the {what} from {folder}: {first}; the files may be truncated or corrupt") from e


def load(root: Path, graphs: list[str], dtype=torch.float32) -> Checkpoint:
    """Loads only the modules the requested graphs need, in `dtype`, offline."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    root = Path(root)
    index = check_folder(root, graphs)
    ck = Checkpoint(root=root, model_index=index)
    kw = dict(local_files_only=True)
    needed = {p for g in graphs for p in GRAPH_PARTS[g]}
    # The transformer's config decides the variant, so it is always read.
    ck.transformer = _load(
        "transformer",
        root / "transformer",
        lambda d, t: FluxTransformer2DModel.from_pretrained(d, dtype=t, **kw),
        dtype,
    ) if "transformer" in needed else _config_only_transformer(root)
    if "vae" in needed:
        ck.vae = _load("VAE", root / "vae", lambda d, t: AutoencoderKL.from_pretrained(d, dtype=t, **kw), dtype)
    if "clip" in needed:
        ck.clip = _load("CLIP text encoder", root / "text_encoder",
                        lambda d, t: CLIPTextModel.from_pretrained(d, dtype=t, **kw), dtype)
    if "t5" in needed:
        ck.t5 = _load("T5 text encoder", root / "text_encoder_2",
                      lambda d, t: T5EncoderModel.from_pretrained(d, dtype=t, **kw), dtype)
    ck.scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json") if (
        root / "scheduler" / "scheduler_config.json").is_file() else None
    return ck


class _ConfigOnly:
    """Stands in for the transformer when only its config is needed (exporting text encoders or the VAE)."""

    def __init__(self, config: dict):
        self.config = type("Config", (), config)


def _config_only_transformer(root: Path):
    path = root / "transformer" / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} is missing; the transformer config tells schnell from dev")
    cfg = _read_json(path)
    cfg.setdefault("guidance_embeds", False)
    return _ConfigOnly(cfg)
