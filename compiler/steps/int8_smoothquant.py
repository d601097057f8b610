"""int8_smoothquant: SmoothQuant (per-input-channel scales migrate activation outliers into the weights,
strength alpha) followed by W8A8 static int8, with nvidia-modelopt (INT8_SMOOTHQUANT_CFG)."""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.steps.base import StepParams
from compiler.steps.modelopt import ModeloptStep


@dataclass
class Params(StepParams):
    """alpha: migration strength in [0, 1]; the per-channel scale is s = max|x|^alpha / max|w|^(1-alpha).
    0 leaves activations alone, 1 moves all of their range into the weights; 0.5 is the paper's default
    for BERT-sized models. exclude: module-name patterns (fnmatch) kept in full precision, on top of
    model.exclude."""

    alpha: float = 0.5
    exclude: list[str] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str, str]]:
        if not 0.0 <= self.alpha <= 1.0:
            return [("alpha", f"{self.alpha} is outside [0, 1]", "use a value in [0, 1], e.g. 0.5")]
        return []


class Int8SmoothQuantStep(ModeloptStep):
    name = "int8_smoothquant"
    Params = Params
    FORMAT = "int8_smoothquant"
    summary = "SmoothQuant (alpha) + W8A8 static int8 with modelopt, exported as Q/DQ; int8 x int8 products on torch (CPU)"
    precision = frozenset({"int8"})

    def algorithm(self):
        return {"method": "smoothquant", "alpha": float(self.params.alpha)}

    def apply_torch(self, model, ctx):
        self.validate(ctx.model_info, ctx.target)  # a step built outside validation is checked too
        model = super().apply_torch(model, ctx)
        ctx.report["alpha"] = float(self.params.alpha)
        return model
