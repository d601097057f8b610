"""compiler/numerics/int4_linear.py: target=torch's int4 weight-only Linear stores modelopt's int4 blocks as 4-bit
codes and computes exactly what the fake-quant computes (rtn and the AWQ pre-scale); torch.export keeps it, so a
target=torch int4 run leaves a program `qcompile predict` loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compiler.numerics.int4_linear import Int4DequantLinear, use_int4_dequant_linears
from compiler.steps.base import StepContext
from compiler.steps.int4_weight_only import Int4WeightOnlyStep, Params
from tests.conftest import model_exclude, run_cli
from tests.steps.modelopt_cases import caps


def _int4(tiny_bert, tiny_data, tmp_path, algorithm="rtn"):
    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, work_dir=tmp_path,
                      calibration=tiny_data.calibration, exclude=model_exclude(tiny_bert))
    step = Int4WeightOnlyStep(Params(block_size=32, is_symmetric=True, algorithm=algorithm))
    return step.apply_torch(copy.deepcopy(tiny_bert.module), ctx)


@pytest.mark.parametrize("algorithm", ["rtn", "awq_lite"])
def test_the_int4_linear_computes_the_fake_quant_numbers(tiny_bert, tiny_data, tmp_path, algorithm):
    fake = _int4(tiny_bert, tiny_data, tmp_path, algorithm)
    lean = copy.deepcopy(fake)
    assert use_int4_dequant_linears(lean) == 12  # tiny_bert's encoder Linears (the pooler is excluded)
    swapped = [m for m in lean.modules() if isinstance(m, Int4DequantLinear)]
    assert all((m.pre_scale is not None) == (algorithm == "awq_lite") for m in swapped)
    feed = next(tiny_data.evaluation.batches(16))
    args = [torch.from_numpy(feed[n]) for n in tiny_bert.input_names]
    with torch.no_grad():
        for want, got in zip(fake(*args), lean(*args)):
            assert torch.equal(got, want)
    # two codes per byte: half a byte per weight plus one fp32 scale per 32
    layer = swapped[0]
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() * 2 == layer.in_features * layer.out_features


def test_a_quantizer_it_does_not_reproduce_stays_fake_quant(tiny_bert, tiny_data, tmp_path):
    fake = _int4(tiny_bert, tiny_data, tmp_path)
    linear = fake.get_submodule("inner.encoder.layer.0.attention.self.query")
    assert Int4DequantLinear.from_modelopt(linear) is not None
    wq = linear.weight_quantizer
    real_forward = wq.forward
    # PLANTED: a fake-quant whose numbers are not codes / (7 / amax) (as another scale rule would give)
    wq.forward = lambda w: real_forward(w) * 1.001
    assert Int4DequantLinear.from_modelopt(linear) is None
    wq.forward = real_forward
    linear.input_quantizer.enable()  # activations quantized too: not weight-only
    assert Int4DequantLinear.from_modelopt(linear) is None


def test_a_torch_int4_run_exports_a_program_that_predict_loads(tmp_path):
    res = run_cli(tmp_path, "model=tiny_bert", "recipe=int4_weight_only", "target=torch",
                       "recipe.steps.int4_weight_only.is_symmetric=true", "bench.enabled=false",
                       "check.loss_sources=false")
    assert res.rc == 0, res.stderr[-3000:]
    (run,) = res.run_dirs()
    report = json.loads((run / "report.json").read_text())
    lower = report["lower"]
    assert lower["artifact"] == "exported_program" and (run / "engine.pt2").is_file()
    assert lower["kernels"]["int4_dequant_linear"] == lower["kernels"]["fake_quant_layers"] > 0
    res = run_cli(tmp_path, "predict", str(run), "a fine sentence", "--json")
    assert res.rc == 0, res.stderr
    assert json.loads(res.stdout)["predictions"][0]["text"] == "a fine sentence"
