"""What the repair search measures on each map: the budgeted metric (its fp32 reference and drop, budget.py) and
every other gate threshold as a condition the map must also meet, all computed from one forward's outputs.

Conditions, from recipe.gate (compiler/stages/check.py checks the same): per output, the Polygraphy cosine
(flattened per batch, mean over batches) >= min_output_cosine (not for classifiers); mean embedding cosine >=
min_embedding_cosine and retrieval top-1 agreement >= min_top1_agreement (embedders) or label agreement >=
min_top1_agreement (classifiers); the task metric's drop <= gate.max_task_drop (labeled data). The search sees
them on the ranking rows in its measurer's batches: the torch measurer runs them without padding, the check with
it, so a per-output cosine of token outputs (last_hidden_state) can differ from the check's by the pad positions'
share. strict_tolerance (atol / rtol) is no condition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from compiler.core.errors import RecipeError
from compiler.core.tasks import eval_task, task_kind
from compiler.numerics.metrics import TaskLabels, classifier_fidelity, default_metric, embedding_fidelity, task_metric
from compiler.repair.budget import Budget

PRIMARY = "metric"  # the budgeted metric's key in a measurement's values


@dataclass(frozen=True)
class RepairMetric:
    """The budgeted metric: name, its fp32 value on the ranking subset, fn(quantized outputs) -> value, the
    budget (its largest drop and where it came from), and "task" or "fidelity"."""

    name: str
    reference: float
    fn: Callable[[np.ndarray], float]
    budget: Budget

    @property
    def kind(self) -> str:
        return self.budget.kind

    @property
    def max_drop(self) -> float:
        return self.budget.max_drop


@dataclass(frozen=True)
class Condition:
    """A gate threshold a map must also meet: value(name) >= floor. source: the recipe key that set it."""

    name: str
    floor: float
    source: str
    fn: Callable[[list[dict[str, np.ndarray]], np.ndarray], float] | None = None  # (batches, rows) -> value

    def label(self) -> str:
        return f"{self.name} >= {self.floor:.6g} ({self.source})"


def fidelity_metric(model_task: str):
    """(name, fn(reference outputs, quantized outputs) -> value, higher is better, 1.0 = equal)."""
    if task_kind(model_task).labeled:
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
    if labels is not None and eval_task(labels.task).texts_per_example == 2:
        n -= n % 2
    return n


def repair_metric(budget: Budget, gate, model_task: str, labels: TaskLabels | None, reference: np.ndarray,
                  order: np.ndarray | None = None) -> RepairMetric:
    """The metric for a search over outputs of the ranking subset; reference = the fp32 model's outputs on it
    (the first rows, as many as ranking_rows gave). order: the evaluation row of each output row when the
    measurer runs the rows in another order (e.g. sorted by length); None = in order. Fidelity pairs outputs
    row by row and needs no order; the task metric puts the rows back where the gold labels expect them."""
    if budget.kind == "task":
        if order is not None:
            back = np.argsort(np.asarray(order))
            if not np.array_equal(np.asarray(order)[back], np.arange(len(reference))):
                raise ValueError("order must be a permutation of the ranking rows 0..n-1")
            inner = _task_fn(labels, reference[back], budget, gate)
            return RepairMetric(inner.name, inner.reference, lambda q: inner.fn(np.asarray(q)[back]), budget)
        return _task_fn(labels, reference, budget, gate)
    name, fn = fidelity_metric(model_task)
    return RepairMetric(name, 1.0, lambda q: fn(reference, q), budget)


def _task_fn(labels: TaskLabels, reference: np.ndarray, budget: Budget, gate) -> RepairMetric:
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
    return RepairMetric(f"{sub.task} {metric}", float(ref), lambda q: task_metric(sub, q, metric), budget)


def _flat_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Polygraphy's cosine similarity of two arrays (flattened; both zero: 1, one zero: 0)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def output_cosines(reference: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]],
                   names: Sequence[str]) -> dict[str, float]:
    """The check's per-output statistic: mean over batches of the flattened cosine, as "output <name> cosine"."""
    return {f"output {n} cosine": float(np.mean([_flat_cosine(r[n], b[n]) for r, b in zip(reference, batches)]))
            for n in names}


def output_of(condition_name: str) -> str | None:
    """The output a per-output cosine condition is on (None for the other conditions)."""
    if condition_name.startswith("output ") and condition_name.endswith(" cosine"):
        return condition_name.removeprefix("output ").removesuffix(" cosine")
    return None


def gate_conditions(gate, metric: RepairMetric, model_task: str, output_names: Sequence[str], primary_output: str,
                    labels: TaskLabels | None, reference_batches: list[dict[str, np.ndarray]],
                    reference_rows: np.ndarray) -> list[Condition]:
    """Every gate threshold as a Condition on the ranking rows, except one the budget already implies (the same
    metric with a floor no higher than the budget's)."""
    floor = metric.reference - metric.max_drop
    out: list[Condition] = []

    def add(name, value, source, fn):
        if name == metric.name and value <= floor + 1e-12:
            return
        out.append(Condition(name, float(value), source, fn))

    if not task_kind(model_task).labeled:  # an embedder: the check's output and embedding cosines
        for name in output_names:
            def cos(batches, rows, name=name):
                return float(np.mean([_flat_cosine(r[name], b[name]) for r, b in zip(reference_batches, batches)]))
            add(f"output {name} cosine", gate.min_output_cosine, f"recipe.gate.min_output_cosine="
                f"{gate.min_output_cosine:g}", cos)
        add("embedding_cosine_mean", gate.min_embedding_cosine,
            f"recipe.gate.min_embedding_cosine={gate.min_embedding_cosine:g}",
            lambda b, rows: embedding_fidelity(reference_rows, rows)["embedding_cosine_mean"])
        add("top1_agreement", gate.min_top1_agreement, f"recipe.gate.min_top1_agreement={gate.min_top1_agreement:g}",
            lambda b, rows: embedding_fidelity(reference_rows, rows)["top1_agreement"])
    else:
        add("label_agreement", gate.min_top1_agreement, f"recipe.gate.min_top1_agreement={gate.min_top1_agreement:g}",
            lambda b, rows: classifier_fidelity(reference_rows, rows)["label_agreement"])
    if labels is not None and gate.max_task_drop is not None and labels.output == primary_output:
        task = _task_fn(labels, reference_rows, Budget("task", float(gate.max_task_drop), ""), gate)
        add(task.name, task.reference - float(gate.max_task_drop),
            f"recipe.gate.max_task_drop={gate.max_task_drop:g}", lambda b, rows: task.fn(rows))
    return out


def primary_rows(batches: list[dict[str, np.ndarray]], output: str, unsort: np.ndarray | None) -> np.ndarray:
    """One output's rows over the batches, in evaluation order."""
    out = np.concatenate([b[output] for b in batches], axis=0)
    return out if unsort is None else out[unsort]


class Scorer:
    """values(batches) -> {PRIMARY: the budgeted metric, condition name: value, ...} from one forward's outputs
    (per batch, {output name: array}, in the measurer's batch order); unsort puts the primary output's rows back
    in evaluation order. Without conditions only the primary output is needed (outputs)."""

    def __init__(self, metric: RepairMetric, primary_output: str, conditions: Sequence[Condition] = (),
                 unsort: np.ndarray | None = None):
        self.metric, self.primary_output, self.conditions, self.unsort = metric, primary_output, list(conditions), unsort
        names = {primary_output}
        names.update(n for n in (output_of(c.name) for c in self.conditions) if n)
        self.outputs = sorted(names)

    def rows(self, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        return primary_rows(batches, self.primary_output, self.unsort)

    def __call__(self, batches: list[dict[str, np.ndarray]]) -> float | dict[str, float]:
        rows = self.rows(batches)
        value = float(self.metric.fn(rows))
        if not self.conditions:
            return value
        return {PRIMARY: value, **{c.name: float(c.fn(batches, rows)) for c in self.conditions}}
