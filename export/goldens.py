"""Reference outputs from diffusers' FluxPipeline for the runtime's parity tests.

One safetensors file per case (prompt x resolution) under GOLDENS/<model>/, plus index.json. Stored: token ids,
text embeddings, pooled embedding, sigmas, timesteps, initial noise (unpacked and packed), the packed latents
after every step, and the final image as floats in [0,1] (diffusers' output_type="pt").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PROMPTS = [
    "a photo of a cat",
    # longer than CLIP's 77 tokens: exercises truncation
    "A highly detailed photograph of an old stone lighthouse on a rocky cliff at sunset, waves crashing on the "
    "rocks below, seagulls circling in an orange and purple sky, dramatic clouds, golden hour lighting, cinematic "
    "composition, shot on a 35mm lens with a shallow depth of field, volumetric light rays through the sea mist, a "
    "small red fishing boat in the distance, ultra realistic, award winning photography",
    # non-ASCII: accents, CJK, emoji
    "Ein Fuchs im Schnee — 雪の中の狐 🦊, café crème",
]
SIZES = [(64, 64), (128, 96)]  # (width, height); the second is non-square
STEPS = {"schnell": 4, "dev": 6}
GUIDANCE = 3.5


def cases(variant: str) -> list[dict]:
    out = []
    for pi, prompt in enumerate(PROMPTS):
        for si, (w, h) in enumerate(SIZES):
            out.append({
                "name": f"p{pi}_{w}x{h}",
                "prompt": prompt,
                "width": w,
                "height": h,
                "seed": 1000 + 10 * pi + si,
                "steps": STEPS[variant],
                "guidance": GUIDANCE if variant == "dev" else None,
            })
    return out


def load_pipeline(checkpoint_dir: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(checkpoint_dir, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, case: dict, t5_max_length: int) -> dict[str, torch.Tensor]:
    """Runs FluxPipeline once, recording every intermediate the runtime must reproduce."""
    rec: dict[str, torch.Tensor] = {}
    prompt = case["prompt"]
    clip_ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer_max_length,
                              truncation=True, return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=t5_max_length,
                              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=t5_max_length)

    original = pipe.prepare_latents

    def recording_prepare(*args, **kwargs):
        latents, ids = original(*args, **kwargs)
        rec["noise_packed"] = latents.clone()
        return latents, ids

    steps: list[torch.Tensor] = []

    def on_step(_pipe, _i, _t, kwargs):
        steps.append(kwargs["latents"].clone())
        return kwargs

    pipe.prepare_latents = recording_prepare
    try:
        kw = {}
        if case["guidance"] is not None:
            kw["guidance_scale"] = case["guidance"]
        image = pipe(
            prompt,
            width=case["width"],
            height=case["height"],
            num_inference_steps=case["steps"],
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            max_sequence_length=t5_max_length,
            output_type="pt",
            callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["latents"],
            **kw,
        ).images
    finally:
        pipe.prepare_latents = original

    h, w = 2 * (case["height"] // 16), 2 * (case["width"] // 16)
    rec["noise"] = torch.randn((1, 16, h, w), generator=torch.Generator("cpu").manual_seed(case["seed"]))
    rec.update({
        "clip_input_ids": clip_ids.to(torch.int64),
        "t5_input_ids": t5_ids.to(torch.int64),
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled,
        "sigmas": pipe.scheduler.sigmas.float(),
        "timesteps": pipe.scheduler.timesteps.float(),
        "latents": torch.stack(steps),  # [steps, B, S, 64]
        "image": image.float(),  # [B, 3, H, W] in [0, 1]
    })
    return {k: v.contiguous() for k, v in rec.items()}


def write_goldens(checkpoint_dir: Path, out_dir: Path, variant: str, t5_max_length: int, log=print) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(checkpoint_dir)
    index = []
    for case in cases(variant):
        tensors = run_case(pipe, case, t5_max_length)
        meta = {k: json.dumps(v) for k, v in case.items()}
        save_file(tensors, str(out_dir / f"{case['name']}.safetensors"), metadata=meta)
        index.append({**case, "file": f"{case['name']}.safetensors", "t5_max_length": t5_max_length})
        log(f"golden {out_dir.name}/{case['name']}: {case['steps']} steps, image {tuple(tensors['image'].shape)}")
    (out_dir / "index.json").write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
