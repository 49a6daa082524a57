"""Graphs past the protobuf limit get one external-data side file each, which onnxruntime and fluxrt's layout
tool follow. The limit is lowered here so the tiny transformer takes that path (the real 12B transformer and
T5-XXL take it for real)."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from export import graph_io
from export import onnx_export as ox
from export.graph_io import cpu_session
from export.validate import validate_graph


def test_big_graphs_are_saved_with_one_side_file(checkpoints, tmp_path, monkeypatch):
    from export import checkpoint as ckpt

    parts = ckpt.load(checkpoints["schnell"], ["transformer"])
    monkeypatch.setattr(graph_io, "EXTERNAL_DATA_BYTES", 0)
    path = tmp_path / "transformer.onnx"
    entry = ox.export_graph("transformer", parts, path)
    assert entry["external_data"] == "transformer.onnx.data"
    side_files = sorted(p.name for p in tmp_path.iterdir())
    assert side_files == ["transformer.onnx", "transformer.onnx.data"]
    # the weights live in the side file, not in the protobuf
    proto = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert path.stat().st_size < (tmp_path / "transformer.onnx.data").stat().st_size
    # onnxruntime resolves the data relative to the model file and matches PyTorch at both shapes
    results = validate_graph("transformer", path, parts, "fp32")
    assert all(r.ok and r.max_abs <= 1e-4 for r in results), [r.line() for r in results]
    # re-saving replaces the data file instead of appending to it (onnx.save_model appends to an existing one)
    size = (tmp_path / "transformer.onnx.data").stat().st_size
    ox.export_graph("transformer", parts, path)
    assert (tmp_path / "transformer.onnx.data").stat().st_size == size
    sess = cpu_session(path)
    d = ox.dims(parts)
    ex = ox.example_inputs("transformer", d, ox.VALIDATION_SHAPES[0], seed=3)
    out = sess.run(None, ox.numpy_inputs("transformer", path, ex))[0]
    with torch.no_grad():
        from export.wrappers import wrap

        ref = wrap("transformer", parts)(*ex).numpy()
    assert np.abs(out - ref).max() <= 1e-4
