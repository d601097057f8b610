"""fp16 on the dynamo exporter's graphs: its value_info types every intermediate tensor, which
onnxruntime's converter retyped inconsistently around the kept-fp32 rotary nodes of ModernBERT
("Inferred elem type differs from existing elem type: (1) vs (10)")."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from compiler.steps.base import StepContext
from compiler.steps.fp16 import Fp16Step, Params
from tests.steps.test_fp16 import mean_cosine, run


@pytest.fixture(scope="module")
def dynamo_modernbert(tiny_modernbert, tiny_modernbert_data, tmp_path_factory):
    from compiler import graph as graph_passes
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    root = tmp_path_factory.mktemp("dynamo_modernbert")
    cfg = ExportConfig(exporter="dynamo")
    path = export_onnx(tiny_modernbert.module, tiny_modernbert.input_names, tiny_modernbert.output_names,
                       root / "export.onnx", cfg)
    return graph_passes.fix_exported(path, root, cfg, {})


def test_fp16_converts_the_dynamo_graph_of_a_rotary_model(dynamo_modernbert, tiny_modernbert,
                                                          tiny_modernbert_data, tmp_path):
    fp32 = dynamo_modernbert
    assert len(onnx.load(str(fp32)).graph.value_info) > 0  # the exporter's typing the converter tripped on
    ctx = StepContext(target="ort", model_info=tiny_modernbert.info, calibration=tiny_modernbert_data.calibration,
                      work_dir=tmp_path, report={})
    out = Fp16Step(Params()).apply_onnx(fp32, tmp_path / "fp16.onnx", ctx)
    feeds = list(tiny_modernbert_data.evaluation.batches(8))
    assert mean_cosine(run(out, feeds), run(fp32, feeds)) > 0.9999
    assert mean_cosine(run(out, feeds, "last_hidden_state"), run(fp32, feeds, "last_hidden_state")) > 0.9999
    g = onnx.load(str(out))
    weights = [i for i in g.graph.initializer if len(i.dims) == 2 and min(i.dims) >= 64]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    # the rotary angles stay fp32 (blocked), as on the TorchScript graph
    assert ctx.report["blocked_reasons"].get("rotary angle (Sin/Cos input)", 0) > 0
    assert np.isfinite(ctx.report["probe_rel_error"]) and ctx.report["probe_rel_error"] < 0.01
