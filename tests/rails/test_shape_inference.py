"""Rail 7 (shape inference): graphs on which strict inference fails are reported (warned) and the
permissive pass keeps what it can; nothing raises. Real tiny BERT / ModernBERT exports pass."""

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from compiler.core.schema import DoctorConfig
from compiler.rails import PASSED, WARNED, RailContext
from compiler.rails import shape_inference as si
from targets import capabilities_of


def _save(tmp_path, nodes, inputs, outputs, value_info=(), name="g.onnx", domains=()):
    g = h.make_graph(nodes, "g", inputs, outputs, value_info=list(value_info))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)] + [h.make_opsetid(d, 1) for d in domains])
    path = tmp_path / name
    onnx.save(m, str(path))
    return path


def _run(path):
    return si.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=path))


def test_wrong_rank_value_info_is_reported_and_worked_around(tmp_path):
    """An exporter wrote a value_info whose rank contradicts the op (rank 1 for a [2,3] Relu output)."""
    x = h.make_tensor_value_info("x", T.FLOAT, [2, 3])
    path = _save(tmp_path, [h.make_node("Relu", ["x"], ["r"]), h.make_node("Neg", ["r"], ["y"])], [x],
                 [h.make_tensor_value_info("y", T.FLOAT, None)], value_info=[h.make_tensor_value_info("r", T.FLOAT, [7])])
    r = _run(path)
    assert r["status"] == WARNED
    assert r["strict_error"] and "worked around with the permissive pass" in r["message"]
    assert r["tensors"] == 1


def test_type_clash_is_reported_not_raised(tmp_path):
    x = h.make_tensor_value_info("x", T.FLOAT, [2, 3])
    path = _save(tmp_path, [h.make_node("Cast", ["x"], ["xh"], to=T.FLOAT16), h.make_node("Mul", ["xh", "x"], ["y"])],
                 [x], [h.make_tensor_value_info("y", T.FLOAT, None)])
    r = _run(path)
    assert r["status"] == WARNED and "inconsistent type" in r["strict_error"]
    assert r["tensors_with_shape"] == 1 and r["tensors"] == 1  # the Cast output still got its shape


def test_clean_graph_passes_with_counts(tmp_path):
    x = h.make_tensor_value_info("x", T.FLOAT, [2, 3])
    path = _save(tmp_path, [h.make_node("Relu", ["x"], ["r"]), h.make_node("Neg", ["r"], ["y"])], [x],
                 [h.make_tensor_value_info("y", T.FLOAT, None)])
    r = _run(path)
    assert r["status"] == PASSED and r["tensors_with_shape"] == r["tensors"] == 1


def test_judge_when_both_passes_fail():
    r = si.judge("strict broke", "permissive broke", 0, 10)
    assert r["status"] == WARNED and "continues without inferred shapes" in r["message"]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_modernbert"])
def test_real_exports_pass(fixture, request, tmp_path):
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    model = request.getfixturevalue(fixture)
    path = export_onnx(model.module, model.input_names, model.output_names, tmp_path / "m.onnx", ExportConfig())
    r = _run(path)
    assert r["status"] == PASSED, r
    assert r["tensors_with_shape"] == r["tensors"] > 100
