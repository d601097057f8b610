"""compiler/numerics/int8_linear.py: target=torch's CPU int8 Linear computes exactly what torchao's dynamic int8
Linear computes (same weights, same activation quantization, same order of floating-point operations), only faster;
it takes only the torchao forms it reproduces."""

from __future__ import annotations

import copy

import pytest
import torch

from compiler.numerics.int8_linear import Int8DynamicLinear, use_lean_int8_linears
from compiler.steps.torchao_kernels import TorchKernel, make_config, torchao_modules


def _torchao_linear(granularity: str, bias: bool = True, config: str = "Int8DynamicActivationInt8WeightConfig",
                    **kwargs) -> torch.nn.Linear:
    taoq, _ = torchao_modules()
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=bias)
    holder = torch.nn.Sequential(lin)
    args = {"granularity": granularity, **kwargs} if granularity else kwargs
    taoq.quantize_(holder, make_config(TorchKernel(config, args)))
    return holder[0]


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_cpu_linear_equals_torchao_bit_for_bit(granularity, bias):
    quantized = _torchao_linear(granularity, bias)
    lean = Int8DynamicLinear.from_torchao(quantized)
    assert lean is not None and lean.per_token == (granularity == "per_row")
    torch.manual_seed(1)
    # a 3-D activation with one large token (as a [CLS] row) and rows of very different ranges
    x = torch.randn(2, 7, 96) * torch.logspace(-2, 1, 7).reshape(1, 7, 1)
    x[0, 0, 3] = 40.0
    with torch.no_grad():
        expected, got = quantized(x), lean(x)
    assert got.shape == expected.shape == (2, 7, 40)
    assert torch.equal(got, expected)
    # and it is int8 arithmetic, not fp32: the fp32 Linear differs, by what rounding the activations costs
    # (one scale for the whole tensor and its 40.0 outlier cost more than one scale per token)
    with torch.no_grad():
        fp32 = torch.nn.functional.linear(x, quantized.weight.dequantize(), quantized.bias)
    rel = float(torch.linalg.norm(got - fp32) / torch.linalg.norm(fp32))
    assert (0 < rel < 0.01) if granularity == "per_row" else (0.01 < rel < 0.2), rel


def test_forms_it_does_not_reproduce_stay_torchao():
    # weight-only int8 (fp32 activations) and asymmetric activations compute something else
    weight_only = _torchao_linear("", config="Int8WeightOnlyConfig")
    assert Int8DynamicLinear.from_torchao(weight_only) is None
    taoq, _ = torchao_modules()
    asym = _torchao_linear("per_row", act_mapping_type=taoq.MappingType.ASYMMETRIC)
    assert Int8DynamicLinear.from_torchao(asym) is None
    assert Int8DynamicLinear.from_torchao(torch.nn.Linear(4, 4)) is None  # a plain fp32 Linear


def test_swapping_a_module_keeps_its_outputs_and_the_other_layers():
    taoq, _ = torchao_modules()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16),
                                torch.nn.Linear(16, 8))
    taoq.quantize_(model, make_config(TorchKernel("Int8DynamicActivationInt8WeightConfig", {"granularity": "per_row"})),
                   filter_fn=lambda m, name: name in ("0", "2"))
    before = copy.deepcopy(model)
    assert use_lean_int8_linears(model) == 2
    assert [type(m).__name__ for m in model] == ["Int8DynamicLinear", "GELU", "Int8DynamicLinear", "Linear"]
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(model(x), before(x))
    program = torch.export.export(model, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten._int_mm.default" in ops and not any(o.startswith("torchao.") for o in ops)


def test_a_weight_that_is_not_int8_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"weight_t must be a 2-D int8 tensor .*\(3, 4\) torch.float32"):
        Int8DynamicLinear(torch.zeros(3, 4), torch.ones(4), None, per_token=True)


# -- calibrated static W8A8 (modelopt fake-quant) run in int8 ----------------------------------------------------

@pytest.mark.parametrize("recipe_step", ["int8", "int8_smoothquant"])
def test_a_modelopt_w8a8_model_runs_in_int8_with_its_fake_quant_numbers(recipe_step, tiny_bert, tiny_data):
    """The calibrated fake-quant model (tiny BERT, every encoder Linear W8A8, SmoothQuant's pre-scales for
    int8_smoothquant) and the same model with its Linears swapped for Int8StaticLinear: the same activation and
    weight codes, so the outputs differ only by fp32 summation order (the fake-quant sums dequantized products,
    the int8 module sums integers exactly and scales once)."""
    from tests.steps.modelopt_cases import caps, make_step, rel_err, torch_outputs

    from compiler.numerics.int8_linear import Int8StaticLinear
    from compiler.steps.base import StepContext

    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, calibration=tiny_data.calibration,
                      exclude=["*pooler*"], report={})
    fake = make_step(recipe_step).apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    lowered = copy.deepcopy(fake)
    assert use_lean_int8_linears(lowered) == 12
    swapped = [m for m in lowered.modules() if isinstance(m, Int8StaticLinear)]
    assert len(swapped) == 12
    assert all(m.pre_scale is not None for m in swapped) == (recipe_step == "int8_smoothquant")
    (feed,) = list(tiny_data.evaluation.batches(32))
    got, want, ref = (torch_outputs(m, feed)[0] for m in (lowered, fake, tiny_bert.module))
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert rel_err(want, ref) > 1e-4  # the format's own error is far larger: this is W8A8, not fp32

    # a layer's int8 weight codes are modelopt's own rounding of the weight: scaled back they are its fake-quant
    layer = next(n for n, m in fake.named_modules() if n.endswith("layer.0.attention.self.query"))
    q = fake.get_submodule(layer)
    with torch.no_grad():
        dequantized = q.weight_quantizer(q.weight)
    codes = lowered.get_submodule(layer).weight_t.t().float()
    assert torch.allclose(codes * (q.weight_quantizer.amax.reshape(-1, 1) / 127.0), dequantized, rtol=1e-6, atol=0)


def test_quantizers_it_cannot_run_in_int8_stay_fake_quant(tiny_bert, tiny_data):
    """fp8 (not integer), a Linear that is not quantized at all, and a W8A8 layer planted with an input quantizer
    still calibrating or switched off (weight-only) are left as they are."""
    from tests.steps.modelopt_cases import caps, make_step

    from compiler.numerics.int8_linear import Int8StaticLinear
    from compiler.steps.base import StepContext

    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, calibration=tiny_data.calibration,
                      exclude=["*pooler*"], report={})
    fp8 = make_step("fp8").apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    assert use_lean_int8_linears(fp8) == 0
    assert Int8StaticLinear.from_modelopt(torch.nn.Linear(4, 4)) is None

    # a W8A8 layer is taken; the same layer with its input quantizer off (weight-only), or still calibrating, is not
    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, calibration=tiny_data.calibration,
                      exclude=["*pooler*"], report={})
    fake = make_step("int8").apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    layer = next(m for n, m in fake.named_modules() if n.endswith("layer.0.attention.self.query"))
    assert Int8StaticLinear.from_modelopt(layer) is not None
    layer.input_quantizer.enable_calib()
    assert Int8StaticLinear.from_modelopt(layer) is None
    layer.input_quantizer.disable_calib()
    layer.input_quantizer.disable()
    assert Int8StaticLinear.from_modelopt(layer) is None
