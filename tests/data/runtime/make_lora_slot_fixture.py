"""Writes lora_slot.onnx, the unit-test graph of an optional (overridable-initializer) input pair, like the
transformer's run-time LoRA slots: y = x + (x @ A) @ B with A [3, r], B [r, 3] defaulting to zero-rank [3, 0] / [0, 3].

    /root/.cache/fluxrt/venv/bin/python tests/data/runtime/make_lora_slot_fixture.py
"""

import os

import onnx
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
a = helper.make_tensor_value_info("lin.lora_A", TensorProto.FLOAT, [3, "r"])
b = helper.make_tensor_value_info("lin.lora_B", TensorProto.FLOAT, ["r", 3])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
nodes = [
    helper.make_node("MatMul", ["x", "lin.lora_A"], ["xa"]),
    helper.make_node("MatMul", ["xa", "lin.lora_B"], ["xab"]),
    helper.make_node("Add", ["x", "xab"], ["y"]),
]
inits = [
    helper.make_tensor("lin.lora_A", TensorProto.FLOAT, [3, 0], []),
    helper.make_tensor("lin.lora_B", TensorProto.FLOAT, [0, 3], []),
]
graph = helper.make_graph(nodes, "lora_slot", [x, a, b], [y], initializer=inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fluxrt-fixtures")
model.ir_version = 8
onnx.checker.check_model(model)
path = os.path.join(HERE, "lora_slot.onnx")
onnx.save_model(model, path)
print(f"lora_slot.onnx: {os.path.getsize(path)} bytes")
