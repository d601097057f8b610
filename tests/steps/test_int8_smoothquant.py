"""int8_smoothquant step (modelopt SmoothQuant + W8A8): the alpha validation, smoothing really applied
(pre-quant scales on every quantized Linear, the fp32 function preserved), error vs fp32, the exported Q/DQ
graph run by ORT = torch fake-quant, a CLI build.

Error bound vs fp32: 1e-2 relative L2, the W8A8 bound (see test_int8.py): smoothing moves range between
activations and weights but leaves both int8 per-tensor / per-channel."""

from __future__ import annotations

import json

import pytest
import torch
from modelopt_cases import caps, eval_feed, export, make_step, op_counts, ort_outputs, quantize, rel_err, torch_outputs

from compiler.core.errors import RecipeError

INT8_REL_BOUND = 1e-2


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_a_recipe_error(alpha, tiny_bert):
    from omegaconf import OmegaConf

    from compiler.stages.validate import validate_steps

    node = OmegaConf.create({"name": "sq", "steps": {"int8_smoothquant": {"alpha": alpha}}})
    with pytest.raises(RecipeError) as e:
        validate_steps(node, caps("ort"), tiny_bert.info)
    assert e.value.key == "recipe.steps.int8_smoothquant.alpha"
    assert str(e.value) == (f"recipe.steps.int8_smoothquant.alpha: {alpha} is outside [0, 1] -- use a value in "
                            "[0, 1], e.g. 0.5")


def test_alpha_cli_error_exit_2(qcompile):
    res = qcompile("model=tiny_bert", "recipe=int8_smoothquant", "target=ort", "recipe.steps.int8_smoothquant.alpha=2")
    assert res.rc == 2, res
    assert "recipe.steps.int8_smoothquant.alpha: 2.0 is outside [0, 1]" in res.stderr + res.stdout


@pytest.mark.parametrize("which", ["bert", "modernbert"])
def test_smoothing_applied_and_error_bound(which, request, tmp_path):
    model = request.getfixturevalue("tiny_bert" if which == "bert" else "tiny_modernbert")
    data = request.getfixturevalue("tiny_data" if which == "bert" else "tiny_modernbert_data")
    step = make_step("int8_smoothquant", alpha=0.5)
    module, ctx = quantize(step, model, data)
    r = ctx.report
    n = 12 if which == "bert" else 8
    assert (r["weight_quantizers"], r["input_quantizers"], r["alpha"]) == (n, n, 0.5)

    # every quantized Linear got a per-input-channel smoothing scale, and not all ones
    scaled = []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and sub.input_quantizer.is_enabled:
            pqs = sub.input_quantizer.pre_quant_scale
            assert pqs is not None and pqs.numel() == sub.in_features, name
            scaled.append(float((pqs - 1).abs().max()))
    assert len(scaled) == n and max(scaled) > 1e-3

    # with rounding off (pre_quant_scale still applied), smoothing is an exact rewrite: x/s @ (W*s)^T == x @ W^T
    feed = eval_feed(data)
    ref = torch_outputs(model.module, feed)
    on = [q for _, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)
          for q in (sub.input_quantizer, sub.weight_quantizer) if q.is_enabled]
    for q in on:
        q.disable()
    smoothed_fp32 = torch_outputs(module, feed)
    for q in on:
        q.enable()
    assert rel_err(smoothed_fp32[0], ref[0]) < 1e-5
    fq = torch_outputs(module, feed)
    err = rel_err(fq[0], ref[0])
    assert 1e-6 < err < INT8_REL_BOUND, err

    path = export(step, module, model, tmp_path)
    ops = op_counts(path)
    assert ops.get("QuantizeLinear") == n and ops.get("DequantizeLinear") == 2 * n, ops
    for o, t in zip(ort_outputs(path, feed), fq):
        assert rel_err(o, t) < 1e-4, rel_err(o, t)


def test_cli_tiny_bert_ort(qcompile):
    from conftest import FAST

    res = qcompile("model=tiny_bert", "recipe=int8_smoothquant", "target=ort", *FAST,
                   "recipe.steps.int8_smoothquant.alpha=0.6")
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    report = json.loads((run / "report.json").read_text())
    assert report["steps"]["int8_smoothquant"]["alpha"] == 0.6
    assert report["steps"]["int8_smoothquant"]["input_quantizers"] == 10  # recipe: FFN down-projections fp32
    assert report["onnx"]["ops"]["QuantizeLinear"] == 10
    assert report["check"]["fidelity"]["embedding_cosine_mean"] > 0.99
