"""Torch modules whose forward() is exactly one ONNX graph of the official contract (the I/O of the BFL
FLUX.1-*-onnx exports as NVIDIA TensorRT's demo/Diffusion builds them), as contract/flux-onnx.json writes it down.

Each wrapper fixes the input/output names, dtypes and ranks; the exporter only adds dynamic axes.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn


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
