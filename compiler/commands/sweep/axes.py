"""The axes of a sweep's summary and plot (which Row numbers, which way is better) and the Pareto front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from compiler.commands.sweep.row import Row
from compiler.core.status import Status


@dataclass(frozen=True)
class Axis:
    """One axis of the summary's front and plot: a Row's number, and which way is better."""

    key: str
    label: str  # the plot's axis label and the front's description
    get: Callable[[Row], Optional[float]]
    higher_is_better: bool

    def cost(self, r: Row) -> float:
        """The value as something to minimize (ties to FIDELITY_DECIMALS, see below)."""
        v = round(self.get(r), FIDELITY_DECIMALS)
        return -v if self.higher_is_better else v


FIDELITY_DECIMALS = 6  # cosines equal to 6 decimals tie: fp32 on torch (1.0 exactly) does not "beat"
                       # fp32 on ORT (0.99999999999) on fidelity, so a slower exact copy is not on the front

SPEEDUP = Axis("speedup_vs_fp32", "speed vs the fp32 engine, same run (x, higher is better)",
               lambda r: r.speedup_vs_fp32 if r.speedup_vs_fp32 is not None else (1.0 if r.fp32_self else None), True)
LATENCY = Axis("ms_per_sample", "latency, ms per sample (lower is better)", lambda r: r.ms_per_sample, False)
SIZE = Axis("artifact_mb", "artifact size, MB (lower is better)", lambda r: r.artifact_mb, False)
COSINE = Axis("embedding_cosine", "mean embedding cosine to fp32 (higher is better)", lambda r: r.embedding_cosine,
              True)
DROP = Axis("task_drop", "task metric drop, fp32 minus target (lower is better)", lambda r: r.task_drop, False)
REPAIR_SIZE = Axis("repair_weight_mb", "quantized layers' weights at their formats, MB (lower is better)",
                   lambda r: r.repair_weight_mb, False)
REPAIR_DROP = Axis("repair_drop", "drop of the budgeted metric at the chosen fallbacks (lower is better)",
                   lambda r: r.repair_drop, False)


def pareto_front_min(points: Sequence[Sequence[float]]) -> List[int]:
    """Indices of the points no other point beats, every coordinate minimized: a point is beaten when another
    is at least as good in all and strictly better in one (equal points all stay)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats: lower latency (x) and higher fidelity (y)."""
    return pareto_front_min([(x, -y) for x, y in points])


def is_budget_sweep(rows: Sequence[Row]) -> bool:
    """Runs that searched fallbacks (recipe.repair.enabled) under different budgets: a size-vs-drop curve."""
    return len({r.repair_budget for r in rows if r.repair_budget is not None}) > 1


def _finished(rows: Sequence[Row]) -> List[Row]:
    return [r for r in rows if r.status in (Status.PASSED, Status.GATE_FAILED)]


def choose_axes(rows: Sequence[Row]) -> Tuple[Axis, Axis]:
    """(x, y) of the summary: artifact size against the drop of the budgeted metric for a sweep over the repair
    budget (the repair's own measurement; else the task metric's drop, else the embedding cosine); otherwise the
    same-run speed ratio to fp32 against the embedding cosine. Latencies of builds run in parallel (or while the
    machine's load changed) do not compare, ratios timed in one run do: the ratio is the axis whenever any
    finished run has one, and the runs without one (ratio_missing) are named on the plot and in summary.md.
    Latency only where no run has a ratio (every run with bench.baseline=none, a GPU target on a machine without
    one), and the plot says so."""
    done = [r for r in _finished(rows) if r.embedding_cosine is not None]
    if is_budget_sweep(rows):
        met = [r for r in _finished(rows) if r.repair_budget is not None]
        x = REPAIR_SIZE if met and all(REPAIR_SIZE.get(r) is not None for r in met) else SIZE
        for y in (REPAIR_DROP, DROP):
            if met and all(y.get(r) is not None for r in met):
                return x, y
        return x, COSINE
    return (SPEEDUP if any(SPEEDUP.get(r) is not None for r in done) or not done else LATENCY), COSINE


def ratio_missing(rows: Sequence[Row], axes: Optional[Tuple[Axis, Axis]] = None) -> List[Row]:
    """Finished runs with a fidelity number but no same-run speed ratio, where the summary's x axis is the ratio:
    they are off the plot and the front, and the summary says so."""
    x, _ = axes or choose_axes(rows)
    if x is not SPEEDUP:
        return []
    return [r for r in _finished(rows) if r.embedding_cosine is not None and SPEEDUP.get(r) is None]


def search_objectives(rows: Sequence[Row]) -> List[str]:
    """The objectives a search's jobs returned (compiler/commands/search.py), when they returned any numbers."""
    names = next((list(r.objectives) for r in rows if r.objectives), [])
    return names if any(v is not None for r in rows for v in r.objectives.values()) else []


def _measured(rows: Sequence[Row], axes: Optional[Tuple[Axis, Axis]] = None) -> List[Row]:
    x, y = axes or choose_axes(rows)
    return [r for r in _finished(rows) if x.get(r) is not None and y.get(r) is not None]


def mark_pareto(rows: Sequence[Row]) -> None:
    """A search marks the front over the objectives its jobs returned (all minimized, what Optuna's
    best_trials hold); a grid the front over the summary's two axes."""
    for r in rows:
        r.pareto = False
    names = search_objectives(rows)
    if names:
        pts = [r for r in _finished(rows) if all(r.objectives.get(n) is not None for n in names)]
        vectors = [[round(r.objectives[n], FIDELITY_DECIMALS) for n in names] for r in pts]
    else:
        x, y = choose_axes(rows)
        pts = _measured(rows, (x, y))
        vectors = [(x.cost(r), y.cost(r)) for r in pts]
    for i in pareto_front_min(vectors):
        pts[i].pareto = True

