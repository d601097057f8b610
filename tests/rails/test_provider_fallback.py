"""Rail 2 (silent provider fallback): planted assignment records and real CPU sessions."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from compiler.core.schema import DoctorConfig
from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext
from compiler.rails import provider_fallback as pf
from targets import capabilities_of

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_quantized_op_on_cpu_under_cuda_fails():
    placement = {CUDA: {"MatMul": 10, "Add": 5}, CPU: {"Shape": 4, "DynamicQuantizeMatMul": 2, "MatMulInteger": 1}}
    r = pf.judge(placement, [CUDA, CPU])
    assert r["status"] == FAILED
    assert r["quantized_fallback"] == 3 and r["other_fallback"] == 4
    assert "3 quantized nodes fell back to the CPU" in r["message"]
    assert "DynamicQuantizeMatMul@CPUExecutionProvider x2" in r["message"]


def test_shape_ops_on_cpu_pass_and_compute_ops_warn():
    r = pf.judge({CUDA: {"MatMul": 10}, CPU: {"Shape": 4, "Gather": 2}}, [CUDA])
    assert r["status"] == PASSED and r["other_fallback"] == 6 and r["nodes_on_provider"] == 10
    r = pf.judge({CUDA: {"Add": 1}, CPU: {"MatMul": 3}}, [CUDA])
    assert r["status"] == WARNED and r["compute_fallback"] == 3
    # a quantized op on a secondary GPU provider (TensorRT asked first, CUDA took it) only warns
    r = pf.judge({"TensorrtExecutionProvider": {"MatMul": 4}, CUDA: {"QuantizeLinear": 2}},
                 ["TensorrtExecutionProvider", CUDA])
    assert r["status"] == WARNED


def test_nothing_on_the_requested_provider_fails():
    r = pf.judge({CPU: {"MatMul": 3, "Add": 3}}, [CUDA, CPU])
    assert r["status"] == FAILED and "no node runs on CUDAExecutionProvider" in r["message"]


def test_cpu_requested_everything_on_cpu_passes():
    r = pf.judge({CPU: {"MatMulInteger": 3, "DynamicQuantizeLinear": 3}}, [CPU])
    assert r["status"] == PASSED and r["nodes"] == 6


def test_provider_error_from_the_session_fails():
    ctx = RailContext(target=capabilities_of("ort"), config=DoctorConfig(), providers=[CUDA],
                      provider_error="asked for CUDAExecutionProvider but the session runs ['CPUExecutionProvider']")
    r = pf.run(ctx)
    assert r["status"] == FAILED and "session runs" in r["message"]


def _quantized_graph(tmp_path):
    """A two-MatMul graph, dynamically quantized by onnxruntime.quantization (MatMulInteger path)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2")]
    g = h.make_graph([h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
                      h.make_node("MatMul", ["b", "w2"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", 16])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     initializer=inits)
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(src))
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


def test_real_cpu_session_assignment(tmp_path):
    path = _quantized_graph(tmp_path)
    from compiler.runners.sessions import ort_session

    sess = ort_session(path, [CPU], record_placement=True)
    placement = pf.placement_from_session(sess)
    assert set(placement) == {CPU}
    quant_nodes = sum(n for op, n in placement[CPU].items() if pf.is_quantized_op(op))
    assert quant_nodes >= 2  # the int8 MatMuls (MatMulInteger / DynamicQuantizeMatMul) really are recorded
    assert pf.judge(placement, [CPU])["status"] == PASSED
    # the same real record under a CUDA request: nothing ran on CUDA, a silent fallback
    r = pf.judge(placement, [CUDA, CPU])
    assert r["status"] == FAILED and r["nodes_on_provider"] == 0


def test_torch_target_parameters_on_the_asked_device():
    import torch

    m = torch.nn.Linear(4, 4)
    ok = pf.run(RailContext(target=capabilities_of("torch"), config=DoctorConfig(), module=m, providers=["cpu"]))
    assert ok["status"] == PASSED and ok["by_device"] == {"cpu": 2}
    bad = pf.run(RailContext(target=capabilities_of("torch"), config=DoctorConfig(), module=m, providers=["cuda"]))
    assert bad["status"] == FAILED and "2 parameters not on cuda" in bad["message"]


def test_trt_target_skips():
    from compiler.rails import applies

    assert not applies(pf, capabilities_of("trt")) and applies(pf, capabilities_of("torch"))
    assert pf.run(RailContext(target=capabilities_of("trt"), config=DoctorConfig()))["status"] == SKIPPED


@pytest.mark.parametrize("op,quantized", [("QLinearMatMul", True), ("MatMulNBits", True), ("ConvInteger", True),
                                          ("TRT_FP8QuantizeLinear", True), ("MatMul", False), ("Shape", False)])
def test_is_quantized_op(op, quantized):
    assert pf.is_quantized_op(op) is quantized
