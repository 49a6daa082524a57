"""fluxrt convert: a bf16 BFL ONNX download -> graphs ONNX Runtime's CPU, CUDA, DirectML and CoreML providers run.

Black Forest Labs publish FLUX.1 as bf16 ONNX folders for TensorRT (clip.opt/, t5.opt/, transformer.opt/bf16/,
vae.opt/, Kontext's vae_encoder.opt/). Most ONNX Runtime providers have no bf16 kernels, so this writes the same
layout in fp32, in fp16 with fp32 islands, or with an int8 / int4 transformer (in transformer.opt/<precision>/).

Self-contained on purpose (the standard library, numpy and onnx): the fluxrt binary embeds this file and runs it as
`python -c SOURCE MODEL OUT --precision P --progress json`; `python -m export convert` runs the same code.
Weights stream one tensor at a time (read, convert, append to the output data file), so memory stays near the
largest tensor plus the weightless graph proto, whatever the size of the model.

Exit status: 0 done; 2 a problem the user can fix (one `error: ...` line on stderr); 1 a bug (a traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

VERSION = "1"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
DATA_FILE = "backbone.onnx_data"
MANIFEST = "fluxrt-convert.json"
ALIGN = 64  # byte alignment of every tensor in a data file
INLINE_BYTES = 1024  # smaller tensors stay in the proto (onnx's own threshold)
EXTERNAL_BYTES = 1_800_000_000  # weights past this go to a data file: a proto cannot exceed 2 GiB
INT4_BLOCK = 32
INT4_ACCURACY = 4  # MatMulNBits accuracy_level 4: int8 compute
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
MS_DOMAIN = "com.microsoft"

# (graph, source folder, FP16_ISLANDS key). transformer.opt/bf16 is required; the others are converted when present.
GRAPHS = (
    ("clip", "clip.opt", "clip"),
    ("t5", "t5.opt", "t5"),
    ("transformer", "transformer.opt/bf16", "transformer"),
    ("vae", "vae.opt", "vae_decoder"),
    ("vae_encoder", "vae_encoder.opt", "vae_encoder"),
)
_TOP_FOLDERS = {folder.split("/")[0] for _, folder, _ in GRAPHS}

# fp16 islands: what stays fp32 because it overflows or loses too much in fp16 (T5's feed-forward, the transformer's
# residual adds and norms, the VAE's mid-block attention: the node lists onnxruntime's transformers/models/flux
# optimizer keeps out of fp16, and diffusers' fp16 clipping in T5). The export step (onnx_export.to_fp16) uses it too.
FP16_ISLANDS = {
    "clip": {"op_types": [], "whole_graph": False, "why": "CLIP-L runs in fp16 (demoDiffusion exports it so)"},
    "t5": {"op_types": [], "whole_graph": True, "why": "T5 blocks overflow fp16 activations: the graph stays fp32"},
    "transformer": {
        "op_types": ["LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Softmax", "Cos", "Sin", "Exp"],
        # regexes over node names: the single blocks' own residual adds, not the adds inside their sub-modules
        "node_patterns": [r"single_transformer_blocks\.\d+/Add(_\d+)?$"],
        "whole_graph": False,
        "why": "norms, softmax, RoPE/time embeddings and the single-block residual adds overflow in fp16",
    },
    "vae_decoder": {
        "op_types": ["InstanceNormalization", "GroupNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"],
        "whole_graph": False,
        "why": "group norms and the mid-block attention overflow in fp16",
    },
    "vae_encoder": {
        "op_types": ["InstanceNormalization", "GroupNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Exp"],
        "whole_graph": False,
        "why": "group norms, the mid-block attention and exp(logvar) overflow in fp16",
    },
}

BF16, F16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT
_ITEMSIZE = {
    TensorProto.FLOAT: 4, TensorProto.UINT8: 1, TensorProto.INT8: 1, TensorProto.UINT16: 2, TensorProto.INT16: 2,
    TensorProto.INT32: 4, TensorProto.INT64: 8, TensorProto.BOOL: 1, TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8,
    TensorProto.UINT32: 4, TensorProto.UINT64: 8, TensorProto.COMPLEX64: 8, TensorProto.COMPLEX128: 16,
    TensorProto.BFLOAT16: 2, TensorProto.FLOAT8E4M3FN: 1, TensorProto.FLOAT8E4M3FNUZ: 1, TensorProto.FLOAT8E5M2: 1,
    TensorProto.FLOAT8E5M2FNUZ: 1,
}
_PACKED4 = {TensorProto.UINT4, TensorProto.INT4, TensorProto.FLOAT4E2M1}  # two elements a byte
_FLOATS = {F32: "<f4", F16: "<f2", BF16: "<u2"}  # the float types read as numbers (bf16 as its bit pattern)
# Attributes that hold an element type: Cast.to, EyeLike / Random*.dtype, LayerNormalization.stash_type, ...
_DTYPE_ATTRS = {"to", "dtype", "output_dtype", "stash_type"}
# Ops whose output type an attribute sets: never fp16 islands (casting their inputs up would not make them fp32).
_TYPED_BY_ATTRIBUTE = {"Cast", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomNormalLike",
                       "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
                "external_data", "data_location")
_USER_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS}  # disk full, no permission, read-only


class UserError(Exception):
    """A problem the user can fix: reported as one `error:` line, exit status 2."""


# ---------------------------------------------------------------- tensor data

def _nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's data as stored: dims x element size."""
    n = math.prod(t.dims)
    if t.data_type in _PACKED4:
        return (n + 1) // 2
    if t.data_type not in _ITEMSIZE:
        raise UserError(f"tensor {t.name!r} has element type {t.data_type}, which this converter does not know")
    return n * _ITEMSIZE[t.data_type]


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _external_ref(t: TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor; a missing offset is 0, a missing length the tensor's size."""
    info = {e.key: e.value for e in t.external_data}
    if not info.get("location"):
        raise UserError(f"tensor {t.name!r} has external data without a location")
    length = int(info["length"]) if "length" in info else _nbytes(t)
    return info["location"], int(info.get("offset", 0)), length


def _inline_bytes(t: TensorProto) -> bytes:
    """The little-endian bytes of a tensor stored in the proto."""
    if t.HasField("raw_data"):
        return t.raw_data
    if t.data_type in (BF16, F16):  # the proto keeps 16-bit floats one per int32 field
        return np.asarray(t.int32_data, dtype=np.int32).astype("<u2").tobytes()
    return onnx.numpy_helper.to_array(t).tobytes()


def _to_f32(data: bytes, dtype: int) -> np.ndarray:
    """Float data as float32; bf16 -> fp32 is exact (the bf16 bits are the top half of the fp32 ones)."""
    if dtype == BF16:
        bits = np.frombuffer(data, "<u2").astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return np.frombuffer(data, _FLOATS[dtype]).astype(np.float32)


def _from_f32(x: np.ndarray, dtype: int) -> np.ndarray:
    """float32 -> dtype (FLOAT or FLOAT16). Finite values past fp16's range saturate at +-65504, as in onnxruntime's
    float16 converter: an overflow to inf would poison every sum it enters. inf and nan stay what they are."""
    if dtype == F32:
        return x
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    over = np.isinf(h) & np.isfinite(x)
    if over.any():
        h[over] = np.copysign(np.float16(65504), x[over])
    return h


def _clear_data(t: TensorProto) -> None:
    for field in _DATA_FIELDS:
        t.ClearField(field)


class DataFile:
    """One output graph's external data file: tensors appended at ALIGN-byte offsets. None of it stays in memory."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, None, 0

    def write(self, data) -> tuple[int, int]:
        if self.file is None:
            self.file = open(self.path, "wb")
        view = memoryview(data).cast("B")
        pad = -self.offset % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        start = self.offset
        self.file.write(view)
        self.offset += view.nbytes
        return start, view.nbytes

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _store(t: TensorProto, dtype: int, dims, data, sink: DataFile | None) -> None:
    """Gives t new contents (bytes or a C-contiguous array): in the data file when there is one and t is not tiny."""
    dims = [int(d) for d in dims]  # before clearing: dims may be t.dims itself
    _clear_data(t)
    t.data_type = dtype
    del t.dims[:]
    t.dims.extend(dims)
    view = memoryview(data).cast("B")
    if sink is None or view.nbytes < INLINE_BYTES:
        t.raw_data = view.tobytes()
        return
    offset, length = sink.write(view)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)


class SourceData:
    """Reads one graph's external tensors from the files beside it, one tensor at a time."""

    def __init__(self, graph_dir: Path):
        self.dir, self.files = graph_dir, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()

    def data(self, t: TensorProto) -> bytes:
        """The bytes of any initializer, external or inline."""
        return self.read(t) if _is_external(t) else _inline_bytes(t)

    def read(self, t: TensorProto) -> bytes:
        location, offset, length = _external_ref(t)
        if location not in self.files:
            self.files[location] = open(_data_path(self.dir, location), "rb")
        f = self.files[location]
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise UserError(f"incomplete download: {f.name} ends before tensor {t.name!r}; re-download it")
        return data


# ---------------------------------------------------------------- checking the download

def _check_not_pointer(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:
            raise UserError(f"{path} is a Git LFS pointer, not the data; run `git lfs pull` or download with "
                            "`hf download`")


def _data_path(graph_dir: Path, location: str) -> Path:
    rel = Path(location)
    if rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"{graph_dir / 'model.onnx'} names external data outside its folder ({location})")
    return graph_dir / rel


def _load(path: Path) -> onnx.ModelProto:
    """A graph without its external weights: the proto stays small."""
    _check_not_pointer(path)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # any parse failure of a downloaded graph means a damaged file
        raise UserError(f"cannot read {path} ({e}); re-download it") from e


def _check_data_files(graph_dir: Path, tensors) -> None:
    """Every data file a graph names is there, is real data and is long enough for its tensors."""
    needs: dict[str, int] = {}
    for t in tensors:
        location, offset, length = _external_ref(t)
        needs[location] = max(needs.get(location, 0), offset + length)
    for location, need in needs.items():
        path = _data_path(graph_dir, location)
        if not path.is_file():
            raise UserError(f"{path} is missing: {graph_dir / 'model.onnx'} keeps its weights there; download it")
        _check_not_pointer(path)
        size = path.stat().st_size
        if size < need:
            raise UserError(f"incomplete download: {path} has {size} bytes, the graph needs {need}; re-download it")


# ---------------------------------------------------------------- types of the graph

def _retype_value(tp: onnx.TypeProto, to: int) -> None:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tt = getattr(tp, kind)
        if tt.elem_type == BF16:
            tt.elem_type = to
    elif kind in ("sequence_type", "optional_type"):
        _retype_value(getattr(tp, kind).elem_type, to)
    elif kind == "map_type":
        _retype_value(tp.map_type.value_type, to)


def _retype_inline(t: TensorProto, to: int) -> None:
    if t.data_type != BF16:
        return
    if _is_external(t):
        raise UserError(f"tensor {t.name!r}: external data in a node attribute or a subgraph is not supported")
    _store(t, to, t.dims, _from_f32(_to_f32(_inline_bytes(t), BF16), to), None)


def _retype_graph(graph: onnx.GraphProto, to: int) -> None:
    """bf16 -> `to` in all but the top-level initializers (streamed apart): value types, node attribute tensors
    (Constant, ConstantOfShape), element-type attributes (Cast.to, ...) and subgraphs."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        _retype_value(v.type, to)
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                _retype_inline(a.t, to)
            elif a.type == AttributeProto.TENSORS:
                for t in a.tensors:
                    _retype_inline(t, to)
            elif a.type == AttributeProto.INT and a.name in _DTYPE_ATTRS and a.i == BF16:
                a.i = to
            for sub in ([a.g] if a.type == AttributeProto.GRAPH else a.graphs):
                _retype_graph(sub, to)
                for t in sub.initializer:
                    _retype_inline(t, to)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value (0 where unknown), by onnx's type inference on a weightless copy of the graph."""
    g = onnx.GraphProto(name=model.graph.name)
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    declared = {v.name for v in g.input}
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in model.graph.initializer if t.name not in declared)
    skeleton = helper.make_model(g, opset_imports=list(model.opset_import))
    skeleton.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*inferred.input, *inferred.value_info, *inferred.output)}


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names that nodes inside subgraphs read (they may come from the outer graph)."""
    names = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == AttributeProto.GRAPH else a.graphs):
                names.update(x for n in sub.node for x in n.input)
                names |= _subgraph_inputs(sub)
    return names


# ---------------------------------------------------------------- fp16 islands

def island_by_name(name: str, spec: dict) -> bool:
    """Whether a node name matches one of the spec's node_patterns (regexes)."""
    return any(re.search(p, name) for p in spec.get("node_patterns", []))


def _island_candidates(graph: onnx.GraphProto, spec: dict) -> list[int]:
    ops = set(spec["op_types"])
    return [i for i, n in enumerate(graph.node) if n.op_type in ops or island_by_name(n.name, spec)]


def _typed(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    return all(types.get(v, 0) for v in (*node.input, *node.output) if v)


def _can_island(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    """A node can run in fp32 between Casts when its output types follow its inputs, every type is known, and some
    input is fp16."""
    if node.op_type in _TYPED_BY_ATTRIBUTE or node.domain not in ("", "ai.onnx"):
        return False
    return _typed(node, types) and any(types[x] == F16 for x in node.input if x)


def _add_islands(model: onnx.ModelProto, spec: dict) -> dict:
    """Runs the spec's nodes in fp32 inside an fp16 graph: fp16 inputs get a Cast up (one per value), fp16 outputs are
    produced as fp32 under a new name and cast back down only for the nodes outside the island (and graph outputs),
    so chains of island nodes stay fp32 throughout."""
    graph = model.graph
    candidates = _island_candidates(graph, spec)
    types = _elem_types(model) if candidates else {}
    island = {i for i in candidates if _can_island(graph.node[i], types)}
    untyped = sum(1 for i in candidates if not _typed(graph.node[i], types))
    outside = {x for i, n in enumerate(graph.node) if i not in island for x in n.input}
    outside |= {v.name for v in graph.output} | _subgraph_inputs(graph)
    as_fp32: dict[str, str] = {}  # fp16 value -> its fp32 twin
    nodes, renamed = [], []
    for i, node in enumerate(graph.node):
        if i not in island:
            nodes.append(node)
            continue
        for k, x in enumerate(node.input):
            if x and x not in as_fp32 and types.get(x) == F16:
                as_fp32[x] = f"{x}/fp32"
                nodes.append(helper.make_node("Cast", [x], [as_fp32[x]], f"{x}/to_fp32", to=F32))
            if x in as_fp32:
                node.input[k] = as_fp32[x]
        nodes.append(node)
        for k, y in enumerate(node.output):
            if y and types.get(y) == F16:
                as_fp32[y] = node.output[k] = f"{y}/fp32"
                renamed.append(y)
                if y in outside:
                    nodes.append(helper.make_node("Cast", [as_fp32[y]], [y], f"{y}/to_fp16", to=F16))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_value_info(graph, {y for y in renamed if y not in outside})
    info = {"op_types": spec["op_types"], "node_patterns": spec.get("node_patterns", []), "nodes": len(island),
            "why": spec["why"]}
    if untyped:
        info["untyped"] = untyped  # onnx could not type them: they stay fp16
    return info


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


# ---------------------------------------------------------------- int8 / int4 weights

def _quant_slots(graph: onnx.GraphProto, method: str) -> dict[str, bool]:
    """Weights to quantize, name -> stored transposed ([N, K]: a Gemm with transB=1). Like onnxruntime: int8
    (quantize_dynamic) takes MatMuls and the plain Gemms it rewrites as MatMul; int4 (MatMulNBitsQuantizer) takes
    MatMuls. A weight must be a 2-D float initializer that only such B inputs read, all the same way round."""
    inits = {t.name: t for t in graph.initializer}
    overridable = {v.name for v in graph.input}
    uses: dict[str, list] = {}
    for node in graph.node:
        for k, x in enumerate(node.input):
            uses.setdefault(x, []).append((node, k))
    slots = {}
    for name, t in inits.items():
        if name in overridable or len(t.dims) != 2 or 0 in t.dims or t.data_type not in _FLOATS:
            continue
        ways = {_b_slot(node, k, method) for node, k in uses.get(name, [])}
        if len(ways) == 1 and None not in ways:
            slots[name] = ways.pop()
    return slots


def _b_slot(node: onnx.NodeProto, k: int, method: str) -> bool | None:
    """Whether input k of node is a quantizable B read transposed; None when it is no quantizable B."""
    if k != 1:
        return None
    if node.op_type == "MatMul":
        return False
    if node.op_type != "Gemm" or method != "int8":
        return None
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        return None
    return bool(a.get("transB", 0))


def _is_signed_permutation(w: np.ndarray) -> bool:
    """RoPE's pair swap is a MatMul by a constant signed permutation: quantizing it would only round activations."""
    n = w.shape[0]
    if w.shape != (n, n) or np.count_nonzero(w) != n:
        return False
    a = np.abs(w)
    return bool(np.isin(w, (-1, 0, 1)).all() and (a.sum(0) == 1).all() and (a.sum(1) == 1).all())


def _quantize_int8(w: np.ndarray, name: str) -> list:
    """[K, N] -> int8 per output channel, symmetric, as onnxruntime's quantize_dynamic(per_channel=True,
    weight_type=QInt8) computes it: scale = max|w[:, n]| / 127 (in float64), q = round-half-even(w / scale)."""
    absmax = np.maximum(np.maximum(w.max(axis=0), -w.min(axis=0)), 0)
    scale = (absmax.astype(np.float64) * 2 / 254).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return [(name + "_quantized", TensorProto.INT8, q), (name + "_scale", F32, scale),
            (name + "_zero_point", TensorProto.INT8, np.zeros(w.shape[1], np.int8))]


def _quantize_int4(w: np.ndarray, name: str) -> list:
    """[K, N] -> MatMulNBits' 4-bit blocks as onnxruntime's MatMulNBitsQuantizer(bits=4, block_size=32,
    is_symmetric=True) writes them (its C++ kernel, mirrored): per column, blocks of 32 along K (zero-padded); the
    value of largest magnitude maps to -8: scale = -peak / 8; q = clamp(roundf(v / scale + 8), 0, 15) with zero
    point 8 implied; two values a byte, the lower k in the low nibble, zeros past K. B: uint8 [N, blocks, 16], scales
    [N, blocks]."""
    k, n = w.shape
    blocks = -(-k // INT4_BLOCK)
    cols = np.zeros((n, blocks * INT4_BLOCK), np.float32)
    cols[:, :k] = w.T
    cols = cols.reshape(n, blocks, INT4_BLOCK)
    lo, hi = cols.min(axis=-1), cols.max(axis=-1)
    peak = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    scale = (-peak / np.float32(8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    v = cols * inv[..., None]
    v += np.float32(8)
    whole = np.floor(v)
    q = np.clip(whole + (v - whole >= 0.5), 0, 15).astype(np.uint8)  # roundf: halves away from zero
    q.reshape(n, -1)[:, k:] = 0  # the kernel leaves the padding past K zero
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return [(name + "_Q4", TensorProto.UINT8, packed), (name + "_scales", F32, scale)]


def _int8_nodes(node: onnx.NodeProto, w: str, quantized_inputs: set[str]) -> list:
    """A MatMul (or plain Gemm) as onnxruntime's quantize_dynamic writes it: DynamicQuantizeLinear of the activation
    (one per activation), MatMulInteger, Cast to float, times a_scale * w_scale (then + C for a Gemm)."""
    a, y = node.input[0], node.output[0]
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    base = (node.name or y) + ("_MatMul" if node.op_type == "Gemm" else "")
    product = y + "_MatMul" if bias else y
    nodes = []
    if a not in quantized_inputs:
        quantized_inputs.add(a)
        nodes.append(helper.make_node("DynamicQuantizeLinear", [a], [a + "_quantized", a + "_scale", a + "_zero_point"],
                                      a + "_QuantizeLinear"))
    q, ints = base + "_quant", product + "_output_quantized"
    nodes += [
        helper.make_node("MatMulInteger", [a + "_quantized", w + "_quantized", a + "_zero_point", w + "_zero_point"],
                         [ints], q),
        helper.make_node("Cast", [ints], [ints + "_cast_output"], ints + "_cast", to=F32),
        helper.make_node("Mul", [a + "_scale", w + "_scale"], [q + "_scales_mul:0"], q + "_scales_mul"),
        helper.make_node("Mul", [ints + "_cast_output", q + "_scales_mul:0"], [product], q + "_output_scale_mul"),
    ]
    if bias:
        nodes.append(helper.make_node("Add", [product, bias], [y], (node.name or y) + "_Add"))
    return nodes


def _int4_node(node: onnx.NodeProto, w: str, shape: tuple[int, int]) -> onnx.NodeProto:
    return helper.make_node("MatMulNBits", [node.input[0], w + "_Q4", w + "_scales"], list(node.output),
                            (node.name or node.output[0]) + "_Q4", domain=MS_DOMAIN, K=shape[0], N=shape[1], bits=4,
                            block_size=INT4_BLOCK, accuracy_level=INT4_ACCURACY)


def _rewrite_quantized(model: onnx.ModelProto, quantized: dict[str, tuple[int, int]], method: str) -> int:
    """Replaces the nodes that read a quantized weight; returns how many."""
    graph, nodes, quantized_inputs, count = model.graph, [], set(), 0
    for node in graph.node:
        w = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        if w not in quantized:
            nodes.append(node)
            continue
        count += 1
        nodes += _int8_nodes(node, w, quantized_inputs) if method == "int8" else [_int4_node(node, w, quantized[w])]
    del graph.node[:]
    graph.node.extend(nodes)
    if method == "int4" and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return count


# ---------------------------------------------------------------- one graph

# What fluxrt-convert.json records about each quantization.
_QUANTIZATION = {
    "int8": {"method": "int8", "weight_type": "int8", "per_channel": True, "activations": "dynamic uint8"},
    "int4": {"method": "int4", "bits": 4, "block_size": INT4_BLOCK, "accuracy_level": INT4_ACCURACY,
             "symmetric": True},
}


@dataclass
class GraphJob:
    name: str
    src: Path  # the source model.onnx
    src_rel: str  # its path in MODEL
    out_rel: str  # its folder in OUT
    islands: str  # FP16_ISLANDS key
    precision: str  # what the graph becomes: fp32, fp16, int8, int4
    weight_bytes: int  # source weights
    external: bool  # whether the output keeps its weights in DATA_FILE
    whole_fp32: bool = False  # an fp16 conversion keeps this graph fp32 (FP16_ISLANDS whole_graph)


def _quantized_tensors(w: np.ndarray, name: str, method: str, sink) -> list[TensorProto]:
    tensors = []
    for qname, dtype, arr in (_quantize_int8 if method == "int8" else _quantize_int4)(w, name):
        tensors.append(TensorProto(name=qname))
        _store(tensors[-1], dtype, arr.shape, np.ascontiguousarray(arr), sink)
    return tensors


def _stream_initializers(graph, src: SourceData, sink, float_to: int, slots: dict, method: str, advance):
    """Converts the initializers one at a time, in place: bf16 -> float_to, quantization slots -> int8/int4 tensors,
    external data -> the new data file. Returns ({quantized weight: (K, N)}, weights kept float)."""
    quantized, kept, extra = {}, 0, []
    for t in graph.initializer:
        size = _nbytes(t)  # of the source tensor: what progress counts
        if t.name in slots:
            w = _to_f32(src.data(t), t.data_type).reshape(tuple(t.dims))
            if _is_signed_permutation(w):
                kept += 1
                _store(t, F32, t.dims, w, sink)
            else:
                w = np.ascontiguousarray(w.T) if slots[t.name] else w  # Gemm transB: MatMul's [K, N]
                quantized[t.name] = w.shape
                extra += _quantized_tensors(w, t.name, method, sink)
                _clear_data(t)
        elif t.data_type == BF16:
            _store(t, float_to, t.dims, _from_f32(_to_f32(src.data(t), BF16), float_to), sink)
        elif _is_external(t):  # other types as they are
            _store(t, t.data_type, t.dims, src.read(t), sink)
        advance(size)
    for i in reversed(range(len(graph.initializer))):  # in place: copying the list would copy inline weights
        if graph.initializer[i].name in quantized:
            del graph.initializer[i]
    graph.initializer.extend(extra)
    return quantized, kept


def convert_graph(job: GraphJob, out_dir: Path, progress) -> dict:
    """Converts one graph into out_dir/job.out_rel; returns what fluxrt-convert.json records about it."""
    t0 = time.time()
    model = _load(job.src)
    dst = out_dir / job.out_rel
    dst.mkdir(parents=True, exist_ok=True)
    float_to = F16 if job.precision == "fp16" else F32
    _retype_graph(model.graph, float_to)
    slots = _quant_slots(model.graph, job.precision) if job.precision in _QUANTIZATION else {}
    sink = DataFile(dst / DATA_FILE) if job.external else None
    try:
        with SourceData(job.src.parent) as src:
            quantized, kept = _stream_initializers(model.graph, src, sink, float_to, slots, job.precision,
                                                   lambda n: progress.advance(job.name, n))
    finally:
        if sink is not None:
            sink.close()
    info = {"source": job.src_rel, "file": f"{job.out_rel}/model.onnx", "precision": job.precision,
            "external_data": DATA_FILE if sink is not None and sink.file is not None else None}
    spec = FP16_ISLANDS[job.islands]
    if job.precision == "fp16":
        info["islands"] = _add_islands(model, spec)
        if info["islands"].get("untyped"):
            print(f"warning: {job.name}: {info['islands']['untyped']} fp16-island nodes have values onnx cannot "
                  "type; they stay fp16", file=sys.stderr)
    elif job.whole_fp32:
        info["islands"] = {"whole_graph": True, "why": spec["why"]}
    if job.precision in _QUANTIZATION:
        info["quantization"] = {**_QUANTIZATION[job.precision], "kept_float": kept,
                                "quantized_nodes": _rewrite_quantized(model, quantized, job.precision)}
    onnx.save_model(model, str(dst / "model.onnx"))
    info["bytes"] = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
    info["seconds"] = round(time.time() - t0, 3)
    progress.graph(job.name, info["seconds"], info["bytes"])
    return info


# ---------------------------------------------------------------- the folder

def plan(model_dir: Path, precision: str) -> tuple[list[GraphJob], list[str]]:
    """The graphs to convert (each checked: readable, data files complete) and the folders skipped."""
    jobs = []
    for name, folder, islands in GRAPHS:
        src = model_dir / folder / "model.onnx"
        if not src.is_file():
            if name == "transformer":
                raise UserError(f"{model_dir} has no transformer.opt/bf16/model.onnx: convert takes an official "
                                "FLUX.1 ONNX download (black-forest-labs/FLUX.1-*-onnx) with its bf16 transformer")
            continue
        become = precision if name == "transformer" else "fp16" if precision == "fp16" else "fp32"
        whole_fp32 = become == "fp16" and FP16_ISLANDS[islands]["whole_graph"]
        become = "fp32" if whole_fp32 else become
        model = _load(src)
        tensors = list(model.graph.initializer)
        _check_data_files(src.parent, [t for t in tensors if _is_external(t)])
        weight_bytes = sum(_nbytes(t) for t in tensors)
        grown = weight_bytes + sum(_nbytes(t) for t in tensors if t.data_type == BF16 and become != "fp16")
        external = any(_is_external(t) for t in tensors) or grown > EXTERNAL_BYTES
        out_rel = f"transformer.opt/{precision}" if name == "transformer" else folder
        jobs.append(GraphJob(name, src, f"{folder}/model.onnx", out_rel, islands, become, weight_bytes, external,
                             whole_fp32))
        del model, tensors
    skipped = [f"transformer.opt/{d.name}" for d in sorted((model_dir / "transformer.opt").iterdir())
               if d.is_dir() and d.name != "bf16"]
    skipped += [d.name for d in sorted(model_dir.glob("*.opt")) if d.is_dir() and d.name not in _TOP_FOLDERS]
    return jobs, skipped


def _check_paths(model_dir: Path, out: Path, overwrite: bool) -> None:
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder: pass the BFL ONNX download folder")
    m, o = model_dir.resolve(), out.resolve()
    if o == m or m in o.parents:
        raise UserError(f"OUT {out} is the model folder or inside it; choose a folder outside {model_dir}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another OUT")
    if o in m.parents:
        raise UserError(f"the model folder {model_dir} is inside OUT {out}; --overwrite would delete it")


def _parse_includes(specs: list[str]) -> list[tuple[str, Path]]:
    """--include NAME=DIR: a folder copied to OUT/NAME (the tokenizers, which the downloads lack)."""
    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or "/" in name or "\\" in name or name.startswith(".") or name in _TOP_FOLDERS | {MANIFEST}:
            raise UserError(f"--include {spec!r}: expected NAME=DIR with NAME a plain folder name (e.g. "
                            "tokenizer=/path/to/tokenizer)")
        if not Path(folder).is_dir():
            raise UserError(f"--include {spec!r}: {folder} is not a folder")
        out.append((name, Path(folder)))
    return out


def _commit(staging: Path, out: Path) -> None:
    """Moves the finished staging folder to OUT; an old OUT is replaced only once the new one is complete."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def convert(model_dir: Path, out: Path, precision: str, overwrite: bool = False,
            includes: list[tuple[str, Path]] = (), progress: Progress | None = None) -> dict:
    """Converts the BFL folder model_dir into out (written beside it, then renamed in); returns the record."""
    progress = progress or Progress("text")
    _check_paths(model_dir, out, overwrite)
    jobs, skipped = plan(model_dir, precision)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
    progress.start(jobs, skipped, precision)
    try:
        staging.mkdir()
        record = {"converter": "fluxrt convert", "version": VERSION, "source": str(model_dir.resolve()),
                  "precision": precision, "graphs": {}, "skipped": skipped, "included": {}}
        for job in jobs:
            record["graphs"][job.name] = convert_graph(job, staging, progress)
        for name, folder in includes:
            shutil.copytree(folder, staging / name)
            record["included"][name] = str(folder.resolve())
        record["seconds"] = round(time.time() - t0, 3)
        (staging / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        _commit(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    progress.done(time.time() - t0)
    return record


class Progress:
    """Reports to the fluxrt shell (json: one object a line on stdout, at most every 1 % of the weights) or to a
    person (text: lines on stderr, every 10 %)."""

    def __init__(self, mode: str):
        self.json, self.total, self.done_bytes, self.shown = mode == "json", 0, 0, 0

    def _emit(self, event: str, **fields) -> None:
        if self.json:
            print(json.dumps({"event": event, **fields}), flush=True)

    def _say(self, text: str) -> None:
        if not self.json:
            print(text, file=sys.stderr, flush=True)

    def start(self, jobs: list[GraphJob], skipped: list[str], precision: str) -> None:
        self.total = sum(j.weight_bytes for j in jobs)
        self._emit("start", total_bytes=self.total, graphs=[j.name for j in jobs])
        self._say(f"converting {', '.join(j.name for j in jobs)} ({_size(self.total)} of weights) to "
                  f"{precision}" + (f"; skipping {', '.join(skipped)} (TensorRT only)" if skipped else ""))

    def advance(self, graph: str, nbytes: int, force: bool = False) -> None:
        self.done_bytes += nbytes
        step = max(1, self.total // (100 if self.json else 10))
        if force or self.done_bytes - self.shown >= step:
            self.shown = self.done_bytes
            self._emit("progress", graph=graph, done_bytes=self.done_bytes)
            if not force:
                self._say(f"  {graph}: {100 * self.done_bytes // max(1, self.total)} %")

    def graph(self, name: str, seconds: float, nbytes: int) -> None:
        self.advance(name, 0, force=True)
        self._emit("graph", graph=name, seconds=seconds, bytes=nbytes)
        self._say(f"{name}: {_size(nbytes)} in {seconds:.1f} s")

    def done(self, seconds: float) -> None:
        self._emit("done", seconds=round(seconds, 3))
        self._say(f"done in {seconds:.1f} s")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # the shell's convention: `error: ...` and exit status 2
        raise UserError(f"{self.prog}: {message}")


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    p = _Parser(prog=prog, description="Convert a bf16 BFL FLUX.1 ONNX download (for TensorRT) into the same layout "
                "in fp32 / fp16 / int8 / int4, which ONNX Runtime's CPU, CUDA, DirectML and CoreML providers run.")
    p.add_argument("model", type=Path, help="the BFL ONNX folder (clip.opt/, t5.opt/, transformer.opt/bf16/, ...)")
    p.add_argument("out", type=Path, help="the folder to create")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (CPUs); fp16 with fp32 islands (GPUs); int8 / int4: the transformer's MatMul weights "
                   "(CPUs), the other graphs fp32")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (only once the new one is complete)")
    p.add_argument("--include", action="append", default=[], metavar="NAME=DIR",
                   help="copy the folder DIR to OUT/NAME (e.g. tokenizer=..., tokenizer_2=...); repeatable")
    p.add_argument("--progress", choices=("text", "json"), default="text",
                   help="text: lines on stderr; json: one JSON object a line on stdout")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "fluxrt convert") -> int:
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv, prog)
        convert(a.model, a.out, a.precision, a.overwrite, _parse_includes(a.include), Progress(a.progress))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except MemoryError:
        print("error: out of memory converting a tensor; close other programs or use a machine with more memory",
              file=sys.stderr)
    except OSError as e:
        if e.errno not in _USER_ERRNOS:
            raise
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted; OUT was left as it was", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
