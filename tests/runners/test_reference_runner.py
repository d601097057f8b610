"""The reference runner (ReferenceEvaluator + TensorRT custom ops) against ONNX Runtime and torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.runners.reference import ReferenceRunner, reference_predictor, unsupported_ops


def _int8_qdq_graph(tmp_path, tiny_bert, tiny_data):
    """tiny BERT exported in fp32, then ORT quantize_static (QDQ, U8S8) over 16 calibration samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compiler.stages.export import export_onnx
    from compiler.core.schema import ExportConfig

    fp32 = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "fp32.onnx",
                       ExportConfig(opset=17))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(list(tiny_data.calibration.batches(8)))

        def get_next(self):
            return next(self._it, None)

    out = tmp_path / "int8.onnx"
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return out


def test_matches_onnxruntime_on_int8_qdq_graph(tmp_path, tiny_bert, tiny_data):
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    path = _int8_qdq_graph(tmp_path, tiny_bert, tiny_data)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # ORT's optimizer would fuse Q/DQ into integer kernels (other rounding); compare the graph as written
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"],
                                              graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
    feeds = list(tiny_data.evaluation.batches(8))[:2]
    results = Comparator.run([ReferenceRunner(path, name="reference"), ort_runner], data_loader=feeds)
    # the same QDQ arithmetic in both, but x/scale rounding can flip one int8 step where a value sits on a
    # .5 boundary (ORT multiplies by 1/scale): the median diff must be ~0, the mean tiny, and no element off
    # by more than a few int8 steps of the output (|output| ~ 1, step ~ 0.01)
    acc = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-5, rtol=1e-5,
                                                                               check_error_stat="median"))
    assert bool(acc), "reference runner differs from ONNX Runtime on the int8 QDQ graph"
    for ref, got in zip(results["reference"], results[ort_runner.name]):
        for name in ("last_hidden_state", "sentence_embedding"):
            diff = np.abs(ref[name] - got[name])
            assert diff.mean() < 1e-4 and diff.max() < 0.05, (name, diff.mean(), diff.max())
        # a flip touches one token's row of last_hidden_state: nearly every element is bit-close
        assert np.mean(np.abs(ref["last_hidden_state"] - got["last_hidden_state"]) < 1e-5) > 0.99
    assert np.abs(results["reference"][0]["sentence_embedding"]).max() > 0


def _single_op_model(node, inputs, outputs, opset=21, inits=()):
    graph = helper.make_graph([node], "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("trt", 1)])


def test_trt_fp8_ops_match_standard_fp8_qdq_in_onnxruntime():
    """trt::TRT_FP8QuantizeLinear/DequantizeLinear == standard Q/DQ with a float8e4m3fn zero point (ORT)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    x[0, :4] = [1000.0, -1000.0, 1e-6, 0.0]  # saturation and underflow
    scale = np.float32(0.01)
    trt_nodes = [
        helper.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["q"], domain="trt"),
        helper.make_node("TRT_FP8DequantizeLinear", ["q", "s"], ["y"], domain="trt"),
    ]
    g = helper.make_graph(trt_nodes, "trt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                          initializer=[numpy_helper.from_array(np.array(scale), "s")])
    trt_model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("trt", 1)])
    got = reference_predictor(trt_model)({"x": x})["y"]

    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    std_nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], saturate=1),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    g2 = helper.make_graph(std_nodes, "std", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                           initializer=[numpy_helper.from_array(np.array(scale), "s"), zp])
    std = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 21)])
    want = ort.InferenceSession(std.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == pytest.approx(448 * 0.01)


def test_trt_fp4_dynamic_quantize_then_standard_dq_equals_torch_fake_quant():
    """The NVFP4 activation pattern modelopt exports: TRT_FP4DynamicQuantize -> DQ(scale) -> DQ(x, block 16)
    reproduces compiler.numerics.nvfp4.nvfp4_fake_quant (the torch side) exactly."""
    import torch

    from compiler.numerics.nvfp4 import nvfp4_fake_quant

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 8, 64)) * rng.uniform(0.1, 5, size=(2, 8, 64))).astype(np.float32)
    amax = float(np.abs(x).max()) * 0.8  # calibrated amax below the batch max: saturation is exercised
    gs = np.array(amax / 6.0 / 448.0, dtype=np.float32)
    nodes = [
        helper.make_node("TRT_FP4DynamicQuantize", ["x", "gs"], ["xf4", "sf8"], domain="trt", axis=-1,
                         block_size=16, scale_type=TensorProto.FLOAT8E4M3FN),
        helper.make_node("DequantizeLinear", ["sf8", "gs"], ["s"]),
        helper.make_node("DequantizeLinear", ["xf4", "s"], ["y"], axis=-1, block_size=16),
    ]
    g = helper.make_graph(nodes, "fp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 64])],
                          initializer=[numpy_helper.from_array(gs, "gs")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)])
    got = reference_predictor(model)({"x": x})["y"]
    want = nvfp4_fake_quant(torch.from_numpy(x), torch.tensor(amax), 16).numpy()
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, x)


def test_unknown_custom_op_is_named():
    node = helper.make_node("TRT_Mystery", ["x"], ["y"], domain="trt")
    model = _single_op_model(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert unsupported_ops(model) == ["trt::TRT_Mystery"]
    from compiler.core.errors import BuildError

    with pytest.raises(BuildError, match="no implementation of trt::TRT_Mystery"):
        reference_predictor(model)
