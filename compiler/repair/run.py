"""The repair stage, one run function for both sides: the per-layer precision map of recipe.repair.layers, or
(repair.enabled, no map yet) the one the search finds, given to the quantizing steps (Step.with_layer_formats).
Torch-side steps are measured on torch fake-quant before they run (torch_measure.py); ONNX-side steps on the
quantized exported graph in onnxruntime (onnx_measure.py). The searched map goes into spec.raw (so into
recipe.yaml: a rebuild replays it without searching); sensitivity.json, sensitivity.png and layers.yaml into the
run directory, the summary into report["repair"]."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from compiler.core.errors import BuildError
from compiler.core.tasks import task_kind
from compiler.repair.budget import resolve_budget
from compiler.repair.metric import (
    Scorer,
    gate_conditions,
    output_cosines,
    output_of,
    primary_rows,
    ranking_rows,
    repair_metric,
)
from compiler.repair.onnx_measure import OnnxMeasurer
from compiler.repair.outputs import report_markdown, unmet_message, write_layers_yaml, write_outputs
from compiler.repair.result import RepairBudgetError, RepairResult, replayed_section, searched_section
from compiler.repair.search import search, sensitivity_unless_met, split
from compiler.repair.torch_measure import TorchMeasurer
from compiler.steps.base import StepContext

# context(work_dir) -> the StepContext a step runs with (the pipeline's step_context for this build)
Context = Callable[[Path], StepContext]


def repairs_onnx(spec) -> bool:
    """Whether the repair (searched or replayed) applies to ONNX-side steps: it then runs after export, on the
    exported graph, instead of before the torch steps."""
    rep = spec.repair
    return (rep is not None and bool(rep.enabled or rep.layers)
            and any(s.quantizes_compute for s in spec.onnx_steps))


def sensitivity_key(model, spec, data, names) -> dict[str, Any]:
    """Everything the per-layer sensitivity depends on: weights, data, recipe steps, target, fallback."""
    steps = OmegaConf.to_container(spec.raw.recipe.get("steps"), resolve=True) if spec.raw is not None else {}
    return {"weights": model.weights_sha256, "calibration": data.calibration.sha256(),
            "evaluation": data.evaluation.sha256(), "ranking_samples": int(spec.repair.ranking_samples),
            "confirm_top": int(spec.repair.confirm_top), "steps": steps, "target": spec.target.name,
            "fallback": spec.repair.fallback, "layers": list(names), "seed": int(spec.seed),
            "exclude": list(spec.model.exclude)}


def run_repair(spec, model, data, run_dir: Path, work_dir: Path, report: dict[str, Any], context: Context,
               cache=None, exported: Path | None = None, reference_module=None, after_training: bool = False):
    """The repair stage for a build (see the module docstring). model: the fp32 LoadedModel; exported: the fp32
    graph when the quantizing steps are ONNX-side (reference_module: the fp32 torch module the check compares
    with). Returns (spec with the map given to its steps, the REPORT.md section). An unmet budget raises
    RepairBudgetError after filling report (status, reason, repair); its .markdown is the REPORT.md section.
    after_training: a training step ran before the search (its unmet message names the map-first alternative)."""
    rep = spec.repair
    layer_map = dict(rep.layers or {})
    side_steps = spec.onnx_steps if exported is not None else spec.torch_steps
    md = ""
    if not layer_map:
        result = search_map(spec, model, data, work_dir, context, cache, exported, reference_module)
        files = write_outputs(run_dir, result)
        md = report_markdown(result)
        report["repair"] = searched_section(result, files).to_dict()
        if not result.met:
            report["status"] = RepairBudgetError.kind
            report["reason"] = unmet_message(result, after_training)
            err = RepairBudgetError(report["reason"])
            err.markdown = md
            raise err
        layer_map = result.layer_map
        with open_dict(spec.raw):
            OmegaConf.update(spec.raw, "recipe.repair.layers", layer_map, force_add=True)
    else:
        report["repair"] = replayed_section(layer_map).to_dict()
    primary: dict[str, str] = {}  # what each quantizing step gives the layers it touches
    for s in side_steps:
        if s.quantizes_compute:
            primary.update({n: ",".join(sorted(s.precision)) for n in s.layers(model.module, context(work_dir).exclude)})
    write_layers_yaml(run_dir, model.roles.role if model.roles is not None else {}, primary, layer_map)
    steps = [s.with_layer_formats(layer_map) if s.quantizes_compute and s in side_steps else s
             for s in spec.steps]
    return dataclasses.replace(spec, steps=steps), md


def search_map(spec, model, data, work_dir: Path, context: Context, cache=None, exported: Path | None = None,
               reference_module=None) -> RepairResult:
    """The sensitivity and the search on one side's measurer: the budgeted metric first, every gate threshold
    a condition the map must also meet."""
    rep = spec.repair
    # a training step (distill) is not in the search: the pipeline trains first, with every layer in the 4-bit
    # format, and hands the search the trained weights (model) and the fp32 module (reference_module); training per
    # measured model would train twice per build (the quantized and the fallback model the measurer swaps between)
    side_steps = [s for s in (spec.onnx_steps if exported is not None else spec.torch_steps) if not s.trains]
    quant = [s for s in side_steps if s.quantizes_compute]
    if not quant:
        raise BuildError("repair: the recipe has no quantizing step to search over on "
                         f"target={spec.target.name}")
    primary_format = ",".join(sorted(quant[0].precision))
    t0 = time.perf_counter()
    labels = getattr(data, "evaluation_labels", None)
    rows = ranking_rows(int(rep.ranking_samples), len(data.evaluation), labels)
    batch = int(spec.data.batch_size)
    if exported is not None:
        def apply_onnx(onnx_path, steps, out_dir):
            for i, step in enumerate(steps):
                onnx_path = step.apply_onnx(onnx_path, out_dir / f"{i:02d}_{step.name}.onnx", context(out_dir))
            return onnx_path

        # an ORT target's own optimization level; a trt graph's stand-in session runs at ORT's default
        opt_level = spec.target.graph_optimization if spec.capabilities and spec.capabilities.ort_session else "all"
        measurer = OnnxMeasurer(model, reference_module, exported, side_steps, apply_onnx, data, rows, batch,
                                Path(work_dir) / "repair", rep.fallback, opt_level)
    else:
        def apply(module, steps):
            for step in steps:
                module = step.apply_torch(module, context(work_dir))
            return module

        measurer = TorchMeasurer(model, side_steps, rep.fallback, apply, data, rows, batch, reference_module)
    primary_output = model.output_names[task_kind(model.task).primary_index]
    score = scorer(spec, model, labels, measurer, primary_output)
    metric = score.metric
    names = measurer.start(score)
    allowed = math.floor(float(rep.max_fallback_fraction) * len(names) + 1e-9)
    t1 = time.perf_counter()
    # the metric, the conditions and the gold labels (the evaluation file's digest) decide the gains too
    key = {**sensitivity_key(model, spec, data, names), **measurer.key(), "metric": metric.name, "ranking_rows": rows,
           "labels": getattr(data, "files_sha256", {}).get("evaluation") if labels is not None else None,
           **({"conditions": [[c.name, c.floor] for c in score.conditions]} if score.conditions else {})}
    sensitivity = sensitivity_unless_met(measurer, names, measurer.roles, metric.reference, metric.max_drop, cache,
                                         key, lambda: measurer.sensitivity(int(rep.confirm_top)), score.conditions)
    t2 = time.perf_counter()

    def run_search(conditions):
        return search(measurer, sensitivity, metric.name, metric.budget, rep.fallback, allowed, primary_format,
                      measurer.counts, reference=metric.reference, strategy=str(rep.strategy), conditions=conditions)

    # the check's own batches: every evaluation row, padded, in row order
    check_feeds = [[torch.from_numpy(np.ascontiguousarray(v)) for v in b.values()]
                   for b in data.evaluation.batches(batch)]

    def exact(chosen, conditions):
        names = [n for n in (output_of(c.name) for c in conditions) if n]
        if not names:
            return {}
        ref, out = measurer.check_layout(chosen, check_feeds, set(names))
        return output_cosines(ref, out, names)

    result = confirmed(run_search, exact, lambda chosen: split(measurer(frozenset(chosen)))[1], score.conditions)
    result.fraction = float(rep.max_fallback_fraction)
    result.seconds = {"prepare": round(t1 - t0, 2), "sensitivity": round(t2 - t1, 2),
                      "search": round(time.perf_counter() - t2, 2), **measurer.finish(result.chosen)}
    return result


def confirmed(run_search: Callable[[list], RepairResult], exact: Callable[[list, list], dict[str, float]],
              approx: Callable[[list], dict[str, float]], conditions: list, rounds: int = 3) -> RepairResult:
    """run_search(conditions), then its map's per-output cosines in the check's own layout (exact(chosen,
    conditions): padded batches of every evaluation row; the measurers run the ranking rows unpadded or sorted):
    a condition the check would fail gets its floor raised by the gap between the two (approx: the search's
    values) and the search runs again, at most `rounds` times."""
    gate = {c.name: c.floor for c in conditions}  # what the check holds the values to
    result = run_search(conditions)
    for _ in range(rounds):
        if not result.met:
            break
        check = exact(result.chosen, conditions)
        short = {c.name for c in conditions if c.name in check and not check[c.name] >= gate[c.name] - 1e-12}
        if not short:
            break
        seen = approx(result.chosen)
        conditions = [dataclasses.replace(
            c, floor=max(c.floor, gate[c.name] + max(seen[c.name] - check[c.name], 0.0) + 1e-6),
            source=f"{c.source}; raised by {seen[c.name] - check[c.name]:.3g}: the check's padded batches gave "
                   f"{check[c.name]:.6g} at the map of {len(result.chosen)} layers") if c.name in short else c
            for c in conditions]
        result = run_search(conditions)
    return result


def scorer(spec, model, labels, measurer, primary_output: str) -> Scorer:
    """The measurement of a map: the budgeted metric (its budget resolved from the recipe, budget.py) and every
    gate threshold as a condition, on the measurer's fp32 reference outputs."""
    reference = primary_rows(measurer.reference_batches, primary_output, measurer.unsort)
    budget = resolve_budget(spec.repair, spec.gate, model.task, labels is not None)
    metric = repair_metric(budget, spec.gate, model.task, labels, reference)
    conditions = gate_conditions(spec.gate, metric, model.task, model.output_names, primary_output, labels,
                                 measurer.reference_batches, reference)
    return Scorer(metric, primary_output, conditions, measurer.unsort)
