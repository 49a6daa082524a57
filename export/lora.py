"""Fuse Flux LoRA safetensors into the weights before export (`python -m export CKPT OUT --lora FILE:SCALE`).

The loading and fusing is diffusers' own: `FluxPipeline.load_lora_weights` then `fuse_lora(lora_scale=SCALE)` and
`unload_lora_weights()` (which keeps the fused weights), one LoRA after another, on a FluxPipeline holding the
checkpoint's transformer (and CLIP text encoder, when that graph is exported and the LoRA has CLIP layers).
Accepted key namings are those diffusers' FluxLoraLoaderMixin.lora_state_dict converts: diffusers/PEFT
(`transformer.<module>.lora_A.weight` / `lora_B.weight`, optional `.alpha`) and kohya / sd-scripts as BFL-style
trainers write it (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `lora_up.weight` / `alpha`, CLIP
layers as `lora_te1_*`), plus the other variants that function recognises.

What this module adds around diffusers:
- clear one-line errors (ExportError, exit code 2) for a missing, unreadable or malformed file, a file with no LoRA
  keys, a LoRA whose layers this model does not have, and a shape mismatch (naming the layer and both shapes);
  diffusers would instead warn and skip unknown layers, or silently zero-pad / expand a layer whose shape differs;
- kohya `lora_unet_single_blocks_N_linear1` (fused q, k, v and MLP-in of a single block) is split with the split
  sizes of THIS model; diffusers hard-codes FLUX.1's [3072, 3072, 3072, 12288] and fails on smaller models. The
  arithmetic is diffusers' own (`_convert_to_ai_toolkit_cat`: alpha folded in as scale_down / scale_up, the
  block-diagonal "sparse" case chunked) and gives the same tensors for FLUX.1 itself;
- kohya input/output layers (img_in, txt_in, time_in, vector_in, guidance_in, final_layer) are fused: diffusers
  0.42.1 converts them to keys without the `transformer.` prefix and then drops them without a word, and it ignores
  the alpha of the final_layer ones; here they get the prefix and their alpha like every other layer;
- a random LoRA for a (tiny) transformer in either naming, for tests (`make_random_lora`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ExportError

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
_KOHYA_LINEAR1 = re.compile(r"^lora_unet_single_blocks_(\d+)_linear1\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_spec(text: str) -> LoraSpec:
    """`FILE:SCALE` (SCALE a finite number, may be negative) or just `FILE` (scale 1.0)."""
    path, sep, scale = str(text).rpartition(":")
    if sep and path:
        try:
            value = float(scale)
        except ValueError:
            value = None
        if value is not None:
            if not math.isfinite(value):
                raise ExportError(f"--lora {text}: the scale must be a finite number")
            return LoraSpec(Path(path), value)
    return LoraSpec(Path(text), 1.0)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA .safetensors file; ExportError for anything a user must fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ExportError(f"LoRA file {path} does not exist (pass --lora FILE:SCALE)")
    if not path.is_file():
        raise ExportError(f"LoRA file {path} is not a file")
    try:
        with open(path, "rb"):
            pass
        sd = load_file(str(path))
    except OSError as e:
        raise ExportError(f"cannot read LoRA file {path}: {e.strerror or e}") from e
    except (SafetensorError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"LoRA file {path} is not a valid safetensors file ({first})") from e
    if not sd:
        raise ExportError(f"LoRA file {path} holds no tensors")
    if not any(k.endswith((LORA_A, LORA_B, ".lora_down.weight", ".lora_up.weight")) for k in sd):
        raise ExportError(f"LoRA file {path} has no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys, e.g. "
                          f"{sorted(sd)[0]!r}); it is not a LoRA")
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise ExportError(f"LoRA file {path}: tensor {bad[0]!r} is {sd[bad[0]].dtype}, not floating point")
    if any("dora_scale" in k for k in sd):
        raise ExportError(f"LoRA file {path} is a DoRA (has dora_scale keys); diffusers cannot fuse those")
    return sd


def naming(sd: dict) -> str:
    return "kohya" if any(".lora_down.weight" in k for k in sd) else "diffusers"


# ------------------------------------------------------------------ key conversion and checks


def _single_block_dims(transformer, i: int) -> list[int] | None:
    blocks = getattr(transformer, "single_transformer_blocks", None)
    if blocks is None or i >= len(blocks):
        return None
    b = blocks[i]
    return [b.attn.to_q.out_features, b.attn.to_k.out_features, b.attn.to_v.out_features, b.proj_mlp.out_features]


def _split_kohya_linear1(sd: dict, transformer, path: Path) -> tuple[dict, list[str]]:
    """Pops the kohya single-block linear1 LoRAs out of `sd`; returns them in diffusers naming (split with this
    model's sizes, exactly as diffusers' _convert_to_ai_toolkit_cat does) and the blocks this model lacks."""
    out, missing = {}, []
    blocks = sorted({int(m.group(1)) for k in sd if (m := _KOHYA_LINEAR1.match(k))})
    for i in blocks:
        key = f"lora_unet_single_blocks_{i}_linear1"
        if f"{key}.lora_down.weight" not in sd or f"{key}.lora_up.weight" not in sd:
            raise ExportError(f"LoRA file {path}: {key} lacks its lora_down or lora_up weight")
        down = sd.pop(f"{key}.lora_down.weight")
        up = sd.pop(f"{key}.lora_up.weight")
        rank = down.shape[0]
        alpha = sd.pop(f"{key}.alpha", torch.tensor(rank, dtype=down.dtype))
        dims = _single_block_dims(transformer, i)
        if dims is None:
            missing.append(f"single_transformer_blocks.{i} (kohya {key})")
            continue
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank:
            raise ExportError(f"LoRA file {path}: {key} has lora_down {list(down.shape)} and lora_up "
                              f"{list(up.shape)}, which are not a rank-{rank} pair of matrices")
        width = transformer.single_transformer_blocks[i].attn.to_q.in_features
        if up.shape[0] != sum(dims) or down.shape[1] != width:
            raise ExportError(
                f"LoRA file {path} does not fit layer single_transformer_blocks.{i} linear1 (q, k, v, mlp-in): "
                f"this model's fused weight is [{sum(dims)}, {width}], the LoRA's update is "
                f"[{up.shape[0]}, {down.shape[1]}] (kohya {key}); it was made for another model")
        scale = alpha / rank
        scale_down, scale_up = scale, 1.0
        while scale_down * 2 < scale_up:
            scale_down *= 2
            scale_up /= 2
        down, up = down * scale_down, up * scale_up
        names = [f"transformer.single_transformer_blocks.{i}.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                            "proj_mlp")]
        sparse = False
        if rank % len(names) == 0:
            r = rank // len(names)
            sparse, row = True, 0
            for j, dj in enumerate(dims):
                for k in range(len(dims)):
                    if j != k:
                        sparse = sparse and bool(torch.all(up[row:row + dj, k * r:(k + 1) * r] == 0))
                row += dj
        if not sparse:
            for name, part in zip(names, torch.split(up, dims, dim=0)):
                out[name + LORA_A] = down
                out[name + LORA_B] = part
        else:
            row = 0
            for j, (name, part) in enumerate(zip(names, torch.chunk(down, len(names), dim=0))):
                out[name + LORA_A] = part
                out[name + LORA_B] = up[row:row + dims[j], j * r:(j + 1) * r].contiguous()
                row += dims[j]
    return out, missing


def _fold_final_layer_alphas(sd: dict) -> None:
    """diffusers 0.42.1 drops the alpha of kohya final_layer LoRAs (it converts them without alpha / rank); fold it
    into lora_down / lora_up here the way diffusers does for every other layer, so they scale like the rest."""
    for key in [k for k in sd if k.startswith("lora_unet_final_layer_") and k.endswith(".alpha")]:
        base = key[: -len(".alpha")]
        alpha = sd.pop(key)
        if f"{base}.lora_down.weight" not in sd or f"{base}.lora_up.weight" not in sd:
            continue
        down = sd[f"{base}.lora_down.weight"]
        scale = alpha / down.shape[0]
        scale_down, scale_up = scale, 1.0
        while scale_down * 2 < scale_up:
            scale_down *= 2
            scale_up /= 2
        sd[f"{base}.lora_down.weight"] = down * scale_down
        sd[f"{base}.lora_up.weight"] = sd[f"{base}.lora_up.weight"] * scale_up


def to_diffusers(sd: dict, transformer, path: Path) -> tuple[dict, list[str]]:
    """The LoRA in diffusers naming (`transformer.*` / `text_encoder.*` keys, kohya alphas folded in), as diffusers'
    FluxPipeline.lora_state_dict converts it; plus the layers that name blocks this model does not have."""
    from diffusers import FluxPipeline

    sd = dict(sd)
    missing: list[str] = []
    pre = {}
    if naming(sd) == "kohya":
        pre, missing = _split_kohya_linear1(sd, transformer, path)
        _fold_final_layer_alphas(sd)
    elif not any(k.startswith(("transformer.", "text_encoder.")) for k in sd):
        # PEFT's own save format has no component prefix; it can only be the transformer's.
        sd = {f"transformer.{k}": v for k, v in sd.items()}
    if sd:
        try:
            out = FluxPipeline.lora_state_dict(sd, return_alphas=True)
        except (ValueError, KeyError, AssertionError, NotImplementedError, RuntimeError, IndexError) as e:
            first = str(e).strip().splitlines() if str(e).strip() else [type(e).__name__]
            detail = " ".join(line.strip() for line in first if line.strip())[:300]
            raise ExportError(f"LoRA file {path} has keys diffusers cannot map to Flux layers ({detail}); it was "
                              "made for another model or trainer") from e
        converted, alphas = out[0], out[1] or {}
    else:
        converted, alphas = {}, {}
    # diffusers 0.42.1 converts kohya img_in / txt_in / time_in / vector_in / guidance_in / final_layer LoRAs to
    # keys without the `transformer.` prefix, which its load_lora_weights then drops without a word; they are the
    # transformer's, so they get the prefix here and are fused like every other layer.
    converted = {(k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}"): v
                 for k, v in converted.items()}
    # CLIP layers in PEFT naming (q_proj.lora_A, fc1.lora_B, ...): diffusers' own text-encoder conversion only maps
    # its old `to_q_lora.down` names when the file also has `to_out_lora` ones, and otherwise skips those layers.
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT

    def peft_name(k: str) -> str:
        for old, new in DIFFUSERS_OLD_TO_PEFT.items():
            k = k.replace(old, new)
        return k

    converted = {(peft_name(k) if k.startswith("text_encoder.") else k): v for k, v in converted.items()}
    converted = {**converted, **pre}
    for k, v in alphas.items():  # diffusers naming with `.alpha` keys: kept for load_lora_weights
        converted[k] = torch.as_tensor(v)
    return converted, missing


def _pairs(sd: dict, prefix: str, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mods: dict[str, dict] = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        for suffix, which in ((LORA_A, "A"), (LORA_B, "B")):
            if k.endswith(suffix):
                mods.setdefault(k[len(prefix):-len(suffix)], {})[which] = v
    out = {}
    for name, ab in mods.items():
        if set(ab) != {"A", "B"}:
            lacking = "lora_B" if "A" in ab else "lora_A"
            raise ExportError(f"LoRA file {path}: layer {name} has no {lacking} weight; the file is incomplete")
        out[name] = (ab["A"], ab["B"])
    return out


def _check_layers(pairs: dict, model, path: Path, what: str, clip_names: bool = False) -> tuple[dict, list]:
    """({lora module name: model module path}, [names the model lacks]); ExportError on a shape mismatch."""
    modules = dict(model.named_modules())
    found, missing = {}, []
    for name, (a, b) in sorted(pairs.items()):
        # CLIP LoRAs may or may not carry `text_model.`; transformers 5's CLIPTextModel has no such level
        candidates = (name, name.removeprefix("text_model."), f"text_model.{name}") if clip_names else (name,)
        target = next((c for c in candidates if c in modules), None)
        if target is None:
            missing.append(name)
            continue
        layer = modules[target]
        if not isinstance(layer, torch.nn.Linear):
            raise ExportError(f"LoRA file {path}: {what} layer {name} is a {type(layer).__name__}, not a Linear "
                              "layer diffusers can fuse a LoRA into")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ExportError(f"LoRA file {path}: {what} layer {name} has lora_A {list(a.shape)} and lora_B "
                              f"{list(b.shape)}, which are not a low-rank pair of matrices")
        want = (layer.out_features, layer.in_features)
        if (b.shape[0], a.shape[1]) != want:
            raise ExportError(
                f"LoRA file {path} does not fit {what} layer {name}: the layer's weight is [{want[0]}, {want[1]}], "
                f"the LoRA's update is [{b.shape[0]}, {a.shape[1]}] (lora_B {list(b.shape)} x lora_A "
                f"{list(a.shape)}); it was made for another model")
        found[name] = target
    return found, missing


def check_fits(sd: dict, transformer, clip, path: Path, missing: list[str]) -> tuple[dict, dict]:
    """Checks every layer of the converted LoRA against the model; returns ({transformer layers}, {CLIP layers})."""
    tr, tr_missing = _check_layers(_pairs(sd, "transformer.", path), transformer, path, "transformer")
    te_sd = {k: v for k, v in sd.items() if k.startswith("text_encoder.")}
    te, te_missing = {}, []
    if te_sd and clip is not None:
        odd = [k for k in te_sd if not k.endswith((LORA_A, LORA_B, ".alpha"))]
        if odd:
            raise ExportError(f"LoRA file {path}: CLIP key {odd[0]!r} is in a form diffusers cannot load")
        te, te_missing = _check_layers(_pairs(te_sd, "text_encoder.", path), clip, path, "CLIP text encoder",
                                       clip_names=True)
    missing = list(missing) + tr_missing + [f"text_encoder.{m}" for m in te_missing]
    if missing:
        n_blocks = len(getattr(transformer, "transformer_blocks", []))
        n_single = len(getattr(transformer, "single_transformer_blocks", []))
        total = len(tr) + len(te) + len(missing)
        which = "matches no layer of this model" if not (tr or te) else \
            f"has {len(missing)} of its {total} layers that this model lacks"
        raise ExportError(
            f"LoRA file {path} {which} (e.g. {missing[0]}; this transformer has {n_blocks} double and {n_single} "
            "single blocks); it was made for another model")
    if not tr and not te:
        raise ExportError(f"LoRA file {path} has no layer for the exported graphs (its layers are for the CLIP text "
                          "encoder, which is not exported here)" if te_sd else
                          f"LoRA file {path} has no transformer layers diffusers can load")
    return tr, te


# ------------------------------------------------------------------ fusing


def precheck(specs: list[LoraSpec], components: list[str]) -> None:
    """The checks that need no model: the transformer graph is exported, and every file reads as a LoRA."""
    if specs and "transformer" not in components:
        raise ExportError("--lora needs the transformer graph; add transformer to --components")
    for spec in specs:
        read_lora_file(spec.path)


def fuse_loras(parts, specs: list[LoraSpec], log=print) -> list[dict]:
    """Fuses each LoRA (scaled) into parts.transformer (and parts.clip) in place, in order; returns what the
    manifest's source section records about each."""
    if not specs:
        return []
    transformer = parts.transformer
    if not isinstance(transformer, torch.nn.Module):
        raise ExportError("--lora needs the transformer graph; add transformer to --components")
    # Read and check every file first, so a bad one fails before any weight changes.
    prepared = []
    for spec in specs:
        raw = read_lora_file(spec.path)
        sd, missing = to_diffusers(raw, transformer, spec.path)
        tr, te = check_fits(sd, transformer, parts.clip, spec.path, missing)
        if any(k.startswith("text_encoder.") for k in sd) and not te:
            log(f"LoRA {spec.path.name}: its CLIP text-encoder layers are skipped (the clip graph is not exported)")
            sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
        prepared.append((spec, raw, sd, tr, te))

    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlogging
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=parts.clip, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    records = []
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        for i, (spec, raw, sd, tr, te) in enumerate(prepared):
            adapter = f"fluxrt_lora_{i}"
            try:
                pipe.load_lora_weights(sd, adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExportError(f"diffusers cannot load LoRA file {spec.path}: {first}") from e
            for model, layers, what in ((transformer, tr, "transformer"), (parts.clip, te, "CLIP")):
                for name, target in layers.items():
                    layer = model.get_submodule(target)
                    if not (isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "lora_A", {})):
                        raise ExportError(f"diffusers did not load LoRA layer {name} of {spec.path} into the {what}")
            pipe.fuse_lora(components=["transformer"] + (["text_encoder"] if te else []), lora_scale=spec.scale,
                           adapter_names=[adapter])
            pipe.unload_lora_weights()  # keeps the fused weights; the modules are plain Linear layers again
            records.append({"file": spec.path.name, "sha256": sha256(spec.path), "scale": spec.scale,
                            "naming": naming(raw), "transformer_layers": len(tr), "clip_layers": len(te)})
            log(f"fused LoRA {spec.path.name} x {spec.scale:g} ({naming(raw)} naming): {len(tr)} transformer layers"
                + (f", {len(te)} CLIP layers" if te else ""))
    finally:
        dlogging.set_verbosity(verbosity)
    leftovers = [n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)]
    if leftovers:
        raise ExportError(f"LoRA layers were left unfused in the transformer ({leftovers[0]})")
    return records


# ------------------------------------------------------------------ random LoRAs for tests


def _kohya_targets(transformer, single_linear1: bool, top_level: bool, blocks: bool = True,
                   all_top_level: bool = False) -> list[tuple[str, list[str]]]:
    """(kohya name, the diffusers modules it covers, in order) for every block layer of this model (when blocks),
    plus the input and output layers when top_level; all_top_level adds time_in's out layer, vector_in and (models
    with a guidance embedder) guidance_in."""
    out = []
    for i, _ in enumerate(transformer.transformer_blocks if blocks else []):
        d = f"transformer_blocks.{i}"
        for side, attn, proj, ff, mod in (("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
                                           ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                                            "ff_context", "norm1_context")):
            k = f"lora_unet_double_blocks_{i}_{side}"
            out += [(f"{k}_attn_qkv", [f"{d}.attn.{a}" for a in attn]),
                    (f"{k}_attn_proj", [f"{d}.attn.{proj}"]),
                    (f"{k}_mlp_0", [f"{d}.{ff}.net.0.proj"]),
                    (f"{k}_mlp_2", [f"{d}.{ff}.net.2"]),
                    (f"{k}_mod_lin", [f"{d}.{mod}.linear"])]
    for i, _ in enumerate(transformer.single_transformer_blocks if blocks else []):
        s = f"single_transformer_blocks.{i}"
        k = f"lora_unet_single_blocks_{i}"
        if single_linear1:
            out.append((f"{k}_linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"]))
        out += [(f"{k}_linear2", [f"{s}.proj_out"]), (f"{k}_modulation_lin", [f"{s}.norm.linear"])]
    if top_level:
        out += [("lora_unet_img_in", ["x_embedder"]), ("lora_unet_txt_in", ["context_embedder"]),
                ("lora_unet_time_in_in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
                ("lora_unet_final_layer_linear", ["proj_out"]),
                ("lora_unet_final_layer_adaLN_modulation_1", ["norm_out.linear"])]
    if all_top_level:
        emb = "time_text_embed"
        out += [("lora_unet_time_in_out_layer", [f"{emb}.timestep_embedder.linear_2"]),
                ("lora_unet_vector_in_in_layer", [f"{emb}.text_embedder.linear_1"]),
                ("lora_unet_vector_in_out_layer", [f"{emb}.text_embedder.linear_2"])]
        if hasattr(transformer.time_text_embed, "guidance_embedder"):
            out += [("lora_unet_guidance_in_in_layer", [f"{emb}.guidance_embedder.linear_1"]),
                    ("lora_unet_guidance_in_out_layer", [f"{emb}.guidance_embedder.linear_2"])]
    return out


def diffusers_targets(transformer) -> list[str]:
    """Every Linear layer of the blocks plus the embedders and output layers: what make_random_lora targets."""
    return [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and (n.startswith(("transformer_blocks.", "single_transformer_blocks."))
                 or n in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear"))]


def make_random_lora(transformer, path: Path, naming: str = "diffusers", rank: int = 4, seed: int = 0,
                     single_linear1: bool = True, top_level: bool = True, up_std: float = 0.2,
                     blocks: bool = True, all_top_level: bool = False, targets: list[str] | None = None) -> Path:
    """Writes a random LoRA for `transformer` (fixed seed): `naming` "diffusers" (transformer.X.lora_A/B, no alpha)
    or "kohya" (lora_unet_*.lora_down/lora_up/alpha with alpha = rank / 2, fused qkv and linear1 layers).
    lora_up/lora_B are random too (trained-looking), so the LoRA visibly changes the model. Kohya files without
    single_linear1 and top_level hold only layers that diffusers 0.42.1 itself loads on a non-FLUX.1-sized model.
    Other layer sets (the defaults keep the files above unchanged): `targets` lists the diffusers modules of a
    diffusers file; for kohya, blocks=False leaves the block layers out and all_top_level adds the remaining
    embedder layers (time_in out, vector_in, guidance_in)."""
    from safetensors.torch import save_file

    g = torch.Generator("cpu").manual_seed(seed)
    modules = dict(transformer.named_modules())
    sd: dict[str, torch.Tensor] = {}
    if naming == "diffusers":
        for name in targets if targets is not None else diffusers_targets(transformer):
            m = modules[name]
            sd[f"transformer.{name}{LORA_A}"] = torch.randn(rank, m.in_features, generator=g) / math.sqrt(m.in_features)
            sd[f"transformer.{name}{LORA_B}"] = torch.randn(m.out_features, rank, generator=g) * up_std
    elif naming == "kohya":
        for kname, covered in _kohya_targets(transformer, single_linear1, top_level, blocks, all_top_level):
            mods = [modules[t] for t in covered]
            fan_in = mods[0].in_features
            out_features = sum(m.out_features for m in mods)
            sd[f"{kname}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
            sd[f"{kname}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * up_std
            sd[f"{kname}.alpha"] = torch.tensor(rank / 2, dtype=torch.float32)
    else:
        raise ValueError(f"naming must be 'diffusers' or 'kohya', not {naming!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
