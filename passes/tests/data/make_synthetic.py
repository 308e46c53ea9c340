"""Builds `synthetic.onnx`: a tiny hand-made model that exercises what real exports rarely do all
at once: an If with bodies that read outer values, a model-local function, node and model
metadata, optional-field presence, a Constant tensor attribute and several attribute kinds.
Run with the pinned `onnx` (see models/requirements.txt): python make_synthetic.py
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 10, "w")
scale = numpy_helper.from_array(np.array([0.5], dtype=np.float32), "scale")

then_out = helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["batch", 4])
then_body = helper.make_graph(
    [helper.make_node("Mul", ["h", "scale"], ["then_y"], name="then_mul")],
    "then_body", [], [then_out])
else_out = helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["batch", 4])
else_body = helper.make_graph(
    [helper.make_node("Relu", ["h"], ["else_y"], name="else_relu")],
    "else_body", [], [else_out])

double = helper.make_function(
    "local", "Double", ["a"], ["b"],
    [helper.make_node("Add", ["a", "a"], ["b"])],
    [helper.make_opsetid("", 17)])

nodes = [
    helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
    helper.make_node("Constant", [], ["zero"], name="zero",
                     value=numpy_helper.from_array(np.array(0.0, dtype=np.float32))),
    helper.make_node("ReduceSum", ["h"], ["total"], name="sum", keepdims=0),
    helper.make_node("Greater", ["total", "zero"], ["positive"], name="cmp"),
    helper.make_node("If", ["positive"], ["branch"], name="choose",
                     then_branch=then_body, else_branch=else_body),
    helper.make_node("Double", ["branch"], ["doubled"], name="double", domain="local"),
    helper.make_node("LeakyRelu", ["doubled"], ["y"], name="leaky", alpha=0.25),
]
nodes[0].metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'proj']")
graph = helper.make_graph(nodes, "synthetic", [x], [y], [w, scale])
model = helper.make_model(
    graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    functions=[double], producer_name="make_synthetic.py")
model.ir_version = 8
helper.set_model_props(model, {"purpose": "IR round-trip fixture"})
onnx.checker.check_model(model, full_check=True)
onnx.save(model, "synthetic.onnx")
