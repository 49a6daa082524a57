"""Quantization for CPU inference: the transformer's MatMul weights (weight-only), the VAE decoder's Convs (static).

`python -m export quantize MODEL_DIR OUT_DIR --to int8|int4` copies an exported model folder and replaces its
transformer graph:

- int8: `onnxruntime.quantization.quantize_dynamic`, int8 weights per output channel for every MatMul whose
  second input is a weight (`MatMulConstBOnly`; attention's activation x activation MatMuls stay fp32), activations
  quantized on the fly (DynamicQuantizeLinear + MatMulInteger). ~1.65x per transformer step on AVX-512 VNNI CPUs.
- int4: MatMulNBits, 4-bit symmetric blocks of `block_size` along K, `accuracy_level` 4 (int8 compute). Saves
  memory; on x86 CPUs it is not much faster than fp32 (measured: benches/NOTES.md).
- int8-nbits: MatMulNBits with 8 bits (same kernels as int4).

`--vae int8` (alone or with `--to`) quantizes the VAE decoder's convolutions statically
(`onnxruntime.quantization.quantize_static`): int8 weights per output channel, uint8 activations (U8S8), QOperator
format by default (QLinearConv; ~9 % faster than QDQ on ORT 1.31 CPU in one A/B), activation ranges from the
99.999th percentile (default; MinMax and Entropy selectable) over the latents the model itself produces: its own
text encoders and transformer run from onnxruntime on a few prompts and seeds at the calibration size (default 8 at
256x256; ~1-4 min for the bench preset, depending on load). Everything around the convolutions (GroupNorm, SiLU,
the mid-block attention, Resize, the residual Adds) stays fp32. Bench preset, 512x512: the decoded image is 39.0 dB
(percentile) / 37.1 dB (MinMax) from fp32; the decoder runs ~2.5-3x faster on an AVX-512 VNNI CPU (benches/NOTES.md).

Graphs not quantized are hard-linked (or copied) unchanged. The manifest records `precision` and a `quantization`
entry for every quantized graph. Quantize the exported fp32 graph, before any transformer-optimizer fusion
(quantize_dynamic cannot type fused Gelu outputs; `python -m export optimize` fuses after quantizing).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from . import manifest as mf
from . import ort_flow as flow
from .checkpoint import ExportError
from .graph_io import const_value, cpu_session, save_graph

METHODS = ("int8", "int4", "int8-nbits")
VAE_METHODS = ("int8",)
VAE_FORMATS = ("qoperator", "qdq")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Prompts for the VAE calibration latents (seed i+1 for prompt i); the benchmarks use other prompts and seed 0.
CALIBRATION_PROMPTS = (
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old man with a beard, studio lighting",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table",
    "city skyline at night, neon lights",
    "a dog running on the beach",
    "abstract geometric pattern, blue and gold",
    "a forest in autumn fog",
)


def _link_or_copy(src: Path, dst: Path) -> None:
    # External data is copied: onnx (1.19+) refuses to load a data file with several hard links ("hardlink attack").
    if src.suffix in (".data", ".onnx_data"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    for p in src.iterdir():
        if p.name in skip:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            _link_or_copy(p, dst / p.name)


@contextmanager
def derived_model(model_dir: Path, out_dir: Path, manifest: dict, replaced: set[str], force: bool, source_key: str,
                  log=print):
    """A new model folder made from model_dir: yields a staging folder holding every file except `replaced` (the
    graph files the caller writes) and the manifest; on success writes `manifest` (renamed after out_dir, with
    source[source_key] = model_dir's name) and moves the staging folder to out_dir. out_dir may be model_dir."""
    from .run import commit_out_dir, prepare_out_dir

    in_place = out_dir.resolve() == model_dir.resolve()
    staging = prepare_out_dir(out_dir, force or in_place)
    try:
        t0 = time.time()
        _copy_tree(model_dir, staging, replaced | {"manifest.json"})
        yield staging
        if not in_place:
            manifest["name"] = out_dir.name
        manifest.setdefault("source", {})[source_key] = model_dir.name
        mf.write(staging, manifest)
        commit_out_dir(staging, out_dir)
        log(f"wrote {out_dir} in {time.time() - t0:.1f}s")
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def signed_permutation_matmuls(model) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant signed permutation matrix (one nonzero, +-1, in
    every row and column)."""
    import numpy as np

    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name: i for i in model.graph.initializer}
    names = []
    for n in model.graph.node:
        b = const_value(producers, initializers, n.input[1]) if n.op_type == "MatMul" else None
        if b is not None and b.ndim == 2 and b.shape[0] == b.shape[1] and np.isin(b, (-1, 0, 1)).all() \
                and (np.abs(b).sum(0) == 1).all() and (np.abs(b).sum(1) == 1).all():
            names.append(n.name)
    return names


def quantize_graph(src: Path, dst: Path, method: str, block_size: int = 32, accuracy_level: int = 4) -> dict:
    """Quantizes one ONNX graph file; returns what the manifest records about it."""
    import onnx

    if method not in METHODS:
        raise ExportError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    model = onnx.load(str(src), load_external_data=True)
    n_matmul = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    inits = {i.name for i in model.graph.initializer}
    n_weight = sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    info: dict = {"method": method, "matmuls": n_matmul, "weight_matmuls": n_weight}
    # RoPE's pair swap (wrappers.pair_swap) is a MatMul with a constant too, but quantizing it would only round the
    # rotated activations: it stays float.
    keep_float = signed_permutation_matmuls(model)
    info["kept_float"] = len(keep_float)
    tmp = dst.with_name(dst.name + ".tmp.onnx")
    if method == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            model,
            str(tmp),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
            nodes_to_exclude=keep_float,
        )
        out = onnx.load(str(tmp), load_external_data=True)
        info.update({"weight_type": "int8", "per_channel": True, "activations": "dynamic uint8"})
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        bits = 4 if method == "int4" else 8
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",),
                                 nodes_to_exclude=keep_float)
        q.process()
        out = q.model.model
        info.update({"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level, "symmetric": True})
    quantized = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits"}
    info["quantized_nodes"] = sum(1 for n in out.graph.node if n.op_type in quantized)
    if info["quantized_nodes"] == 0:
        raise ExportError(f"{src.name}: no MatMul was quantized ({n_matmul} MatMuls, {n_weight} with weights)")
    for p in (tmp, Path(str(tmp) + ".data")):
        if p.exists():
            p.unlink()
    info["external_data"] = save_graph(out, dst)
    return info


def calibration_latents(model_dir: Path, manifest: dict, count: int = 8, size: int = 256, steps: int | None = None,
                        log=print, first: int = 0) -> list:
    """The VAE decoder's inputs (scaled and shifted latents) that this model's own pipeline produces for `count`
    calibration prompts at size x size: text encoders and transformer run from onnxruntime, fluxrt's schedule."""
    import numpy as np
    import torch

    if size <= 0 or size % 16:
        raise ExportError(f"calibration size {size} is not a positive multiple of 16")
    if count < 1:
        raise ExportError("the VAE calibration needs at least one latent (--vae-calibration-count >= 1)")
    sess = {g: cpu_session(model_dir / manifest["graphs"][g]["file"]) for g in ("clip", "t5", "transformer")}
    np_types = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}
    toks = flow.tokenizers(model_dir, manifest)
    has_guidance = any(i.name == "guidance" for i in sess["transformer"].get_inputs())
    guidance = manifest["defaults"].get("guidance") or 3.5
    n = steps or manifest["defaults"].get("steps") or 4
    c = manifest["latent_channels"]
    lh = lw = 2 * (size // 16)
    sig = flow.sigmas(manifest["scheduler"], n, (lh // 2) * (lw // 2))
    img_ids = flow.img_ids(lh, lw)
    out = []
    t0 = time.time()
    for i in range(first, first + count):
        prompt = CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)]
        enc = {}
        for g in ("clip", "t5"):
            inp = sess[g].get_inputs()[0]
            enc[g] = {inp.name: np.asarray([toks[g].encode(prompt).ids], dtype=np_types.get(inp.type, np.int64))}
        pooled = sess["clip"].run(["pooled_embeddings"], enc["clip"])[0]
        txt = sess["t5"].run(["text_embeddings"], enc["t5"])[0]
        gen = torch.Generator("cpu").manual_seed(i + 1)
        x = flow.pack(torch.randn((1, c, lh, lw), generator=gen, dtype=torch.float32).numpy())
        for j in range(n):
            feeds = {"hidden_states": x, "encoder_hidden_states": txt, "pooled_projections": pooled,
                     "timestep": np.full((1,), sig[j], np.float32), "img_ids": img_ids,
                     "txt_ids": np.zeros((txt.shape[1], 3), np.float32)}
            if has_guidance:
                feeds["guidance"] = np.full((1,), guidance, np.float32)
            x = x + (sig[j + 1] - sig[j]) * sess["transformer"].run(["latent"], feeds)[0]
        out.append(flow.vae_input(flow.unpack(x, c, lh, lw), manifest["vae"]))
    log(f"calibration latents: {count} at {size}x{size}, {n} steps, {time.time() - t0:.1f}s")
    return out


def quantize_vae_graph(src: Path, dst: Path, latents: list, fmt: str = "qoperator", calibration: str = "percentile",
                       exclude: tuple[str, ...] = ()) -> dict:
    """Static int8 quantization of one VAE decoder graph's Convs (U8S8, per-channel weights); returns what the
    manifest records. `exclude`: Conv node names to keep fp32 ("first" / "last" name the input and output Convs)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if fmt not in VAE_FORMATS:
        raise ExportError(f"unknown VAE quantization format {fmt!r}; choose one of {', '.join(VAE_FORMATS)}")
    if calibration not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    graph = onnx.load(str(src), load_external_data=False)
    convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
    if not convs:
        raise ExportError(f"{src.name}: no Conv to quantize")
    alias = {"first": convs[0], "last": convs[-1]}
    excluded = [alias.get(x, x) for x in exclude]
    unknown = [x for x in excluded if x not in convs]
    if unknown:
        raise ExportError(f"{src.name}: no Conv named {', '.join(unknown)}")
    input_name = graph.graph.input[0].name
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.graph.initializer)
    del graph

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(latents)

        def get_next(self):
            z = next(self.it, None)
            return None if z is None else {input_name: z}

    tmp = dst.with_name(dst.name + ".tmp.onnx")
    quantize_static(str(src), str(tmp), Reader(),
                    quant_format=QuantFormat.QOperator if fmt == "qoperator" else QuantFormat.QDQ,
                    op_types_to_quantize=["Conv"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=external,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[calibration])
    out = onnx.load(str(tmp), load_external_data=True)
    for p in (tmp, Path(str(tmp) + ".data")):
        if p.exists():
            p.unlink()
    if fmt == "qoperator":
        n_q = sum(1 for n in out.graph.node if n.op_type == "QLinearConv")
    else:
        dq = {o for n in out.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        n_q = sum(1 for n in out.graph.node if n.op_type == "Conv" and n.input[0] in dq)
    if n_q == 0:
        raise ExportError(f"{src.name}: no Conv was quantized ({len(convs)} Convs)")
    info = {"method": "int8", "scheme": "static", "format": fmt, "op_types": ["Conv"], "convs": len(convs),
            "quantized_nodes": n_q, "excluded": excluded, "weight_type": "int8", "per_channel": True,
            "activations": "static uint8", "calibration": {"method": calibration, "latents": len(latents),
                                                            "shape": list(latents[0].shape)}}
    info["external_data"] = save_graph(out, dst)
    return info


def _record(entry: dict, info: dict, precision: str, staging: Path) -> int:
    """Writes a quantized graph's manifest entry (precision, external data, the quantizer's record); returns the
    bytes its files take in the staging folder."""
    entry["external_data"] = info.pop("external_data")
    entry["precision"] = precision
    entry["quantization"] = info
    return sum(p.stat().st_size for p in staging.iterdir() if p.name.startswith(entry["file"]))


def quantize_model(model_dir: Path, out_dir: Path, method: str | None, force: bool = False, block_size: int = 32,
                   accuracy_level: int = 4, graphs: tuple[str, ...] = ("transformer",), log=print,
                   vae: str | None = None, vae_format: str = "qoperator", calibration: str = "percentile",
                   calibration_count: int = 8, calibration_size: int = 256, vae_exclude: tuple[str, ...] = ()) -> dict:
    """Writes out_dir: model_dir with its transformer quantized (method) and/or its VAE decoder (vae="int8").
    out_dir == model_dir quantizes in place."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if method is None and vae is None:
        raise ExportError("nothing to quantize: pass --to (transformer) and/or --vae (VAE decoder)")
    if method is not None and method not in METHODS:
        raise ExportError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if vae is not None and vae not in VAE_METHODS:
        raise ExportError(f"unknown VAE quantization {vae!r}; choose one of {', '.join(VAE_METHODS)}")
    if vae is not None and vae_format not in VAE_FORMATS:
        raise ExportError(f"unknown VAE quantization format {vae_format!r}; choose one of {', '.join(VAE_FORMATS)}")
    if vae is not None and calibration not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    mf_path = model_dir / "manifest.json"
    if not mf_path.is_file():
        raise ExportError(f"{model_dir} has no manifest.json; pass a model folder written by python -m export")
    manifest = json.loads(mf_path.read_text())
    graphs = tuple(graphs) if method is not None else ()
    todo = graphs + (("vae_decoder",) if vae is not None else ())
    for g in todo:
        entry = manifest.get("graphs", {}).get(g)
        if entry is None:
            raise ExportError(f"{model_dir} has no {g} graph to quantize")
        if entry.get("precision") != "fp32":
            raise ExportError(f"{model_dir}: the {g} graph is {entry.get('precision')}; quantize an fp32 export")
    if vae is not None:
        missing = [g for g in ("clip", "t5", "transformer") if g not in manifest.get("graphs", {})]
        if missing:
            raise ExportError(f"{model_dir} lacks {', '.join(missing)}: the VAE calibration runs the whole pipeline")
    if vae is not None and vae_exclude:
        import onnx

        vae_graph = onnx.load(str(model_dir / manifest["graphs"]["vae_decoder"]["file"]), load_external_data=False)
        convs = {n.name for n in vae_graph.graph.node if n.op_type == "Conv"} | {"first", "last"}
        unknown = [x for x in vae_exclude if x not in convs]
        if unknown:
            raise ExportError(f"{model_dir}: the VAE decoder has no Conv named {', '.join(unknown)}")
    skip = {manifest["graphs"][g]["file"] for g in todo}
    skip |= {manifest["graphs"][g].get("external_data") for g in todo} - {None}
    with derived_model(model_dir, out_dir, manifest, skip, force, "quantized_from", log) as staging:
        for g in graphs:
            entry = manifest["graphs"][g]
            src = model_dir / entry["file"]
            t = time.time()
            info = quantize_graph(src, staging / entry["file"], method, block_size, accuracy_level)
            size = _record(entry, info, method, staging)
            log(f"quantized {g} to {method}: {info['quantized_nodes']} nodes, {size / 1e6:.1f} MB, "
                f"{time.time() - t:.1f}s")
        if vae is not None:
            entry = manifest["graphs"]["vae_decoder"]
            t = time.time()
            # Calibrate on what the source folder's own pipeline produces (its transformer, fp32 or quantized).
            latents = calibration_latents(model_dir, manifest, calibration_count, calibration_size, log=log)
            info = quantize_vae_graph(model_dir / entry["file"], staging / entry["file"], latents, vae_format,
                                      calibration, tuple(vae_exclude))
            info["calibration"]["size"] = calibration_size
            size = _record(entry, info, vae, staging)
            log(f"quantized vae_decoder to {vae} ({vae_format}, {calibration} calibration): "
                f"{info['quantized_nodes']} of {info['convs']} Convs, {size / 1e6:.1f} MB, {time.time() - t:.1f}s")
    return manifest
