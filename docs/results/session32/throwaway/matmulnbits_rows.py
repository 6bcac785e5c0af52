"""Is ONNX Runtime's int4 MatMulNBits (int8 activations, accuracy_level 4) row-invariant between a one-row
call and a multi-row one? One node of each weight shape of an int4 artifact's model.onnx, run alone on
random rows: row 0 of an M = 1 call against row 0 of M = 2, 3, 5, 9 calls (20 draws each).
Run: python docs/results/session32/throwaway/matmulnbits_rows.py ARTIFACT (an --precision int4 export)."""

import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

model = onnx.load(f"{sys.argv[1]}/model.onnx")
inits = {i.name: i for i in model.graph.initializer}
seen = set()
for node in model.graph.node:
    if node.op_type != "MatMulNBits":
        continue
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shape = (attrs["K"], attrs["N"])
    if shape in seen:
        continue
    seen.add(shape)
    one = helper.make_node("MatMulNBits", ["x", node.input[1], node.input[2]], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [one],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", attrs["K"]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", attrs["N"]])],
        [inits[node.input[1]], inits[node.input[2]]],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), options)
    rng = np.random.default_rng(0)
    differ, multi_differ, worst = 0, 0, 0.0
    for _ in range(20):
        x = rng.standard_normal((9, attrs["K"])).astype(np.float32)
        alone = session.run(None, {"x": x[:1]})[0][0]
        rows = [session.run(None, {"x": x[:m]})[0][0] for m in (2, 3, 5, 9)]
        differ += sum(not np.array_equal(alone, r) for r in rows)
        multi_differ += sum(not np.array_equal(rows[0], r) for r in rows[1:])
        worst = max(worst, *(float(np.abs(alone - r).max()) for r in rows))
    print(
        f"K {shape[0]:5d} N {shape[1]:5d}: row 0 at M = 1 differs from M > 1 in {differ}/80 calls (max {worst:.2e}); "
        f"M = 2 against M = 3, 5, 9: {multi_differ}/60 differ"
    )
