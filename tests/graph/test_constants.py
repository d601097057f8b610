"""Constant fix-ups: constant subgraphs evaluated into initializers, large Constants promoted (and then
movable to external data), custom ops and live ops left alone; outputs equal before and after (up to fp32
accumulation order)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compiler.core.schema import CONSTANT_PROMOTE_BYTES
from compiler.graph.constants import fix_constants, fold_constant_subgraphs, promote_constants


def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name + "_v"))


def _rotated_weight_graph(d=128, out=96):
    """y = x @ Transpose(Reshape(W_flat) @ H) * 2 + b: a weight that only exists as a constant subgraph over
    Constant nodes (how a rotation computed at run time exports), plus a small Constant (the bias)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out * d,)).astype(np.float32)  # 48 KiB
    h = (np.linalg.qr(rng.standard_normal((d, d)))[0]).astype(np.float32)  # 64 KiB: promoted
    big = rng.standard_normal((d, d)).astype(np.float32)  # 64 KiB Constant used by a live op
    nodes = [
        _const("w_flat", w), _const("h", h), _const("shape", np.array([out, d], np.int64)),
        _const("two", np.array(2.0, np.float32)), _const("b", rng.standard_normal(out).astype(np.float32)),
        _const("big", big),
        helper.make_node("Reshape", ["w_flat", "shape"], ["w"]),
        helper.make_node("MatMul", ["w", "h"], ["wh"]),
        helper.make_node("Transpose", ["wh"], ["wt"], perm=[1, 0]),
        helper.make_node("Mul", ["wt", "two"], ["wt2"]),
        helper.make_node("MatMul", ["x", "big"], ["xb"]),  # live: reads the graph input
        helper.make_node("MatMul", ["xb", "wt2"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_constant_subgraph_becomes_one_initializer():
    model = _rotated_weight_graph()
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    before = _run(model, x)
    model, removed = fold_constant_subgraphs(model)
    ops = [n.op_type for n in model.graph.node]
    assert removed == 8  # Reshape, MatMul, Transpose, Mul and the 4 Constants only they read
    assert ops == ["Constant", "Constant", "MatMul", "MatMul", "Add"]  # the bias and the live op's Constant stay
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert list(inits) == ["wt2"] and inits["wt2"].shape == (128, 96)
    onnx.checker.check_model(model)
    # numpy's MatMul (folding) and ORT's MLAS accumulate in another order: equal up to fp32 rounding
    np.testing.assert_allclose(_run(model, x), before, rtol=2e-5, atol=1e-4)


def test_large_constants_promoted_small_kept():
    model = _rotated_weight_graph()
    model, n = promote_constants(model, CONSTANT_PROMOTE_BYTES)
    assert n == 2  # h (64 KiB) and big (64 KiB); w_flat (48 KiB) and the bias stay Constants
    assert {t.name for t in model.graph.initializer} == {"h", "big"}
    assert {n.output[0] for n in model.graph.node if n.op_type == "Constant"} == {"w_flat", "shape", "two", "b"}
    model2, n2 = promote_constants(_rotated_weight_graph(), CONSTANT_PROMOTE_BYTES, names=["b"])
    assert n2 == 3 and "b" in {t.name for t in model2.graph.initializer}


def test_fix_constants_file_then_external_data(tmp_path):
    """After the fix-up every large tensor is an initializer, so external data takes all of them: the
    .onnx proto keeps only small tensors."""
    from compiler.graph.io import save_onnx

    src = tmp_path / "m.onnx"
    onnx.save(_rotated_weight_graph(), str(src))
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
    before = _run(onnx.load(str(src)), x)
    out, counts = fix_constants(src, tmp_path / "fixed.onnx", CONSTANT_PROMOTE_BYTES)
    assert counts == {"folded_nodes": 8, "promoted_constants": 1}  # the 'big' Constant of the live MatMul
    ext = save_onnx(onnx.load(str(out)), tmp_path / "ext.onnx", "always")
    assert (tmp_path / "ext.onnx.data").stat().st_size == (96 * 128 + 128 * 128) * 4  # folded weight + big
    assert ext.stat().st_size < 4096
    np.testing.assert_allclose(
        ort.InferenceSession(str(ext), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0], before,
        rtol=2e-5, atol=1e-4)
    same, counts2 = fix_constants(ext, tmp_path / "again.onnx", CONSTANT_PROMOTE_BYTES)
    assert counts2 == {"folded_nodes": 0, "promoted_constants": 0} and same == ext  # nothing left to do


def test_custom_ops_and_shared_weight_aliases_are_not_folded():
    w = numpy_helper.from_array(np.ones((32, 16), np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w_alias"]),
             helper.make_node("TRT_FP4QDQ", ["w"], ["wq"], domain="trt", block_size=16),
             helper.make_node("MatMul", ["x", "wq"], ["y1"]),
             helper.make_node("Transpose", ["w_alias"], ["wt"]),
             helper.make_node("MatMul", ["wt", "x2"], ["y2"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]),
                                       helper.make_tensor_value_info("x2", TensorProto.FLOAT, [32, 2])],
                          [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 16]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, [16, 2])], initializer=[w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt", 1)])
    model, removed = fold_constant_subgraphs(model)
    assert removed == 0  # Transpose reads an Identity alias of an initializer: an exporter detail, kept
    assert [n.op_type for n in model.graph.node] == ["Identity", "TRT_FP4QDQ", "MatMul", "Transpose", "MatMul"]
