"""nvfp4's weight-rounding calibrations (`algorithm`, issue 19 section 2): the CPU static-block kernel against the
dynamic one, each modelopt calibration run on the CPU, the rounding it chose carried into the TensorRT graph
(graph == torch fake-quant for every algorithm), and the error each lowers against max calibration on a tiny
BERT with a planted outlier weight column."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from compiler.core.errors import RecipeError
from compiler.numerics.nvfp4 import (
    FixedScaleFP4QDQ,
    nvfp4_fake_quant,
    nvfp4_fake_quant_with_scales,
    nvfp4_quantize,
    nvfp4_static_fake_quant,
    nvfp4_static_scales,
)
from compiler.steps.base import ModelInfo, StepContext
from compiler.steps.nvfp4 import ALGORITHMS, NVFP4Params, NVFP4Step
from modelopt_cases import caps
from tests.conftest import PLANTED_LAYER, model_exclude

ROUNDING = [a for a in ALGORITHMS if a != "max"]

# ---- numerics -----------------------------------------------------------------------------------------


def test_static_kernel_with_max_block_amax_is_the_dynamic_kernel():
    """modelopt's static kernel (block amax given) and its dynamic one (block amax from the data) define the
    same scales when the given amax is each block's max: the CPU stand-ins agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-2, 1, 96)
    block_amax = x.reshape(64, 6, 16).abs().amax(-1)
    got = nvfp4_static_fake_quant(x, block_amax, x.abs().amax())
    np.testing.assert_allclose(got.numpy(), nvfp4_fake_quant(x, x.abs().amax()).numpy(), rtol=1e-6, atol=0)


def test_static_kernel_clips_and_four_over_six_normalizes_by_256():
    x = torch.tensor([[0.5, -1.0, 3.0, 12.0] + [0.0] * 12])
    amax = torch.tensor([6.0])  # clip the block at 6: 12 saturates to 6
    y = nvfp4_static_fake_quant(x, amax, torch.tensor(12.0))
    assert y[0, 3] == 6.0 and y[0, 2] == 3.0 and y[0, 1] == -1.0
    s448, gs448 = nvfp4_static_scales(torch.tensor([6.0]), torch.tensor(12.0), 448.0)
    s256, gs256 = nvfp4_static_scales(torch.tensor([6.0]), torch.tensor(12.0), 256.0)
    assert float(s448 * gs448) == pytest.approx(1.0) and float(s256 * gs256) == pytest.approx(1.0)
    assert float(s256) < float(s448) and float(s256) <= 256  # 4/6 leaves the e4m3 scales headroom above 256


def test_fixed_scales_reproduce_the_dynamic_rounding_and_are_idempotent():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    _, s8, gs = nvfp4_quantize(w, w.abs().amax())
    y = FixedScaleFP4QDQ.apply(w, s8, gs, 16)
    assert torch.equal(y, nvfp4_fake_quant(w, w.abs().amax()))
    assert torch.equal(nvfp4_fake_quant_with_scales(y, s8, gs), y)  # the stored rounded weight stays put
    zero = nvfp4_fake_quant_with_scales(w, torch.zeros_like(s8), gs)
    assert torch.count_nonzero(zero) == 0  # a zero block scale gives a zero block (the static kernel's rule)


# ---- validation ---------------------------------------------------------------------------------------


def test_unknown_algorithm_is_refused_with_the_list():
    from omegaconf import OmegaConf

    from compiler.stages.validate import validate_steps

    info = ModelInfo("tiny_bert", "bert", 64, 256, 4, 512)
    node = OmegaConf.create({"steps": {"nvfp4": {"algorithm": "hqq"}}})
    with pytest.raises(RecipeError) as e:
        validate_steps(node, caps("trt"), info)
    assert str(e.value) == ("recipe.steps.nvfp4.algorithm: nvfp4 has no calibration algorithm 'hqq' -- use one of "
                            "['max', 'awq_lite', 'awq_clip', 'awq_full', 'mse', 'four_over_six', 'local_hessian', "
                            "'gptq']")


def test_the_dynamo_exporter_is_refused_for_a_calibrated_algorithm():
    from compiler.core.schema import ExportConfig

    dynamo = ExportConfig(exporter="dynamo", opset=None)
    NVFP4Step(NVFP4Params()).validate_export(dynamo, caps("trt"))  # max: the dynamo route is fine
    with pytest.raises(RecipeError) as e:
        NVFP4Step(NVFP4Params(algorithm="mse")).validate_export(dynamo, caps("trt"))
    assert str(e.value) == ("recipe.steps.nvfp4.algorithm: mse cannot reach the graph through export.exporter=dynamo "
                            "(its NVFP4 weights export with max scales) -- use export.exporter=torchscript, or "
                            "recipe.steps.nvfp4.algorithm=max")


# ---- the step on a tiny model with a planted outlier column ----------------------------------------------


@pytest.fixture(scope="module")
def planted(tiny_bert):
    """tiny_bert's module with PLANTED_LAYER's input column 7 scaled 300x (an outlier weight column: its NVFP4
    blocks get a 300x larger scale than their other 15 weights need)."""
    module = copy.deepcopy(tiny_bert.module)
    with torch.no_grad():
        module.get_submodule(PLANTED_LAYER).weight[:, 7] *= 300.0
    return module


def _quantize(module, loaded, data, algorithm, target="trt"):
    ctx = StepContext(target=caps(target), model_info=loaded.info, calibration=data.calibration,
                      exclude=model_exclude(loaded))
    return NVFP4Step(NVFP4Params(algorithm=algorithm)).apply_torch(copy.deepcopy(module), ctx), ctx


@pytest.fixture(scope="module")
def quantized(planted, tiny_bert, tiny_data):
    return {a: _quantize(planted, tiny_bert, tiny_data, a) for a in ALGORITHMS}


def _outputs(module, loaded, data):
    feed = next(data.evaluation.batches(32))
    with torch.no_grad():
        return module(*[torch.from_numpy(feed[n]) for n in loaded.input_names])


def _hidden_error(module, reference, loaded, data) -> float:
    got, want = _outputs(module, loaded, data)[0], _outputs(reference, loaded, data)[0]
    return float((got - want).norm() / want.norm())


def _weight_error(module, reference) -> float:
    """Mean over the quantized Linear layers of ||W_effective - W||^2 / ||W||^2, W_effective the weight the
    layer multiplies by (its fake-quant weight, times AWQ's input scale where there is one)."""
    errs = []
    with torch.no_grad():
        for name, sub in module.named_modules():
            wq = getattr(sub, "weight_quantizer", None)
            if wq is None or not wq.is_enabled:
                continue
            w = wq(sub.weight)
            pre = getattr(sub.input_quantizer, "pre_quant_scale", None)
            if pre is not None:
                w = w * pre.reshape(1, -1)
            orig = reference.get_submodule(name).weight
            errs.append(float(((w - orig) ** 2).sum() / (orig ** 2).sum()))
    return float(np.mean(errs))


def test_each_algorithm_reports_itself_and_max_keeps_the_default_report(quantized):
    _, ctx = quantized["max"]
    assert "algorithm" not in ctx.report and "fixed_scale_weights" not in ctx.report  # the default build's report
    for algo in ROUNDING:
        _, ctx = quantized[algo]
        assert ctx.report["algorithm"] == algo and ctx.report["fixed_scale_weights"] == 12, (algo, ctx.report)
        assert ctx.report["quantized_layers"] == 12


def test_mse_and_four_over_six_lower_the_weight_error(quantized, planted):
    """Measured (tiny_bert, planted column, 16 calibration samples): mean relative squared weight error max
    8.35e-3, mse 6.19e-3 (x0.74), four_over_six 6.98e-3 (x0.84). Bounds: x0.8 and x0.9."""
    base = _weight_error(quantized["max"][0], planted)
    assert _weight_error(quantized["mse"][0], planted) < 0.8 * base
    assert _weight_error(quantized["four_over_six"][0], planted) < 0.9 * base


def test_awq_local_hessian_and_gptq_lower_the_output_error(quantized, planted, tiny_bert, tiny_data):
    """The last hidden state's relative error to the (planted) fp32 model, 32 evaluation sentences. Measured:
    max 0.0302, awq_lite 0.0220 (x0.73), awq_full 0.0221, local_hessian 0.0273 (x0.90), gptq 0.0279 (x0.92).
    Bounds: x0.8 for AWQ, x0.95 for the other two."""
    base = _hidden_error(quantized["max"][0], planted, tiny_bert, tiny_data)
    for algo, factor in (("awq_lite", 0.8), ("awq_full", 0.8), ("local_hessian", 0.95), ("gptq", 0.95)):
        err = _hidden_error(quantized[algo][0], planted, tiny_bert, tiny_data)
        assert err < factor * base, (algo, err, base)


def _export(module, loaded, tmp_path, name):
    from compiler import graph as graph_passes
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    cfg = ExportConfig(opset=23)
    path = export_onnx(module, loaded.input_names, loaded.output_names, tmp_path / f"{name}.onnx", cfg)
    path = graph_passes.fix_exported(path, tmp_path, cfg, {})
    ctx = StepContext(target=caps("trt"), model_info=loaded.info)
    return NVFP4Step(NVFP4Params()).after_export(path, tmp_path / f"{name}_trt.onnx", ctx), ctx


@pytest.mark.parametrize("algorithm", ROUNDING)
def test_the_graph_carries_the_chosen_rounding(quantized, tiny_bert, tiny_data, tmp_path, algorithm):
    """The TensorRT NVFP4 graph of each algorithm, run by the reference runner, equals the torch fake-quant (the
    tolerance of today's max graphs), and its FP4 block scales are the ones the calibration chose."""
    from onnx import numpy_helper

    from compiler.runners.reference import reference_predictor

    module, _ = quantized[algorithm]
    path, ctx = _export(module, tiny_bert, tmp_path, algorithm)
    assert ctx.report["fp4_calibrated_scales"] == 12
    model = onnx.load(str(path))
    assert "TRT_FP4QDQ" not in [n.op_type for n in model.graph.node]
    feed = next(tiny_data.evaluation.batches(8))
    got = reference_predictor(path)(feed)
    with torch.no_grad():
        want = module(*[torch.from_numpy(feed[n]) for n in tiny_bert.input_names])
    np.testing.assert_allclose(got["last_hidden_state"], want[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["sentence_embedding"], want[1].numpy(), atol=1e-6)
    # the planted layer's block scales in the graph are its quantizer's
    inits = {t.name: t for t in model.graph.initializer}
    wq = module.get_submodule(PLANTED_LAYER).weight_quantizer
    scales = [numpy_helper.to_array(t).astype(np.float32) for n, t in inits.items() if n.endswith("_f8_scale")]
    chosen = wq._qc_scale_e4m3.numpy()
    assert any(s.shape == chosen.shape and np.array_equal(s, chosen) for s in scales)


def test_mse_scales_differ_from_max_so_the_carry_matters(quantized):
    """Without carrying the scales the graph would hold max scales: for mse they differ in many blocks."""
    module, _ = quantized["mse"]
    wq = module.get_submodule(PLANTED_LAYER).weight_quantizer
    w = module.get_submodule(PLANTED_LAYER).weight.detach()
    _, max_s8, _ = nvfp4_quantize(w, w.abs().amax())
    assert (wq._qc_scale_e4m3 != max_s8).float().mean() > 0.1


@pytest.mark.parametrize("fallback", ["int8", "fp8"])
def test_layers_given_a_fallback_format_keep_their_quantizer(tiny_bert, tiny_data, fallback):
    """The repair's per-layer map (with_layer_formats) with a calibrated algorithm: the fallback layer keeps its
    int8 / fp8 quantizer, the other 11 get their calibrated NVFP4 scales."""
    layer = "inner.encoder.layer.0.attention.self.query"
    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, calibration=tiny_data.calibration,
                      exclude=model_exclude(tiny_bert))
    step = NVFP4Step(NVFP4Params(algorithm="four_over_six")).with_layer_formats({layer: fallback})
    module = step.apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    assert ctx.report["fixed_scale_weights"] == 11
    assert module.get_submodule(layer).weight_quantizer.backend is None
