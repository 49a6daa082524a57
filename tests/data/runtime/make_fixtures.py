"""Writes the tiny ONNX graphs used by the unit tests in src/runtime/.

Run with the fluxrt dev venv (onnx, numpy):
    /root/.cache/fluxrt/venv/bin/python tests/data/runtime/make_fixtures.py
Every graph uses IR 8 / opset 17 so that any ONNX Runtime >= 1.14 can read it.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = [helper.make_opsetid("", 17)]


def save(graph, name, **kwargs):
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="fluxrt-fixtures")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(HERE, name)
    onnx.save_model(model, path, **kwargs)
    print(f"{name}: {os.path.getsize(path)} bytes")


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


# add_f32.onnx: sum = x + y, fixed shape [2, 3].
save(
    helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["sum"])],
        "add_f32",
        [vi("x", TensorProto.FLOAT, [2, 3]), vi("y", TensorProto.FLOAT, [2, 3])],
        [vi("sum", TensorProto.FLOAT, [2, 3])],
    ),
    "add_f32.onnx",
)

# scale_f16.onnx: y = 2 * x in float16, dynamic batch "N" and fixed width 4.
two = numpy_helper.from_array(np.array(2.0, dtype=np.float16), "two")
save(
    helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "scale_f16",
        [vi("x", TensorProto.FLOAT16, ["N", 4])],
        [vi("y", TensorProto.FLOAT16, ["N", 4])],
        initializer=[two],
    ),
    "scale_f16.onnx",
)

# inc_bf16.onnx: y = bf16(f32(x) + 1), any shape of rank 1 ("len").
one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
save(
    helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["xf", "one"], ["yf"]),
            helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16),
        ],
        "inc_bf16",
        [vi("x", TensorProto.BFLOAT16, ["len"])],
        [vi("y", TensorProto.BFLOAT16, ["len"])],
        initializer=[one],
    ),
    "inc_bf16.onnx",
)

# ids_i32.onnx: CLIP/T5-like int32 input_ids [batch, 77-like "seq"] -> f32 embeddings = ids * 0.5,
# plus the ids echoed back as int32 (an integer output, converted to f32 by fluxrt).
half = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")
save(
    helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["idsf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["idsf", "half"], ["embeddings"]),
            helper.make_node("Identity", ["input_ids"], ["ids_echo"]),
        ],
        "ids_i32",
        [vi("input_ids", TensorProto.INT32, ["batch", "seq"])],
        [vi("embeddings", TensorProto.FLOAT, ["batch", "seq"]), vi("ids_echo", TensorProto.INT32, ["batch", "seq"])],
        initializer=[half],
    ),
    "ids_i32.onnx",
)

# ids_i64.onnx: int64 ids [n] -> f32 = ids - 1.
save(
    helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["idsf", "one"], ["out"]),
        ],
        "ids_i64",
        [vi("ids", TensorProto.INT64, ["n"])],
        [vi("out", TensorProto.FLOAT, ["n"])],
        initializer=[one],
    ),
    "ids_i64.onnx",
)

# slow_loop.onnx: x [16, 16] f32; repeats x = tanh(x @ w) `trips` times (int64 scalar input).
# With a large trip count it runs for minutes: used to test cancelling a run from another thread.
w = numpy_helper.from_array((np.eye(16, dtype=np.float32) * 0.5), "w")
body = helper.make_graph(
    [
        helper.make_node("MatMul", ["x_in", "w"], ["mm"]),
        helper.make_node("Tanh", ["mm"], ["x_out"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ],
    "body",
    [vi("iter", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("x_in", TensorProto.FLOAT, [16, 16])],
    [vi("cond_out", TensorProto.BOOL, []), vi("x_out", TensorProto.FLOAT, [16, 16])],
)
save(
    helper.make_graph(
        [
            helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")),
            helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body),
        ],
        "slow_loop",
        [vi("trips", TensorProto.INT64, []), vi("x", TensorProto.FLOAT, [16, 16])],
        [vi("y", TensorProto.FLOAT, [16, 16])],
        initializer=[w],
    ),
    "slow_loop.onnx",
)

# external/add_const.onnx + add_const.onnx.data: y = x + c, with c stored as external data next to the model.
ext_dir = os.path.join(HERE, "external")
os.makedirs(ext_dir, exist_ok=True)
data_file = os.path.join(ext_dir, "add_const.onnx.data")
if os.path.exists(data_file):
    os.remove(data_file)  # onnx.save_model appends to an existing data file
c = numpy_helper.from_array(np.array([10.0, 20.0, 30.0, 40.0], dtype=np.float32), "c")
save(
    helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add_const",
        [vi("x", TensorProto.FLOAT, [4])],
        [vi("y", TensorProto.FLOAT, [4])],
        initializer=[c],
    ),
    os.path.join("external", "add_const.onnx"),
    save_as_external_data=True,
    all_tensors_to_one_file=True,
    location="add_const.onnx.data",
    size_threshold=0,
)
