"""Sweep summaries: one row per run of a multirun (read from each run directory's report.json, failed
and impossible runs included) written as summary.md, summary.csv and pareto.png in the sweep directory,
by a Hydra callback at the end of `qcompile -m ...` or by `qcompile summarize <sweep dir>`."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hydra.experimental.callback import Callback

from compiler.commands.search import BuildResult, is_fp32_self
from compiler.core.status import FAILED_SUFFIX, GATE_FAILED_SUFFIX, PARTIAL_SUFFIX, Status, exit_code

log = logging.getLogger("qcompile")

JOBS_DIR = ".jobs"  # one record per job, written by the job itself: parallel jobs never share a file
# statuses of a row, in the order a summary counts them
STATUS_ORDER = (Status.PASSED, Status.GATE_FAILED, Status.BUILD_FAILED, Status.INTERNAL_ERROR, Status.INTERRUPTED,
                Status.RECIPE_ERROR, Status.NOT_RUNNABLE, Status.INCOMPLETE)

CSV_COLUMNS = ("num", "model", "recipe", "target", "overrides", "artifact_mb", "ms_per_sample", "samples_per_s",
               "speedup_vs_fp32", "peak_rss_mb", "embedding_cosine", "top1_agreement", "task_metric", "task_drop",
               "repair_budget", "fallback_layers", "repair_metric", "repair_drop", "repair_weight_mb",
               "objectives", "status", "pareto", "cache", "reason", "run_dir")


@dataclass
class Row:
    """One run of a sweep."""

    num: Optional[int]
    model: str
    recipe: str
    target: str
    status: str
    run_dir: str = ""  # relative to the sweep directory ("" for recipe errors: no directory is kept)
    overrides: Dict[str, str] = field(default_factory=dict)  # the job's command-line overrides
    artifact_mb: Optional[float] = None
    ms_per_sample: Optional[float] = None
    samples_per_s: Optional[float] = None
    # the build's speed over its fp32 engine timed in the same run (compiler/stages/bench.py): unlike
    # ms_per_sample it compares across sweep points run while the machine's load changed
    speedup_vs_fp32: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    embedding_cosine: Optional[float] = None
    top1_agreement: Optional[float] = None
    # the gated (or default) task metric against gold labels: its name and drop, fp32 minus target
    task_metric: str = ""
    task_drop: Optional[float] = None
    # a build that ran the repair search (compiler/repair/): its budget, and where it met it, how many
    # layers fell back and the drop of the budgeted metric it measured with them
    repair_budget: Optional[float] = None
    fallback_layers: Optional[int] = None
    repair_metric: str = ""
    repair_drop: Optional[float] = None
    # the quantized layers' weights at their formats (the repair's count: 4-bit + scales, fp8, fp32), MB: unlike
    # artifact_mb it shrinks on target=torch too, whose engine.pt keeps fake-quant weights in fp32
    repair_weight_mb: Optional[float] = None
    fp32_self: bool = False  # an fp32 build, its own baseline: speed ratio 1 by definition
    # what the job returned to the sweeper (compiler/commands/search.py), None where the build measured none
    objectives: Dict[str, Optional[float]] = field(default_factory=dict)
    reason: str = ""
    cache: str = ""
    pareto: bool = False

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.target}"


# ---------------------------------------------------------------- reading a sweep directory

def _num(x) -> Optional[float]:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _hydra_info(run_dir: Path) -> Dict[str, Any]:
    """job number, runtime choices and task overrides from the run's .hydra/ files (when Hydra ran it)."""
    from omegaconf import OmegaConf

    out: Dict[str, Any] = {}
    hy = run_dir / ".hydra" / "hydra.yaml"
    if hy.is_file():
        try:
            h = OmegaConf.load(hy).hydra
            num = OmegaConf.select(h, "job.num", default=None)
            out["num"] = int(num) if num is not None else None
            out["choices"] = OmegaConf.to_container(h.runtime.choices) if "runtime" in h else {}
        except Exception:
            pass
    ov = run_dir / ".hydra" / "overrides.yaml"
    if ov.is_file():
        try:
            out["overrides"] = [str(o) for o in OmegaConf.load(ov)]
        except Exception:
            pass
    return out


def _split_overrides(overrides: Sequence[str]) -> Dict[str, str]:
    out = {}
    for o in overrides:
        key, _, value = str(o).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _cache_text(cache: Any) -> str:
    if not isinstance(cache, dict) or not cache.get("enabled", False):
        return ""
    return ", ".join(f"{k} {v}" for k, v in cache.items() if k not in ("enabled", "dir", "entries"))


def _failed_md(run_dir: Path) -> Tuple[str, str]:
    """(kind, reason) from FAILED.md: '# qcompile: <kind>' then the reason."""
    try:
        lines = [ln for ln in (run_dir / "FAILED.md").read_text().splitlines() if ln.strip()]
    except OSError:
        return Status.BUILD_FAILED, "no FAILED.md"
    kind = lines[0].split(":", 1)[1].strip() if lines and ":" in lines[0] else Status.BUILD_FAILED
    reason = lines[1] if len(lines) > 1 else ""
    return kind, reason


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in
                                 ("recipe.yaml", "report.json", "FAILED.md", ".hydra", "report.json.incomplete"))


def read_run(run_dir: Path, sweep_dir: Optional[Path] = None) -> Row:
    """One row from one run directory, whatever state it ended in."""
    run_dir = Path(run_dir)
    hyd = _hydra_info(run_dir)
    choices = hyd.get("choices", {})
    name = run_dir.name
    report = _read_json(run_dir / "report.json")
    if report is None:
        report = _read_json(run_dir / "report.json.incomplete") or {}
    build = report.get("build", {})
    if name.endswith(FAILED_SUFFIX) or (run_dir / "FAILED.md").exists():
        status, reason = _failed_md(run_dir)
    elif name.endswith(PARTIAL_SUFFIX) or not report:
        status, reason = Status.INCOMPLETE, "still building, or its process was killed (a .partial directory)"
    else:
        status = report.get("status") or (Status.GATE_FAILED if name.endswith(GATE_FAILED_SUFFIX) else Status.PASSED)
        reason = report.get("reason", "") or ""
    bench, task = report.get("bench", {}) or {}, (report.get("check", {}) or {}).get("fidelity", {}) or {}
    labels = (report.get("check", {}) or {}).get("task") or {}
    metric = str(labels.get("metric") or "")
    repair = report.get("repair") or {}
    try:
        rel = str(run_dir.relative_to(sweep_dir)) if sweep_dir else str(run_dir)
    except ValueError:
        rel = str(run_dir)
    return Row(
        num=hyd.get("num"),
        model=str(build.get("model") or choices.get("model") or "?"),
        recipe=str(build.get("recipe") or choices.get("recipe") or "?"),
        target=str(build.get("target") or choices.get("target") or "?"),
        status=str(status), run_dir=rel, overrides=_split_overrides(hyd.get("overrides", [])),
        artifact_mb=_num(bench.get("artifact_mb")), ms_per_sample=_num(bench.get("ms_per_sample")),
        samples_per_s=_num(bench.get("samples_per_s")), speedup_vs_fp32=_num(bench.get("speedup_vs_fp32")),
        peak_rss_mb=_num(bench.get("peak_rss_mb")),
        embedding_cosine=_num(task.get("embedding_cosine_mean")), top1_agreement=_num(task.get("top1_agreement")),
        reason=str(reason), cache=_cache_text(report.get("cache")),
        task_metric=metric, task_drop=_num(((labels.get("metrics") or {}).get(metric) or {}).get("drop")),
        repair_budget=_num(repair.get("max_task_drop", repair.get("max_fidelity_drop"))), repair_metric=str(repair.get("metric") or ""),
        **_repair_point(repair),
        fp32_self=is_fp32_self(bench),
    )


def _repair_point(repair: Dict[str, Any]) -> Dict[str, Any]:
    """fallback_layers, repair_drop and repair_weight_mb of a repair that met its budget: the count it chose and
    what its search measured at that count (the last probe with it). An unmet budget chose nothing: all empty
    (the row's reason has the best point); a replayed map (rebuild) has its count but no search."""
    if not repair or repair.get("met") is False or "fallback_layers" not in repair:
        return {"fallback_layers": None, "repair_drop": None, "repair_weight_mb": None}
    n = int(repair["fallback_layers"])
    probes = [p for p in repair.get("search") or [] if p.get("fallback_layers") == n]
    wb = _num(probes[-1].get("weight_bytes")) if probes else None
    return {"fallback_layers": n, "repair_drop": _num(probes[-1].get("drop")) if probes else None,
            "repair_weight_mb": None if wb is None else wb / 1e6}


def read_job_records(sweep_dir: Path) -> List[Dict[str, Any]]:
    recs = []
    for f in sorted((Path(sweep_dir) / JOBS_DIR).glob("*.json")):
        rec = _read_json(f)
        if rec is not None:
            recs.append(rec)
    return recs


def collect_rows(sweep_dir: Path) -> List[Row]:
    """Every run of a sweep: its run directories (finished, gate-failed, failed, still .partial) plus the
    jobs that left none (recipe errors discard their staging dir), from the job records."""
    sweep_dir = Path(sweep_dir)
    rows = [read_run(d, sweep_dir) for d in sorted(sweep_dir.iterdir()) if is_run_dir(d)]
    seen = {r.num for r in rows if r.num is not None}
    records = read_job_records(sweep_dir)
    by_num = {rec.get("num"): rec for rec in records}
    for r in rows:
        rec = by_num.get(r.num, {})
        if isinstance(rec.get("objectives"), dict):
            order = rec.get("objective_names") or list(rec["objectives"])
            r.objectives = {n: _num(rec["objectives"].get(n)) for n in order}
    for rec in records:
        if rec.get("num") in seen or rec.get("exit_code") not in (2,):
            continue
        reason = str(rec.get("error") or "")
        if reason.startswith(f"{Status.RECIPE_ERROR}: "):  # the status column says that already
            reason = reason[len(Status.RECIPE_ERROR) + 2:]
        rows.append(Row(num=rec.get("num"), model=str(rec.get("model", "?")), recipe=str(rec.get("recipe", "?")),
                        target=str(rec.get("target", "?")), status=rec.get("status", Status.RECIPE_ERROR),
                        overrides=_split_overrides(rec.get("overrides", [])), reason=reason))
    rows.sort(key=lambda r: (r.num if r.num is not None else 1 << 30, r.run_dir))
    mark_pareto(rows)
    return rows


# ---------------------------------------------------------------- axes and the Pareto front

@dataclass(frozen=True)
class Axis:
    """One axis of the summary's front and plot: a Row's number, and which way is better."""

    key: str
    label: str  # the plot's axis label and the front's description
    get: Callable[[Row], Optional[float]]
    higher_is_better: bool

    def cost(self, r: Row) -> float:
        """The value as something to minimize (ties to FIDELITY_DECIMALS, see below)."""
        v = round(self.get(r), FIDELITY_DECIMALS)
        return -v if self.higher_is_better else v


FIDELITY_DECIMALS = 6  # cosines equal to 6 decimals tie: fp32 on torch (1.0 exactly) does not "beat"
                       # fp32 on ORT (0.99999999999) on fidelity, so a slower exact copy is not on the front

SPEEDUP = Axis("speedup_vs_fp32", "speed vs the fp32 engine, same run (x, higher is better)",
               lambda r: r.speedup_vs_fp32 if r.speedup_vs_fp32 is not None else (1.0 if r.fp32_self else None), True)
LATENCY = Axis("ms_per_sample", "latency, ms per sample (lower is better)", lambda r: r.ms_per_sample, False)
SIZE = Axis("artifact_mb", "artifact size, MB (lower is better)", lambda r: r.artifact_mb, False)
COSINE = Axis("embedding_cosine", "mean embedding cosine to fp32 (higher is better)", lambda r: r.embedding_cosine,
              True)
DROP = Axis("task_drop", "task metric drop, fp32 minus target (lower is better)", lambda r: r.task_drop, False)
REPAIR_SIZE = Axis("repair_weight_mb", "quantized layers' weights at their formats, MB (lower is better)",
                   lambda r: r.repair_weight_mb, False)
REPAIR_DROP = Axis("repair_drop", "drop of the budgeted metric at the chosen fallbacks (lower is better)",
                   lambda r: r.repair_drop, False)


def pareto_front_min(points: Sequence[Sequence[float]]) -> List[int]:
    """Indices of the points no other point beats, every coordinate minimized: a point is beaten when another
    is at least as good in all and strictly better in one (equal points all stay)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats: lower latency (x) and higher fidelity (y)."""
    return pareto_front_min([(x, -y) for x, y in points])


def is_budget_sweep(rows: Sequence[Row]) -> bool:
    """Runs that searched fallbacks (recipe.repair.enabled) under different budgets: a size-vs-drop curve."""
    return len({r.repair_budget for r in rows if r.repair_budget is not None}) > 1


def _finished(rows: Sequence[Row]) -> List[Row]:
    return [r for r in rows if r.status in (Status.PASSED, Status.GATE_FAILED)]


def choose_axes(rows: Sequence[Row]) -> Tuple[Axis, Axis]:
    """(x, y) of the summary: artifact size against the drop of the budgeted metric for a sweep over the repair
    budget (the repair's own measurement; else the task metric's drop, else the embedding cosine); otherwise the same-run speed ratio to fp32 against
    the embedding cosine, or latency where a finished run lacks the ratio (bench.baseline=none, a GPU target
    on a machine without one): ratios from one run compare across sweep points, latencies only on a quiet machine."""
    done = [r for r in _finished(rows) if r.embedding_cosine is not None]
    if is_budget_sweep(rows):
        met = [r for r in _finished(rows) if r.repair_budget is not None]
        x = REPAIR_SIZE if met and all(REPAIR_SIZE.get(r) is not None for r in met) else SIZE
        for y in (REPAIR_DROP, DROP):
            if met and all(y.get(r) is not None for r in met):
                return x, y
        return x, COSINE
    return (SPEEDUP if done and all(SPEEDUP.get(r) is not None for r in done) else LATENCY), COSINE


def search_objectives(rows: Sequence[Row]) -> List[str]:
    """The objectives a search's jobs returned (compiler/commands/search.py), when they returned any numbers."""
    names = next((list(r.objectives) for r in rows if r.objectives), [])
    return names if any(v is not None for r in rows for v in r.objectives.values()) else []


def _measured(rows: Sequence[Row], axes: Optional[Tuple[Axis, Axis]] = None) -> List[Row]:
    x, y = axes or choose_axes(rows)
    return [r for r in _finished(rows) if x.get(r) is not None and y.get(r) is not None]


def mark_pareto(rows: Sequence[Row]) -> None:
    """A search marks the front over the objectives its jobs returned (all minimized, what Optuna's
    best_trials hold); a grid the front over the summary's two axes."""
    for r in rows:
        r.pareto = False
    names = search_objectives(rows)
    if names:
        pts = [r for r in _finished(rows) if all(r.objectives.get(n) is not None for n in names)]
        vectors = [[round(r.objectives[n], FIDELITY_DECIMALS) for n in names] for r in pts]
    else:
        x, y = choose_axes(rows)
        pts = _measured(rows, (x, y))
        vectors = [(x.cost(r), y.cost(r)) for r in pts]
    for i in pareto_front_min(vectors):
        pts[i].pareto = True


# ---------------------------------------------------------------- writing the summary

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
            _f(r.artifact_mb, 2), _f(r.ms_per_sample, 3), _f(r.samples_per_s, 1), _f(r.speedup_vs_fp32, 2),
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


def plot_pareto(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """The summary's two axes (choose_axes: same-run speed ratio or latency against embedding cosine; size
    against task-metric drop for a repair-budget sweep), Pareto front marked. A cosine axis is 1 - cosine on
    a log scale, labelled in cosine: 0.99, 0.999 and 0.9999 stay apart. A search's front is over all of its
    objectives, so its points are circled without the 2-D staircase."""
    import matplotlib

    matplotlib.use("Agg")  # no display: sweeps run headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    keys = varied_keys(rows)
    xa, ya = choose_axes(rows)
    pts = _measured(rows, (xa, ya))
    floor = 1e-7  # fp32 has cosine 1.0 exactly: 1 - cos = 0 has no place on a log axis
    log_y = ya is COSINE

    def X(r: Row) -> float:
        return xa.get(r)

    def Y(r: Row) -> float:
        return max(1 - ya.get(r), floor) if log_y else ya.get(r)

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    if not pts:
        ax.text(0.5, 0.5, f"no run finished with {xa.key} and {ya.key} numbers", ha="center", va="center",
                transform=ax.transAxes)
    for status, marker, color in ((Status.PASSED, "o", "tab:blue"), (Status.GATE_FAILED, "x", "tab:red")):
        sel = [r for r in pts if r.status == status]
        if sel:
            ax.scatter([X(r) for r in sel], [Y(r) for r in sel], marker=marker, color=color, s=45, label=status,
                       zorder=3)
    names = search_objectives(rows)
    front = sorted((r for r in pts if r.pareto), key=X)
    if front:
        if not names:  # the 2-D front's staircase: each step's corner is the point it is beaten from
            ax.step([X(r) for r in front], [Y(r) for r in front], where="pre" if xa.higher_is_better else "post",
                    color="tab:green", lw=1.5, zorder=2, label="Pareto front")
        ax.scatter([X(r) for r in front], [Y(r) for r in front], s=160, facecolors="none", edgecolors="tab:green",
                   lw=1.5, zorder=4, label=f"Pareto front over {', '.join(names)}" if names else None)
    label, legend_note = _plot_labeller(rows, keys)
    if pts:
        ys = [Y(r) for r in pts]
        if log_y:
            ax.set_yscale("log")
            ax.set_ylim(max(ys) * 4, min(ys) / 4)  # inverted: up = closer to fp32

            def as_cosine(y, _pos=None):  # tick at 1 - cos = y, labelled as the cosine with the digits it needs
                return f"{1 - y:.{max(1, math.ceil(round(-math.log10(y), 6)))}f}" if y > 0 else "1"

            ax.yaxis.set_major_formatter(FuncFormatter(as_cosine))
            # minor ticks (2..9 x 10^-k) get labels only when the plot spans less than ~1.5 decades
            few = math.log10(max(ys) * 4) - math.log10(min(ys) / 4) <= 1.6
            if few:
                ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FuncFormatter(as_cosine) if few else NullFormatter())
        else:
            ax.margins(y=0.15)
        ax.margins(x=0.15)  # room for the labels of the rightmost points
        xs = [X(r) for r in pts]
        if xa is LATENCY and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        else:
            lo, hi = ax.get_xlim()
            ax.set_xlim(max(lo, 0.0), hi)  # the label margin must not invent negative latencies, sizes or ratios
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xa.label)
    ax.set_ylabel(ya.label)
    ax.set_title(title or f"qcompile sweep: {xa.key} vs {ya.key}", fontsize=10)
    if legend_note:
        fig.text(0.01, 0.01, legend_note, fontsize=7, color="dimgray")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    if pts:
        _place_labels(fig, ax, [(label(r), (X(r), Y(r))) for r in pts])
    fig.savefig(path, metadata={"Software": None})  # no matplotlib version stamp: same rows, same bytes
    plt.close(fig)
    return Path(path)


def _place_labels(fig, ax, labelled: Sequence[Tuple[str, Tuple[float, float]]]) -> None:
    """Greedy label placement (matplotlib has no label repulsion): each label takes the first of eight
    spots around its point that covers no placed label, no point and nothing outside the axes, else the
    spot that covers least."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = []
    for _, xy in labelled:
        px, py = ax.transData.transform(xy)
        dots.append(Bbox.from_extents(px - 4, py - 4, px + 4, py + 4))

    def area(b) -> float:
        return 0.0 if b is None else max(b.width, 0) * max(b.height, 0)

    spots = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"), (-6, -4, "right", "top"),
             (0, 9, "center", "bottom"), (0, -9, "center", "top"), (9, 0, "left", "center"), (-9, 0, "right", "center")]
    placed: List[Any] = []
    for text, xy in sorted(labelled, key=lambda t: (t[1][0], t[1][1])):
        best = None
        for dx, dy, ha, va in spots:
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=7)
            ann.set_in_layout(False)  # long labels must not shrink the axes
            box = ann.get_window_extent(renderer)
            cost = (sum(area(Bbox.intersection(box, o)) for o in placed + dots)
                    + area(box) - area(Bbox.intersection(box, frame)))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])


def _plot_labeller(rows: Sequence[Row], keys: Sequence[str]):
    """Point labels: recipe/target (when either varies) and the values of the varied overrides, the
    keys named once in a note under the plot (a calibration sweep: 'entropy, 64')."""
    names = [k.rsplit(".", 1)[-1] for k in keys]
    if len(set(names)) < len(names):
        names = list(keys)
    with_label = len({r.label for r in rows}) > 1 or not keys

    def label(r: Row) -> str:
        parts = ([r.label] if with_label else []) + [r.overrides.get(k, "-") for k in keys]
        if r.fallback_layers is not None:  # a repair search: what the budget cost
            parts.append(f"{r.fallback_layers} fallback")
        if r.artifact_mb is not None and "artifact_mb" in r.objectives:  # a search's third axis, off the plot
            parts.append(f"{r.artifact_mb:.1f} MB")
        return ", ".join(parts)

    note = ("points: " + ", ".join((["recipe/target"] if with_label else []) + names)) if keys else ""
    return label, note


def write_summary(sweep_dir: Path, rows: Optional[List[Row]] = None) -> Dict[str, Path]:
    """summary.md, summary.csv and pareto.png in sweep_dir from its run directories (or the given rows)."""
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir) if rows is None else rows
    mark_pareto(rows)
    md = sweep_dir / "summary.md"
    md.write_text(render_markdown(rows, sweep_dir))
    out = {"summary.md": md, "summary.csv": write_csv(rows, sweep_dir / "summary.csv"),
           "pareto.png": plot_pareto(rows, sweep_dir / "pareto.png", title=f"qcompile sweep {sweep_dir.name}")}
    return out


def sweep_exit_code(rows: Sequence[Row]) -> int:
    """A sweep exits like its worst run (recipe error 2, build failed 1, gate failed 3: the highest code);
    combinations the capability table rules out are holes in the matrix, not failures."""
    return max((_row_exit_code(r) for r in rows), default=0)


def _row_exit_code(r: Row) -> int:
    # a kind of gate failure that core.status has no word for (the repair's "repair budget not met") exits
    # like its directory's suffix says, 3, not as an unknown failure
    if r.run_dir.endswith(GATE_FAILED_SUFFIX) and r.status not in (Status.PASSED,):
        return exit_code(Status.GATE_FAILED)
    return exit_code(r.status)


# ---------------------------------------------------------------- the Hydra callback

SWEEP_OUTCOME = "summary.json"  # the sweep's exit code and counts: what `qcompile -m` exits with


def read_sweep_exit_code(sweep_dir: Path) -> Optional[int]:
    """The exit code the end of a multirun wrote into its sweep directory (None: it wrote none)."""
    rec = _read_json(Path(sweep_dir) / SWEEP_OUTCOME)
    code = rec.get("exit_code") if rec else None
    return int(code) if isinstance(code, int) else None


class SweepSummary(Callback):
    """Registered under hydra.callbacks in recipes/config.yaml. Each job's outcome (what the Hydra task
    returned: exit code, status, error) is written by the job's own process into <sweep>/.jobs/<num>.json
    (launchers may run jobs elsewhere); the end of the multirun writes the summary from the run dirs and
    job records, and the sweep's exit code into <sweep>/summary.json, which compiler.commands.cli reads."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            self._record_job(config, job_return)
        except Exception as e:  # a bookkeeping problem must not fail the job it describes
            log.error("sweep: cannot record job %s: %s: %s", config.hydra.job.get("num"), type(e).__name__, e)

    def _record_job(self, config, job_return) -> None:
        hydra_cfg = config.hydra
        try:
            ret = job_return.return_value if job_return.status.name == "COMPLETED" else None
        except Exception:
            ret = None
        if isinstance(ret, BuildResult):  # the objectives for the sweeper, with the build's outcome
            searched = hydra_cfg.sweeper.get("direction") is not None  # an optimizing sweeper (Optuna) read them
            # the names in the sweeper's order too: the record is written with sorted keys
            ret = {**ret.outcome, **({"objectives": ret.objectives(), "objective_names": list(ret.names)}
                                     if searched else {})}
        elif not isinstance(ret, dict):  # the task raised: a bug, not one of qcompile's errors
            ret = {"exit_code": exit_code(Status.INTERNAL_ERROR), "status": Status.INTERNAL_ERROR}
        choices = dict(hydra_cfg.runtime.choices)
        rec = {"num": int(hydra_cfg.job.num), "model": choices.get("model"), "recipe": choices.get("recipe"),
               "target": choices.get("target"), "overrides": [str(o) for o in hydra_cfg.overrides.task],
               "output_dir": str(hydra_cfg.runtime.output_dir), **ret}
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        jobs = sweep_dir / JOBS_DIR
        jobs.mkdir(parents=True, exist_ok=True)
        tmp = jobs / f".{rec['num']}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(rec, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, jobs / f"{rec['num']}.json")

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        try:
            rows = collect_rows(sweep_dir)
            code = sweep_exit_code(rows)
        except Exception as e:  # the runs still decide the exit code, from their job records alone
            log.error("sweep: cannot read the runs: %s: %s", type(e).__name__, e)
            rows = []
            code = max((int(r.get("exit_code", 1)) for r in read_job_records(sweep_dir)), default=1) or 1
        counts = {str(s): n for s in STATUS_ORDER if (n := sum(r.status == s for r in rows))}
        (sweep_dir / SWEEP_OUTCOME).write_text(
            json.dumps({"exit_code": code, "runs": len(rows), "statuses": counts}, indent=2) + "\n")
        try:
            files = write_summary(sweep_dir, rows)
        except Exception as e:  # a summary problem must not hide the runs themselves
            log.error("sweep summary failed: %s: %s", type(e).__name__, e)
            return
        print(f"qcompile: sweep summary ({len(rows)} runs): {files['summary.md']}  {files['summary.csv']}  "
              f"{files['pareto.png']}")


# ---------------------------------------------------------------- qcompile summarize

def latest_sweep_dir(root: Path = Path("outputs/multirun")) -> Optional[Path]:
    dirs = [p for p in root.glob("*/*") if p.is_dir()] if root.is_dir() else []
    return max(dirs, key=lambda p: p.stat().st_mtime) if dirs else None


def summarize_main(argv: Sequence[str]) -> int:
    import argparse

    from compiler.core.errors import RecipeError

    ap = argparse.ArgumentParser(prog="qcompile summarize",
                                 description="Write summary.md, summary.csv and pareto.png for a sweep directory.")
    ap.add_argument("sweep_dir", nargs="?", help="a multirun directory (default: the newest under outputs/multirun)")
    args = ap.parse_args(list(argv))
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else latest_sweep_dir()
    if sweep_dir is None:
        raise RecipeError("sweep_dir", "no sweep directory given and none under outputs/multirun",
                          "pass one: qcompile summarize outputs/multirun/<date>/<time>")
    if not sweep_dir.is_dir():
        raise RecipeError("sweep_dir", f"{sweep_dir} is not a directory", "pass a multirun directory")
    rows = collect_rows(sweep_dir)
    if not rows:
        raise RecipeError("sweep_dir", f"{sweep_dir} holds no run directories",
                          "pass the directory a `qcompile -m ...` sweep wrote (it holds multirun.yaml)")
    files = write_summary(sweep_dir, rows)
    print((sweep_dir / "summary.md").read_text())
    print("written: " + "  ".join(str(p) for p in files.values()))
    return 0
