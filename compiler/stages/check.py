"""Check stage: Polygraphy's Comparator runs the target and the fp32 reference on the evaluation set;
per-output statistics plus task metrics (embedding cosine, top-1 agreement) gate the build."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import numpy as np

log = logging.getLogger(__name__)


def _quiet_polygraphy():
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL


def compare_outputs(reference_runner, target_runner, feeds: List[Dict[str, np.ndarray]], gate) -> Dict[str, Any]:
    """Polygraphy comparison: per output, max/mean abs and rel diff over iterations and mean cosine."""
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc

    _quiet_polygraphy()
    results = Comparator.run([reference_runner, target_runner], data_loader=feeds)
    funcs = [
        SimpleCompareFunc(atol=float(gate.atol), rtol=float(gate.rtol), check_error_stat="median"),
        CosineSimilarityCompareFunc(cosine_similarity_threshold=float(gate.min_output_cosine)),
    ]
    accuracy = Comparator.compare_accuracy(results, compare_func=funcs)
    per_output: Dict[str, Dict[str, Any]] = {}
    for acc in accuracy:
        for _pair, iterations in acc.items():
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
    for name, stats in per_output.items():
        n = max(stats["iterations"], 1)
        for k in ("mean_absdiff", "mean_reldiff", "median_absdiff"):
            if k in stats:
                stats[k] /= n
        cos = stats.pop("_cos", [])
        stats["cosine_mean"] = float(np.mean(cos)) if cos else float("nan")
        stats["cosine_min"] = float(np.min(cos)) if cos else float("nan")
    ref_name, tgt_name = reference_runner.name, target_runner.name
    outputs = {
        "reference": {n: np.concatenate([r[n] for r in results[ref_name]], axis=0) for n in reference_runner.output_names},
        "target": {n: np.concatenate([r[n] for r in results[tgt_name]], axis=0) for n in target_runner.output_names},
    }
    return {"per_output": per_output, "outputs": outputs}


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def embedding_metrics(ref: np.ndarray, tgt: np.ndarray) -> Dict[str, float]:
    """Mean cosine of target vs reference embeddings; retrieval top-1 agreement (each sentence's nearest
    other sentence is the same under both)."""
    r, t = _normalize(ref), _normalize(tgt)
    cos = np.sum(r * t, axis=-1)
    def top1(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argmax(s, axis=1)
    agree = float(np.mean(top1(r) == top1(t))) if len(r) > 1 else 1.0
    return {"embedding_cosine_mean": float(np.mean(cos)), "embedding_cosine_min": float(np.min(cos)),
            "top1_agreement": agree}


def classification_metrics(ref: np.ndarray, tgt: np.ndarray) -> Dict[str, float]:
    r, t = ref.astype(np.float64), tgt.astype(np.float64)
    cos = np.sum(_normalize(r) * _normalize(t), axis=-1)
    return {"embedding_cosine_mean": float(np.mean(cos)), "embedding_cosine_min": float(np.min(cos)),
            "top1_agreement": float(np.mean(np.argmax(r, -1) == np.argmax(t, -1)))}


def gate_failures(per_output: Dict[str, Dict[str, Any]], task: Dict[str, float], gate) -> List[str]:
    """Each failure names the output or metric, the statistic, the value and the threshold."""
    fails = []
    for name, s in per_output.items():
        if s["cosine_mean"] < gate.min_output_cosine or not np.isfinite(s["cosine_mean"]):
            fails.append(f"output {name}: cosine {s['cosine_mean']:.5f} < {gate.min_output_cosine} "
                         f"(short by {gate.min_output_cosine - s['cosine_mean']:.5f})")
        if gate.strict_tolerance and not s["tolerance_passed"]:
            fails.append(f"output {name}: median abs diff {s.get('median_absdiff', float('nan')):.4g} / max abs diff "
                         f"{s.get('max_absdiff', float('nan')):.4g} beyond atol={gate.atol} rtol={gate.rtol}")
    if task["embedding_cosine_mean"] < gate.min_embedding_cosine or not np.isfinite(task["embedding_cosine_mean"]):
        fails.append(f"task: mean embedding cosine {task['embedding_cosine_mean']:.5f} < {gate.min_embedding_cosine} "
                     f"(short by {gate.min_embedding_cosine - task['embedding_cosine_mean']:.5f})")
    if task["top1_agreement"] < gate.min_top1_agreement:
        fails.append(f"task: top-1 agreement {task['top1_agreement']:.4f} < {gate.min_top1_agreement} "
                     f"(short by {gate.min_top1_agreement - task['top1_agreement']:.4f})")
    return fails


def run_check(reference_runner, target_runner, feeds: List[Dict[str, np.ndarray]], task_kind: str, gate
              ) -> Dict[str, Any]:
    cmp = compare_outputs(reference_runner, target_runner, feeds, gate)
    key = "logits" if task_kind == "classification" else "sentence_embedding"
    metrics_fn = classification_metrics if task_kind == "classification" else embedding_metrics
    task = metrics_fn(cmp["outputs"]["reference"][key], cmp["outputs"]["target"][key])
    fails = gate_failures(cmp["per_output"], task, gate)
    return {"per_output": cmp["per_output"], "task": task, "gate_failures": fails, "passed": not fails,
            "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds))}
