"""fp16 past protobuf's 2 GB: onnx's shape inference and an InferenceSession on bytes both serialize the whole
model, so a large graph is typed from its weight-less copy and probed through a file with external data. The
limit is lowered for the test (a real 2 GB fp16 build costs minutes and ~10 GB): the large-model path must give
exactly what the ordinary path gives."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.graph import io
from compiler.steps.base import StepContext
from compiler.steps import fp16
from compiler.steps.fp16 import Fp16Step, Params
from modelopt_cases import caps


def elem_types(typed):
    return {v.name: v.type.tensor_type.elem_type for v in
            list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}


@pytest.fixture
def limit_of_one_megabyte(monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1 << 20)
    monkeypatch.setattr(io, "PROTOBUF_MARGIN", 0)


def test_weightless_copy_infers_the_same_types(exported, limit_of_one_megabyte):
    model = onnx.load(str(exported["tiny_modernbert"][2]))
    assert io.exceeds_protobuf(model)
    stripped = io.structure_only(model)
    big = [t for t in stripped.graph.initializer if int(np.prod(t.dims)) * 4 > 4096]
    assert big and all(not t.raw_data and not t.float_data for t in big)
    assert elem_types(io.infer_shapes(model)) == elem_types(onnx.shape_inference.infer_shapes(model))


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_modernbert"])
def test_fp16_past_the_protobuf_limit_equals_the_ordinary_conversion(exported, name, tmp_path, monkeypatch):
    model, data, fp32 = exported[name]
    feeds = list(data.evaluation.batches(8))[:2]

    def convert(out):
        ctx = StepContext(target=caps("ort"), model_info=model.info, calibration=data.calibration, work_dir=tmp_path)
        path = Fp16Step(Params()).apply_onnx(fp32, out, ctx)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return onnx.load(str(path)), [sess.run(None, f) for f in feeds], ctx.report

    small_graph, small_out, small_report = convert(tmp_path / "small.onnx")
    seen = []
    real = io.exceeds_protobuf
    monkeypatch.setattr(io, "exceeds_protobuf", lambda m: seen.append(real(m)) or seen[-1])
    monkeypatch.setattr(fp16, "exceeds_protobuf", io.exceeds_protobuf)  # where the fp16 step looks it up
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1 << 20)
    monkeypatch.setattr(io, "PROTOBUF_MARGIN", 0)
    large_graph, large_out, large_report = convert(tmp_path / "large.onnx")

    assert seen and all(seen)  # every size check took the large-model path
    assert (tmp_path / "large.onnx.data").exists()  # and the result was written with external data
    assert [n.op_type for n in large_graph.graph.node] == [n.op_type for n in small_graph.graph.node]
    assert large_report == small_report
    for a, b in zip(large_out, small_out):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
