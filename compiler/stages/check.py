"""Check stage: Polygraphy's Comparator runs the target and the fp32 reference on the evaluation set;
per-output statistics, fidelity metrics (embeddings: cosine and top-1 agreement; classifiers: label agreement,
KL, logit difference) and task metrics against gold labels (fp32 vs target, with the drop's interval) gate it."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np

from compiler.core.errors import RecipeError
from compiler.core.tasks import EVAL_TASKS, eval_task, task_kind
from compiler.numerics.metrics import TaskLabels, compare_task, default_metric, fidelity_metrics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _unlogged_output_stats():
    """Polygraphy 0.53 formats every output's statistics (mean, std, variance, median, quantiles) into a string
    before it hands it to its logger (comparator/util.py log_output_stats), so a hidden log line still costs the
    arithmetic: about 1 s of CPU in a MiniLM check (16 iterations x 2 outputs x target, reference, abs and rel
    diff). The check reads its statistics from the compare results (metric_values), never from that log: while
    the log is hidden, log_output_stats does nothing."""
    from polygraphy.comparator import util as comp_util

    saved = comp_util.log_output_stats
    comp_util.log_output_stats = lambda *args, **kwargs: None
    try:
        yield
    finally:
        comp_util.log_output_stats = saved


def compare_outputs(reference_runner, target_runner, feeds: list[dict[str, np.ndarray]], gate,
                    cosine: bool = True) -> dict[str, Any]:
    """Polygraphy comparison: per output, max/mean abs and rel diff over iterations and (cosine=True) mean
    cosine; classifiers pass cosine=False, the cosine of a 2-value logit vector being no statistic of them."""
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import (
        CosineSimilarityCompareFunc,
        SimpleCompareFunc,
    )

    from polygraphy.logger import G_LOGGER

    # quiet for the comparison only: setting the logger's severity for good hid TensorRT's parser errors from
    # a later build in the same process (a joblib sweep), whose messages are read from Polygraphy's log
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), _unlogged_output_stats():
        results = Comparator.run([reference_runner, target_runner], data_loader=feeds)
        funcs = [SimpleCompareFunc(atol=float(gate.atol), rtol=float(gate.rtol), check_error_stat="median")]
        if cosine:
            funcs.append(CosineSimilarityCompareFunc(cosine_similarity_threshold=float(gate.min_output_cosine)))
        accuracy = Comparator.compare_accuracy(results, compare_func=funcs)
    per_output: dict[str, dict[str, Any]] = {}
    for acc in accuracy:
        for iterations in acc.values():
            for it in iterations:
                for name, res in it.items():
                    stats = per_output.setdefault(name, {"iterations": 0, "tolerance_passed": True})
                    values = res.metric_values()
                    if "cosine_similarity" in values:
                        stats.setdefault("_cos", []).append(float(values["cosine_similarity"]))
                    else:
                        stats["iterations"] += 1
                        stats["tolerance_passed"] = stats["tolerance_passed"] and bool(res)
                        for k in ("max_absdiff", "mean_absdiff", "max_reldiff", "mean_reldiff", "median_absdiff"):
                            v = values.get(k)
                            if v is None:
                                continue
                            agg = max if k.startswith("max") else (lambda a, b: a + b)
                            stats[k] = agg(stats.get(k, 0.0), float(v))
    for stats in per_output.values():
        n = max(stats["iterations"], 1)
        for k in ("mean_absdiff", "mean_reldiff", "median_absdiff"):
            if k in stats:
                stats[k] /= n
        cos = stats.pop("_cos", [])
        if cosine:
            stats["cosine_mean"] = float(np.mean(cos)) if cos else float("nan")
            stats["cosine_min"] = float(np.min(cos)) if cos else float("nan")
    ref_name, tgt_name = reference_runner.name, target_runner.name
    outputs = {
        "reference": {n: np.concatenate([r[n] for r in results[ref_name]], axis=0) for n in reference_runner.output_names},
        "target": {n: np.concatenate([r[n] for r in results[tgt_name]], axis=0) for n in target_runner.output_names},
    }
    return {"per_output": per_output, "outputs": outputs}


def validate_gate(gate, task: str | None, where: str) -> None:
    """Validate-time: the task budget is a non-negative number and its metric fits the evaluation task
    (task None: plain-text evaluation data, which has no task metric). where names the data file."""
    if gate.max_task_drop is not None and not gate.max_task_drop >= 0:  # NaN too
        raise RecipeError("recipe.gate.max_task_drop", f"{gate.max_task_drop} is below 0",
                          "give the largest allowed drop (fp32 minus target) in the metric's units, e.g. 0.005")
    for key in ("max_task_drop", "task_metric"):
        if getattr(gate, key) is not None and task is None:
            raise RecipeError(f"recipe.gate.{key}", f"needs gold labels but {where} is plain text",
                              "give data.evaluation_file with labels (TSV/JSONL columns "
                              f"{' | '.join(','.join(t.columns) for t in EVAL_TASKS.values())}) or leave the key unset")
    metrics = eval_task(task).metrics if task is not None else ()
    if gate.task_metric is not None and gate.task_metric not in metrics:
        raise RecipeError("recipe.gate.task_metric", f"{gate.task_metric!r} does not fit the {task} task of {where}",
                          f"use one of {', '.join(metrics)}")


def task_result(labels: TaskLabels, reference: dict[str, np.ndarray], target: dict[str, np.ndarray], gate
                ) -> dict[str, Any]:
    """Every metric of the task on fp32 and target, the drop and its paired-bootstrap 95% interval."""
    metric = gate.task_metric or default_metric(labels.task)
    return {"task": labels.task, "examples": len(labels), "metric": metric, "max_task_drop": gate.max_task_drop,
            "metrics": compare_task(labels, reference[labels.output], target[labels.output])}


def gate_failures(per_output: dict[str, dict[str, Any]], fidelity: dict[str, float], gate,
                  task: dict[str, Any] | None = None) -> list[str]:
    """Each failure names the output or metric, the statistic, the value and the threshold."""
    fails = []
    for name, s in per_output.items():
        if "cosine_mean" in s and (s["cosine_mean"] < gate.min_output_cosine or not np.isfinite(s["cosine_mean"])):
            fails.append(f"output {name}: cosine {s['cosine_mean']:.5f} < {gate.min_output_cosine} "
                         f"(short by {gate.min_output_cosine - s['cosine_mean']:.5f})")
        if gate.strict_tolerance and not s["tolerance_passed"]:
            fails.append(f"output {name}: median abs diff {s.get('median_absdiff', float('nan')):.4g} / max abs diff "
                         f"{s.get('max_absdiff', float('nan')):.4g} beyond atol={gate.atol} rtol={gate.rtol}")
    if "embedding_cosine_mean" in fidelity:
        cos = fidelity["embedding_cosine_mean"]
        if cos < gate.min_embedding_cosine or not np.isfinite(cos):
            fails.append(f"fidelity: mean embedding cosine {cos:.5f} < {gate.min_embedding_cosine} "
                         f"(short by {gate.min_embedding_cosine - cos:.5f})")
        if fidelity["top1_agreement"] < gate.min_top1_agreement:
            fails.append(f"fidelity: retrieval top-1 agreement {fidelity['top1_agreement']:.4f} < "
                         f"{gate.min_top1_agreement} (short by {gate.min_top1_agreement - fidelity['top1_agreement']:.4f})")
    if "label_agreement" in fidelity and not fidelity["label_agreement"] >= gate.min_top1_agreement:
        fails.append(f"fidelity: label agreement {fidelity['label_agreement']:.4f} < {gate.min_top1_agreement} "
                     f"(short by {gate.min_top1_agreement - fidelity['label_agreement']:.4f})")
    if task is not None and gate.max_task_drop is not None:
        m = task["metric"]
        r = task["metrics"][m]
        lo, hi = r["drop_ci95"]
        if not r["drop"] <= gate.max_task_drop:
            fails.append(f"task: {task['task']} {m} dropped {r['drop']:.4f} (fp32 {r['fp32']:.4f} -> target "
                         f"{r['target']:.4f}, 95% interval of the drop [{lo:.4f}, {hi:.4f}]) > max_task_drop "
                         f"{gate.max_task_drop}")
    return fails


def run_check(reference_runner, target_runner, feeds: list[dict[str, np.ndarray]], model_task: str, gate,
              labels: TaskLabels | None = None) -> dict[str, Any]:
    """model_task is model.task (compiler/core/tasks.py); labels the evaluation rows' gold labels."""
    kind = task_kind(model_task)
    cmp = compare_outputs(reference_runner, target_runner, feeds, gate, cosine=kind.output_cosine)
    ref, tgt = cmp["outputs"]["reference"], cmp["outputs"]["target"]
    fidelity = fidelity_metrics(model_task, ref, tgt)
    task = task_result(labels, ref, tgt, gate) if labels is not None else None
    fails = gate_failures(cmp["per_output"], fidelity, gate, task)
    out = {"per_output": cmp["per_output"], "fidelity": fidelity, "gate_failures": fails, "passed": not fails,
           "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds))}
    if task is not None:
        out["task"] = task
    return out
