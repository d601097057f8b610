"""fp8: FP8 e4m3 weights and Linear inputs (per-tensor scales, max calibration) with nvidia-modelopt
(FP8_DEFAULT_CFG). On target=ort the exported TensorRT FP8 ops are lowered to standard float8 Q/DQ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from compiler.core.schema import ExportConfig
from compiler.graph.fp8_qdq import MIN_OPSET, lower_trt_fp8
from compiler.graph.io import save_onnx
from compiler.steps.base import StepParams
from compiler.steps.modelopt import ModeloptStep
from compiler.steps.torchao_kernels import NoKernel


# How the weights' per-tensor scales are chosen (modelopt calibration algorithms that apply to e4m3 per-tensor
# weights; its AWQ / local_hessian / four_over_six are block-format calibrations, not offered here):
#   max  each weight's max (FP8_DEFAULT_CFG's, the default)
#   mse  the weight's amax searched among 0.25x..4x of its max to minimize its squared error (MseCalibConfig)
ALGORITHMS = {"max": "max", "mse": {"method": "mse"}}


@dataclass
class Params(StepParams):
    """exclude: module-name patterns (fnmatch) kept in full precision, on top of model.exclude.
    algorithm: how the weight scales are calibrated (ALGORITHMS)."""

    exclude: List[str] = field(default_factory=list)
    algorithm: str = "max"

    def problems(self):
        if self.algorithm not in ALGORITHMS:
            return [("algorithm", f"fp8 has no calibration algorithm {self.algorithm!r}",
                     f"use one of {list(ALGORITHMS)}")]
        return []


class Fp8Step(ModeloptStep):
    name = "fp8"
    Params = Params
    FORMAT = "fp8"
    summary = "FP8 e4m3 W8A8 fake-quant with modelopt; float8 Q/DQ on ort (opset >= 19), TRT FP8 ops on trt"
    # min_opset and its reason come from the fp8 format (compiler/core/formats.py): a target that runs the
    # ONNX graph without TensorRT's trt:: ops gets standard float8 Q/DQ (opset 19); TensorRT reads its own FP8
    # ops at any opset
    precision = frozenset({"fp8"})

    def torch_kernel(self) -> NoKernel:
        return NoKernel("fp8: torchao's float8 kernels (Float8DynamicActivationFloat8WeightConfig) run on CUDA GPUs "
                        "with compute capability >= 8.9 only, and qcompile does not lower to them yet; there is no "
                        "CPU float8 matrix product")

    def algorithm(self):
        algo = str(self.params.algorithm)
        return "__keep__" if algo == "max" else dict(ALGORITHMS[algo])  # max: the preset's, as before

    def after_export(self, onnx_path, out_path, ctx):
        """Where the target cannot run TensorRT's FP8 custom ops: lowered to standard float8 Q/DQ with fp8
        weight initializers. TensorRT reads its own ops, so there the graph stays as modelopt exported it."""
        if ctx.target.trt_custom_ops:
            return onnx_path
        import onnx

        if int(ctx.opset) < MIN_OPSET:  # validation catches this first; a direct caller gets the same words
            self.validate_export(ExportConfig(opset=int(ctx.opset)), ctx.target)
        model = lower_trt_fp8(onnx.load(str(onnx_path), load_external_data=True))
        return save_onnx(model, out_path, "auto")
