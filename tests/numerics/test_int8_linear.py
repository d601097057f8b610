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
