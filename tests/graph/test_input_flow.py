"""Input-flow check: a graph whose output was baked into a Constant at export fails the build with the
documented message; live graphs pass (ORT, or the reference runner for TensorRT-flavoured graphs)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compiler.core.errors import BuildError
from compiler.graph.input_flow import MESSAGE, check_input_flow, needs_reference_runner


class EagerRotation(torch.nn.Module):
    """What modelopt's `rotate` does through the CUDA-only fast_hadamard_transform: the rotation runs
    outside torch (here numpy), so the tracer sees a constant and the export bakes the example's result."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.h = np.linalg.qr(np.random.default_rng(0).standard_normal((64, 64)))[0].astype(np.float32)

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden, emb = self.inner(input_ids, attention_mask, token_type_ids)
        rotated = torch.from_numpy(emb.detach().numpy() @ self.h)  # escapes the tracer
        return hidden, rotated


def _export(module, loaded, path):
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    return export_onnx(module, loaded.input_names, loaded.output_names, path, ExportConfig(opset=17))


def test_planted_constant_baked_graph_fails(tmp_path, tiny_bert):
    # eval() on the wrapper: torch.onnx.export restores the wrapper's training flag afterwards, recursively,
    # which would switch the shared session fixture into train mode (dropout) for later tests
    path = _export(EagerRotation(copy.deepcopy(tiny_bert.module)).eval(), tiny_bert, tmp_path / "baked.onnx")
    with pytest.raises(BuildError) as e:
        check_input_flow(path, tiny_bert.input_names)
    assert str(e.value).startswith(MESSAGE)
    assert "output(s) sentence_embedding identical for two different inputs; checked with onnxruntime" in str(e.value)
    assert MESSAGE == "output does not depend on input: an op was baked into a Constant during export"


def test_live_graph_passes(tmp_path, tiny_bert):
    path = _export(tiny_bert.module, tiny_bert, tmp_path / "live.onnx")
    result = check_input_flow(path, tiny_bert.input_names)
    assert result["runner"] == "onnxruntime" and result["outputs"] == 2
    assert result["min_max_abs_change"] > 1e-3


def test_trt_graph_goes_to_the_reference_runner():
    from onnx import TensorProto, helper

    node = helper.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["q"], domain="trt")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("q", TensorProto.UINT8, [2])])
    assert needs_reference_runner(helper.make_model(g))
