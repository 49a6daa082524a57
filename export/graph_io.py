"""Reading and writing ONNX graphs (shared by export, quantize and optimize): constant values, and saving inline or
with one external-data side file past the protobuf limit."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

# protobuf's hard limit is 2 GiB; stay clear of it.
EXTERNAL_DATA_BYTES = 1_800_000_000


def save_graph(model: onnx.ModelProto, path: Path) -> str | None:
    """Saves the graph; one external-data side file when it would pass the protobuf limit. Returns that file's
    name, or None."""
    path = Path(path)
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    if data_path.exists():
        data_path.unlink()  # onnx appends to an existing data file
    # Not model.ByteSize(): protobuf cannot even measure a message past 2 GiB (EncodeError), which is the case to catch.
    big = _inline_bytes(model) > EXTERNAL_DATA_BYTES if _all_inline(model) else True
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return data_name
    onnx.save_model(model, str(path))
    return None


def cpu_session(path: Path):
    """An onnxruntime CPU session for `path`, quiet, with fluxrt's thread setting: FLUXRT_THREADS intra-op threads
    when set (as the Rust runtime reads it), else onnxruntime's default (the physical cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads = os.environ.get("FLUXRT_THREADS", "").strip()
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def const_value(producers: dict, initializers: dict, name: str):
    """The value of `name` as a numpy array when it is a Constant node's output or an initializer, else None.
    `producers` maps output names to nodes, `initializers` names to TensorProtos."""
    from onnx import numpy_helper

    n = producers.get(name)
    if n is not None and n.op_type == "Constant":
        return numpy_helper.to_array(n.attribute[0].t)
    init = initializers.get(name)
    return None if init is None else numpy_helper.to_array(init)


def topological(nodes: list, graph) -> list | None:
    """`nodes` in an order where each runs after the producers of its inputs (graph inputs and initializers are
    ready from the start), or None when some input is never produced (a cycle or a dangling name)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            return None
        pending = rest
    return ordered


def _inline_bytes(model: onnx.ModelProto) -> int:
    """The bytes of the weights stored in the proto (initializers and Constant nodes' tensors), which is nearly all of
    a graph's size."""
    def tensor_bytes(t: onnx.TensorProto) -> int:
        # raw_data, or the typed fields (4 or 8 bytes per element; an upper bound is enough here).
        return len(t.raw_data) + 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data))

    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    for n in model.graph.node:
        total += sum(tensor_bytes(a.t) for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


def _all_inline(model: onnx.ModelProto) -> bool:
    return not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
