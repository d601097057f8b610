"""summary.md and summary.csv of a sweep: one row per run, the varied overrides, the front, why runs did not pass."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence

from compiler.commands.sweep.axes import LATENCY, SPEEDUP, Axis, _finished, choose_axes, ratio_missing, search_objectives
from compiler.commands.sweep.row import STATUS_ORDER, Row
from compiler.core.status import Status

CSV_COLUMNS = ("num", "model", "recipe", "target", "overrides", "artifact_mb", "ms_per_sample", "samples_per_s",
               "speedup_vs_fp32", "peak_rss_mb", "embedding_cosine", "top1_agreement", "task_metric", "task_drop",
               "repair_budget", "fallback_layers", "repair_metric", "repair_drop", "repair_weight_mb",
               "objectives", "status", "pareto", "cache", "reason", "run_dir")


def varied_keys(rows: Sequence[Row]) -> List[str]:
    """Overrides that differ between runs, besides model/recipe/target which have their own columns."""
    keys = sorted({k for r in rows for k in r.overrides})
    return [k for k in keys if k not in ("model", "recipe", "target")
            and len({r.overrides.get(k) for r in rows}) > 1]


def _overrides_text(r: Row, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={r.overrides[k]}" for k in keys if k in r.overrides)


def _f(v: Optional[float], nd: int) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def _g(v: Optional[float]) -> str:  # objectives span 1e-6 (a cosine loss) to 100 (MB): 4 significant digits
    return "" if v is None else f"{v:.4g}"


def render_markdown(rows: Sequence[Row], sweep_dir: Path) -> str:
    keys = varied_keys(rows)
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(list(STATUS_ORDER) + [r.status for r in rows])}
    lines = [f"# qcompile sweep: {sweep_dir}", "",
             f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", ""]
    if keys:
        lines += ["Varied besides model/recipe/target: " + ", ".join(f"`{k}`" for k in keys) + ".", ""]
    metrics = sorted({r.task_metric for r in rows if r.task_drop is not None})
    repaired = any(r.repair_budget is not None for r in rows)
    budgeted = "/".join(sorted({r.repair_metric for r in rows if r.repair_metric}))
    names = search_objectives(rows)
    head = ["#", "model", "recipe", "target"] + (["overrides"] if keys else []) + [
        "artifact MB", "ms/sample", "samples/s", "x fp32 (same run)", "peak MB", "emb cosine", "top-1"] + (
        [f"{'/'.join(metrics)} drop"] if metrics else []) + (
        ["budget", "fallbacks", f"{budgeted} drop (repair)", "weights MB (repair)"] if repaired else []) + names + [
        "Pareto", "status", "run dir"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ["" if r.num is None else str(r.num), r.model, r.recipe, r.target] + (
            [_overrides_text(r, keys)] if keys else []) + [
            _f(r.artifact_mb, 2), _f(r.ms_per_sample, 3), _f(r.samples_per_s, 1), _speed_cell(r),
            _f(r.peak_rss_mb, 0),
            _f(r.embedding_cosine, 6), _f(r.top1_agreement, 3)] + (
            [_f(r.task_drop, 4)] if metrics else []) + (
            [_f(r.repair_budget, 4), "" if r.fallback_layers is None else str(r.fallback_layers), _g(r.repair_drop),
             _f(r.repair_weight_mb, 2)] if repaired else []) + [
            _g(r.objectives.get(n)) for n in names] + [
            "*" if r.pareto else "", r.status, f"`{r.run_dir}`" if r.run_dir else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    front = [r for r in rows if r.pareto]
    if front:
        x, y = choose_axes(rows)
        what = (f"over the search's objectives ({', '.join(names)}; all minimized)" if names else
                f"({_better(x)}, {_better(y)})")
        order = sorted(front, key=lambda r: (x.cost(r) if x.get(r) is not None else math.inf))
        lines += [f"Pareto front {what}: " + ", ".join(_point_label(r, keys) for r in order) + ".", "",
                  f"![{x.key} vs {y.key}](pareto.png)", ""]
    note = speed_note(rows, keys)
    if note:
        lines += [f"**{note}**", ""]
    problems = [r for r in rows if r.status not in (Status.PASSED,) and r.reason]
    if problems:
        lines += ["## Why runs did not pass", ""]
        for r in problems:
            tag = f"{r.num} " if r.num is not None else ""
            lines.append(f"- {tag}{_point_label(r, keys)}: **{r.status}**: {r.reason}")
        lines.append("")
    caches = [r for r in rows if r.cache]
    if caches:
        lines += ["Cache (hit = reused from an earlier run with identical inputs): "
                  + "; ".join(f"{r.num} {r.cache}" for r in caches) + ".", ""]
    return "\n".join(lines)


def _better(axis: Axis) -> str:
    word = {"speedup_vs_fp32": "x fp32 (same run)", "ms_per_sample": "ms/sample", "artifact_mb": "artifact MB",
            "embedding_cosine": "embedding cosine to fp32", "task_drop": "task metric drop",
            "repair_drop": "drop of the budgeted metric", "repair_weight_mb": "quantized weights MB"}[axis.key]
    return f"{'higher' if axis.higher_is_better else 'lower'} {word}"


def _speed_cell(r: Row) -> str:
    # the fp32 build is its own baseline (plotted at 1): say so rather than leave the cell blank
    return "1 (itself)" if r.speedup_vs_fp32 is None and r.fp32_self else _f(r.speedup_vs_fp32, 2)


def speed_note(rows: Sequence[Row], keys: Sequence[str]) -> str:
    """What the speed axis leaves out, in words ("" when nothing): the finished runs without a same-run speed
    ratio to fp32 (off the plot and the front), or that no run has one and latency stands in."""
    axes = choose_axes(rows)
    missing = ratio_missing(rows, axes)
    if axes[0] is SPEEDUP and missing:
        return ("No same-run speed ratio to fp32 (not plotted, not on the front): "
                + ", ".join(_point_label(r, keys) for r in missing)
                + " -- bench.baseline=none, or a GPU target timed on a machine without one")
    if axes[0] is LATENCY and any(r.embedding_cosine is not None for r in _finished(rows)):
        return ("No run has a same-run speed ratio to fp32: the plot shows latency, which does not compare across "
                "runs built in parallel or under changing load (bench.baseline=fp32 gives the ratio)")
    return ""


def _point_label(r: Row, keys: Sequence[str]) -> str:
    extra = _overrides_text(r, keys)
    return r.label + (f" [{extra}]" if extra else "")


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    keys = varied_keys(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            d = asdict(r)
            d["overrides"] = _overrides_text(r, keys)
            d["pareto"] = "yes" if r.pareto else ""
            d["objectives"] = " ".join(f"{k}={'' if v is None else v}" for k, v in r.objectives.items())
            w.writerow(["" if d.get(c) is None else d.get(c) for c in CSV_COLUMNS])
    return Path(path)
