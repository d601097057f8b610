"""Repair stage: per-layer sensitivity of a quantizing recipe and the search for the fewest layers to give the
fallback format so the budgeted metric holds; its result is a per-layer precision map ({layer: format}).

How it measures: the recipe's torch steps are applied twice to copies of the fp32 model, once as written (A)
and once with every quantized layer given the fallback format (B, through Step.with_layer_formats). A mixed
model is A with some layers' modules swapped in from B. This equals quantizing with the mixed map: modelopt
calibrates every quantizer on the unquantized forward (calibration mode disables quantization), so a layer's
ranges do not depend on the other layers' formats. Each measurement is then one forward of the ranking subset.
That is the target's numerics for target=torch, and the graph the trt / ort targets export from the same
fake-quant modules (ORT equals torch fake-quant to < 1e-4 on these graphs: compiler/steps tests).

Sensitivity of a layer: the budgeted metric with only that layer at the fallback minus the metric with all
layers quantized (a gain: larger = more sensitive). A cheap first pass (each layer's output error against its
fallback module on the same input, from one forward) orders the layers; the top `confirm_top` are measured.
The search: layers in sensitivity order, the smallest count k whose map meets the budget, found by binary search
over k (the metric rises with k in practice; each probe is measured and reported). It only calls a
measure(fallback_layers) -> metric: steps that quantize the exported ONNX graph (int8_static / int8_dynamic on ort,
trt) bring their own, which quantizes and runs the graph in onnxruntime (compiler/stages/repair_onnx.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.steps.base import TORCH

import numpy as np

from compiler.core.errors import BuildError, GateError, RecipeError
from compiler.stages.repair_metric import ranking_rows, repair_metric

log = logging.getLogger("qcompile")

FALLBACKS = ("fp32", "fp16", "int8", "fp8")
# stored bits per weight of each format (nvfp4: 4-bit values + one e4m3 scale per 16; int4: 4-bit values + one
# fp32 scale per block of 32, int4_weight_only's default block), for the size estimate
FORMAT_BITS = {"fp32": 32.0, "fp16": 16.0, "int8": 8.0, "fp8": 8.0, "nvfp4": 4.5, "int4": 5.0}


class RepairBudgetError(GateError):
    """The budget cannot be met within repair.max_fallback_fraction. Exit 3, like a failed gate."""

    kind = "repair budget not met"


@dataclass
class Probe:
    """One measured point of the search."""

    fallback_layers: int
    metric: float
    drop: float
    weight_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"fallback_layers": self.fallback_layers, "metric": round(self.metric, 6),
                "drop": round(self.drop, 6), "weight_bytes": self.weight_bytes}


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

    @property
    def layer_map(self) -> dict[str, str]:
        return {n: self.fallback for n in sorted(self.chosen)}

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "reference": self.reference, "max_drop": self.budget,
                "fallback": self.fallback, "primary_format": self.primary_format, "quantized_layers": self.total,
                "max_fallback_layers": self.allowed, "chosen": sorted(self.chosen), "layers": self.layers,
                "search": [p.as_dict() for p in self.probes], "seconds": self.seconds, "met": self.met,
                "needed": self.needed}


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
    if rep.strategy != "greedy":
        raise RecipeError("recipe.repair.strategy", f"unknown strategy {rep.strategy!r}", "use greedy")
    if rep.ranking_samples <= 0:
        raise RecipeError("recipe.repair.ranking_samples", f"must be > 0, got {rep.ranking_samples}", "use e.g. 32")
    if rep.confirm_top < 0:
        raise RecipeError("recipe.repair.confirm_top", f"must be >= 0, got {rep.confirm_top}", "use e.g. 16")
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
    """Whether a layer module (possibly wrapped, e.g. by a rotation) has an enabled quantizer."""
    for m in sub.modules():
        for attr in ("weight_quantizer", "input_quantizer"):
            q = getattr(m, attr, None)
            if q is not None and bool(getattr(q, "is_enabled", False)):
                return True
    return False


def _params(sub) -> int:
    import torch

    return int(sum(m.weight.numel() for m in sub.modules() if isinstance(m, torch.nn.Linear)))


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

    def __init__(self, a, b, names: Sequence[str]):
        self.model = a
        self.primary = {n: _get(a, n) for n in names}
        self.fallback = {n: _get(b, n) for n in names}
        self.current: set = set()

    def use(self, fallback_layers) -> Any:
        want = set(fallback_layers)
        for n in self.current - want:
            _set(self.model, n, self.primary[n])
        for n in want - self.current:
            _set(self.model, n, self.fallback[n])
        self.current = want
        return self.model


# ------------------------------------------------------------------------------------------------ search

def measure_sensitivity(mixed: MixedModel, names: Sequence[str], roles: dict[str, str], feeds,
                        reference: np.ndarray, metric_fn, confirm_top: int, output_index: int) -> dict[str, Any]:
    """Per-layer sensitivity: the proxy error of every layer, the measured gain of the top confirm_top by proxy;
    layers ordered by measured gain, then the unmeasured ones by proxy."""
    def measure(fallback_layers) -> float:
        return metric_fn(reference, _outputs(mixed.use(fallback_layers), feeds, output_index))

    base = measure([])
    proxy = proxy_errors(mixed.use([]), _b_of(mixed), names, feeds)
    by_proxy = sorted(names, key=lambda n: (-proxy[n], n))
    gains: dict[str, float | None] = {n: None for n in names}
    for n in by_proxy[:confirm_top]:
        gains[n] = measure([n]) - base
    measured = sorted((n for n in names if gains[n] is not None), key=lambda n: (-gains[n], -proxy[n], n))
    order = measured + [n for n in by_proxy if gains[n] is None]
    mixed.use([])
    return {"base_metric": base, "layers": [
        {"name": n, "role": roles.get(n, ""), "proxy_error": round(proxy[n], 6),
         "gain": None if gains[n] is None else round(gains[n], 6)} for n in order]}


def search(measure: Callable[[Sequence[str]], float], sensitivity: dict[str, Any], metric_name: str, budget: float,
           fallback: str, allowed: int, primary_format: str, counts: dict[str, int],
           reference: float = 1.0) -> RepairResult:
    """Layers in sensitivity order; the smallest count k <= allowed whose map meets the budget, by binary search
    (every probe measured). measure(fallback_layers) -> metric of the build with those layers in the fallback;
    reference: the metric's fp32 value (drop = reference - metric). Unmet: the count that would meet it (searched
    past `allowed`), in result.needed."""
    order = [x["name"] for x in sensitivity["layers"]]
    primary = {n: primary_format for n in order}
    probes: dict[int, Probe] = {}

    def probe(k: int) -> Probe:
        if k not in probes:
            m = float(sensitivity["base_metric"]) if k == 0 else float(measure(order[:k]))
            fmts = dict(primary, **{n: fallback for n in order[:k]})
            probes[k] = Probe(k, m, reference - m, weight_bytes(counts, fmts))
        return probes[k]

    def ok(k: int) -> bool:
        return probe(k).drop <= budget + 1e-12

    def smallest(lo: int, hi: int) -> int:
        """The smallest k in (lo, hi] with ok(k), given ok(hi) and not ok(lo)."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        return hi

    chosen: int | None = None
    needed: int | None = None
    if ok(0):
        chosen = 0
    elif allowed > 0 and ok(allowed):
        chosen = smallest(0, allowed)
    elif len(order) > allowed and ok(len(order)):
        needed = smallest(allowed, len(order))
    result = RepairResult(metric_name=metric_name, reference=reference, budget=budget, fallback=fallback,
                          layers=sensitivity["layers"], probes=[probes[k] for k in sorted(probes)],
                          chosen=order[:chosen] if chosen is not None else [], allowed=allowed, total=len(order),
                          primary_format=primary_format)
    result.met = chosen is not None
    result.needed = needed
    return result


def _b_of(mixed: MixedModel):
    """A module tree whose layers are B's: the fallback modules swapped into a shallow view for proxy_errors."""

    class _View:
        def get_submodule(self, name):
            return mixed.fallback[name]

    return _View()


def unmet_message(result: RepairResult) -> str:
    within = [p for p in result.probes if p.fallback_layers <= result.allowed]
    best = min(within, key=lambda p: p.drop)
    need = result.needed
    frac = result.fraction
    head = (f"budget met with {need} of {result.total} layers in {result.fallback}; "
            f"max_fallback_fraction={frac:g} allows {result.allowed}" if need else
            f"budget not met even with all {result.total} layers in {result.fallback}")
    return (f"{head} (best within it: {result.metric_name} {best.metric:.5f}, drop {best.drop:.5f} > "
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
    labels = getattr(data, "evaluation_labels", None)
    rows = ranking_rows(int(rep.ranking_samples), len(data.evaluation), labels)
    feeds = _ranking_feeds(data, rows, int(spec.data.batch_size))
    output_index = 0 if model.task == "classification" else 1
    reference = _outputs(model.module, feeds, output_index)
    # the budgeted metric (compiler/stages/repair_metric.py): the task metric against the ranking rows' gold
    # labels, or the fidelity metric against the fp32 outputs; the search only sees value(outputs)
    chosen_metric = repair_metric(rep, spec.gate, model.task, labels, reference)
    metric_name, budget = chosen_metric.name, chosen_metric.budget

    def metric_fn(_reference, outputs):
        return chosen_metric.fn(outputs)

    allowed = math.floor(float(rep.max_fallback_fraction) * len(names) + 1e-9)
    counts = {n: _params(_get(a, n)) for n in names}
    roles = model.roles.role if model.roles is not None else {}
    mixed = MixedModel(a, b, names)
    t1 = time.perf_counter()

    def sens() -> dict[str, Any]:
        return measure_sensitivity(mixed, names, roles, feeds, reference, metric_fn, int(rep.confirm_top),
                                   output_index)

    if cache is not None:
        def build(d: Path) -> None:
            (d / "sensitivity.json").write_text(json.dumps(sens(), indent=1, sort_keys=True) + "\n")

        # the metric and the gold labels (the evaluation file's digest) decide the gains too
        key = dict(sensitivity_key(model, spec, data, names), metric=metric_name, ranking_rows=rows,
                   labels=getattr(data, "files_sha256", {}).get("evaluation") if labels is not None else None)
        entry = cache.get_or_create("sensitivity", key, build)
        sensitivity = json.loads((entry / "sensitivity.json").read_text())
    else:
        sensitivity = sens()
    t2 = time.perf_counter()
    result = search(lambda layers: metric_fn(reference, _outputs(mixed.use(layers), feeds, output_index)),
                    sensitivity, metric_name, budget, rep.fallback, allowed, primary_format, counts,
                    reference=chosen_metric.reference)
    mixed.use(result.chosen)
    result.fraction = float(rep.max_fallback_fraction)
    result.seconds = {"build_variants": round(t1 - t0, 2), "sensitivity": round(t2 - t1, 2),
                      "search": round(time.perf_counter() - t2, 2)}
    return result


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _ranking_feeds(data, n: int, batch_size: int):
    import torch

    ev = data.evaluation
    n = min(n, len(ev))
    feeds = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        feeds.append([torch.from_numpy(np.ascontiguousarray(v[start:stop])) for v in ev.arrays.values()])
    return feeds


def sensitivity_key(model, spec, data, names) -> dict[str, Any]:
    """Everything the per-layer sensitivity depends on: weights, data, recipe steps, target, fallback."""
    from omegaconf import OmegaConf

    steps = OmegaConf.to_container(spec.raw.recipe.get("steps"), resolve=True) if spec.raw is not None else {}
    return {"weights": model.weights_sha256, "calibration": data.calibration.sha256(),
            "evaluation": data.evaluation.sha256(), "ranking_samples": int(spec.repair.ranking_samples),
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
    # a map may name scopes that are no Linear (ONNX repair: activation MatMuls); listed after the layers
    names = [n for n in roles if n in primary or n in layer_map] + sorted(set(layer_map) - set(roles))
    for name in names:
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
    ax.set_title(f"per-layer sensitivity (red: fell back to {result.fallback}; unmeasured layers at 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(result: RepairResult) -> str:
    """The REPORT.md section: fallen-back layers, the metric after each search step, size before / after."""
    probes = sorted(result.probes, key=lambda p: p.fallback_layers)
    first = probes[0]
    final = next((p for p in probes if p.fallback_layers == len(result.chosen)), probes[-1])
    out = ["", "## Repair (per-layer mixed precision)", "",
           (f"Budget: {result.metric_name} drop <= {result.budget:g}; fallback {result.fallback}; "
            f"{len(result.chosen)} of {result.total} quantized layers fell back "
            f"(at most {result.allowed} allowed)."), "",
           "| layers in fallback | " + result.metric_name + " | drop | weight bytes |", "|---|---|---|---|"]
    for p in probes:
        out.append(f"| {p.fallback_layers} | {p.metric:.5f} | {p.drop:.5f} | {p.weight_bytes} |")
    out += ["", (f"Linear weights: {first.weight_bytes} bytes all {result.primary_format} -> "
                 f"{final.weight_bytes} bytes with the fallbacks."), "",
            "| layer | role | proxy error | measured gain | format |", "|---|---|---|---|---|"]
    for x in result.layers:
        fmt = result.fallback if x["name"] in result.chosen else result.primary_format
        gain = "-" if x["gain"] is None else f"{x['gain']:.5f}"
        proxy = "-" if x.get("proxy_error") is None else f"{x['proxy_error']:.4f}"  # ONNX repair: all measured
        out.append(f"| {x['name']} | {x['role'] or 'other'} | {proxy} | {gain} | {fmt} |")
    return "\n".join(out) + "\n"
