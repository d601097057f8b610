"""The repair search, generic over the measurement: measure(fallback_layers: frozenset[str]) -> the budgeted
metric (higher is better), or {PRIMARY: metric, condition name: value, ...} when gate conditions apply. It finds
the fewest layers to give the fallback format so that reference - metric <= max_drop and every condition holds.

greedy: lazy greedy forward selection with re-measured marginal gains, then a backward pass; binary: the smallest
prefix of the single-gain order (fewer forwards, larger maps). The budgeted metric comes first: while it is unmet
the gains are its gains; once it holds, the gains are those of the first condition still unmet.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.repair.budget import STRATEGIES, Budget, weight_bytes
from compiler.repair.metric import PRIMARY
from compiler.repair.result import Probe, RepairResult

log = logging.getLogger("qcompile")

Measure = Callable[[frozenset], "float | Mapping[str, float]"]


@dataclass
class SearchOutcome:
    """What a search found: the fallback layers in the order picked, every measured point, whether the budget
    (and every condition) holds within `allowed`, and (unmet) the count that would meet it."""

    chosen: list[str]
    probes: list[Probe]
    met: bool
    needed: int | None
    base: float


def memoized(measure: Measure, seed: dict[frozenset, Any] | None = None) -> Measure:
    """measure with every set measured once (a search revisits sets; a forward is the whole cost)."""
    memo: dict[frozenset, Any] = dict(seed or {})

    def m(layers):
        key = frozenset(layers)
        if key not in memo:
            v = measure(key)
            memo[key] = v if isinstance(v, Mapping) else float(v)
        return memo[key]

    m.memo = memo  # type: ignore[attr-defined]
    return m


def split(value) -> tuple[float, dict[str, float]]:
    """(budgeted metric, condition values) of one measurement."""
    if isinstance(value, Mapping):
        return float(value[PRIMARY]), {k: float(v) for k, v in value.items() if k != PRIMARY}
    return float(value), {}


def search_fallbacks(measure: Measure, names: Sequence[str], reference: float, budget: float, allowed: int, *,
                     strategy: str = "greedy", singles: dict[str, Any] | None = None, base: Any = None,
                     bounds: dict[str, float] | None = None,
                     size_of: Callable[[frozenset], int] | None = None,
                     related: Callable[[str], Iterable[str]] | None = None,
                     conditions: Sequence[Any] = ()) -> SearchOutcome:
    """The fewest layers of `names` to put in the fallback so that reference - metric(set) <= budget and every
    condition (c.name, c.floor: value >= floor) holds, with at most `allowed` of them; every measured point
    becomes a Probe.

    greedy (default): forward selection with re-measured marginal gains, lazily: each candidate keeps its last
      measured gain as a stale bound (at first its single-layer gain, measured against the empty set, so fresh
      for the first pick); the top candidate is re-measured against the current set and accepted when it is
      still on top. Gains are not additive (two FFN layers of one block share an error), so gains re-measured
      against the current set pick better maps than one fixed order; stale bounds keep it to a few forwards per
      pick. Stops at the first set meeting every constraint, or at `allowed`. Stale bounds assume a gain only
      shrinks as the set grows; within one transformer block it can grow, so related(pick), when given, names
      layers whose bounds are re-measured after the pick (costs forwards). Once the budget holds and a condition
      does not, the gains are that condition's (bounds from its single-layer values).
      Forward selection does not stop at `allowed` when the set of every layer meets the constraints: it goes on
      to the first set that meets them, then a backward pass drops, one at a time, the picked layer whose removal
      costs least while every constraint still holds (a later pick can make an early one redundant: on MiniLM
      nvfp4_rotate forward selection met a 0.01 cosine budget at 13 layers, the backward pass at 12).
    binary: names in single-gain order, the smallest prefix meeting the constraints by binary search (the metric
      rises with the prefix in practice): ~log2(n) measurements after the single gains, a worse map.
    singles: single-layer measurements already made (the sensitivity; the rest are measured here unless bounds
      gives them an ordering value: a large model's unmeasured layers, re-measured before any pick).
    Unmet within `allowed`: `needed` says what it would take -- greedy: the size of the set forward selection and
    the backward pass found beyond `allowed` (None when even every layer misses); binary: the single-gain order
    after the chosen set, binary-searched for the count that meets the constraints."""
    measure = memoized(measure, {frozenset([n]): v for n, v in (singles or {}).items()})
    if base is not None:
        measure.memo.setdefault(frozenset(), base)  # type: ignore[attr-defined]
    base_metric = split(measure(frozenset()))[0]
    singles = dict(singles or {})
    bounds = {n: v for n, v in (bounds or {}).items() if n not in singles}
    for n in names:
        if n not in singles and n not in bounds:
            singles[n] = measure(frozenset([n]))
    key = {**bounds, **{n: split(v)[0] for n, v in singles.items()}}
    order = sorted(names, key=lambda n: (-key[n], list(names).index(n)))
    probes: list[Probe] = []
    conditions = list(conditions)

    def point(layers: frozenset, added: str | None, accepted: bool, removed: str | None = None) -> Probe:
        m, values = split(measure(layers))
        unmet = ([PRIMARY] if reference - m > budget + 1e-12 else []) + [
            c.name for c in conditions if not values.get(c.name, -math.inf) >= c.floor - 1e-12]
        p = Probe(len(layers), m, reference - m, size_of(layers) if size_of else 0, added, accepted, removed,
                  values, unmet)
        probes.append(p)
        if accepted:
            log.info("repair search: %d fallback layers (%s) -> %.5f (drop %.5f, budget %g%s; %d points measured)",
                     p.fallback_layers, p.change, m, p.drop, budget,
                     f"; unmet {', '.join(unmet)}" if unmet else "", len(probes))
        return p

    def ok(p: Probe) -> bool:
        return not p.unmet

    current = point(frozenset(), None, True)
    chosen: list[str] = []
    if strategy == "greedy":
        # past `allowed` only when every layer in the fallback meets the constraints (one forward tells)
        reach = len(names) if not ok(current) and ok(point(frozenset(names), None, False)) else allowed
        chosen, current = _lazy_greedy(point, ok, current, order, key, set(singles), base_metric, reach, related,
                                       lambda n: split(measure(frozenset([n])))[1], current.values)
        if ok(current):
            chosen, current = _backward(point, ok, chosen, current)
        if len(chosen) > allowed:  # met, but only beyond allowed: what it would take
            return SearchOutcome(chosen=[], probes=probes, met=False, needed=len(chosen), base=base_metric)
    elif strategy == "binary":
        k = _smallest_prefix(lambda k: point(frozenset(order[:k]), order[k - 1] if k else None, True), ok, 0,
                             min(allowed, len(order))) if not ok(current) else 0
        if k is not None:
            chosen = order[:k]
            current = point(frozenset(chosen), chosen[-1] if chosen else None, True)
    else:
        raise ValueError(f"unknown search strategy {strategy!r}; use one of {list(STRATEGIES)}")
    met = ok(current)
    needed = None
    if not met:
        rest = [n for n in order if n not in chosen]
        k = _smallest_prefix(lambda k: point(frozenset(chosen + rest[:k]), rest[k - 1] if k else None, True), ok,
                             0, len(rest))
        needed = None if k is None else len(chosen) + k
    return SearchOutcome(chosen=chosen if met else [], probes=probes, met=met, needed=needed, base=base_metric)


def _lazy_greedy(point, ok, current: Probe, order: list[str], key: dict[str, float], measured: set, base: float,
                 allowed: int, related: Callable[[str], Iterable[str]] | None = None,
                 single_values: Callable[[str], dict[str, float]] | None = None,
                 base_values: dict[str, float] | None = None) -> tuple[list[str], Probe]:
    """Lazy greedy forward selection (see search_fallbacks). A heap of (-gain bound, position, name, size the
    gain was measured at); a bound measured at the current size is fresh (-1: never measured). After a pick, the
    layers related(pick) names lose their bounds (re-measured before the next pick). The objective is the
    budgeted metric while it is unmet, then the first unmet condition (the heap rebuilt from single values)."""
    def objective(p: Probe) -> str:
        return p.unmet[0]

    def value(p: Probe, target: str) -> float:
        return p.metric if target == PRIMARY else p.values[target]

    target = PRIMARY
    heap = [(-(key[n] - base), i, n, 0 if n in measured else -1) for i, n in enumerate(order)]
    heapq.heapify(heap)
    chosen: list[str] = []
    while heap and not ok(current) and len(chosen) < allowed:
        if objective(current) != target:  # the budget holds now, a condition does not: chase its gains
            target = objective(current)
            heap = _rebound(heap, target, measured, base_values, single_values)
        neg, i, n, at = heapq.heappop(heap)
        if at == len(chosen):  # fresh and still the best bound: take it
            chosen.append(n)
            current = point(frozenset(chosen), n, True)
            if related is not None:
                near = set(related(n))
                heap = [(-math.inf, e[1], e[2], -1) if e[2] in near else e for e in heap]
                heapq.heapify(heap)
            continue
        trial = point(frozenset(chosen + [n]), n, False)
        heapq.heappush(heap, (-(value(trial, target) - value(current, target)), i, n, len(chosen)))
    return chosen, current


def _rebound(heap: list, target: str, measured: set, base_values: dict[str, float],
             single_values: Callable[[str], dict[str, float]]) -> list:
    """The heap with bounds on the gains of `target` (a condition): each measured layer's single-layer gain in it
    (stale, as measured at size 0); a layer without one first in line to be measured."""
    out = []
    for _, i, n, _ in heap:
        v = single_values(n).get(target) if n in measured else None
        out.append((-math.inf, i, n, -1) if v is None or target not in base_values
                   else (-(v - base_values[target]), i, n, 0))
    heapq.heapify(out)
    return out


def _backward(point, ok, chosen: list[str], current: Probe) -> tuple[list[str], Probe]:
    """Backward elimination after forward selection: while some picked layer can leave the set with every
    constraint still met, drop the one whose removal costs least (|set| forwards a round; the last finds none)."""
    while chosen:
        trials = [(point(frozenset(chosen) - {n}, None, False, removed=n), n) for n in chosen]
        best, name = max(trials, key=lambda t: (ok(t[0]), t[0].metric, -chosen.index(t[1])))
        if not ok(best):
            break
        chosen = [n for n in chosen if n != name]
        current = point(frozenset(chosen), None, True, removed=name)
    return chosen, current


def _smallest_prefix(probe, ok, lo: int, hi: int) -> int | None:
    """The smallest k in (lo, hi] with ok(probe(k)), by binary search, given not ok at lo; None if not ok at hi."""
    if hi <= lo or not ok(probe(hi)):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(probe(mid)):
            hi = mid
        else:
            lo = mid
    return hi


def sensitivity_unless_met(measure: Measure, names: Sequence[str], roles: dict[str, str], reference: float,
                           budget: float, cache, key: dict[str, Any], compute: Callable[[], dict[str, Any]],
                           conditions: Sequence[Any] = ()) -> dict[str, Any]:
    """The per-layer sensitivity (compute(), content-addressed in the cache under key when a cache is given),
    or none when the all-quantized build already meets the budget and every condition: the search stops at its
    first point then, so measuring every layer alone would buy nothing (on MiniLM int8_static that was 36
    forwards for a map of zero layers). The skipped form lists the layers unmeasured and says why."""
    base, values = split(measure(frozenset()))
    if reference - base <= budget + 1e-12 and all(values.get(c.name, -math.inf) >= c.floor - 1e-12
                                                  for c in conditions):
        log.info("repair: the all-quantized build meets the budget (drop %.6g <= %g); no sensitivity pass",
                 reference - base, budget)
        return {"base_metric": base, "skipped": f"the all-quantized build meets the budget (drop "
                f"{reference - base:.6g} <= {budget:g}): no layer needs measuring",
                "layers": [{"name": n, "role": roles.get(n, ""), "proxy_error": None, "gain": None, "metric": None}
                           for n in names]}
    if cache is None:
        return compute()

    def build(d: Path) -> None:
        (d / "sensitivity.json").write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")

    entry = cache.get_or_create("sensitivity", key, build)
    return json.loads((entry / "sensitivity.json").read_text())


def search(measure: Measure, sensitivity: dict[str, Any], metric_name: str, budget: Budget, fallback: str,
           allowed: int, primary_format: str, counts: dict[str, int], reference: float = 1.0,
           strategy: str = "greedy", conditions: Sequence[Any] = ()) -> RepairResult:
    """search_fallbacks over the sensitivity's layers (measured singles from it, the rest bounded), as a
    RepairResult. measure(fallback_layers) -> the measurement of the build with those layers in the fallback
    (a Measurer: torch fake-quant or the quantized graph in onnxruntime); budget: budget.Budget; reference: the
    metric's fp32 value."""
    layers = sensitivity["layers"]
    names = [x["name"] for x in layers]
    base = float(sensitivity["base_metric"])

    def single(x):
        metric = float(x["metric"]) if x.get("metric") is not None else base + float(x["gain"])
        return {PRIMARY: metric, **x["values"]} if x.get("values") else metric

    # the measurement of each measured single (older sensitivities and ONNX repair store only the gain); with
    # conditions only those that stored their condition values (the others are measured again, memoized)
    singles = {x["name"]: single(x) for x in layers if (x.get("metric") is not None or x.get("gain") is not None)
               and (not conditions or x.get("values"))}
    floor = min((split(v)[0] for v in singles.values()), default=base)
    # unmeasured layers (beyond confirm_top): bounds below every measured one, in proxy order
    bounds = {x["name"]: floor - 1e-9 * (i + 1)
              for i, x in enumerate(x for x in layers if x.get("metric") is None and x.get("gain") is None)}
    primary = {n: primary_format for n in names}

    def size_of(chosen: frozenset) -> int:
        return weight_bytes(counts, dict(primary, **{n: fallback for n in chosen}))

    # related= (re-measure a pick's block mates) is not passed: on MiniLM nvfp4 it found the same 12 layers with
    # 97 forwards instead of 55 (search 246 s vs 85 s on the loaded machine)
    out = search_fallbacks(measure, names, reference, budget.max_drop, allowed, strategy=strategy, singles=singles,
                           base=None if conditions else base, bounds=bounds, size_of=size_of,
                           conditions=conditions)
    return RepairResult(metric_name=metric_name, reference=reference, budget=budget, fallback=fallback,
                        layers=layers, probes=out.probes, chosen=out.chosen, allowed=allowed, total=len(names),
                        primary_format=primary_format, met=out.met, needed=out.needed, strategy=strategy,
                        sensitivity_skipped=str(sensitivity.get("skipped", "")), conditions=list(conditions))
