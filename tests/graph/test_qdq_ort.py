"""compiler/graph/qdq_ort.py on a hand-built QDQ graph: which inputs get rewired, which Q/DQ stay, the fused
MatMulIntegerToFloat's inputs, and onnxruntime's numbers before and after."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.graph.qdq_ort import (
    activation_products,
    float_consumers_read_float,
    fuse_matmul_bias,
    qdq_fed_only_float,
)

K, N = 16, 8


def block():
    """x -> Q/DQ -> MatMul(int8 per-channel weight) -> Add(bias) -> Add(residual: the same dequantized x) ->
    y; an int8 embedding table's Gather with its output Q/DQ -> Add; an activation product x_dq @ x_dq^T."""
    rng = np.random.default_rng(0)
    # 7-bit weights: on an AVX2 CPU without VNNI onnxruntime's u8s8 integer kernel adds u8*s8 products in int16
    # pairs, which saturate with full-range weights (measured on an AMD EPYC: 6 of 32 outputs off by up to 0.43
    # after the fusion); 2 * 255 * 63 fits, so the fused kernel equals the float path on every CPU
    w = rng.integers(-63, 64, (K, N)).astype(np.int8)
    w_scale = (rng.random(N) * 0.01 + 0.001).astype(np.float32)
    table = rng.integers(-127, 128, (10, N)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w_zp"),
             numpy_helper.from_array(np.float32(0.02), "x_scale"), numpy_helper.from_array(np.uint8(128), "x_zp"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bias"),
             numpy_helper.from_array(table, "t_q"), numpy_helper.from_array(np.float32(0.01), "t_scale"),
             numpy_helper.from_array(np.int8(0), "t_zp"),
             numpy_helper.from_array(np.array([1, 0], np.int64), "perm_unused")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_DQ", axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "bias"], ["mm_b"], name="dense/Add"),
        helper.make_node("Slice", ["x_dq", "zero", "n", "two"], ["x_res"], name="res/Slice"),
        helper.make_node("Add", ["mm_b", "x_res"], ["y"], name="residual/Add"),
        helper.make_node("DequantizeLinear", ["t_q", "t_scale", "t_zp"], ["t_dq"], name="t_DQ"),
        helper.make_node("Gather", ["t_dq", "ids"], ["g"], name="emb/Gather"),
        helper.make_node("QuantizeLinear", ["g", "t_scale", "t_zp"], ["g_q"], name="g_Q"),
        helper.make_node("DequantizeLinear", ["g_q", "t_scale", "t_zp"], ["g_dq"], name="g_DQ"),
        helper.make_node("Add", ["g_dq", "y"], ["z"], name="emb/Add"),
        helper.make_node("Transpose", ["x"], ["x_t"], name="attn/Transpose", perm=[0, 2, 1]),
        helper.make_node("QuantizeLinear", ["x_t", "x_scale", "x_zp"], ["x_t_q"], name="x_t_Q"),
        helper.make_node("DequantizeLinear", ["x_t_q", "x_scale", "x_zp"], ["x_t_dq"], name="x_t_DQ"),
        helper.make_node("MatMul", ["x_dq", "x_t_dq"], ["scores"], name="attn/MatMul"),
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
              numpy_helper.from_array(np.array([N], np.int64), "n"),
              numpy_helper.from_array(np.array([2], np.int64), "two")]
    graph = helper.make_graph(nodes, "block", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, K]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, N]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def outputs(model):
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((1, 4, K)).astype(np.float32), "ids": np.array([[1, 2, 3, 9]], np.int64)}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return feed, sess.run(["z", "scores"], feed)


def by_name(model):
    return {n.name: n for n in model.graph.node}


def test_float_consumers_read_the_float_tensor():
    model = block()
    assert qdq_fed_only_float(model) == []  # x's Q/DQ feeds the MatMuls too; g's is the Gather's own
    rewired = float_consumers_read_float(model)
    nodes = by_name(model)
    # the residual's Slice reads x itself; both MatMuls keep their dequantized operands, the int8 Gather
    # keeps the Q/DQ on its output (onnxruntime gathers int8 rows through it)
    assert rewired == 1
    assert nodes["res/Slice"].input[0] == "x"
    assert list(nodes["dense/MatMul"].input) == ["x_dq", "w_dq"]
    assert list(nodes["attn/MatMul"].input) == ["x_dq", "x_t_dq"]
    assert nodes["emb/Add"].input[0] == "g_dq" and "g_Q" in nodes
    assert qdq_fed_only_float(model) == []


def test_a_q_dq_pair_left_only_to_float_ops_is_reported_then_removed():
    model = block()
    for name in ("dense/MatMul", "dense/Add", "attn/MatMul", "attn/Transpose", "x_t_Q", "x_t_DQ"):
        model.graph.node.remove(by_name(model)[name])
    model.graph.node.append(helper.make_node("Identity", ["x"], ["mm_b"], name="stand_in"))
    del model.graph.output[1]
    assert qdq_fed_only_float(model) == ["x_Q"]
    float_consumers_read_float(model)
    assert "x_Q" not in by_name(model) and "x_DQ" not in by_name(model)
    assert qdq_fed_only_float(model) == []


def test_rewiring_changes_only_what_the_float_ops_read():
    model = block()
    feed, before = outputs(model)
    float_consumers_read_float(model)
    _, after = outputs(model)
    # the residual now adds x instead of x rounded to the 0.02 grid: at most half a step per element
    assert np.max(np.abs(after[0] - before[0])) <= 0.01 + 1e-6
    np.testing.assert_array_equal(after[1], before[1])


def test_matmul_and_bias_fuse_into_matmulintegertofloat():
    model = block()
    float_consumers_read_float(model)
    _, before = outputs(model)
    assert fuse_matmul_bias(model) == 1  # the activation product has no constant weight: left as it is
    nodes = by_name(model)
    fused = nodes["dense/MatMul"]
    assert (fused.op_type, fused.domain) == ("MatMulIntegerToFloat", "com.microsoft")
    assert list(fused.input) == ["x_q", "w_q", "x_scale", "w_scale", "x_zp", "w_zp", "bias"]
    assert list(fused.output) == ["mm_b"] and "dense/Add" not in nodes and "w_DQ" not in nodes
    assert nodes["attn/MatMul"].op_type == "MatMul"
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    _, after = outputs(model)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(after[1], before[1])


def test_activation_products_are_the_matmuls_without_a_stored_weight():
    model = block()
    assert activation_products(model) == ["attn/MatMul"]
    assert activation_products(model, ["dense/MatMul"]) == []
