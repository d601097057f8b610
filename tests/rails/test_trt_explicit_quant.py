"""Rail 8 (TensorRT explicit quantization): `qcompile doctor model.onnx target=trt` on onnxruntime's U8S8
Q/DQ graph of tiny_bert must fail naming the node and the rule (it passed before this rail), while the
Q/DQ graph qcompile's int8_static makes for target=trt passes; each rule is planted on a small graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from compiler.core.schema import DoctorConfig
from compiler.rails import FAILED, PASSED, SKIPPED, RailContext, applies
from compiler.rails import trt_explicit_quant as teq
from compiler.rails import doctor
from targets import capabilities_of


def _graph(nodes, inits, inputs=("x",), opset=21):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(i, T.FLOAT, [2, 4]) for i in inputs],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def _qdq(zp_dtype=np.int8, zp=0, scale_shape=(), on_weight=False, block=False):
    """x (or a constant weight) -> QuantizeLinear -> DequantizeLinear -> MatMul with a weight."""
    scale = np.full(scale_shape, 0.1, np.float32)
    zps = np.full(scale_shape, zp, zp_dtype)
    w = nh.from_array(np.ones((4, 4), np.float32), "w")
    src = "w" if on_weight else "x"
    extra = {"axis": 1} if scale_shape else {}
    if block:
        extra = {"axis": 1, "block_size": 2}
    nodes = [h.make_node("QuantizeLinear", [src, "s", "zp"], ["q"], name="q_node", **extra),
             h.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq_node", **extra),
             h.make_node("MatMul", ["x", "dq"] if on_weight else ["dq", "w"], ["y"], name="mm")]
    return _graph(nodes, [w, nh.from_array(scale, "s"), nh.from_array(zps, "zp")])


def _run(model):
    return teq.judge(teq.violations(model), 2)


def test_applies_to_symmetric_int8_targets_only():
    assert applies(teq, capabilities_of("trt"))
    assert not applies(teq, capabilities_of("ort")) and not applies(teq, capabilities_of("torch"))


def test_symmetric_int8_qdq_passes():
    r = _run(_qdq())
    assert r["status"] == PASSED and r["violations"] == 0


@pytest.mark.parametrize("planted,rule", [
    ({"zp_dtype": np.uint8, "zp": 128},
     "Q/DQ type: TensorRT takes int8 or fp8 e4m3 Q/DQ (int4 / fp4 blocks for weights), never uint8"),
    ({"zp": 3}, "zero point: TensorRT quantization is symmetric, every zero point must be 0 (here 3)"),
    ({"scale_shape": (4,)}, "per-channel scale: TensorRT takes per-channel (axis) Q/DQ on constant weights only"),
])
def test_each_planted_rule_fails_naming_node_and_rule(planted, rule):
    r = _run(_qdq(**planted))
    assert r["status"] == FAILED, r
    assert r["message"].startswith(f"node q_node (QuantizeLinear) breaks TensorRT's {rule}")
    assert "(+1 more node(s))" in r["message"]
    assert r["nodes"] == ["q_node (QuantizeLinear)", "dq_node (DequantizeLinear)"]


def test_per_channel_on_weights_and_blocks_pass():
    assert _run(_qdq(scale_shape=(4,), on_weight=True))["status"] == PASSED
    assert _run(_qdq(scale_shape=(4, 2), block=True))["status"] == PASSED  # blocked (NVFP4-style) scales


def test_quantize_without_zero_point_is_uint8():
    """QuantizeLinear with no zero point and no output_dtype quantizes to uint8 (ONNX default)."""
    nodes = [h.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q_default"),
             h.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq_default")]
    r = _run(_graph(nodes, [nh.from_array(np.float32(0.1), "s")]))
    assert r["status"] == FAILED and r["nodes"][0] == "q_default (QuantizeLinear)" and "never uint8" in r["message"]


def test_qoperator_op_fails():
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
             h.make_node("MatMulInteger", ["xq", "wq", "xz"], ["y"], name="mmi")]
    r = _run(_graph(nodes, [nh.from_array(np.ones((4, 4), np.int8), "wq")]))
    assert r["status"] == FAILED and r["nodes"] == ["dql (DynamicQuantizeLinear)", "mmi (MatMulInteger)"]
    assert "QOperator op: TensorRT parses Q/DQ graphs only" in r["message"]


def test_int32_bias_dequantize_on_a_computed_tensor_fails():
    bias = nh.from_array(np.array([5, 6, 7, 8], np.int32), "b_q")
    s = nh.from_array(np.float32(0.01), "bs")
    nodes = [h.make_node("DequantizeLinear", ["b_q", "bs"], ["b"], name="bias_dq"),
             h.make_node("Add", ["x", "b"], ["y"], name="add")]
    r = _run(_graph(nodes, [bias, s]))
    assert r["status"] == FAILED and r["nodes"] == ["bias_dq (DequantizeLinear)"]
    assert "int32 DequantizeLinear" in r["message"]
    # the same int32 DequantizeLinear folded into a constant only (TensorRT folds it): fine
    nodes = [h.make_node("DequantizeLinear", ["b_q", "bs"], ["b"], name="bias_dq"),
             h.make_node("Mul", ["b", "bs"], ["b2"], name="const_mul"), h.make_node("Add", ["x", "b2"], ["y"])]
    assert _run(_graph(nodes, [bias, s]))["status"] == PASSED


def test_trt_custom_ops_and_graphs_without_qdq():
    nodes = [h.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["q"], domain="trt"),
             h.make_node("TRT_FP8DequantizeLinear", ["q", "s"], ["y"], domain="trt")]
    assert _run(_graph(nodes, [nh.from_array(np.float32(0.1), "s")]))["status"] == PASSED
    plain = _graph([h.make_node("Relu", ["x"], ["y"])], [])
    assert teq.run(RailContext(target=capabilities_of("trt"), config=DoctorConfig()))["status"] == SKIPPED
    assert teq.judge(teq.violations(plain), 0)["status"] == SKIPPED


def _int8_static(exported, tmp_path, target):
    from tests.steps.test_int8_static import quantize

    out, _ = quantize(exported, "tiny_bert", tmp_path / target, target=target)
    return out


def test_doctor_fails_ort_u8s8_graph_and_passes_qcompile_trt_graph(exported, tmp_path):
    """The defect: onnxruntime's U8S8 Q/DQ graph (uint8 activations, zero point 128ish) got
    "4 passed, 3 skipped" from `qcompile doctor ... target=trt`."""
    u8s8 = _int8_static(exported, tmp_path, "ort")
    by = {r["rail"]: r for r in doctor.doctor_file(u8s8, target=capabilities_of("trt"))}
    r = by["trt_explicit_quant"]
    assert r["status"] == FAILED, r
    assert "QuantizeLinear) breaks TensorRT's Q/DQ type: TensorRT takes int8 or fp8 e4m3" in r["message"]
    assert "never uint8" in r["message"] and r["violations"] >= 16
    assert doctor.failures(list(by.values()))
    # the same recipe lowered for trt (signed, symmetric) passes
    trt_ready = _int8_static(exported, tmp_path, "trt")
    by = {r["rail"]: r for r in doctor.doctor_file(trt_ready, target=capabilities_of("trt"))}
    assert by["trt_explicit_quant"]["status"] == PASSED, by["trt_explicit_quant"]
    assert by["trt_explicit_quant"]["qdq_nodes"] > 16
    # and the rail is not asked for an ORT target
    ort_rows = {r["rail"]: r for r in doctor.doctor_file(u8s8, target=capabilities_of("ort"))}
    assert ort_rows["trt_explicit_quant"]["status"] == SKIPPED
    assert "target=ort is not one" in ort_rows["trt_explicit_quant"]["message"]


def test_doctor_command_exits_1_on_the_u8s8_graph(exported, tmp_path, capsys):
    from compiler.commands.subcommands import doctor as doctor_cmd

    u8s8 = _int8_static(exported, tmp_path, "ort")
    assert doctor_cmd([str(u8s8), "target=trt", "input_dependence=false"]) == 1
    out = capsys.readouterr().out
    assert "| trt_explicit_quant | failed | node " in out and "1 failed" in out
    assert onnx.load(str(u8s8), load_external_data=False).graph.node  # the file is untouched
