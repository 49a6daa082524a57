"""torch -> ONNX for one graph: dynamic axes, external data for big graphs, fp16 with fp32 islands."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .convert import FP16_ISLANDS, island_by_name  # the fp16 islands, shared with fluxrt convert
from .graph_io import save_graph
from .contract import contract_for
from .wrappers import export_patches, wrap

GRAPHS = ["clip", "t5", "transformer", "vae_decoder", "vae_encoder"]
PRECISIONS = ["fp32", "fp16", "bf16"]
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class Shape:
    """One set of example dims: batch, pixel size and text length."""

    batch: int
    width: int
    height: int
    text_len: int


# Export with batch 2 and a non-square size so no dim is specialised to 1 or to its twin.
EXPORT_SHAPE = Shape(batch=2, width=128, height=64, text_len=32)
# Validation shapes: batch 1 and 2, two resolutions, two text lengths, neither equal to the export shape.
VALIDATION_SHAPES = [Shape(1, 64, 64, 24), Shape(2, 96, 128, 40)]


def dims(parts) -> dict:
    """Model dims the example inputs need, read from the loaded modules."""
    d = {}
    if parts.clip is not None:
        d["clip_dim"] = parts.clip.config.hidden_size
        d["clip_vocab"] = parts.clip.config.vocab_size
        d["clip_eos"] = parts.clip.config.eos_token_id
    if parts.t5 is not None:
        d["t5_vocab"] = parts.t5.config.vocab_size
    tcfg = parts.transformer.config
    d["t5_dim"] = tcfg.joint_attention_dim
    d["pooled_dim"] = tcfg.pooled_projection_dim
    d["latent_channels"] = tcfg.in_channels // 4
    d["guidance_embeds"] = bool(tcfg.guidance_embeds)
    return d


def example_inputs(graph: str, d: dict, s: Shape, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """Deterministic example inputs for one graph at shape s, in the contract's order."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    B, L = s.batch, s.text_len
    h, w = s.height // 8, s.width // 8
    if graph == "clip":
        ids = torch.randint(0, d["clip_vocab"] - 2, (B, 77), generator=g, dtype=torch.int32)
        for b in range(B):  # a real prompt: eos after a few tokens, then padding with eos
            ids[b, 5 + 3 * b:] = d["clip_eos"]
        return [ids]
    if graph == "t5":
        return [torch.randint(0, d["t5_vocab"], (B, L), generator=g, dtype=torch.int32)]
    if graph == "transformer":
        from diffusers import FluxPipeline

        S = (h // 2) * (w // 2)
        img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32)
        out = [
            rnd(B, S, 64),
            rnd(B, L, d["t5_dim"]),
            rnd(B, d["pooled_dim"]),
            torch.rand(B, generator=g).to(dtype),
            img_ids.to(dtype),
            torch.zeros(L, 3, dtype=dtype),
        ]
        if d["guidance_embeds"]:
            out.append(torch.full((B,), 3.5, dtype=dtype))
        return out
    if graph == "vae_decoder":
        return [rnd(B, d["latent_channels"], h, w)]
    if graph == "vae_encoder":
        return [torch.rand(B, 3, s.height, s.width, generator=g).mul(2).sub(1).to(dtype)]
    raise KeyError(graph)


def _dynamic_axes(contract) -> dict:
    axes = {}
    for io in contract["inputs"] + contract["outputs"]:
        named = {i: dim for i, dim in enumerate(io.shape) if isinstance(dim, str) and not dim.endswith("_dim")}
        if named:
            axes[io.name] = named
    return axes


def _torch_export(module, example, path: Path, contract, opset: int):
    with warnings.catch_warnings(), export_patches(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example),
            str(path),
            input_names=[i.name for i in contract["inputs"]],
            output_names=[o.name for o in contract["outputs"]],
            dynamic_axes=_dynamic_axes(contract),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _name_dims(model: onnx.ModelProto, contract, d: dict) -> None:
    """Writes the contract's dim names (and the model's fixed dims) onto the graph's inputs and outputs, in place
    of the exporter's generated names, so the manifest and `fluxrt info` show B, L, S, H, W."""
    specs = {io.name: io.shape for io in contract["inputs"] + contract["outputs"]}
    for v in list(model.graph.input) + list(model.graph.output):
        shape = specs.get(v.name)
        if shape is None:
            continue
        for dim, want in zip(v.type.tensor_type.shape.dim, shape):
            if isinstance(want, str) and want.endswith("_dim"):
                want = d["pooled_dim"] if want == "clip_dim" else d["t5_dim"]
            if isinstance(want, int):
                dim.ClearField("dim_param")
                dim.dim_value = want
            else:
                dim.ClearField("dim_value")
                dim.dim_param = want


def _island_nodes(model: onnx.ModelProto, spec: dict) -> list[str]:
    return [n.name for n in model.graph.node if island_by_name(n.name, spec)]


def to_fp16(model: onnx.ModelProto, graph: str) -> tuple[onnx.ModelProto, dict]:
    """fp16 with the graph's fp32 islands; returns the model and the islands record for the manifest."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    spec = FP16_ISLANDS[graph]
    if spec["whole_graph"]:
        return model, {"precision": "fp32", "why": spec["why"]}
    nodes = _island_nodes(model, spec)
    converted = convert_float_to_float16(
        model,
        keep_io_types=False,
        op_block_list=spec["op_types"],
        node_block_list=nodes,
        disable_shape_infer=False,
    )
    _dedupe_nodes(converted)
    return converted, {"op_types": spec["op_types"], "nodes": len(nodes), "why": spec["why"]}


def _dedupe_nodes(model: onnx.ModelProto) -> None:
    """The fp16 converter inserts the same Cast once per consumer when a tensor feeds several blocked nodes:
    drop exact repeats (same outputs) and give any remaining clashing names a suffix, so the graph is valid."""
    seen_outputs, seen_names, keep = set(), set(), []
    for n in model.graph.node:
        outs = tuple(n.output)
        if outs and outs in seen_outputs:
            continue
        seen_outputs.add(outs)
        name, k = n.name, 1
        while n.name in seen_names:
            n.name = f"{name}_{k}"
            k += 1
        seen_names.add(n.name)
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _strip(model: onnx.ModelProto) -> None:
    """Drops doc strings (source paths of the exporting machine) so files are smaller and reproducible."""
    model.doc_string = ""
    for n in model.graph.node:
        n.doc_string = ""


def export_graph(graph: str, parts, out_path: Path, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                 lora_slots: bool = False) -> dict:
    """Exports one graph to out_path; returns its manifest entry (without I/O, which the caller reads back).
    lora_slots (transformer only): add the run-time LoRA slot inputs of export/lora_slots.py."""
    d = dims(parts)
    contract = contract_for(graph, d["guidance_embeds"])
    module = wrap(graph, parts)
    torch_dtype = torch.bfloat16 if precision == "bf16" and graph != "t5" else torch.float32
    if precision == "bf16":
        module = module.to(torch_dtype)
    example = example_inputs(graph, d, EXPORT_SHAPE, dtype=torch_dtype)
    slots = None
    if lora_slots and graph == "transformer":
        from . import lora_slots as ls

        slots = ls.slots_for(parts.transformer)
        contract = {"inputs": list(contract["inputs"]) + ls.slot_ios(slots), "outputs": contract["outputs"]}
        module = ls.SlottedTransformerGraph(module.transformer, slots).eval()
        example = example + ls.example_factors(slots, dtype=torch_dtype)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        tmp_path = Path(tmp) / "graph.onnx"
        _torch_export(module, example, tmp_path, contract, opset)
        model = onnx.load(str(tmp_path), load_external_data=True)
    _name_dims(model, contract, d)
    islands = None
    if precision == "fp16":
        model, islands = to_fp16(model, graph)
    elif precision == "bf16":
        islands = {"precision": "fp32", "why": "T5 is exported in fp32"} if graph == "t5" else {}
    if slots is not None:
        ls.finish_graph(model, slots)
        ls.check_slot_dtypes(model, slots)
    _strip(model)
    external = save_graph(model, out_path)
    module.float()
    entry = {"precision": _graph_precision(model), "opset": opset, "external_data": external, "islands": islands or {}}
    if slots is not None:
        entry["lora_slots"] = ls.manifest_field(slots)
    return entry


def _graph_precision(model: onnx.ModelProto) -> str:
    """What the graph's float inputs really are (fp16 may have fallen back to fp32 for a whole graph)."""
    elem = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    for i in list(model.graph.input) + list(model.graph.output):
        t = i.type.tensor_type.elem_type
        if t in elem:
            return elem[t]
    return "fp32"


_DTYPE = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}


def read_io(path: Path) -> dict:
    """The graph's inputs/outputs as the manifest records them: name, dtype, symbolic shape."""
    model = onnx.load(str(path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        shape = [dd.dim_param if dd.dim_param else int(dd.dim_value) for dd in t.shape.dim]
        return {"name": v.name, "dtype": _DTYPE.get(t.elem_type, str(t.elem_type)), "shape": shape}

    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [one(v) for v in model.graph.input if v.name not in inits],
        "outputs": [one(v) for v in model.graph.output],
    }


def numpy_inputs(graph: str, path: Path, tensors: list[torch.Tensor]) -> dict:
    """Feeds for onnxruntime, cast to the graph's declared input dtypes."""
    io = read_io(path)["inputs"]
    feeds = {}
    for spec, t in zip(io, tensors):
        arr = t.float().numpy() if t.is_floating_point() else t.numpy()
        np_dtype = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}.get(spec["dtype"])
        if np_dtype is None:  # bfloat16: onnxruntime takes it through ml_dtypes-free OrtValue only; keep fp32
            raise NotImplementedError(f"{graph}: feeding {spec['dtype']} from Python is not supported")
        feeds[spec["name"]] = arr.astype(np_dtype)
    return feeds


