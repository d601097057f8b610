"""The objectives a build hands back to Hydra, so a sweeper (hydra-optuna-sweeper's NSGA-II) can search recipe
parameters for the Pareto front instead of running a full grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from compiler.core.errors import RecipeError, did_you_mean
from compiler.core.report_types import Report
from compiler.core.status import Status


def _fidelity_loss(report: Report) -> Optional[float]:
    return report.check.fidelity.loss() if report.check is not None and report.check.fidelity else None


def _task_drop(report: Report) -> Optional[float]:
    return report.task_drop()


def _artifact_mb(report: Report) -> Optional[float]:
    return report.bench.artifact_mb if report.bench is not None else None


def _time_vs_fp32(report: Report) -> Optional[float]:
    # an fp32 build is its own baseline (bench.baseline_kind "self"): ratio 1 by definition
    ratio = report.bench.speed_ratio() if report.bench is not None else None
    return 1.0 / ratio if ratio is not None and ratio > 0 else None


def _latency_ms(report: Report) -> Optional[float]:
    return report.bench.ms_per_sample if report.bench is not None else None


# name -> (what it is, how to read it from report.json). All are minimized, so a search preset's
# hydra.sweeper.direction is `minimize` once per objective.
OBJECTIVES: Dict[str, Tuple[str, Callable[[Report], Optional[float]]]] = {
    "fidelity_loss": ("1 - mean embedding cosine to fp32 (classifiers: 1 - label agreement)", _fidelity_loss),
    "task_drop": ("drop of the gated task metric against gold labels, fp32 minus target (needs labeled data)",
                  _task_drop),
    "artifact_mb": ("size of the engine files, MB", _artifact_mb),
    # 1 / speedup_vs_fp32: minimized like the others; a ratio from one run, so it compares across trials
    # run while the machine's load changed, unlike latency_ms
    "time_vs_fp32": ("engine time over the same model's fp32 engine timed in the same run (1 / speedup_vs_fp32)",
                     _time_vs_fp32),
    "latency_ms": ("ms per sample (absolute: moves with the machine's load)", _latency_ms),
}


def check_objectives(names: Sequence[str], directions: Any = None) -> Tuple[str, ...]:
    """The objective names of search.objectives, checked (and against the sweeper's hydra.sweeper.direction,
    when it has one) before any model loads."""
    names = tuple(str(n) for n in names)
    if not names:
        raise RecipeError("search.objectives", "is empty", f"name at least one of {', '.join(OBJECTIVES)}")
    for n in names:
        if n not in OBJECTIVES:
            raise RecipeError("search.objectives", f"unknown objective {n!r}", did_you_mean(n, OBJECTIVES))
    if directions is not None:
        dirs = [directions] if isinstance(directions, str) else list(directions)
        if len(dirs) != len(names):
            raise RecipeError("hydra.sweeper.direction",
                              f"{len(dirs)} direction(s) for {len(names)} objectives ({', '.join(names)})",
                              f"give one per objective: hydra.sweeper.direction=[{','.join(['minimize'] * len(names))}]")
        up = [str(getattr(d, "name", d)) for d in dirs if str(getattr(d, "name", d)) != "minimize"]
        if up:
            raise RecipeError("hydra.sweeper.direction", f"{up[0]!r}: every qcompile objective is a loss",
                              "use minimize for each (time_vs_fp32 is 1 / speedup_vs_fp32)")
    return names


# What a build that measured nothing returns for each objective: a penalty, dominated by every real point.
# Not NaN, which would make a failed trial: hydra-optuna-sweeper 1.3.0 then calls study.tell(state=FAIL,
# values=...) and optuna 2.10 refuses values with FAIL, ending the whole sweep with a ValueError (measured).
# Not inf: NSGA-II's crowding distance subtracts objective values.
PENALTY = 1.0e9


def objective_values(report: Optional[Report], names: Sequence[str]) -> Tuple[float, ...]:
    """The objectives of a build that measured something (passed, or failed its gate: a real point whose loss
    the sampler should learn from); PENALTY for each where the build failed (no report) or lacks the number
    (task_drop on unlabeled data)."""
    if report is None or report.status not in (Status.PASSED, Status.GATE_FAILED):
        return tuple(PENALTY for _ in names)
    out = []
    for n in names:
        v = OBJECTIVES[n][1](report)
        out.append(PENALTY if v is None or not math.isfinite(v) else float(v))
    return tuple(out)


def read_report(run_dir: Optional[Path]) -> Optional[Report]:
    """The run's report.json, typed (missing or mistyped values read as None); None where it has none."""
    if run_dir is None:
        return None
    try:
        return Report.read(Path(run_dir) / "report.json", partial=True)
    except (OSError, ValueError):  # json.JSONDecodeError and TypedJSONError are ValueErrors
        return None


class BuildResult(tuple):
    """What the Hydra task returns: a tuple of the objective values (what Optuna's sweeper reads: a float
    sequence, or float() of it for one objective) that also carries the build's outcome (exit code, status,
    error line) and objective names for compiler.commands.sweep.SweepSummary. A tuple subclass pickles with
    its attributes, so launchers that run jobs in other processes (joblib) hand it back whole."""

    outcome: Dict[str, Any]
    names: Tuple[str, ...]

    def __new__(cls, values: Sequence[float], names: Sequence[str], outcome: Mapping[str, Any]):
        self = super().__new__(cls, (float(v) for v in values))
        self.names = tuple(names)
        self.outcome = dict(outcome)
        return self

    def __reduce__(self):
        return (BuildResult, (tuple(self), self.names, self.outcome))

    def __float__(self) -> float:  # a single-objective study: `float(return_value)`
        if len(self) != 1:
            raise TypeError(f"{len(self)} objectives ({', '.join(self.names)}) cannot be one float: "
                            f"give hydra.sweeper.direction one entry per objective")
        return self[0]

    def objectives(self) -> Dict[str, Optional[float]]:
        """{name: value}, None where the build measured no value (the sweeper was handed PENALTY)."""
        return {n: (None if v >= PENALTY else v) for n, v in zip(self.names, self)}
