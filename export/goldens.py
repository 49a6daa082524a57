"""Reference outputs from diffusers' FluxPipeline for the runtime's parity tests.

One safetensors file per case (prompt x resolution) under GOLDENS/<model>/, plus index.json. Stored: token ids,
text embeddings, pooled embedding, sigmas, timesteps, initial noise (unpacked and packed), the packed latents
after every step, and the final image as floats in [0,1] (diffusers' output_type="pt").

Also img2img goldens (FluxImg2ImgPipeline, GOLDENS/<model>/img2img/) and true-CFG goldens (negative prompt +
true_cfg_scale, GOLDENS/<model>/true_cfg/), each with an index.json whose "notes" state what diffusers does; the
LoRA goldens (GOLDENS/<model>/lora/) are export/lora_goldens.py's. Files are only rewritten when their values
change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
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

    pipe = FluxPipeline.from_pretrained(checkpoint_dir, dtype=torch.float32, local_files_only=True)
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


def write_goldens(checkpoint_dir: Path, out_dir: Path, variant: str, t5_max_length: int, log=print,
                  pipe=None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipe or load_pipeline(checkpoint_dir)
    index = []
    for case in cases(variant):
        tensors = run_case(pipe, case, t5_max_length)
        meta = {k: json.dumps(v) for k, v in case.items()}
        wrote = save_if_changed(tensors, out_dir / f"{case['name']}.safetensors", meta)
        index.append({**case, "file": f"{case['name']}.safetensors", "t5_max_length": t5_max_length})
        log(f"golden {out_dir.name}/{case['name']}: {case['steps']} steps, image {tuple(tensors['image'].shape)}"
            + ("" if wrote else " (unchanged)"))
    write_text_if_changed(out_dir / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")


# ==================================================================== img2img and true-CFG goldens
#
# Written into NEW folders beside the text-to-image ones (GOLDENS/<model>/img2img/, GOLDENS/<model>/true_cfg/) with
# an index.json of the form {"kind", "notes", "cases"}; the init images are PNGs under GOLDENS/inputs/. Every file is
# only (re)written when its values change, so regenerating leaves identical goldens byte for byte alone.

NEGATIVE_PROMPT = "blurry, low quality, watermark"
TRUE_CFG_SCALE = 4.0
INIT_SIZES = [(64, 64), (128, 96)]  # (width, height); each init image is already at its case's size


def init_image_pixels(width: int, height: int) -> np.ndarray:
    """The img2img init image as uint8 [H, W, 3], from integer arithmetic only (no libm), so it is the same on
    every machine: an RGB gradient, a filled disc, a rectangle and a diagonal stripe."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (255 * x) // (width - 1)
    g = (255 * y) // (height - 1)
    b = 255 - (255 * (x + y)) // (width + height - 2)
    img = np.stack([r, g, b], axis=-1)
    cx, cy, rad = (3 * width) // 10, (2 * height) // 5, min(width, height) // 5
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= rad * rad
    img[disc] = (230, 40, 40)
    rect = (x >= (11 * width) // 20) & (x < (17 * width) // 20) & (y >= (11 * height) // 20) & (y < (4 * height) // 5)
    img[rect] = (30, 30, 200)
    stripe = abs((x - width // 2) - (y - height // 2)) <= 1
    img[stripe] = (250, 250, 250)
    return img.astype(np.uint8)


def init_image_name(width: int, height: int) -> str:
    return f"init_{width}x{height}.png"


def write_init_images(inputs_dir: Path, log=print) -> dict[tuple[int, int], Path]:
    """Writes GOLDENS/inputs/init_WxH.png unless a file with the same pixels is there."""
    from PIL import Image

    inputs_dir = Path(inputs_dir)
    inputs_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for w, h in INIT_SIZES:
        path = inputs_dir / init_image_name(w, h)
        pixels = init_image_pixels(w, h)
        same = False
        if path.is_file():
            with Image.open(path) as old:
                same = old.mode == "RGB" and np.array_equal(np.asarray(old), pixels)
        if not same:
            Image.fromarray(pixels, mode="RGB").save(path, format="PNG")
            log(f"wrote {path}")
        out[w, h] = path
    return out


def img2img_cases(variant: str) -> list[dict]:
    # (width, height, strength): two strengths at 64x64 (0.6 starts mid-schedule, 1.0 starts at sigma 1 but
    # still draws the posterior sample first), one non-square case.
    specs = [(64, 64, 0.6), (64, 64, 1.0), (128, 96, 0.75)]
    out = []
    for i, (w, h, strength) in enumerate(specs):
        out.append({
            "name": f"i2i_{w}x{h}_s{strength:g}",
            "prompt": PROMPTS[0],
            "width": w,
            "height": h,
            "strength": strength,
            "seed": 2000 + i,
            "steps": STEPS[variant],
            "guidance": GUIDANCE if variant == "dev" else None,
            "init_image": f"../../inputs/{init_image_name(w, h)}",
        })
    return out


def true_cfg_cases(variant: str) -> list[dict]:
    specs = [(0, 64, 64), (2, 128, 96)]  # the plain prompt, and the non-ASCII one at the non-square size
    out = []
    for i, (pi, w, h) in enumerate(specs):
        out.append({
            "name": f"cfg_p{pi}_{w}x{h}",
            "prompt": PROMPTS[pi],
            "negative_prompt": NEGATIVE_PROMPT,
            "true_cfg_scale": TRUE_CFG_SCALE,
            "width": w,
            "height": h,
            "seed": 3000 + i,
            "steps": STEPS[variant],
            "guidance": GUIDANCE if variant == "dev" else None,
        })
    return out


def torch_randn_mt19937_values(numel: int) -> int:
    """How many 32-bit mt19937 outputs torch.randn(numel) in float32 on a CPU generator consumes (numel >= 16):
    every element draws one uniform, and a ragged tail redraws 16 more for its last block."""
    assert numel >= 16, "below 16 elements torch.randn takes another path (64-bit draws per element)"
    return numel if numel % 16 == 0 else numel + 16


IMG2IMG_NOTES = {
    "pipeline": "diffusers FluxImg2ImgPipeline (diffusers 0.42.1), fp32 on CPU, output_type='pt'; one "
                "torch.Generator('cpu').manual_seed(seed) passed as `generator`.",
    "init_image": "init_image (relative to this index.json) is a PNG already at width x height, so "
                  "VaeImageProcessor.preprocess does no resampling (PIL resize to the same size is a copy). "
                  "Preprocessing is exactly: float32(pixel_uint8) / 255.0, then 2.0 * x - 1.0, layout [1, 3, H, W] "
                  "RGB (tensor `init_image`).",
    "vae_encode": "vae.encode(init_image).latent_dist: parameters [1, 32, h, w] split into mean and logvar "
                  "(channels 0-15 / 16-31), logvar clamped to [-30, 20], std = exp(0.5 * logvar). Tensors "
                  "`image_latent_mean`, `image_latent_std` (= the vae_encoder graph's `latent` and `latent_std`).",
    "rng_order": "The ONE generator is used exactly twice, in this order: (1) the posterior sample "
                 "`posterior_eps` = torch.randn([1, 16, h, w]) inside latent_dist.sample(generator) during "
                 "_encode_vae_image, (2) the initial noise `noise` = torch.randn([1, 16, h, w]) in prepare_latents. "
                 "Nothing else draws from it (text encoding, timesteps and the denoising loop do not). Each draw of "
                 "n = 16*h*w float32 values consumes exactly n 32-bit mt19937 outputs (n is a multiple of 16; a "
                 "ragged n >= 16 would consume n + 16), so `noise` equals elements [n, 2n) of "
                 "torch.randn(2n) from the same seed, and is NOT the text-to-image noise of that seed (that one is "
                 "elements [0, n)). This holds for strength 1.0 too: the posterior draw still comes first. The "
                 "mt19937 is init_genrand(seed) (numpy's legacy RandomState(seed) gives the same stream); each "
                 "uniform is (u32 & 0xFFFFFF) * 2^-24; blocks of 16: out[j] = sqrt(-2 ln(1 - U[j])) * cos(2 pi "
                 "U[j+8]), out[j+8] = same radius * sin(2 pi U[j+8]), j < 8 (PyTorch's normal_fill, aten/src/ATen/native/cpu/DistributionTemplates.h; fluxrt's src/noise.rs).",
    "image_latents": "`image_latents_sample` = image_latent_mean + image_latent_std * posterior_eps; "
                     "`image_latents` = (image_latents_sample - shift_factor) * scaling_factor (0.1159, 0.3611).",
    "timesteps": "The full schedule for `steps` is made exactly as text-to-image (`sigmas_full`, N + 1 values "
                 "with the terminal 0; dev shifts with mu from image_seq_len = (H/16)*(W/16)). Then, in float64 "
                 "Python arithmetic: init_timestep = min(steps * strength, steps); t_start = int(max(steps - "
                 "init_timestep, 0)) (truncation, so 4 * 0.6 = 2.4 gives t_start 1 and 6 * 0.6 = "
                 "3.5999999999999996 gives t_start 2); the loop runs steps_run = steps - t_start steps over "
                 "`timesteps` = timesteps_full[t_start:], and the scheduler's begin index is t_start, so "
                 "`sigmas` = sigmas_full[t_start:] (steps_run + 1 values) are the sigmas actually used.",
    "x_t": "`x_t` = sigma0 * noise + (1 - sigma0) * image_latents with sigma0 = sigmas[0] in float32 "
           "(scheduler.scale_noise); `x_t_packed` is its 2x2 packing [1, S, 64], the loop's starting latents.",
    "loop": "Identical to text-to-image from there: Euler x <- x + (sigma_next - sigma) * v per step, with the "
            "transformer's timestep = sigma (timestep / 1000) and, for dev, guidance = `guidance`. `latents` "
            "[steps_run, 1, S, 64] holds the packed latents after every step; `image` [1, 3, H, W] in [0, 1] is "
            "vae.decode(unpack(latents[-1]) / scaling_factor + shift_factor) * 0.5 + 0.5, clamped.",
    "text": "clip_input_ids, t5_input_ids, prompt_embeds, pooled_prompt_embeds as in the text-to-image goldens.",
}

TRUE_CFG_NOTES = {
    "pipeline": "diffusers FluxPipeline (diffusers 0.42.1) with negative_prompt and true_cfg_scale, fp32 on CPU, "
                "output_type='pt', generator torch.Generator('cpu').manual_seed(seed); the noise is the same "
                "draw as text-to-image (the negative prompt draws nothing from the generator).",
    "enabled_when": "do_true_cfg = true_cfg_scale > 1 and a negative prompt (or negative embeddings) is given; "
                    "with true_cfg_scale <= 1 the negative prompt is ignored and the run equals text-to-image.",
    "negative_encoding": "The negative prompt is encoded exactly like the prompt (CLIP 77 tokens padded with eos, "
                         "pooled output; T5 padded to the same t5_max_length), no attention masks. Tensors "
                         "negative_clip_input_ids, negative_t5_input_ids, negative_prompt_embeds, "
                         "negative_pooled_prompt_embeds. txt_ids for the negative pass are zeros of the same shape.",
    "combine": "Per step, two transformer evaluations on the SAME latents, timestep (sigma) and, for dev, the "
               "SAME guidance value (the distilled guidance embedding is fed to both): v_cond with the prompt "
               "embeddings, then v_uncond with the negative ones. Combined in float32 as "
               "v = v_uncond + true_cfg_scale * (v_cond - v_uncond) (that operation order), then the Euler step "
               "x <- x + (sigma_next - sigma) * v. `noise_pred_cond` and `noise_pred_uncond` [steps, 1, S, 64] are "
               "the two transformer outputs per step, `latents` the packed latents after every step.",
    "schedule": "Sigmas, timesteps, noise and packing exactly as the text-to-image goldens (`sigmas`, `timesteps`, "
                "`noise`, `noise_packed`). schnell accepts true CFG in diffusers too (no guidance input).",
}


def _files_equal(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bool:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return False
    try:
        old = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            old_meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable old file is simply replaced
        return False
    if set(old) != set(tensors) or old_meta != meta:
        return False
    return all(old[k].dtype == v.dtype and old[k].shape == v.shape and torch.equal(old[k], v)
               for k, v in tensors.items())


def save_if_changed(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> bool:
    """save_file unless `path` already holds exactly these tensors and metadata; True when written."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if _files_equal(Path(path), tensors, meta):
        return False
    save_file(tensors, str(path), metadata=meta)
    return True


def write_text_if_changed(path: Path, text: str) -> bool:
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    path.write_text(text)
    return True


def _text_record(pipe, prompt: str, t5_max_length: int, prefix: str = "") -> dict[str, torch.Tensor]:
    clip_ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer_max_length,
                              truncation=True, return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=t5_max_length,
                              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=t5_max_length)
    return {
        f"{prefix}clip_input_ids": clip_ids.to(torch.int64),
        f"{prefix}t5_input_ids": t5_ids.to(torch.int64),
        f"{prefix}prompt_embeds": embeds,
        f"{prefix}pooled_prompt_embeds": pooled,
    }


def _step_recorder():
    steps: list[torch.Tensor] = []

    def on_step(_pipe, _i, _t, kwargs):
        steps.append(kwargs["latents"].clone())
        return kwargs

    return steps, on_step


def img2img_pipeline(pipe):
    """A FluxImg2ImgPipeline over the same modules as a loaded FluxPipeline."""
    from diffusers import FluxImg2ImgPipeline

    i2i = FluxImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    return i2i


def run_img2img_case(i2i, case: dict, t5_max_length: int, init_pixels: np.ndarray) -> tuple[dict, dict]:
    """Runs FluxImg2ImgPipeline once; returns (tensors, facts) with every intermediate a runtime must reproduce."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.flux.pipeline_flux_img2img as i2i_mod
    from PIL import Image

    w, h = case["width"], case["height"]
    assert init_pixels.shape == (h, w, 3), "the init image must already be at the case's size"
    rec = _text_record(i2i, case["prompt"], t5_max_length)
    draws: list[tuple[str, torch.Tensor]] = []
    saved = {"vae": vae_mod.randn_tensor, "pipe": i2i_mod.randn_tensor, "encode": i2i.vae.encode,
             "prepare": i2i.prepare_latents}

    def recording_randn(tag, fn):
        def wrapped(*args, **kwargs):
            t = fn(*args, **kwargs)
            draws.append((tag, t.clone()))
            return t
        return wrapped

    def recording_encode(*args, **kwargs):
        out = saved["encode"](*args, **kwargs)
        dist = out.latent_dist if hasattr(out, "latent_dist") else out[0]
        rec["image_latent_mean"] = dist.mean.clone()
        rec["image_latent_std"] = dist.std.clone()
        return out

    def recording_prepare(image, timestep, *args, **kwargs):
        rec["init_image"] = image.clone()
        latents, ids = saved["prepare"](image, timestep, *args, **kwargs)
        rec["x_t_packed"] = latents.clone()
        return latents, ids

    steps, on_step = _step_recorder()
    vae_mod.randn_tensor = recording_randn("posterior", saved["vae"])
    i2i_mod.randn_tensor = recording_randn("noise", saved["pipe"])
    i2i.vae.encode = recording_encode
    i2i.prepare_latents = recording_prepare
    try:
        kw = {"guidance_scale": case["guidance"]} if case["guidance"] is not None else {}
        image = i2i(
            case["prompt"],
            image=Image.fromarray(init_pixels, mode="RGB"),
            strength=case["strength"],
            width=w,
            height=h,
            num_inference_steps=case["steps"],
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            max_sequence_length=t5_max_length,
            output_type="pt",
            callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["latents"],
            **kw,
        ).images
    finally:
        vae_mod.randn_tensor, i2i_mod.randn_tensor = saved["vae"], saved["pipe"]
        del i2i.vae.encode, i2i.prepare_latents  # drop the instance attributes: the class methods show again

    order = [tag for tag, _ in draws]
    if order != ["posterior", "noise"]:
        raise RuntimeError(f"FluxImg2ImgPipeline drew from the generator as {order}, not posterior then noise")
    eps, noise = draws[0][1], draws[1][1]
    hh, ww = 2 * (h // 16), 2 * (w // 16)
    n = 16 * hh * ww
    # The recorded draws are the first and second n values of the seed's stream (see IMG2IMG_NOTES["rng_order"]).
    stream = torch.randn(2 * n, generator=torch.Generator("cpu").manual_seed(case["seed"]))
    assert torch.equal(eps.flatten(), stream[:n]) and torch.equal(noise.flatten(), stream[n:])

    sched = i2i.scheduler
    t_start = int(sched.begin_index)
    sigmas_full = sched.sigmas.float()
    timesteps_full = sched.timesteps.float()
    sample = rec["image_latent_mean"] + rec["image_latent_std"] * eps
    cfg = i2i.vae.config
    image_latents = (sample - cfg.shift_factor) * cfg.scaling_factor
    sigma0 = sigmas_full[t_start]
    x_t = sigma0 * noise + (1.0 - sigma0) * image_latents
    from diffusers import FluxPipeline

    if not torch.equal(FluxPipeline._pack_latents(x_t, 1, 16, hh, ww), rec["x_t_packed"]):
        raise RuntimeError("x_t recomputed from the recorded draws differs from the pipeline's starting latents")
    rec.update({
        "posterior_eps": eps,
        "image_latents_sample": sample,
        "image_latents": image_latents,
        "sigmas_full": sigmas_full,
        "timesteps_full": timesteps_full,
        "sigmas": sigmas_full[t_start:].clone(),
        "timesteps": timesteps_full[t_start:].clone(),
        "noise": noise,
        "x_t": x_t,
        "latents": torch.stack(steps),  # [steps_run, B, S, 64]
        "image": image.float(),
    })
    facts = {"t_start": t_start, "steps_run": len(steps), "mt19937_values_per_draw": torch_randn_mt19937_values(n),
             "noise_mt19937_offset": torch_randn_mt19937_values(n)}
    return {k: v.contiguous() for k, v in rec.items()}, facts


def run_true_cfg_case(pipe, case: dict, t5_max_length: int) -> dict[str, torch.Tensor]:
    """Runs FluxPipeline once with negative_prompt + true_cfg_scale, recording both transformer outputs per step."""
    rec = _text_record(pipe, case["prompt"], t5_max_length)
    rec.update(_text_record(pipe, case["negative_prompt"], t5_max_length, prefix="negative_"))
    calls: list[torch.Tensor] = []
    transformer = pipe.transformer
    saved_forward = transformer.forward

    def recording_forward(*args, **kwargs):
        out = saved_forward(*args, **kwargs)
        calls.append((out[0] if isinstance(out, tuple) else out.sample).clone())
        return out

    saved_prepare = pipe.prepare_latents

    def recording_prepare(*args, **kwargs):
        latents, ids = saved_prepare(*args, **kwargs)
        rec["noise_packed"] = latents.clone()
        return latents, ids

    steps, on_step = _step_recorder()
    transformer.forward = recording_forward
    pipe.prepare_latents = recording_prepare
    try:
        kw = {"guidance_scale": case["guidance"]} if case["guidance"] is not None else {}
        image = pipe(
            case["prompt"],
            negative_prompt=case["negative_prompt"],
            true_cfg_scale=case["true_cfg_scale"],
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
        del transformer.forward, pipe.prepare_latents
    if len(calls) != 2 * case["steps"]:
        raise RuntimeError(f"expected 2 transformer calls per step, got {len(calls)} for {case['steps']} steps")
    h, w = 2 * (case["height"] // 16), 2 * (case["width"] // 16)
    rec.update({
        "noise": torch.randn((1, 16, h, w), generator=torch.Generator("cpu").manual_seed(case["seed"])),
        "sigmas": pipe.scheduler.sigmas.float(),
        "timesteps": pipe.scheduler.timesteps.float(),
        "noise_pred_cond": torch.stack(calls[0::2]),
        "noise_pred_uncond": torch.stack(calls[1::2]),
        "latents": torch.stack(steps),
        "image": image.float(),
    })
    return {k: v.contiguous() for k, v in rec.items()}


def _write_kind(out_dir: Path, kind: str, notes: dict, entries: list[tuple[dict, dict]], log) -> None:
    cases = []
    for case, tensors in entries:
        meta = {k: json.dumps(v) for k, v in case.items()}
        wrote = save_if_changed(tensors, out_dir / f"{case['name']}.safetensors", meta)
        cases.append({**case, "file": f"{case['name']}.safetensors"})
        log(f"golden {out_dir.parent.name}/{kind}/{case['name']}: {'written' if wrote else 'unchanged'}")
    index = {"kind": kind, "notes": notes, "cases": cases}
    write_text_if_changed(out_dir / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")


def write_img2img_goldens(checkpoint_dir: Path, model_goldens_dir: Path, variant: str, t5_max_length: int,
                          inputs_dir: Path | None = None, pipe=None, log=print) -> Path:
    """GOLDENS/<model>/img2img/: FluxImg2ImgPipeline cases; init images in `inputs_dir` (default GOLDENS/inputs)."""
    model_goldens_dir = Path(model_goldens_dir)
    inputs_dir = Path(inputs_dir) if inputs_dir else model_goldens_dir.parent / "inputs"
    out_dir = model_goldens_dir / "img2img"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_init_images(inputs_dir, log=log)
    i2i = img2img_pipeline(pipe or load_pipeline(checkpoint_dir))
    entries = []
    for case in img2img_cases(variant):
        case = {**case, "init_image": os.path.relpath(inputs_dir / init_image_name(case["width"], case["height"]),
                                                       out_dir)}
        tensors, facts = run_img2img_case(i2i, case, t5_max_length,
                                          init_image_pixels(case["width"], case["height"]))
        entries.append(({**case, "t5_max_length": t5_max_length, **facts}, tensors))
    _write_kind(out_dir, "img2img", IMG2IMG_NOTES, entries, log)
    return out_dir


def write_true_cfg_goldens(checkpoint_dir: Path, model_goldens_dir: Path, variant: str, t5_max_length: int,
                           pipe=None, log=print) -> Path:
    """GOLDENS/<model>/true_cfg/: FluxPipeline with a negative prompt and true_cfg_scale."""
    out_dir = Path(model_goldens_dir) / "true_cfg"
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipe or load_pipeline(checkpoint_dir)
    entries = [({**case, "t5_max_length": t5_max_length}, run_true_cfg_case(pipe, case, t5_max_length))
               for case in true_cfg_cases(variant)]
    _write_kind(out_dir, "true_cfg", TRUE_CFG_NOTES, entries, log)
    return out_dir


KINDS = ("txt2img", "img2img", "true_cfg", "lora")


def write_all(checkpoint_dir: Path, model_goldens_dir: Path, variant: str, t5_max_length: int, kinds=KINDS,
              log=print) -> None:
    """Every kind of golden for one model, from one loaded pipeline: txt2img into model_goldens_dir (the original
    layout), img2img, true_cfg and lora (export/lora_goldens.py; LoRA files in tests/data/lora) into its
    subfolders. lora runs last: it loads and then unloads PEFT adapters on the shared pipeline."""
    pipe = load_pipeline(checkpoint_dir)
    if "txt2img" in kinds:
        write_goldens(checkpoint_dir, model_goldens_dir, variant, t5_max_length, log=log, pipe=pipe)
    if "img2img" in kinds:
        write_img2img_goldens(checkpoint_dir, model_goldens_dir, variant, t5_max_length, pipe=pipe, log=log)
    if "true_cfg" in kinds:
        write_true_cfg_goldens(checkpoint_dir, model_goldens_dir, variant, t5_max_length, pipe=pipe, log=log)
    if "lora" in kinds:
        from .lora_goldens import write_lora_goldens

        write_lora_goldens(checkpoint_dir, model_goldens_dir, variant, t5_max_length, pipe=pipe, log=log)
