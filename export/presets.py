"""Small random-weight Flux pipelines with the real architecture, built offline with fixed seeds.

A preset is saved as an ordinary diffusers checkpoint folder, so the exporter treats it exactly like a
real FLUX.1 checkpoint: the same code path exports both.

- tiny-schnell / tiny-dev: the bundled test models. Real CLIP-L and T5 v1.1 vocabularies and tokenizers,
  1 double + 1 single block, 2 heads x 16. They differ only in the guidance embedding (as the real ones do) and
  share the text encoders and the VAE bit for bit (same seeds).
- bench: ~160M-parameter transformer with the real text dims (T5 4096, CLIP 768), the real-size VAE and
  small text encoders; for benchmarks, generated on demand and never committed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch


PRESET_FILE = "fluxrt_preset.json"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    variant: str  # "schnell" | "dev"
    # transformer
    num_layers: int
    num_single_layers: int
    num_heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    # CLIP text encoder
    clip_hidden: int
    clip_layers: int
    clip_heads: int
    clip_intermediate: int
    # T5 encoder
    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int
    # VAE
    vae_block_out: tuple[int, ...]
    vae_layers_per_block: int
    vae_groups: int
    seed: int = 0

    @property
    def guidance_embeds(self) -> bool:
        return self.variant == "dev"

    def summary(self) -> str:
        """One line for --help: the variant and the transformer's size."""
        return (f"FLUX.1-{self.variant}, {self.num_layers} double + {self.num_single_layers} single blocks, "
                f"{self.num_heads} heads x {self.head_dim}, T5 width {self.t5_d_model}")


_TINY = dict(
    num_layers=1,
    num_single_layers=1,
    num_heads=2,
    head_dim=16,
    axes_dims_rope=(4, 6, 6),
    clip_hidden=8,
    clip_layers=2,
    clip_heads=2,
    clip_intermediate=16,
    t5_d_model=16,
    t5_layers=2,
    t5_heads=2,
    t5_d_kv=8,
    t5_d_ff=32,
    vae_block_out=(8, 16, 16, 16),
    vae_layers_per_block=1,
    vae_groups=4,
)

_BENCH = dict(
    num_layers=4,
    num_single_layers=8,
    num_heads=12,
    head_dim=64,
    axes_dims_rope=(8, 28, 28),
    clip_hidden=768,
    clip_layers=2,
    clip_heads=12,
    clip_intermediate=3072,
    t5_d_model=4096,
    t5_layers=1,
    t5_heads=8,
    t5_d_kv=64,
    t5_d_ff=1024,
    vae_block_out=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_groups=32,
)

PRESETS: dict[str, Preset] = {
    "tiny-schnell": Preset(name="tiny-flux-schnell", variant="schnell", **_TINY),
    "tiny-dev": Preset(name="tiny-flux-dev", variant="dev", **_TINY),
    "bench": Preset(name="bench-flux-schnell", variant="schnell", **_BENCH),
    "bench-dev": Preset(name="bench-flux-dev", variant="dev", **_BENCH),
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


def _seeded(seed: int):
    torch.manual_seed(seed)


def build_text_encoders(p: Preset):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    _seeded(p.seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=p.clip_hidden,
            intermediate_size=p.clip_intermediate,
            num_hidden_layers=p.clip_layers,
            num_attention_heads=p.clip_heads,
            max_position_embeddings=77,
            projection_dim=p.clip_hidden,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()
    _seeded(p.seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=p.t5_d_model,
            d_kv=p.t5_d_kv,
            d_ff=p.t5_d_ff,
            num_layers=p.t5_layers,
            num_heads=p.t5_heads,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            is_encoder_decoder=True,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    return clip, t5


def build_vae(p: Preset):
    from diffusers import AutoencoderKL

    n = len(p.vae_block_out)
    _seeded(p.seed + 3)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=p.vae_block_out,
        layers_per_block=p.vae_layers_per_block,
        latent_channels=16,
        norm_num_groups=p.vae_groups,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    ).eval()


def build_transformer(p: Preset):
    from diffusers import FluxTransformer2DModel

    assert sum(p.axes_dims_rope) == p.head_dim, "RoPE axes must add up to the head dim"
    # Seeded apart from the text encoders and VAE so schnell and dev share those bit for bit.
    _seeded(p.seed + 4 + (1 if p.guidance_embeds else 0))
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=p.num_layers,
        num_single_layers=p.num_single_layers,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.t5_d_model,
        pooled_projection_dim=p.clip_hidden,
        guidance_embeds=p.guidance_embeds,
        axes_dims_rope=p.axes_dims_rope,
    ).eval()


def build_checkpoint(preset: str, out_dir: Path, tokenizer_cache: Path | None = None) -> Path:
    """Builds the preset as a diffusers FluxPipeline and saves it to out_dir (replaced if present)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    from . import tokenizers as tok

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    tok_root = out_dir / "_tokenizers"
    tok.build_clip_tokenizer(tok_root / "tokenizer")
    tok.build_t5_tokenizer(tok_root / "tokenizer_2")
    clip, t5 = build_text_encoders(p)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[p.variant]),
        vae=build_vae(p),
        text_encoder=clip,
        tokenizer=CLIPTokenizer.from_pretrained(tok_root / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=T5TokenizerFast.from_pretrained(tok_root / "tokenizer_2"),
        transformer=build_transformer(p),
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(tok_root)
    # What the manifest records about the preset; the tiny models default to a size that runs in a blink.
    # The tiny (bundled) models are exported with run-time LoRA slots by default (export/lora_slots.py); the bench
    # presets without, for speed (`python -m export preset bench OUT --lora-slots` adds them).
    info = {"preset": preset, "default_size": 256 if preset.startswith("tiny") else 1024}
    if preset.startswith("tiny"):
        info["lora_slots"] = True
    (out_dir / PRESET_FILE).write_text(json.dumps(info) + "\n")
    return out_dir
