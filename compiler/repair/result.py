"""What a repair search found (RepairResult, with every measured point as a Probe) and the section of
report.json it writes (RepairSummary, a typed record with to_dict)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compiler.core.errors import GateError
from compiler.core.report_types import RepairProbe, RepairSection
from compiler.core.status import Status
from compiler.repair.budget import Budget


class RepairBudgetError(GateError):
    """The budget (or a gate threshold) cannot be met within repair.max_fallback_fraction. Exit 3, like a
    failed gate."""

    kind = Status.REPAIR_BUDGET_NOT_MET


@dataclass
class Probe:
    """One measured point of the search: a set of fallback_layers layers (the last one added: `added`);
    accepted = a point of the search's path (the size-vs-metric curve), not a rejected candidate. values: the
    gate conditions' values at this point; unmet: the constraints it misses ("metric" = the budget)."""

    fallback_layers: int
    metric: float
    drop: float
    weight_bytes: int
    added: str | None = None
    accepted: bool = True
    removed: str | None = None  # the backward pass's point: this layer left the set
    values: dict[str, float] = field(default_factory=dict)
    unmet: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        # drops as small as a tight budget (1e-7) stay readable: 6 significant digits, not 6 decimals
        return {"fallback_layers": self.fallback_layers, "metric": round(self.metric, 9),
                "drop": float(f"{self.drop:.6g}"), "weight_bytes": self.weight_bytes, "added": self.added,
                "accepted": self.accepted, **({"removed": self.removed} if self.removed else {}),
                **({"conditions": {k: round(v, 9) for k, v in self.values.items()}} if self.values else {}),
                **({"unmet": list(self.unmet)} if self.unmet else {})}

    @property
    def change(self) -> str:
        """What this point changed, for tables: +layer added, -layer removed, - for the start."""
        return f"+{self.added}" if self.added else f"-{self.removed}" if self.removed else "-"


@dataclass
class RepairResult:
    metric_name: str
    reference: float  # the metric's fp32 value (1.0 for fidelity metrics)
    budget: Budget
    fallback: str
    layers: list[dict[str, Any]]  # per layer, in sensitivity order: name, role, proxy, gain (measured or None)
    probes: list[Probe]
    chosen: list[str]
    allowed: int
    total: int
    seconds: dict[str, Any] = field(default_factory=dict)
    primary_format: str = ""
    met: bool = True
    needed: int | None = None  # unmet: the fallback count that would meet the budget (None: none does)
    fraction: float = 0.0  # repair.max_fallback_fraction
    strategy: str = "greedy"
    sensitivity_skipped: str = ""  # why no layer was measured alone (the all-quantized build met the budget)
    conditions: list[Any] = field(default_factory=list)  # metric.Condition: the gate thresholds also met

    @property
    def max_drop(self) -> float:
        return self.budget.max_drop

    @property
    def curve(self) -> list[Probe]:
        """The search's path: greedy's accepted points in the order measured (forward picks, then the backward
        pass's drops, so the last point is the map chosen); binary's by set size (binary search measures them
        out of order), one point per size (the last measured)."""
        if self.strategy != "binary":
            return [p for p in self.probes if p.accepted]
        by_size = {p.fallback_layers: p for p in self.probes if p.accepted}
        return [by_size[k] for k in sorted(by_size)]

    @property
    def layer_map(self) -> dict[str, str]:
        return {n: self.fallback for n in sorted(self.chosen)}

    def label(self, name: str) -> str:
        """A constraint in words: the budget ("metric") or a gate condition, with the key that set it."""
        if name == "metric":
            return f"the budget {self.metric_name} drop <= {self.max_drop:g} ({self.budget.source})"
        c = next((c for c in self.conditions if c.name == name), None)
        return f"{name} >= {c.floor:.6g} ({c.source})" if c is not None else name

    @property
    def decided_by(self) -> list[str]:
        """The constraints that decided the map: those still unmet on the path's last point before the first
        point meeting every constraint (none: the all-quantized build met them all); unmet: those the best
        point within the allowed layers misses."""
        path = self.curve
        first = next((i for i, p in enumerate(path) if not p.unmet), None)
        if first is None:
            within = [p for p in path if p.fallback_layers <= self.allowed] or path
            return [self.label(n) for n in min(within, key=lambda p: (len(p.unmet), p.drop)).unmet]
        return [] if first == 0 else [self.label(n) for n in path[first - 1].unmet]

    def decided_sentence(self) -> str:
        d = self.decided_by
        if not self.met:
            return f"Not met within the allowed fallbacks: {'; '.join(d)}."
        if not d:
            return "Decided by: nothing -- the all-quantized build met the budget and every gate threshold."
        return f"Decided by: {'; '.join(d)} (the last constraint met on the search path)."

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "metric_kind": self.budget.kind, "reference": self.reference,
                self.budget.key: self.max_drop, "budget_source": self.budget.source,
                "budget_note": self.budget.note(self.metric_name),
                "conditions": [{"name": c.name, "min": c.floor, "source": c.source} for c in self.conditions],
                "decided_by": self.decided_by,
                "fallback": self.fallback, "primary_format": self.primary_format, "quantized_layers": self.total,
                "max_fallback_layers": self.allowed, "chosen": sorted(self.chosen), "layers": self.layers,
                "strategy": self.strategy, "search": [p.as_dict() for p in self.curve],
                "measurements": [p.as_dict() for p in self.probes], "seconds": self.seconds, "met": self.met,
                "needed": self.needed, **({"sensitivity_skipped": self.sensitivity_skipped}
                                           if self.sensitivity_skipped else {})}


def searched_section(result: RepairResult, files: dict[str, str]) -> RepairSection:
    """report.json's "repair" section of a search (its type: compiler/core/report_types.py RepairSection)."""
    return RepairSection(
        fallback_layers=len(result.chosen), layers=dict(sorted(result.layer_map.items())),
        metric=result.metric_name, metric_kind=result.budget.kind, reference=result.reference,
        **{result.budget.key: result.max_drop}, budget_source=result.budget.source,
        budget_note=result.budget.note(result.metric_name),
        conditions=[{"name": c.name, "min": c.floor, "source": c.source} for c in result.conditions],
        decided_by=list(result.decided_by), fallback=result.fallback, met=result.met,
        quantized_layers=result.total, max_fallback_layers=result.allowed, strategy=result.strategy,
        search=[RepairProbe.from_dict(p.as_dict()) for p in result.curve], measurements=len(result.probes),
        seconds=dict(result.seconds), files=dict(files))


def replayed_section(layer_map: dict[str, str]) -> RepairSection:
    """report.json's "repair" section of a map given in recipe.repair.layers (a rebuild replays it)."""
    return RepairSection(fallback_layers=len(layer_map), layers=dict(sorted(layer_map.items())), replayed=True)
