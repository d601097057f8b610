"""Repair settings checked in one place: the budget (which metric, its largest drop, where that number came from),
the gate thresholds a repaired map must also meet, and the fallback format; one line naming the key on bad input.

The budget (recipe.repair.metric, recipes/repair/default.yaml):
- max_task_drop budgets the task metric against gold labels (gate.task_metric, else the task's default:
  classification accuracy, sts spearman, retrieval accuracy_at_1); max_fidelity_drop budgets the fidelity metric
  against the fp32 outputs (mean embedding cosine; label agreement for classifiers). Give at most one.
- metric=auto (default): the task metric when the evaluation rows carry gold labels and a task budget is given
  (recipe.repair.max_task_drop, else recipe.gate.max_task_drop); otherwise the fidelity metric, its budget
  max_fidelity_drop or, unset, the gate's minimum (1 - gate.min_embedding_cosine; classifiers 1 -
  gate.min_top1_agreement). metric=task / metric=fidelity force one, and the other metric's key is an error.
Either way drop = reference - value, measured on the ranking rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compiler.core.errors import RecipeError
from compiler.core.formats import FORMATS, FULL_PRECISION, number_format
from compiler.core.tasks import eval_task as eval_task_of
from compiler.core.tasks import task_kind
from compiler.steps.base import TORCH

METRIC_CHOICES = ("auto", "task", "fidelity")
STRATEGIES = ("greedy", "binary")


def fallback_formats() -> tuple[str, ...]:
    """The formats a layer may fall back to: every registered format at least 8 bits wide (compiler/core/formats.py),
    widest first (fp32, fp16, then the 8-bit ones)."""
    return tuple(sorted((n for n, f in FORMATS.items() if f.bits >= 8), key=lambda n: (-FORMATS[n].bits, n)))


def weight_bytes(counts: dict[str, int], formats: dict[str, str]) -> int:
    """Stored bytes of the listed layers' weights in their formats (the registry's storage bits, nvfp4's block
    scales included; an estimate: no other scales)."""
    return int(sum(n * number_format(formats[name]).bits / 8 for name, n in counts.items()))


BUDGET_KEYS = {"task": "max_task_drop", "fidelity": "max_fidelity_drop"}
LABELED_FILE_HINT = ("give data.evaluation_file with labels (TSV/JSONL columns text,label | sentence1,sentence2,score "
                     "| query,positive)")


@dataclass(frozen=True)
class Budget:
    """The budgeted metric's kind ("task" | "fidelity"), its largest drop, and what set it: the key
    (recipe.repair.max_task_drop / max_fidelity_drop) or the gate threshold it came from."""

    kind: str
    max_drop: float
    source: str  # e.g. "recipe.repair.max_fidelity_drop=0.01" or "recipe.gate.min_embedding_cosine=0.9"

    @property
    def key(self) -> str:
        """The recipe key of this budget, and its name in report.json and sensitivity.json."""
        return BUDGET_KEYS[self.kind]

    @property
    def from_key(self) -> bool:
        return self.source.startswith(f"recipe.repair.{self.key}=")

    def note(self, metric_name: str) -> str:
        """One sentence: the budget, where it came from, and the key that sets another."""
        head = f"Repair budget: {metric_name} drop <= {self.max_drop:g}"
        if self.from_key:
            return f"{head}, set by {self.source}."
        return (f"{head}, from {self.source} (recipe.repair.{self.key} not given); set recipe.repair.{self.key} "
                f"(e.g. recipe.repair.{self.key}=0.01) for a tighter one.")


def _given(value) -> bool:
    return value is not None


def resolve_budget(rep, gate, model_task: str, labeled: bool, where: str = "the evaluation data") -> Budget:
    """The budget of a repair (see the module docstring); RecipeError when the keys given do not fit the metric or
    the data. Validation calls it before any weights load, the repair run again to measure."""
    mode = getattr(rep, "metric", "auto")
    if mode not in METRIC_CHOICES:
        raise RecipeError("recipe.repair.metric", f"unknown choice {mode!r}", f"use one of {list(METRIC_CHOICES)}")
    task_drop, fid_drop = rep.max_task_drop, getattr(rep, "max_fidelity_drop", None)
    for key, v in (("max_task_drop", task_drop), ("max_fidelity_drop", fid_drop)):
        if _given(v) and (not math.isfinite(v) or v < 0):
            raise RecipeError(f"recipe.repair.{key}", f"{v} is below zero",
                              "give the largest metric drop you accept, e.g. 0.01 (0 = no loss at all)")
    if _given(task_drop) and _given(fid_drop):
        raise RecipeError("recipe.repair.max_fidelity_drop", f"{fid_drop} given together with recipe.repair."
                          f"max_task_drop={task_drop}: the search budgets one metric",
                          "keep max_task_drop (task metric against gold labels) or max_fidelity_drop (fidelity "
                          "metric against fp32), not both")
    if mode == "fidelity" and _given(task_drop):
        raise RecipeError("recipe.repair.max_task_drop", f"{task_drop} budgets the task metric, but recipe.repair."
                          "metric=fidelity budgets the fidelity metric (embedding cosine / label agreement)",
                          f"use recipe.repair.max_fidelity_drop={task_drop}")
    if mode == "task" and _given(fid_drop):
        raise RecipeError("recipe.repair.max_fidelity_drop", f"{fid_drop} budgets the fidelity metric, but "
                          "recipe.repair.metric=task budgets the task metric against gold labels",
                          f"use recipe.repair.max_task_drop={fid_drop}")
    gate_task = getattr(gate, "max_task_drop", None)
    wants_task = mode == "task" or (mode == "auto" and not _given(fid_drop)
                                    and (_given(task_drop) or (labeled and _given(gate_task))))
    if wants_task:
        if not labeled:
            key = "recipe.repair.metric" if mode == "task" else "recipe.repair.max_task_drop"
            raise RecipeError(key, f"{'task' if mode == 'task' else task_drop} needs gold labels but {where} is "
                              "plain text", f"{LABELED_FILE_HINT}, or budget the fidelity metric with "
                              "recipe.repair.max_fidelity_drop")
        if _given(task_drop):
            return Budget("task", float(task_drop), f"recipe.repair.max_task_drop={task_drop:g}")
        if _given(gate_task):
            return Budget("task", float(gate_task), f"recipe.gate.max_task_drop={gate_task:g}")
        raise RecipeError("recipe.repair.metric", "task has no budget: recipe.repair.max_task_drop and "
                          "recipe.gate.max_task_drop are both unset",
                          "set recipe.repair.max_task_drop, e.g. 0.01 (one point of accuracy)")
    if _given(fid_drop):
        return Budget("fidelity", float(fid_drop), f"recipe.repair.max_fidelity_drop={fid_drop:g}")
    if task_kind(model_task).labeled:  # label agreement is the fidelity metric of a classifier
        return Budget("fidelity", max(0.0, 1.0 - float(gate.min_top1_agreement)),
                      f"recipe.gate.min_top1_agreement={gate.min_top1_agreement:g}")
    return Budget("fidelity", max(0.0, 1.0 - float(gate.min_embedding_cosine)),
                  f"recipe.gate.min_embedding_cosine={gate.min_embedding_cosine:g}")


def resolve_fallback(rep, steps) -> str:
    """repair.fallback, with auto resolved from declared facts: when every quantizing step produces a format
    narrower than 8 bits (nvfp4), the first of that format's registered fallbacks the steps can all give a layer
    (nvfp4 -> fp8: mixed NVFP4/FP8 engines); else fp32."""
    if rep.fallback != "auto":
        return rep.fallback
    quant = [s for s in steps if s.quantizes_compute]
    narrow = [number_format(f) for s in quant for f in s.precision if f in FORMATS and FORMATS[f].bits < 8]
    if not quant or not all(any(f in FORMATS and FORMATS[f].bits < 8 for f in s.precision) for s in quant):
        return FULL_PRECISION
    for fallback in narrow[0].fallbacks:
        if all(fallback in s.layer_format_choices for s in quant):
            return fallback
    return FULL_PRECISION


def repair_formats(rep) -> set:
    """The formats a repair may give layers: its fallback (when it searches) and the formats of its map."""
    return ({rep.fallback} if rep.enabled else set()) | set(dict(rep.layers or {}).values())


def repair_min_opset(rep, target) -> int:
    """The opset the map's formats need in an exported graph (the registry's standard-op opset: fp8 layers are
    measured as float8 Q/DQ in onnxruntime, opset 19, on trt too)."""
    if not target.runs_onnx:
        return 0
    return max([number_format(f).onnx_opset for f in repair_formats(rep) if f in FORMATS], default=0)


def validate_repair(rep, steps, target, explicit_opset: int | None) -> None:
    """Bad repair settings, each one line naming the key (before any data or weights load; the budget's fit to
    the data: validate_repair_budget)."""
    for key in ("max_task_drop", "max_fidelity_drop"):
        v = getattr(rep, key, None)
        if _given(v) and (not math.isfinite(v) or v < 0):
            raise RecipeError(f"recipe.repair.{key}", f"{v} is below zero",
                              "give the largest metric drop you accept, e.g. 0.01 (0 = no loss at all)")
    if not 0.0 <= rep.max_fallback_fraction <= 1.0:
        raise RecipeError("recipe.repair.max_fallback_fraction", f"{rep.max_fallback_fraction} is outside [0, 1]",
                          "give the largest share of quantized layers that may fall back, e.g. 0.34")
    if rep.fallback not in fallback_formats() + ("auto",):
        raise RecipeError("recipe.repair.fallback", f"unknown format {rep.fallback!r}",
                          f"use one of {list(fallback_formats() + ('auto',))}")
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
        if fmt not in fallback_formats():
            raise RecipeError(key, f"unknown format {fmt!r}", f"use one of {list(fallback_formats())}")
        for s in quant:
            if fmt != "fp32" and fmt not in s.layer_format_choices:
                ok = sorted({"fp32"} | set(s.layer_format_choices))
                raise RecipeError(key, f"step {s.name} cannot give a layer {fmt!r} on target={target.name}",
                                  f"use one of {ok}")
    need = repair_min_opset(rep, target)
    if explicit_opset is not None and int(explicit_opset) < need:
        fmt = next(f for f in sorted(repair_formats(rep)) if f in FORMATS and number_format(f).onnx_opset == need)
        raise RecipeError(key, f"{fmt} layers are not runnable on target={target.name} at export.opset="
                          f"{explicit_opset} ({number_format(fmt).opset_reason} needs opset {need})",
                          f"set export.opset={need} (or leave it unset), or use fallback=fp32")
    for i, s in enumerate(steps):
        if s.trains and rep.enabled:  # the pipeline trains before the search: the step says what of it the map keeps
            s.validate_with_repair("recipe.repair.enabled", steps[:i])
    onnx_side = [s.name for s in quant if s.stage_for(target.name) != TORCH]
    torch_side = [s.name for s in quant if s.stage_for(target.name) == TORCH]
    if rep.enabled and onnx_side and torch_side:
        # one search measures one side: torch fake-quant modules or the quantized graph in onnxruntime
        raise RecipeError("recipe.repair.enabled", f"{torch_side} quantize the torch model and {onnx_side} the ONNX "
                          f"graph on target={target.name}: the search measures one side",
                          "keep one quantizing step, or name the layers to keep out in recipe.repair.layers")


def validate_repair_budget(rep, gate, model_task: str, eval_task: str | None, where: str) -> None:
    """Validate-time (data files read, no weights): the budget fits the metric and the data."""
    mode = getattr(rep, "metric", "auto")
    if mode not in METRIC_CHOICES:
        raise RecipeError("recipe.repair.metric", f"unknown choice {mode!r}", f"use one of {list(METRIC_CHOICES)}")
    if not rep.enabled:
        return
    budget = resolve_budget(rep, gate, model_task, eval_task is not None, where)
    if budget.kind == "task" and eval_task_of(eval_task).texts_per_example == 2 and rep.ranking_samples < 2:
        raise RecipeError("recipe.repair.ranking_samples", f"{rep.ranking_samples} row holds no {eval_task} pair "
                          f"of {where}", "use at least 2 (whole pairs), e.g. 32")
