"""Which metric the repair search budgets, and its fp32 reference: the labeled task metric against the gold labels
when the evaluation data has labels and a task budget applies, else the fidelity metric against the fp32 outputs.

The rule (recipe.repair.metric, recipes/repair/default.yaml):
- auto (default): the task metric (gate.task_metric, else the task's default: classification accuracy, sts
  spearman, retrieval accuracy_at_1) when the evaluation rows carry gold labels AND a task budget is given
  (recipe.repair.max_task_drop, else recipe.gate.max_task_drop); otherwise the fidelity metric (mean embedding
  cosine, label agreement for classifiers) from 1.0, its budget repair.max_task_drop or the gate's minimum.
  A user who states a task budget gets it kept; one who states none gets what the gate checks.
- task: always the task metric (labels and a task budget required: a recipe error otherwise).
- fidelity: always the fidelity metric, even on labeled data.
Either way drop = reference - value (higher is better), measured on the ranking subset (the first
repair.ranking_samples evaluation rows, whole pairs only, with the labels of those rows alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compiler.core.errors import RecipeError
from compiler.numerics.metrics import TaskLabels, default_metric, task_metric

METRIC_CHOICES = ("auto", "task", "fidelity")


@dataclass(frozen=True)
class RepairMetric:
    """The budgeted metric: name, its fp32 value on the ranking subset, fn(quantized outputs) -> value, the
    largest drop allowed, and whether it is the task metric ("task") or the fidelity metric ("fidelity")."""

    name: str
    reference: float
    fn: Callable[[np.ndarray], float]
    budget: float
    kind: str


def task_budget(rep, gate) -> float | None:
    """The task-metric budget a user stated: recipe.repair.max_task_drop, else recipe.gate.max_task_drop."""
    for v in (rep.max_task_drop, gate.max_task_drop):
        if v is not None:
            return float(v)
    return None


def uses_task_metric(rep, gate, labeled: bool) -> bool:
    mode = getattr(rep, "metric", "auto")
    if mode == "fidelity" or not labeled:
        return False
    return mode == "task" or task_budget(rep, gate) is not None


def fidelity_budget(rep, gate, model_task: str) -> float:
    """repair.max_task_drop, else the gate's: the fidelity metric may drop from 1.0 to the gate's minimum."""
    if rep.max_task_drop is not None:
        return float(rep.max_task_drop)
    if model_task == "classification":
        return max(0.0, 1.0 - float(gate.min_top1_agreement))
    return max(0.0, 1.0 - float(gate.min_embedding_cosine))


def budget_of(rep, gate, model_task: str, labeled: bool = False) -> float:
    """The budget of the metric the search uses (see the module docstring)."""
    if uses_task_metric(rep, gate, labeled):
        return float(task_budget(rep, gate))
    return fidelity_budget(rep, gate, model_task)


def fidelity_metric(model_task: str):
    """(name, fn(reference outputs, quantized outputs) -> value, higher is better, 1.0 = equal)."""
    if model_task == "classification":
        return "label_agreement", lambda r, q: float(np.mean(np.argmax(r, -1) == np.argmax(q, -1)))

    def cosine(r, q):
        r = r / np.clip(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12, None)
        q = q / np.clip(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12, None)
        return float(np.mean(np.sum(r * q, axis=-1)))

    return "embedding_cosine_mean", cosine


def ranking_rows(requested: int, available: int, labels: TaskLabels | None) -> int:
    """How many evaluation rows the ranking subset runs: repair.ranking_samples, at most what was loaded, and
    for pair tasks (sts, retrieval) an even count, because evaluation_set lays a pair out on rows 2k, 2k+1:
    a retrieval query whose gold partner is cut off could never be found."""
    n = min(int(requested), int(available))
    if labels is not None and labels.task != "classification":
        n -= n % 2
    return n


def repair_metric(rep, gate, model_task: str, labels: TaskLabels | None, reference: np.ndarray,
                  order: np.ndarray | None = None) -> RepairMetric:
    """The metric for a search over outputs of the ranking subset; reference = the fp32 model's outputs on it
    (the first rows, as many as ranking_rows gave). order: the evaluation row of each output row when the
    measurer runs the rows in another order (e.g. sorted by length); None = in order. Fidelity pairs outputs
    row by row and needs no order; the task metric puts the rows back where the gold labels expect them."""
    if uses_task_metric(rep, gate, labels is not None):
        if order is not None:
            back = np.argsort(np.asarray(order))
            if not np.array_equal(np.asarray(order)[back], np.arange(len(reference))):
                raise ValueError("order must be a permutation of the ranking rows 0..n-1")
            inner = _task_fn(labels, reference[back], rep, gate)
            return RepairMetric(inner.name, inner.reference, lambda q: inner.fn(np.asarray(q)[back]), inner.budget,
                                inner.kind)
        return _task_fn(labels, reference, rep, gate)
    name, fn = fidelity_metric(model_task)
    return RepairMetric(name, 1.0, lambda q: fn(reference, q), fidelity_budget(rep, gate, model_task), "fidelity")


def _task_fn(labels: TaskLabels, reference: np.ndarray, rep, gate) -> RepairMetric:
    """The task metric of the first len(reference) rows against their gold labels."""
    sub = labels.subset(len(reference))
    if len(sub) == 0:
        raise RecipeError("recipe.repair.ranking_samples", f"{len(reference)} rows hold no complete "
                          f"{labels.task} example", "use more ranking samples, e.g. 32")
    metric = gate.task_metric or default_metric(sub.task)
    ref = task_metric(sub, reference, metric)
    if not np.isfinite(ref):
        raise RecipeError("recipe.repair.ranking_samples", f"the fp32 {metric} on {len(reference)} rows is "
                          f"{ref} (no spread to score)", "use more ranking samples, or recipe.repair.metric=fidelity")
    return RepairMetric(f"{sub.task} {metric}", float(ref), lambda q: task_metric(sub, q, metric),
                        float(task_budget(rep, gate)), "task")


def validate_repair_metric(rep, gate, eval_task: str | None, where: str) -> None:
    """Validate-time (data files read, no weights): the metric choice fits the data and has a budget."""
    mode = getattr(rep, "metric", "auto")
    if mode not in METRIC_CHOICES:
        raise RecipeError("recipe.repair.metric", f"unknown choice {mode!r}", f"use one of {list(METRIC_CHOICES)}")
    if not rep.enabled:
        return
    if uses_task_metric(rep, gate, eval_task is not None) and eval_task != "classification" \
            and rep.ranking_samples < 2:
        raise RecipeError("recipe.repair.ranking_samples", f"{rep.ranking_samples} row holds no {eval_task} pair "
                          f"of {where}", "use at least 2 (whole pairs), e.g. 32")
    if mode != "task":
        return
    if eval_task is None:
        raise RecipeError("recipe.repair.metric", f"task needs gold labels but {where} is plain text",
                          "give data.evaluation_file with labels (TSV/JSONL columns text,label | "
                          "sentence1,sentence2,score | query,positive) or use recipe.repair.metric=auto")
    if task_budget(rep, gate) is None:
        raise RecipeError("recipe.repair.metric", "task has no budget: recipe.repair.max_task_drop and "
                          "recipe.gate.max_task_drop are both unset",
                          "set recipe.repair.max_task_drop, e.g. 0.01 (one point of accuracy)")
