"""fp8: FP8 e4m3 weights and Linear inputs (per-tensor scales, max calibration) with nvidia-modelopt
(FP8_DEFAULT_CFG). On target=ort the exported TensorRT FP8 ops are lowered to standard float8 Q/DQ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from compiler.core.errors import RecipeError
from compiler.graph.fp8_qdq import MIN_OPSET
from compiler.steps.modelopt import ModeloptStep


@dataclass
class Params:
    """exclude: module-name patterns (fnmatch) kept in full precision, on top of model.exclude."""

    exclude: List[str] = field(default_factory=list)


class Fp8Step(ModeloptStep):
    name = "fp8"
    Params = Params
    FORMAT = "fp8"
    summary = "FP8 e4m3 W8A8 fake-quant with modelopt; float8 Q/DQ on ort (opset >= 19), TRT FP8 ops on trt"

    def validate_export(self, export_cfg, target: str) -> None:
        """fp8 on ort needs float8 QuantizeLinear, which opset 19 introduced."""
        if target == "ort" and int(export_cfg.opset) < MIN_OPSET:
            raise RecipeError("export.opset", f"{export_cfg.opset} is too old for fp8 on target=ort "
                              f"(float8e4m3fn QuantizeLinear/DequantizeLinear need opset >= {MIN_OPSET})",
                              f"pass export.opset={MIN_OPSET} (or higher)")

    def after_export(self, onnx_path, out_path, ctx):
        """On ort: TensorRT's FP8 custom ops -> standard float8 Q/DQ with fp8 weight initializers. TensorRT
        (target=trt) reads its own ops, so there the graph stays as modelopt exported it."""
        if ctx.target != "ort":
            return onnx_path
        import onnx

        from compiler.graph.io import save_onnx
        from compiler.graph.fp8_qdq import lower_trt_fp8

        if int(ctx.opset) < MIN_OPSET:  # validation catches this first; a direct caller gets the same words
            self.validate_export(type("E", (), {"opset": ctx.opset})(), ctx.target)
        model = lower_trt_fp8(onnx.load(str(onnx_path), load_external_data=True))
        return save_onnx(model, out_path, "auto")
