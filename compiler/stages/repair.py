"""Repair stage: per-layer sensitivity of a quantizing recipe and the search for the fewest layers to give the
fallback format so the budgeted metric holds; its result is a per-layer precision map ({layer: format}).

How it measures: the recipe's torch steps are applied twice to copies of the fp32 model, once as written (A)
and once with every quantized layer given the fallback format (B, through Step.with_layer_formats). A mixed
model is A with some layers' modules swapped in from B. This equals quantizing with the mixed map: modelopt
calibrates every quantizer on the unquantized forward (calibration mode disables quantization), so a layer's
ranges do not depend on the other layers' formats. Each measurement is then one forward of the ranking subset.
That is the target's numerics for target=torch, and the graph the trt / ort targets export from the same
fake-quant modules (ORT equals torch fake-quant to < 1e-4 on these graphs: compiler/steps tests).

Speed: each variant's weight quantizers are folded into the weights once (modelopt's fold_weight), and the
ranking samples run length-sorted without their padding, so a probe is one forward over the real tokens with
the activation quantizers only.

Sensitivity of a layer: the budgeted metric with only that layer at the fallback minus the metric with all
layers quantized (a gain: larger = more sensitive). A cheap first pass (each layer's output error against its
fallback module on the same input, from one forward) orders the layers; the top `confirm_top` are measured
(default 64: every layer of a MiniLM-size model; the proxy order only matters for larger ones).
The search (search_fallbacks, generic over measure(set) -> metric): lazy greedy forward selection with
re-measured marginal gains (strategy greedy), or a binary search over the single-gain order (strategy binary).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.steps.base import TORCH

import numpy as np

from compiler.core.errors import BuildError, GateError, RecipeError
from compiler.core.status import Status
from compiler.stages.repair_metric import ranking_rows, repair_metric

log = logging.getLogger("qcompile")

FALLBACKS = ("fp32", "fp16", "int8", "fp8")
# block outputs kept for reuse between probes (BlockCache): MiniLM, 128 unpadded sentences, ~40 MB per map
BLOCK_CACHE_BYTES = 512 << 20
# stored bits per weight of each format (nvfp4: 4-bit values + one e4m3 scale per 16), for the size estimate
FORMAT_BITS = {"fp32": 32.0, "fp16": 16.0, "int8": 8.0, "fp8": 8.0, "nvfp4": 4.5, "int4": 5.0}


class RepairBudgetError(GateError):
    """The budget cannot be met within repair.max_fallback_fraction. Exit 3, like a failed gate."""

    kind = Status.REPAIR_BUDGET_NOT_MET


@dataclass
class Probe:
    """One measured point of the search: a set of fallback_layers layers (the last one added: `added`);
    accepted = a point of the search's path (the size-vs-metric curve), not a rejected candidate."""

    fallback_layers: int
    metric: float
    drop: float
    weight_bytes: int
    added: str | None = None
    accepted: bool = True
    removed: str | None = None  # the backward pass's point: this layer left the set

    def as_dict(self) -> dict[str, Any]:
        # drops as small as a tight budget (1e-7) stay readable: 6 significant digits, not 6 decimals
        return {"fallback_layers": self.fallback_layers, "metric": round(self.metric, 9),
                "drop": float(f"{self.drop:.6g}"), "weight_bytes": self.weight_bytes, "added": self.added,
                "accepted": self.accepted, **({"removed": self.removed} if self.removed else {})}

    @property
    def change(self) -> str:
        """What this point changed, for tables: +layer added, -layer removed, - for the start."""
        return f"+{self.added}" if self.added else f"-{self.removed}" if self.removed else "-"


@dataclass
class RepairResult:
    metric_name: str
    reference: float  # the metric's fp32 value (1.0 for fidelity metrics)
    budget: float  # max drop
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

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "reference": self.reference, "max_drop": self.budget,
                "fallback": self.fallback, "primary_format": self.primary_format, "quantized_layers": self.total,
                "max_fallback_layers": self.allowed, "chosen": sorted(self.chosen), "layers": self.layers,
                "strategy": self.strategy, "search": [p.as_dict() for p in self.curve],
                "measurements": [p.as_dict() for p in self.probes], "seconds": self.seconds, "met": self.met,
                "needed": self.needed, **({"sensitivity_skipped": self.sensitivity_skipped}
                                           if self.sensitivity_skipped else {})}


# ------------------------------------------------------------------------------------------------ validation

FP8_MIN_OPSET = 19  # float8 QuantizeLinear / DequantizeLinear in ONNX


def resolve_fallback(rep, steps) -> str:
    """repair.fallback, with auto resolved from the steps' declared facts: fp8 when a quantizing step produces a
    format narrower than 8 bits (nvfp4) and can give layers fp8 (mixed NVFP4/FP8 engines), else fp32."""
    if rep.fallback != "auto":
        return rep.fallback
    quant = [s for s in steps if s.quantizes_compute]
    narrow = quant and all(any(FORMAT_BITS.get(f, 32) < 8 for f in s.precision) and "fp8" in s.layer_format_choices
                           for s in quant)
    return "fp8" if narrow else "fp32"


def repair_formats(rep) -> set:
    """The formats a repair may give layers: its fallback (when it searches) and the formats of its map."""
    return ({rep.fallback} if rep.enabled else set()) | set(dict(rep.layers or {}).values())


def repair_min_opset(rep, target) -> int:
    """fp8 layers in an exported graph need float8 Q/DQ (opset 19); ORT's CPU provider runs them from there."""
    return FP8_MIN_OPSET if target.runs_onnx and "fp8" in repair_formats(rep) else 0


def validate_repair(rep, steps, target, explicit_opset: int | None) -> None:
    """Bad repair settings, each one line naming the key (before any weights load)."""
    if rep.max_task_drop is not None and (not math.isfinite(rep.max_task_drop) or rep.max_task_drop < 0):
        raise RecipeError("recipe.repair.max_task_drop", f"{rep.max_task_drop} is below zero",
                          "give the largest metric drop you accept, e.g. 0.01 (0 = no loss at all)")
    if not 0.0 <= rep.max_fallback_fraction <= 1.0:
        raise RecipeError("recipe.repair.max_fallback_fraction", f"{rep.max_fallback_fraction} is outside [0, 1]",
                          "give the largest share of quantized layers that may fall back, e.g. 0.34")
    if rep.fallback not in FALLBACKS + ("auto",):
        raise RecipeError("recipe.repair.fallback", f"unknown format {rep.fallback!r}",
                          f"use one of {list(FALLBACKS + ('auto',))}")
    rep.fallback = resolve_fallback(rep, steps)
    if rep.strategy not in STRATEGIES:
        raise RecipeError("recipe.repair.strategy", f"unknown strategy {rep.strategy!r}",
                          f"use one of {list(STRATEGIES)}")
    if rep.ranking_samples <= 0:
        raise RecipeError("recipe.repair.ranking_samples", f"must be > 0, got {rep.ranking_samples}", "use e.g. 32")
    if rep.confirm_top < 0:
        raise RecipeError("recipe.repair.confirm_top", f"must be >= 0, got {rep.confirm_top}", "use e.g. 64")
    if not (rep.enabled or rep.layers):
        return
    quant = [s for s in steps if s.quantizes_compute]
    if not quant:
        raise RecipeError("recipe.repair.enabled", "the recipe quantizes nothing, so no layer can fall back",
                          "use a quantizing recipe (e.g. recipe=nvfp4) or set recipe.repair.enabled=false")
    key = "recipe.repair.fallback" if rep.enabled else "recipe.repair.layers"
    for fmt in sorted(repair_formats(rep)):
        if fmt not in FALLBACKS:
            raise RecipeError(key, f"unknown format {fmt!r}", f"use one of {list(FALLBACKS)}")
        for s in quant:
            if fmt != "fp32" and fmt not in s.layer_format_choices:
                ok = sorted({"fp32"} | set(s.layer_format_choices))
                raise RecipeError(key, f"step {s.name} cannot give a layer {fmt!r} on target={target.name}",
                                  f"use one of {ok}")
    need = repair_min_opset(rep, target)
    if explicit_opset is not None and int(explicit_opset) < need:
        raise RecipeError(key, f"fp8 layers are not runnable on target={target.name} at export.opset="
                          f"{explicit_opset} (float8 QuantizeLinear needs opset {need})",
                          f"set export.opset={need} (or leave it unset), or use fallback=fp32")
    onnx_side = [s.name for s in quant if s.stage_for(target.name) != TORCH]
    torch_side = [s.name for s in quant if s.stage_for(target.name) == TORCH]
    if rep.enabled and onnx_side and torch_side:
        # one search measures one side: torch fake-quant modules (repair.py) or the quantized graph (repair_onnx.py)
        raise RecipeError("recipe.repair.enabled", f"{torch_side} quantize the torch model and {onnx_side} the ONNX "
                          f"graph on target={target.name}: the search measures one side",
                          "keep one quantizing step, or name the layers to keep out in recipe.repair.layers")


# ------------------------------------------------------------------------------------------------ numerics

def _outputs(module, feeds: Sequence[Sequence[Any]], index: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([module(*f)[index].detach().double().cpu().numpy() for f in feeds], axis=0)


def _get(module, name: str):
    return module.get_submodule(name)


def _set(module, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


def _is_quantized(sub) -> bool:
    """Whether a layer module (possibly wrapped, e.g. by a rotation) has an enabled quantizer, or is torch's
    dynamic int8 Linear (int8_dynamic on torch: packed int8 weights, no modelopt quantizer)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    for m in sub.modules():
        if isinstance(m, DynamicInt8Linear):
            return True
        for attr in ("weight_quantizer", "input_quantizer"):
            q = getattr(m, attr, None)
            if q is not None and bool(getattr(q, "is_enabled", False)):
                return True
    return False


def _params(sub) -> int:
    import torch

    # torch's dynamic int8 Linear keeps its weight packed: weight() unpacks it
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    return int(sum(m.weight.numel() if isinstance(m, torch.nn.Linear) else m.weight().numel()
                   for m in sub.modules() if isinstance(m, (torch.nn.Linear, DynamicInt8Linear))))


def weight_bytes(counts: dict[str, int], formats: dict[str, str]) -> int:
    """Stored bytes of the listed layers' weights in their formats (an estimate: no scales beyond nvfp4's)."""
    return int(sum(n * FORMAT_BITS[formats[name]] / 8 for name, n in counts.items()))


def proxy_errors(a, b, names: Sequence[str], feeds) -> dict[str, float]:
    """Cheap pass: for each layer, the relative output error of A's module against B's module on the same
    input (the input A's own forward gives it), from one forward over the feeds."""
    import torch

    err: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}
    hooks = []
    for n in names:
        other = _get(b, n)

        def hook(mod, inp, out, n=n, other=other):
            with torch.no_grad():
                ref = other(*inp)
            err[n][0] += float(((out - ref).double() ** 2).sum())
            err[n][1] += float((ref.double() ** 2).sum())
        hooks.append(_get(a, n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for f in feeds:
                a(*f)
    finally:
        for h in hooks:
            h.remove()
    return {n: math.sqrt(e / max(d, 1e-30)) for n, (e, d) in err.items()}


class MixedModel:
    """A (all layers in the recipe's format) with any set of layers swapped in from B (the fallback)."""

    def __init__(self, a, b, names: Sequence[str], cache_bytes: int = 0):
        self.model = a
        self.primary = {n: _get(a, n) for n in names}
        self.fallback = {n: _get(b, n) for n in names}
        self.current: set = set()
        self.blocks = BlockCache(a, names, cache_bytes) if cache_bytes > 0 else None

    def use(self, fallback_layers) -> Any:
        want = set(fallback_layers)
        for n in self.current - want:
            _set(self.model, n, self.primary[n])
        for n in want - self.current:
            _set(self.model, n, self.fallback[n])
        self.current = want
        if self.blocks is not None:
            self.blocks.current = frozenset(want)
        return self.model


class BlockCache:
    """Reuses a transformer block's output when nothing it depends on changed: the batch and the formats of the
    layers in it and in the blocks before it (layers outside every block count for every block, to be safe).
    A probe that changes a layer in block j then recomputes blocks j.. only (about half a forward on average).

    The blocks are the children of the ModuleList holding the most quantized layers (BERT encoder.layer,
    DistilBERT transformer.layer, ModernBERT layers); each block's forward is wrapped on the instance, so module
    paths (and MixedModel's swaps inside a block) stay as they are. Caching is on only while `batch` is set
    (torch_measure sets it), least recently used outputs are dropped past max_bytes."""

    def __init__(self, model, names: Sequence[str], max_bytes: int):
        import torch

        lists = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        best, best_n = None, 1
        for prefix, ml in lists:
            n = sum(any(x.startswith(f"{prefix}.{i}.") for x in names) for i in range(len(ml)))
            if n > best_n:
                best, best_n = (prefix, ml), n
        self.index: dict[str, int] = {}
        self.max_bytes, self.bytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self.cache: dict[Any, Any] = {}
        self.batch: int | None = None
        self.current: frozenset = frozenset()
        if best is None:
            return
        prefix, ml = best
        for i, block in enumerate(ml):
            self.index.update({x: i for x in names if x.startswith(f"{prefix}.{i}.")})
            block.forward = self._wrap(i, block.forward)

    def _key(self, i: int):
        return self.batch, i, frozenset(n for n in self.current if self.index.get(n, -1) <= i)

    def _wrap(self, i: int, forward):
        import torch

        def cached(*args, **kwargs):
            if self.batch is None:
                return forward(*args, **kwargs)
            key = self._key(i)
            if key in self.cache:
                self.hits += 1
                out = self.cache.pop(key)
                self.cache[key] = out  # most recently used last
                return out
            self.misses += 1
            out = forward(*args, **kwargs)
            parts = out if isinstance(out, (tuple, list)) else (out,)
            if all(isinstance(t, torch.Tensor) or t is None for t in parts):
                self.cache[key] = out
                self.bytes += sum(t.nbytes for t in parts if t is not None)
                while self.bytes > self.max_bytes and self.cache:
                    old = self.cache.pop(next(iter(self.cache)))
                    self.bytes -= sum(t.nbytes for t in (old if isinstance(old, (tuple, list)) else (old,))
                                      if t is not None)
            return out

        return cached


# ------------------------------------------------------------------------------------------------ search
# Generic over the measurement: `measure(fallback_layers: frozenset[str]) -> float` (higher is better) and the
# metric's fp32 value `reference`; the torch fake-quant measurer is below (torch_measure), an ONNX Runtime one
# or a labeled-task metric plugs in the same way.

STRATEGIES = ("greedy", "binary")

Measure = Callable[[frozenset], float]


@dataclass
class SearchOutcome:
    """What a search found: the fallback layers in the order picked, every measured point, whether the budget
    holds within `allowed`, and (unmet) the count that would meet it."""

    chosen: list[str]
    probes: list[Probe]
    met: bool
    needed: int | None
    base: float


def memoized(measure: Measure, seed: dict[frozenset, float] | None = None) -> Measure:
    """measure with every set measured once (a search revisits sets; a forward is the whole cost)."""
    memo: dict[frozenset, float] = dict(seed or {})

    def m(layers) -> float:
        key = frozenset(layers)
        if key not in memo:
            memo[key] = float(measure(key))
        return memo[key]

    m.memo = memo  # type: ignore[attr-defined]
    return m


def single_layer_metrics(measure: Measure, names: Sequence[str]) -> dict[str, float]:
    """The metric with each one layer alone in the fallback (the per-layer sensitivity is this minus the
    metric with none)."""
    return {n: float(measure(frozenset([n]))) for n in names}


def search_fallbacks(measure: Measure, names: Sequence[str], reference: float, budget: float, allowed: int, *,
                     strategy: str = "greedy", singles: dict[str, float] | None = None, base: float | None = None,
                     bounds: dict[str, float] | None = None,
                     size_of: Callable[[frozenset], int] | None = None,
                     related: Callable[[str], Iterable[str]] | None = None) -> SearchOutcome:
    """The fewest layers of `names` to put in the fallback so that reference - measure(set) <= budget, with at
    most `allowed` of them; every measured point becomes a Probe.

    greedy (default): forward selection with re-measured marginal gains, lazily: each candidate keeps its last
      measured gain as a stale bound (at first its single-layer gain, measured against the empty set, so fresh
      for the first pick); the top candidate is re-measured against the current set and accepted when it is
      still on top. Gains are not additive (two FFN layers of one block share an error), so gains re-measured
      against the current set pick better maps than one fixed order; stale bounds keep it to a few forwards per
      pick. Stops at the first set meeting the budget, or at `allowed`. Stale bounds assume a gain only shrinks
      as the set grows; within one transformer block it can grow (the FFN down projection's gain once its up
      projection is in the fallback), so related(pick), when given, names layers whose bounds are re-measured
      after the pick (e.g. its transformer block mates; costs forwards, see search()).
      Forward selection does not stop at `allowed` when the set of every layer meets the budget: it goes on to
      the first set that meets it, then a backward pass drops, one at a time, the picked layer whose removal
      costs least while the budget still holds (a later pick can make an early one redundant: on MiniLM
      nvfp4_rotate forward selection met a 0.01 cosine budget at 13 layers, the backward pass at 12).
    binary: names in single-gain order, the smallest prefix meeting the budget by binary search (the metric rises
      with the prefix in practice): ~log2(n) measurements after the single gains, a worse map.
    singles: single-layer metrics already measured (the sensitivity; the rest are measured here unless bounds
      gives them an ordering value: a large model's unmeasured layers, re-measured before any pick).
    Unmet within `allowed`: `needed` says what it would take, so the error can say it -- greedy: the size of the
    set forward selection and the backward pass found beyond `allowed` (None when even every layer misses);
    binary: the single-gain order after the chosen set, binary-searched for the count that meets the budget."""
    measure = memoized(measure, {frozenset([n]): v for n, v in (singles or {}).items()})
    if base is not None:
        measure.memo.setdefault(frozenset(), float(base))  # type: ignore[attr-defined]
    base = measure(frozenset())
    singles = dict(singles or {})
    bounds = {n: v for n, v in (bounds or {}).items() if n not in singles}
    for n in names:
        if n not in singles and n not in bounds:
            singles[n] = measure(frozenset([n]))
    key = {**bounds, **singles}
    order = sorted(names, key=lambda n: (-key[n], list(names).index(n)))
    probes: list[Probe] = []

    def point(layers: frozenset, added: str | None, accepted: bool, removed: str | None = None) -> Probe:
        m = measure(layers)
        p = Probe(len(layers), m, reference - m, size_of(layers) if size_of else 0, added, accepted, removed)
        probes.append(p)
        if accepted:
            log.info("repair search: %d fallback layers (%s) -> %.5f (drop %.5f, budget %g; %d points measured)",
                     p.fallback_layers, p.change, m, p.drop, budget, len(probes))
        return p

    def ok(p: Probe) -> bool:
        return p.drop <= budget + 1e-12

    current = point(frozenset(), None, True)
    chosen: list[str] = []
    if strategy == "greedy":
        # past `allowed` only when every layer in the fallback meets the budget (one forward tells)
        reach = len(names) if not ok(current) and ok(point(frozenset(names), None, False)) else allowed
        chosen, current = _lazy_greedy(point, ok, current, order, key, set(singles), base, reach, related)
        if ok(current):
            chosen, current = _backward(point, ok, chosen, current)
        if len(chosen) > allowed:  # met, but only beyond allowed: what it would take
            return SearchOutcome(chosen=[], probes=probes, met=False, needed=len(chosen), base=base)
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
    return SearchOutcome(chosen=chosen if met else [], probes=probes, met=met, needed=needed, base=base)


def _lazy_greedy(point, ok, current: Probe, order: list[str], key: dict[str, float], measured: set, base: float,
                 allowed: int, related: Callable[[str], Iterable[str]] | None = None) -> tuple[list[str], Probe]:
    """Lazy greedy forward selection (see search_fallbacks). A heap of (-gain bound, position, name, size the
    gain was measured at); a bound measured at the current size is fresh (-1: never measured). After a pick, the
    layers related(pick) names lose their bounds (re-measured before the next pick)."""
    import heapq

    heap = [(-(key[n] - base), i, n, 0 if n in measured else -1) for i, n in enumerate(order)]
    heapq.heapify(heap)
    chosen: list[str] = []
    while heap and not ok(current) and len(chosen) < allowed:
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
        heapq.heappush(heap, (-(trial.metric - current.metric), i, n, len(chosen)))
    return chosen, current


def _backward(point, ok, chosen: list[str], current: Probe) -> tuple[list[str], Probe]:
    """Backward elimination after forward selection: while some picked layer can leave the set with the budget
    still met, drop the one whose removal costs least (|set| forwards a round; the last round finds none)."""
    while chosen:
        trials = [(point(frozenset(chosen) - {n}, None, False, removed=n), n) for n in chosen]
        best, name = max(trials, key=lambda t: (t[0].metric, -chosen.index(t[1])))
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


# ------------------------------------------------------------------------------------------------ torch measurer

def torch_measure(mixed: MixedModel, feeds, reference: np.ndarray, metric_fn, output_index: int,
                  unsort: np.ndarray | None = None) -> Measure:
    """measure(set) on torch fake-quant: the mixed model with that set of layers from B, one forward (the
    blocks before the first changed one read from mixed.blocks when it caches)."""
    import torch

    def measure(fallback_layers) -> float:
        model = mixed.use(fallback_layers)
        outs = []
        try:
            with torch.no_grad():
                for i, f in enumerate(feeds):
                    if mixed.blocks is not None:
                        mixed.blocks.batch = i
                    outs.append(model(*f)[output_index].detach().double().cpu().numpy())
        finally:
            if mixed.blocks is not None:
                mixed.blocks.batch = None
        out = np.concatenate(outs, axis=0)
        return metric_fn(reference, out if unsort is None else out[unsort])

    return measure


def _b_of(mixed: MixedModel):
    """A module tree whose layers are B's: the fallback modules swapped into a shallow view for proxy_errors."""

    class _View:
        def get_submodule(self, name):
            return mixed.fallback[name]

    return _View()


def measure_sensitivity(mixed: MixedModel, names: Sequence[str], roles: dict[str, str], feeds, measure: Measure,
                        confirm_top: int) -> dict[str, Any]:
    """Per-layer sensitivity: the measured single-layer metric of the top confirm_top layers by the proxy error
    (the first pass, one forward with every layer's fallback module run beside it); when confirm_top covers every
    layer (the default on MiniLM-size models) all are measured and the proxy pass is skipped (proxy_error None).
    Layers ordered by measured gain, then the unmeasured ones by proxy."""
    base = float(measure(frozenset()))
    if confirm_top >= len(names):
        proxy: dict[str, float | None] = {n: None for n in names}
        by_proxy = list(names)
    else:
        proxy = dict(proxy_errors(mixed.use([]), _b_of(mixed), names, feeds))
        by_proxy = sorted(names, key=lambda n: (-proxy[n], n))
    metrics = single_layer_metrics(measure, by_proxy[:confirm_top])
    gains = {n: metrics[n] - base for n in metrics}
    position = {n: i for i, n in enumerate(by_proxy)}
    measured = sorted(gains, key=lambda n: (-gains[n], position[n]))
    order = measured + [n for n in by_proxy if n not in gains]
    mixed.use([])
    return {"base_metric": base, "layers": [
        {"name": n, "role": roles.get(n, ""), "proxy_error": None if proxy[n] is None else round(proxy[n], 6),
         "gain": round(gains[n], 6) if n in gains else None, "metric": metrics.get(n)} for n in order]}


def sensitivity_unless_met(measure: Measure, names: Sequence[str], roles: dict[str, str], reference: float,
                           budget: float, cache, key: dict[str, Any],
                           compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The per-layer sensitivity (compute(), content-addressed in the cache under key when a cache is given),
    or none when the all-quantized build already meets the budget: the search stops at its first point then,
    so measuring every layer alone would buy nothing (on MiniLM int8_static that was 36 forwards for a map of
    zero layers). The skipped form lists the layers unmeasured and says why."""
    base = float(measure(frozenset()))
    if reference - base <= budget + 1e-12:
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


def search(measure: Measure, sensitivity: dict[str, Any], metric_name: str, budget: float, fallback: str,
           allowed: int, primary_format: str, counts: dict[str, int], reference: float = 1.0,
           strategy: str = "greedy") -> RepairResult:
    """search_fallbacks over the sensitivity's layers (measured singles from it, the rest bounded), as a
    RepairResult. measure(fallback_layers) -> metric of the build with those layers in the fallback (torch
    fake-quant here, the quantized ONNX graph in repair_onnx.py); reference: the metric's fp32 value."""
    layers = sensitivity["layers"]
    names = [x["name"] for x in layers]
    base = float(sensitivity["base_metric"])
    # the metric of each measured single (older sensitivities and ONNX repair store only the gain)
    singles = {x["name"]: float(x["metric"]) if x.get("metric") is not None else base + float(x["gain"])
               for x in layers if x.get("metric") is not None or x.get("gain") is not None}
    floor = min(singles.values(), default=float(sensitivity["base_metric"]))
    # unmeasured layers (beyond confirm_top): bounds below every measured one, in proxy order
    bounds = {x["name"]: floor - 1e-9 * (i + 1)
              for i, x in enumerate(x for x in layers if x.get("metric") is None)}
    primary = {n: primary_format for n in names}

    def size_of(chosen: frozenset) -> int:
        return weight_bytes(counts, dict(primary, **{n: fallback for n in chosen}))

    # related= (re-measure a pick's block mates) is not passed: on MiniLM nvfp4 it found the same 12 layers with
    # 97 forwards instead of 55 (search 246 s vs 85 s on the loaded machine)
    out = search_fallbacks(measure, names, reference, budget, allowed, strategy=strategy, singles=singles,
                           base=float(sensitivity["base_metric"]), bounds=bounds, size_of=size_of)
    result = RepairResult(metric_name=metric_name, reference=reference, budget=budget, fallback=fallback,
                          layers=layers, probes=out.probes, chosen=out.chosen, allowed=allowed, total=len(names),
                          primary_format=primary_format, met=out.met, needed=out.needed, strategy=strategy,
                          sensitivity_skipped=str(sensitivity.get("skipped", "")))
    return result


def unmet_message(result: RepairResult) -> str:
    within = [p for p in result.curve if p.fallback_layers <= result.allowed]
    best = min(within, key=lambda p: p.drop)
    need = result.needed
    frac = result.fraction
    head = (f"budget met with {need} of {result.total} layers in {result.fallback}; "
            f"max_fallback_fraction={frac:g} allows {result.allowed}" if need else
            f"budget not met even with all {result.total} layers in {result.fallback}")
    # 6 significant digits: a tight budget (1e-6) beside a 5-decimal drop read "drop 0.00000 > 1e-06"
    return (f"{head} (best within it: {result.metric_name} {best.metric:.6g}, drop {best.drop:.6g} > "
            f"max_task_drop {result.budget:g} with {best.fallback_layers} layers) -- "
            + (f"raise recipe.repair.max_fallback_fraction to {need / result.total:.2f}" if need else
               "use a wider fallback (fp32) or a looser budget"))


# ------------------------------------------------------------------------------------------------ the stage

def run_repair(model, spec, data, apply_steps: Callable[[Any, list[Any]], Any], cache=None,
               primary_format: str = "") -> RepairResult:
    """The repair search for a build: model is the fp32 LoadedModel, apply_steps(module, steps) applies torch
    steps to a module (the pipeline's quantize_torch). Raises RepairBudgetError when the budget is unmet."""
    rep = spec.repair
    quant = [s for s in spec.torch_steps if s.quantizes_compute]
    if not quant:
        raise BuildError("repair: the recipe has no torch-side quantizing step to search over on "
                         f"target={spec.target.name}")
    t0 = time.perf_counter()
    a = apply_steps(copy.deepcopy(model.module), list(spec.torch_steps))
    order = model.roles.role if model.roles is not None else {}
    names = [n for n in order if _has(a, n) and _is_quantized(_get(a, n))]
    if not names:
        raise BuildError("repair: no quantized layer found to fall back")
    if rep.fallback == "fp32":  # every layer kept out is the recipe without its quantizing steps
        fallback_steps = [s for s in spec.torch_steps if not s.quantizes_compute]
    else:
        fallback_steps = [s.with_layer_formats({n: rep.fallback for n in names}) if s.quantizes_compute else s
                          for s in spec.torch_steps]
    b = apply_steps(copy.deepcopy(model.module), fallback_steps)
    counts = {n: _params(_get(a, n)) for n in names}  # before folding: it leaves the weights' shapes alone anyway
    fold_weights(a)
    fold_weights(b)
    labels = getattr(data, "evaluation_labels", None)
    rows = ranking_rows(int(rep.ranking_samples), len(data.evaluation), labels)
    feeds = _ranking_feeds(data, rows, int(spec.data.batch_size))
    # the feeds run length-sorted; outputs go back to row order (pairs and gold labels are by row)
    unsort = np.argsort(_ranking_order(data, rows), kind="stable")
    output_index = 0 if model.task == "classification" else 1
    reference = _outputs(model.module, feeds, output_index)[unsort]
    # the budgeted metric (compiler/stages/repair_metric.py): the task metric against the ranking rows' gold
    # labels, or the fidelity metric against the fp32 outputs; the search only sees value(outputs)
    chosen_metric = repair_metric(rep, spec.gate, model.task, labels, reference)
    metric_name, budget = chosen_metric.name, chosen_metric.budget

    def metric_fn(_reference, outputs):
        return chosen_metric.fn(outputs)
    allowed = math.floor(float(rep.max_fallback_fraction) * len(names) + 1e-9)
    roles = model.roles.role if model.roles is not None else {}
    mixed = MixedModel(a, b, names, cache_bytes=BLOCK_CACHE_BYTES)
    measure = memoized(torch_measure(mixed, feeds, reference, metric_fn, output_index, unsort))
    t1 = time.perf_counter()

    # the metric and the gold labels (the evaluation file's digest) decide the gains too
    key = dict(sensitivity_key(model, spec, data, names), metric=metric_name, ranking_rows=rows,
               labels=getattr(data, "files_sha256", {}).get("evaluation") if labels is not None else None)
    sensitivity = sensitivity_unless_met(
        measure, names, roles, chosen_metric.reference, budget, cache, key,
        lambda: measure_sensitivity(mixed, names, roles, feeds, measure, int(rep.confirm_top)))
    t2 = time.perf_counter()
    result = search(measure, sensitivity, metric_name, budget, rep.fallback, allowed, primary_format, counts,
                    reference=chosen_metric.reference, strategy=str(rep.strategy))
    mixed.use(result.chosen)
    result.fraction = float(rep.max_fallback_fraction)
    result.strategy = str(rep.strategy)
    result.seconds = {"build_variants": round(t1 - t0, 2), "sensitivity": round(t2 - t1, 2),
                      "search": round(time.perf_counter() - t2, 2),
                      "forwards": len(measure.memo), "ranking_tokens": int(sum(f[0].numel() for f in feeds)),
                      "block_cache": {"hits": mixed.blocks.hits, "misses": mixed.blocks.misses}}
    return result


def fold_weights(module) -> None:
    """Bake every fake-quant weight quantizer into its weight (modelopt's mtq.fold_weight): a probe's forward
    then runs the activation quantizers only. Same numbers: the folded weight is what the weight quantizer
    returned on every forward (tests/stages/test_repair_search.py checks equality)."""
    from compiler.steps.modelopt import _mtq

    _mtq().fold_weight(module)


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _ranking_feeds(data, n: int, batch_size: int):
    """The first n evaluation samples as torch batches, sorted by length and cut to the longest real token of
    each batch. Padding past every row's attention mask changes no real token's output (masked keys get zero
    attention weight; quantizers scale per token / block or per tensor with calibrated ranges), so a probe
    skips the pad positions (MiniLM's built-in sentences: 17 real tokens of 128 on average)."""
    import torch

    ev = data.evaluation
    n = min(n, len(ev))
    arrays = {k: np.ascontiguousarray(v[:n]) for k, v in ev.arrays.items()}
    mask = arrays.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        rows = _ranking_order(data, n)
        arrays = {k: v[rows] for k, v in arrays.items()}
        lengths = _real_lengths(arrays["attention_mask"])
    feeds = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        batch = {k: v[start:stop] for k, v in arrays.items()}
        if mask is not None and mask.ndim == 2:
            width = max(1, int(lengths[start:stop].max()))
            batch = {k: (v[:, :width] if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}
        feeds.append([torch.from_numpy(np.ascontiguousarray(v)) for v in batch.values()])
    return feeds


def _ranking_order(data, n: int) -> np.ndarray:
    """The row order _ranking_feeds runs the first n evaluation samples in (longest first; as loaded without an
    attention mask)."""
    mask = data.evaluation.arrays.get("attention_mask")
    n = min(n, len(data.evaluation))
    if mask is None or mask.ndim != 2:
        return np.arange(n)
    return np.argsort(-_real_lengths(np.asarray(mask[:n])), kind="stable")


def _real_lengths(mask: np.ndarray) -> np.ndarray:
    """Per row, one past the last position the attention mask keeps (0 for an all-masked row)."""
    kept = mask != 0
    last = mask.shape[1] - np.argmax(kept[:, ::-1], axis=1)
    return np.where(kept.any(axis=1), last, 0)


def sensitivity_key(model, spec, data, names) -> dict[str, Any]:
    """Everything the per-layer sensitivity depends on: weights, data, recipe steps, target, fallback."""
    from omegaconf import OmegaConf

    steps = OmegaConf.to_container(spec.raw.recipe.get("steps"), resolve=True) if spec.raw is not None else {}
    return {"weights": model.weights_sha256, "calibration": data.calibration.sha256(),
            "evaluation": data.evaluation.sha256(), "ranking_samples": int(spec.repair.ranking_samples),
            "measure": "torch fake-quant, folded weights, length-sorted batches without padding",
            "confirm_top": int(spec.repair.confirm_top), "steps": steps, "target": spec.target.name,
            "fallback": spec.repair.fallback, "layers": list(names), "seed": int(spec.seed),
            "exclude": list(spec.model.exclude)}


# ------------------------------------------------------------------------------------------------ outputs

def write_outputs(run_dir: Path, result: RepairResult) -> dict[str, str]:
    """sensitivity.json and sensitivity.png (chosen layers marked): records of the search, like report.json."""
    run_dir = Path(run_dir)
    (run_dir / "sensitivity.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    out = {"sensitivity": "sensitivity.json"}
    try:
        _plot(run_dir / "sensitivity.png", result)
        out["plot"] = "sensitivity.png"
    except (ImportError, RuntimeError, ValueError, OSError) as e:  # no plot must not fail a build with its numbers
        log.warning("sensitivity.png not written: %s", e)
    return out


def write_layers_yaml(run_dir: Path, roles: dict[str, str], primary: dict[str, str], layer_map: dict[str, str]) -> Path:
    """layers.yaml: every quantized layer (forward order) with its role and format; the same bytes whether the
    map was searched or replayed, so a rebuild reproduces it."""
    lines = ["# per-layer precision of this build (recipe.repair.layers holds the fallbacks and replays them)"]
    for name in [n for n in roles if n in primary or n in layer_map]:
        fmt = layer_map.get(name, primary.get(name))
        lines.append(f"{name}: {{role: {roles.get(name) or 'other'}, format: {fmt}}}")
    path = Path(run_dir) / "layers.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(path: Path, result: RepairResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [x["name"] for x in result.layers]
    vals = [x["gain"] if x["gain"] is not None else 0.0 for x in result.layers]
    colors = ["tab:red" if n in result.chosen else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), vals, color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.removeprefix("inner.") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel(f"{result.metric_name} gain with the layer in {result.fallback}")
    ax.set_title("no layer measured alone: the all-quantized build met the budget" if result.sensitivity_skipped
                 else f"per-layer sensitivity (red: fell back to {result.fallback}; unmeasured layers at 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(result: RepairResult) -> str:
    """The REPORT.md section: fallen-back layers, the metric after each search step, size before / after."""
    probes = result.curve
    first = probes[0]
    final = next((p for p in reversed(probes) if p.fallback_layers == len(result.chosen)), probes[-1])
    out = ["", "## Repair (per-layer mixed precision)", "",
           (f"Budget: {result.metric_name} drop <= {result.budget:g}; fallback {result.fallback}; "
            f"{len(result.chosen)} of {result.total} quantized layers fell back "
            f"(at most {result.allowed} allowed); strategy {result.strategy}, "
            f"{len(result.probes)} search points measured."), "",
           "| layers in fallback | change | " + result.metric_name + " | drop | weight bytes |", "|---|---|---|---|---|"]
    for p in probes:
        out.append(f"| {p.fallback_layers} | {p.change} | {p.metric:.5f} | {p.drop:.5f} | {p.weight_bytes} |")
    out += ["", (f"Linear weights: {first.weight_bytes} bytes all {result.primary_format} -> "
                 f"{final.weight_bytes} bytes with the fallbacks."), "",
            *([f"No per-layer sensitivity: {result.sensitivity_skipped}.", ""] if result.sensitivity_skipped else []),
            "| layer | role | proxy error | measured gain | format |", "|---|---|---|---|---|"]
    for x in result.layers:
        fmt = result.fallback if x["name"] in result.chosen else result.primary_format
        gain = "-" if x["gain"] is None else f"{x['gain']:.5f}"
        proxy = "-" if x["proxy_error"] is None else f"{x['proxy_error']:.4f}"
        out.append(f"| {x['name']} | {x['role'] or 'other'} | {proxy} | {gain} | {fmt} |")
    return "\n".join(out) + "\n"
