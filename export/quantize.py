"""Weight-only quantization of the transformer's MatMuls, for CPU inference.

`python -m export quantize MODEL_DIR OUT_DIR --to int8|int4` copies an exported model folder and replaces its
transformer graph:

- int8: `onnxruntime.quantization.quantize_dynamic`, int8 weights per output channel for every MatMul whose
  second input is a weight (`MatMulConstBOnly`; attention's activation x activation MatMuls stay fp32), activations
  quantized on the fly (DynamicQuantizeLinear + MatMulInteger). ~1.65x per transformer step on AVX-512 VNNI CPUs.
- int4: MatMulNBits, 4-bit symmetric blocks of `block_size` along K, `accuracy_level` 4 (int8 compute). Saves
  memory; on x86 CPUs it is not much faster than fp32 (EXPORT_NOTES).
- int8-nbits: MatMulNBits with 8 bits (same kernels as int4).

Only the transformer is touched; the other graphs are hard-linked (or copied) unchanged. The manifest records
`precision` and a `quantization` entry for the transformer. Quantize the exported fp32 graph, before any
transformer-optimizer fusion (quantize_dynamic cannot type fused Gelu outputs).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import manifest as mf
from .checkpoint import ExportError

METHODS = ("int8", "int4", "int8-nbits")
# Graphs this large (bytes) are saved with their weights in one external data file.
EXTERNAL_DATA_BYTES = 1_900_000_000


def _link_or_copy(src: Path, dst: Path) -> None:
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
        )
        out = onnx.load(str(tmp), load_external_data=True)
        info.update({"weight_type": "int8", "per_channel": True, "activations": "dynamic uint8"})
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        bits = 4 if method == "int4" else 8
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
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
    data = dst.name + ".data"
    if (dst.parent / data).exists():
        (dst.parent / data).unlink()
    if out.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(out, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=1024)
        info["external_data"] = data
    else:
        onnx.save_model(out, str(dst))
        info["external_data"] = None
    return info


def quantize_model(model_dir: Path, out_dir: Path, method: str, force: bool = False, block_size: int = 32,
                   accuracy_level: int = 4, graphs: tuple[str, ...] = ("transformer",), log=print) -> dict:
    """Writes out_dir: model_dir with its transformer quantized. out_dir == model_dir quantizes in place."""
    from .run import commit_out_dir, prepare_out_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if method not in METHODS:
        raise ExportError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    mf_path = model_dir / "manifest.json"
    if not mf_path.is_file():
        raise ExportError(f"{model_dir} has no manifest.json; pass a model folder written by python -m export")
    manifest = json.loads(mf_path.read_text())
    for g in graphs:
        entry = manifest.get("graphs", {}).get(g)
        if entry is None:
            raise ExportError(f"{model_dir} has no {g} graph to quantize")
        if entry.get("precision") != "fp32":
            raise ExportError(f"{model_dir}: the {g} graph is {entry.get('precision')}; quantize an fp32 export")
    in_place = out_dir.resolve() == model_dir.resolve()
    staging = prepare_out_dir(out_dir, force or in_place)
    try:
        t0 = time.time()
        skip = {manifest["graphs"][g]["file"] for g in graphs}
        skip |= {manifest["graphs"][g].get("external_data") for g in graphs} - {None}
        _copy_tree(model_dir, staging, skip | {"manifest.json"})
        for g in graphs:
            entry = manifest["graphs"][g]
            src = model_dir / entry["file"]
            t = time.time()
            info = quantize_graph(src, staging / entry["file"], method, block_size, accuracy_level)
            entry["external_data"] = info.pop("external_data")
            entry["precision"] = method
            entry["quantization"] = info
            size = sum(p.stat().st_size for p in staging.iterdir() if p.name.startswith(entry["file"]))
            log(f"quantized {g} to {method}: {info['quantized_nodes']} nodes, {size / 1e6:.1f} MB, "
                f"{time.time() - t:.1f}s")
        if not in_place:
            manifest["name"] = out_dir.name
        manifest.setdefault("source", {})["quantized_from"] = model_dir.name
        mf.write(staging, manifest)
        commit_out_dir(staging, out_dir)
        log(f"wrote {out_dir} in {time.time() - t0:.1f}s")
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)
