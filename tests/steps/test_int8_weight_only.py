"""int8_weight_only step (modelopt): only weight quantizers, no calibration data read, error vs fp32, the
exported graph (int8 weight initializers -> DequantizeLinear, no QuantizeLinear), ORT = torch, a CLI build.

Error bound vs fp32 (relative L2 of last_hidden_state): 2e-3, tighter than W8A8's 1e-2 because activations
stay fp32. Per-output-channel int8 weights round to max|w_row|/127; with weight crest factors of ~4 the
relative weight error is ~1/127/sqrt(12) * 4 ~ 0.9% per element, which averages down over the 64-256 inputs
of a dot product to ~0.1% of each output. Measured: 4e-4 (tiny BERT), 2.5e-5 (tiny ModernBERT)."""

from __future__ import annotations

import json

import onnx
import pytest
from modelopt_cases import (eval_feed, export, make_step, op_counts, ort_outputs, quantize, rel_err, torch_outputs,
                            weight_dq_initializer_types)

from compiler.steps.base import StepContext
from modelopt_cases import caps

WEIGHT_ONLY_REL_BOUND = 2e-3


@pytest.mark.parametrize("which,linear,quantized", [("bert", 13, 12), ("modernbert", 8, 8)])
def test_weights_only_quantized_and_error_bound(which, linear, quantized, request, tmp_path):
    model = request.getfixturevalue("tiny_bert" if which == "bert" else "tiny_modernbert")
    data = request.getfixturevalue("tiny_data" if which == "bert" else "tiny_modernbert_data")
    step = make_step("int8_weight_only")
    assert step.needs_calibration is False
    module, ctx = quantize(step, model, data)
    r = ctx.report
    assert (r["linear_layers"], r["weight_quantizers"], r["input_quantizers"]) == (linear, quantized, 0)
    assert r["calibration"] == "none (weights only)"

    feed = eval_feed(data)
    ref, fq = torch_outputs(model.module, feed), torch_outputs(module, feed)
    err = rel_err(fq[0], ref[0])
    assert 1e-7 < err < WEIGHT_ONLY_REL_BOUND, err

    path = export(step, module, model, tmp_path)
    ops = op_counts(path)
    assert "QuantizeLinear" not in ops and ops.get("DequantizeLinear") == quantized, ops
    assert weight_dq_initializer_types(path) == {"INT8": quantized}
    onnx.checker.check_model(str(path), full_check=True)
    for o, t in zip(ort_outputs(path, feed), fq):
        assert rel_err(o, t) < 1e-5, rel_err(o, t)  # dequantized weights: the same fp32 matmuls
    assert rel_err(ort_outputs(path, feed, optimize=True)[0], ref[0]) < WEIGHT_ONLY_REL_BOUND


def test_runs_without_calibration_data(tiny_bert):
    ctx = StepContext(target=caps("ort"), model_info=tiny_bert.info, calibration=None, exclude=["*pooler*"])
    import copy

    make_step("int8_weight_only").apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    assert ctx.report["weight_quantizers"] == 12


def test_cli_tiny_bert_ort(qcompile):
    from conftest import FAST

    res = qcompile("model=tiny_bert", "recipe=int8_weight_only", "target=ort", *FAST)
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    report = json.loads((run / "report.json").read_text())
    assert report["steps"]["int8_weight_only"]["input_quantizers"] == 0
    assert report["onnx"]["ops"]["DequantizeLinear"] == 12 and "QuantizeLinear" not in report["onnx"]["ops"]
    assert report["check"]["fidelity"]["embedding_cosine_mean"] > 0.999
