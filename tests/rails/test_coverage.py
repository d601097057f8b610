"""Rail 3 (quantization coverage): graphs really quantized by onnxruntime.quantization, with the
op_types_to_quantize mistake planted (Gemm asked, the graph has MatMul)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from compiler.core.schema import DoctorConfig
from compiler.rails import FAILED, PASSED, SKIPPED, RailContext, coverage
from targets import capabilities_of


def _mlp(tmp_path, gemm: bool = True):
    """x -> MatMul(w1) -> Relu -> MatMul(w2) [-> Gemm(w3)]: 2 MatMul (+1 Gemm)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n) for n in ("w1", "w2", "w3")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("Relu", ["a"], ["b"]),
             h.make_node("MatMul", ["b", "w2"], ["c" if gemm else "y"])]
    if gemm:
        nodes.append(h.make_node("Gemm", ["c", "w3"], ["y"]))
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, [4, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits if gemm else inits[:2])
    path = tmp_path / "mlp.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


class _Reader:
    def __init__(self, n=8):
        rng = np.random.default_rng(1)
        self.feeds = iter([{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self.feeds, None)


def test_op_types_that_match_nothing_is_an_error(tmp_path):
    """quantize_dynamic(op_types_to_quantize=["Gemm"]) on a MatMul-only graph writes a valid model with
    zero quantized ops: the rail must fail it on a quantized recipe."""
    from onnxruntime.quantization import quantize_dynamic

    src = _mlp(tmp_path, gemm=False)
    out = tmp_path / "q.onnx"
    quantize_dynamic(str(src), str(out), op_types_to_quantize=["Gemm"])
    counts = coverage.coverage_counts(onnx.load(str(out)))
    assert counts["compute_ops"] == 2 and counts["quantized_ops"] == 0
    r = coverage.judge(counts, quantized=True)
    assert r["status"] == FAILED and "0 of 2 MatMul/Gemm/Conv are quantized" in r["message"]
    assert "MatMul 0/2" in r["message"]
    # the right op types: every MatMul becomes an integer MatMul
    quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul"])
    counts = coverage.coverage_counts(onnx.load(str(out)))
    assert counts["quantized_ops"] == counts["compute_ops"] == 2
    assert coverage.judge(counts, quantized=True)["status"] == PASSED


def test_static_qdq_partial_coverage_fraction(tmp_path):
    """QDQ static quantization of MatMul only: 2 of 3 compute ops (the Gemm stays float)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    src, out = _mlp(tmp_path), tmp_path / "qdq.onnx"
    quantize_static(str(src), str(out), _Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"])
    counts = coverage.coverage_counts(onnx.load(str(out)))
    assert counts["by_op"] == {"MatMul": {"total": 2, "quantized": 2}, "Gemm": {"total": 1, "quantized": 0}}
    assert counts["fraction"] == pytest.approx(2 / 3)
    assert counts["weight_ops"] == 3 and counts["weight_ops_quantized"] == 2
    r = coverage.judge(counts, quantized=True)
    assert r["status"] == PASSED and r["fraction"] == pytest.approx(0.6667) and "2/3" in r["message"]
    r = coverage.judge(counts, quantized=True, min_fraction=0.9)
    assert r["status"] == FAILED and "below doctor.min_quantized_fraction=0.9" in r["message"]


def test_dequantize_through_transpose_counts():
    """modelopt writes DQ(weight) -> Transpose -> MatMul: still covered."""
    w = numpy_helper.from_array(np.ones((8, 8), np.int8), "wq")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    g = h.make_graph([h.make_node("DequantizeLinear", ["wq", "s"], ["wd"]), h.make_node("Transpose", ["wd"], ["wt"]),
                      h.make_node("MatMul", ["x", "wt"], ["y"]), h.make_node("MatMul", ["y", "wt"], ["z"])],
                     "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])], [h.make_tensor_value_info("z", T.FLOAT, None)],
                     initializer=[w, s])
    counts = coverage.coverage_counts(h.make_model(g))
    assert counts["quantized_ops"] == 2 and counts["compute_ops"] == 2
    assert counts["weight_ops"] == 2 and counts["weight_ops_quantized"] == 2


def test_activation_matmuls_are_not_weight_ops():
    """Attention's Q @ K^T multiplies two activations: counted as a compute op, not a weight op."""
    g = h.make_graph([h.make_node("Transpose", ["k"], ["kt"]), h.make_node("MatMul", ["q", "kt"], ["s"])], "g",
                     [h.make_tensor_value_info(n, T.FLOAT, [2, 4, 4]) for n in ("q", "k")],
                     [h.make_tensor_value_info("s", T.FLOAT, None)])
    counts = coverage.coverage_counts(h.make_model(g))
    assert counts["compute_ops"] == 1 and counts["weight_ops"] == 0


def test_not_quantized_recipe_passes_and_file_mode_judges_from_the_graph(tmp_path):
    model = onnx.load(str(_mlp(tmp_path)))
    counts = coverage.coverage_counts(model)
    assert coverage.judge(counts, quantized=False)["status"] == PASSED
    r = coverage.judge(counts, quantized=None)  # a float file from elsewhere
    assert r["status"] == PASSED and r["quantized_recipe"] is False
    ctx = RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=_mlp(tmp_path), quantized=True)
    assert coverage.run(ctx)["status"] == FAILED


def test_recipe_quantizes_asks_the_steps():
    """Each step declares quantizes_compute; the rail never reads it from a step's name."""
    from compiler.steps.base import STEP_REGISTRY, Step, StepParams, load_all_steps

    load_all_steps()

    def S(name):
        cls = STEP_REGISTRY[name]
        return cls(cls.Params())

    assert coverage.recipe_quantizes([S("int8_static")])
    assert coverage.recipe_quantizes([S("rotate"), S("nvfp4")])
    assert coverage.recipe_quantizes([S("int8_smoothquant"), S("int8_weight_only")])
    assert coverage.recipe_quantizes([S("int8_dynamic")]) and coverage.recipe_quantizes([S("fp8")])
    assert not coverage.recipe_quantizes([S("fp16"), S("rotate")])
    assert not coverage.recipe_quantizes([])

    class Lookalike(Step):  # no `name`: not registered; a quantizing name does not make it quantize
        quantizes_compute = False

    class Plain(Step):
        quantizes_compute = True

    assert not coverage.recipe_quantizes([Lookalike(StepParams())])
    assert coverage.recipe_quantizes([Plain(StepParams())])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torch_module_counts():
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    counts = coverage.module_counts(m)
    assert counts["compute_ops"] == 2 and counts["quantized_ops"] == 0
    assert coverage.judge(counts, quantized=True)["status"] == FAILED
    q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    counts = coverage.module_counts(q)
    assert counts["compute_ops"] == 2 and counts["quantized_ops"] == 2
    assert coverage.run(RailContext(target=capabilities_of("torch"), config=DoctorConfig(), module=q, quantized=True))["status"] == PASSED


def test_empty_graph_skips_unless_quantized():
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [2])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2])])
    counts = coverage.coverage_counts(h.make_model(g))
    assert coverage.judge(counts, quantized=False)["status"] == SKIPPED
    assert coverage.judge(counts, quantized=True)["status"] == FAILED


def test_modelopt_quantizers_count_and_disabled_ones_do_not():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    q = mtq.quantize(m, mtq.INT8_DEFAULT_CFG, lambda mm: mm(torch.randn(4, 8)))
    counts = coverage.module_counts(q)
    assert counts["compute_ops"] == 2 and counts["quantized_ops"] == 2
    mtq.disable_quantizer(q, "*")  # quantizers present but switched off: nothing is quantized
    assert coverage.module_counts(q)["quantized_ops"] == 0
