"""int8_weight_only: int8 weights (per output channel, max calibration) with fp32 activations, with
nvidia-modelopt (INT8_WEIGHT_ONLY_CFG); exported as int8 initializers feeding DequantizeLinear. On target=torch the
module keeps int8 weights through torchao (Int8WeightOnlyConfig) instead of modelopt's fake-quant."""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.steps.base import WEIGHTS, StepParams
from compiler.steps.modelopt import ModeloptStep
from compiler.steps.torchao_kernels import TorchKernel


@dataclass
class Params(StepParams):
    """exclude: module-name patterns (fnmatch) kept in full precision, on top of model.exclude."""

    exclude: list[str] = field(default_factory=list)


class Int8WeightOnlyStep(ModeloptStep):
    name = "int8_weight_only"
    Params = Params
    FORMAT = "int8_weight_only"
    # weight amax comes from the weights themselves: no calibration data is read
    needs_calibration = False
    precision = frozenset({"int8"})
    operands = frozenset({WEIGHTS})
    summary = "int8 weights per channel, fp32 activations (modelopt weight-only; torchao int8 weights on torch), exported as DQ-only weights"

    def torch_kernel(self) -> TorchKernel:
        # the same numerics as modelopt's (symmetric, per output channel, max / 127); the weight stays int8 in memory
        # and each product converts it to fp32 (torchao's eager CPU path): a quarter of the weight bytes, fp32 speed
        return TorchKernel("Int8WeightOnlyConfig", {"granularity": "per_row"},
                           compute="int8 weights per output channel, converted to fp32 inside each product")
