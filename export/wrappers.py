"""Torch modules whose forward() is exactly one ONNX graph of the official contract (the I/O of the BFL
FLUX.1-*-onnx exports as NVIDIA TensorRT's demo/Diffusion builds them; src/model/contract.rs).

Each wrapper fixes the input/output names, dtypes and ranks; the exporter only adds dynamic axes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Io:
    name: str
    dtype: str  # "float32" | "int32"; the precision pass may turn float32 into float16/bfloat16
    shape: tuple  # ints for fixed dims, strings for symbolic ones


# The contract, per graph. Symbolic dims: B batch, L text length, S image tokens, H/W pixels, h/w latent.
CONTRACT: dict[str, dict[str, list[Io]]] = {
    "clip": {
        "inputs": [Io("input_ids", "int32", ("B", 77))],
        "outputs": [
            Io("text_embeddings", "float32", ("B", 77, "clip_dim")),
            Io("pooled_embeddings", "float32", ("B", "clip_dim")),
        ],
    },
    "t5": {
        "inputs": [Io("input_ids", "int32", ("B", "L"))],
        "outputs": [Io("text_embeddings", "float32", ("B", "L", "t5_dim"))],
    },
    "transformer": {
        "inputs": [
            Io("hidden_states", "float32", ("B", "S", 64)),
            Io("encoder_hidden_states", "float32", ("B", "L", "t5_dim")),
            Io("pooled_projections", "float32", ("B", "clip_dim")),
            Io("timestep", "float32", ("B",)),
            Io("img_ids", "float32", ("S", 3)),
            Io("txt_ids", "float32", ("L", 3)),
            Io("guidance", "float32", ("B",)),  # dev only
        ],
        "outputs": [Io("latent", "float32", ("B", "S", 64))],
    },
    "vae_decoder": {
        "inputs": [Io("latent", "float32", ("B", 16, "h", "w"))],
        "outputs": [Io("images", "float32", ("B", 3, "H", "W"))],
    },
    "vae_encoder": {
        "inputs": [Io("images", "float32", ("B", 3, "H", "W"))],
        # `latent` is the posterior mean (diffusers' latent_dist.mode()); `latent_std` lets a runtime draw
        # latent_dist.sample() as mean + std * noise like FluxImg2ImgPipeline does.
        "outputs": [
            Io("latent", "float32", ("B", 16, "h", "w")),
            Io("latent_std", "float32", ("B", 16, "h", "w")),
        ],
    },
}


def contract_for(graph: str, guidance_embeds: bool) -> dict[str, list[Io]]:
    c = CONTRACT[graph]
    if graph == "transformer" and not guidance_embeds:
        return {"inputs": [i for i in c["inputs"] if i.name != "guidance"], "outputs": c["outputs"]}
    return c


class ClipGraph(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        out = self.clip(input_ids.to(torch.int64), output_hidden_states=False)
        return out.last_hidden_state, out.pooler_output


class T5Graph(nn.Module):
    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids):
        # No attention mask, as diffusers' FluxPipeline: prompts are padded to the full length.
        return self.t5(input_ids.to(torch.int64), output_hidden_states=False)[0]


class TransformerGraph(nn.Module):
    """`timestep` is sigma in [0,1] and `guidance` the raw scale: the x1000 happens inside the model."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.guidance_embeds = bool(transformer.config.guidance_embeds)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, *guidance):
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance[0] if self.guidance_embeds else None,
            return_dict=False,
        )[0]


class VaeDecoderGraph(nn.Module):
    """Takes the already de-normalised latent (z / scaling_factor + shift_factor): scale/shift stay outside."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        dist = self.vae.encode(images, return_dict=False)[0]
        return dist.mean, dist.std


def wrap(graph: str, parts) -> nn.Module:
    return {
        "clip": lambda: ClipGraph(parts.clip),
        "t5": lambda: T5Graph(parts.t5),
        "transformer": lambda: TransformerGraph(parts.transformer),
        "vae_decoder": lambda: VaeDecoderGraph(parts.vae),
        "vae_encoder": lambda: VaeEncoderGraph(parts.vae),
    }[graph]().eval()


# --- export-time patches -------------------------------------------------------------------------------


def _rotary_traceable(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' apply_rotary_emb (Flux path) without `x.reshape(*x.shape[:-1], -1, 2)`, whose sizes the
    tracer bakes in as constants (the export then fails at any other resolution)."""
    assert use_real and use_real_unbind_dim == -1
    cos, sin = freqs_cis
    if sequence_dim == 2:
        cos, sin = cos[None, None, :, :], sin[None, None, :, :]
    else:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_rotated = x @ pair_swap(x.shape[-1]).to(x.dtype)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def pair_swap(dim: int) -> torch.Tensor:
    """The signed permutation R with (x @ R)[2i] = -x[2i+1] and (x @ R)[2i+1] = x[2i]: diffusers' interleaved
    rotate-half (`stack([-x_imag, x_real])`) as one MatMul. Exact for finite x (one +-1 per column), and ONNX
    Runtime's CPU provider runs it faster than the Gather, Neg, Unsqueeze and Concat nodes the stack traces to
    (bench transformer at 512x512: 7 % of a step). Built in numpy so that the trace records a constant."""
    r = np.zeros((dim, dim), np.float32)
    i = np.arange(0, dim, 2)
    r[i + 1, i] = -1.0
    r[i, i + 1] = 1.0
    return torch.from_numpy(r)


def _rms_norm_forward(self, x):
    """torch.nn.RMSNorm as plain ops: aten::rms_norm has no ONNX symbolic in the TorchScript exporter, and
    Pow(x, 2) is the form onnxruntime's transformer optimizer fuses."""
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * self.weight if self.weight is not None else y


@contextlib.contextmanager
def export_patches():
    import diffusers.models.transformers.transformer_flux as tf

    saved = (tf.apply_rotary_emb, nn.RMSNorm.forward)
    tf.apply_rotary_emb = _rotary_traceable
    nn.RMSNorm.forward = _rms_norm_forward
    try:
        yield
    finally:
        tf.apply_rotary_emb, nn.RMSNorm.forward = saved
