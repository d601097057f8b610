"""int8: W8A8 static int8 with nvidia-modelopt (INT8_DEFAULT_CFG): weights int8 per output channel, Linear
inputs int8 per tensor with amax calibrated on the recipe's data; exported as standard Q/DQ."""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.steps.base import CALIBRATION_METHODS, StepParams
from compiler.steps.modelopt import ModeloptStep

# "max" is modelopt's own name for minmax; accepted so a caller may speak either language
ALIASES = {"max": "minmax"}


@dataclass
class Params(StepParams):
    """calibration: how each Linear input's amax is chosen from the calibration data.
      minmax (alias: max) -> modelopt's max calibrator: the largest |x| seen.
      entropy -> modelopt's HistogramCalibrator, amax minimizing the KL divergence between the 2048-bin
                 histogram and its int8 version (TensorRT's entropy calibration; thresholds tried every
                 16th bin, see compiler/steps/modelopt.py ENTROPY_STRIDE).
      percentile -> modelopt's HistogramCalibrator, amax at `percentile` of |x|.
    Weights always use max per output channel (no clipping: a weight's max is its real range).
    exclude: module-name patterns (fnmatch) kept in full precision, on top of model.exclude."""

    calibration: str = "minmax"
    percentile: float = 99.99
    exclude: list[str] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str, str]]:
        out = []
        if ALIASES.get(self.calibration, self.calibration) not in CALIBRATION_METHODS:
            out.append(("calibration", f"unknown method {self.calibration!r}",
                        f"use one of {', '.join(CALIBRATION_METHODS)}"))
        if not 0.0 < self.percentile <= 100.0:
            out.append(("percentile", f"{self.percentile} is not in (0, 100]", "use e.g. 99.99"))
        return out


class Int8Step(ModeloptStep):
    name = "int8"
    Params = Params
    FORMAT = "int8"
    summary = ("W8A8 static int8 with modelopt (minmax/entropy/percentile), exported as Q/DQ; int8 x int8 products on "
               "torch (CPU)")
    precision = frozenset({"int8"})

    def calibration(self) -> str:
        return ALIASES.get(self.params.calibration, self.params.calibration)

    def percentile(self) -> float:
        return float(self.params.percentile)
