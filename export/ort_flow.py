"""The FLUX.1 sampling steps around the exported graphs, in numpy, for driving a model folder from Python
onnxruntime (the VAE calibration in export/quantize.py, the `ort` engine of benches/compare.py). The same math as
fluxrt's src/schedule.rs and src/latents.rs and diffusers' FluxPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tokenizers(model_dir: Path, manifest: dict) -> dict:
    """CLIP and T5 tokenizers of a model folder, truncating and padding to the lengths the runtime uses."""
    from tokenizers import Tokenizer

    toks = {}
    for k in ("clip", "t5"):
        e = manifest["tokenizers"][k]
        tok = Tokenizer.from_file(str(Path(model_dir) / e["file"]))
        length = e["max_length"] if k == "clip" else manifest["defaults"]["t5_max_length"]
        tok.enable_truncation(length)
        tok.enable_padding(length=length, pad_id=e["pad_id"])
        toks[k] = tok
    return toks


def sigmas(scheduler: dict, steps: int, seq: int) -> np.ndarray:
    """The rectified-flow sigmas for `steps` steps and `seq` image tokens (shifted, dynamically when the
    scheduler says so), with the final 0 appended: float32 [steps + 1]."""
    s = np.linspace(1.0, 1.0 / steps, steps)
    if scheduler["use_dynamic_shifting"]:
        k = (scheduler["max_shift"] - scheduler["base_shift"]) / (
            scheduler["max_image_seq_len"] - scheduler["base_image_seq_len"])
        mu = seq * k + scheduler["base_shift"] - k * scheduler["base_image_seq_len"]
        s = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    else:
        s = scheduler["shift"] * s / (1 + (scheduler["shift"] - 1) * s)
    return np.append(s.astype(np.float32), np.float32(0.0))


def pack(z: np.ndarray) -> np.ndarray:
    """Latents [B, C, H, W] -> the transformer's 2x2 patches [B, H/2 * W/2, C * 4]."""
    b, c, h, w = z.shape
    x = z.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    return np.ascontiguousarray(x, dtype=np.float32)


def unpack(x: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """The inverse of `pack`: [B, H/2 * W/2, C * 4] -> [B, C, H, W]."""
    b = x.shape[0]
    return x.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def img_ids(h: int, w: int) -> np.ndarray:
    """Position ids [H/2 * W/2, 3] of the packed latents of an [.., H, W] latent image: (0, row, column)."""
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def vae_input(z: np.ndarray, vae: dict) -> np.ndarray:
    """Undoes the VAE normalisation: what the decoder graph takes."""
    return np.ascontiguousarray(z / vae["scaling_factor"] + vae["shift_factor"], dtype=np.float32)
