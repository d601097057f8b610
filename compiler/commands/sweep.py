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
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.experimental.callback import Callback

from compiler.core.status import FAILED_SUFFIX, GATE_FAILED_SUFFIX, PARTIAL_SUFFIX, Status, exit_code

log = logging.getLogger("qcompile")

JOBS_DIR = ".jobs"  # one record per job, written by the job itself: parallel jobs never share a file
# statuses of a row, in the order a summary counts them
STATUS_ORDER = (Status.PASSED, Status.GATE_FAILED, Status.BUILD_FAILED, Status.INTERNAL_ERROR, Status.INTERRUPTED,
                Status.RECIPE_ERROR, Status.NOT_RUNNABLE, Status.INCOMPLETE)

CSV_COLUMNS = ("num", "model", "recipe", "target", "overrides", "artifact_mb", "ms_per_sample", "samples_per_s",
               "speedup_vs_fp32", "peak_rss_mb", "embedding_cosine", "top1_agreement", "status", "pareto", "cache",
               "reason", "run_dir")


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
    )


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
    for rec in read_job_records(sweep_dir):
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


# ---------------------------------------------------------------- the Pareto front

def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats: lower latency (x) and higher fidelity (y), where a
    point is beaten when another is at least as good in both and strictly better in one."""
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any((xj <= xi and yj >= yi) and (xj < xi or yj > yi) for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _measured(rows: Sequence[Row]) -> List[Row]:
    return [r for r in rows if r.ms_per_sample is not None and r.embedding_cosine is not None
            and r.status in (Status.PASSED, Status.GATE_FAILED)]


FIDELITY_DECIMALS = 6  # cosines equal to 6 decimals tie: fp32 on torch (1.0 exactly) does not "beat"
                       # fp32 on ORT (0.99999999999) on fidelity, so a slower exact copy is not on the front


def mark_pareto(rows: Sequence[Row]) -> None:
    pts = _measured(rows)
    for r in rows:
        r.pareto = False
    for i in pareto_front([(r.ms_per_sample, round(r.embedding_cosine, FIDELITY_DECIMALS)) for r in pts]):
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


def render_markdown(rows: Sequence[Row], sweep_dir: Path) -> str:
    keys = varied_keys(rows)
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(list(STATUS_ORDER) + [r.status for r in rows])}
    lines = [f"# qcompile sweep: {sweep_dir}", "",
             f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", ""]
    if keys:
        lines += ["Varied besides model/recipe/target: " + ", ".join(f"`{k}`" for k in keys) + ".", ""]
    head = ["#", "model", "recipe", "target"] + (["overrides"] if keys else []) + [
        "artifact MB", "ms/sample", "samples/s", "x fp32 (same run)", "peak MB", "emb cosine", "top-1", "Pareto",
        "status", "run dir"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ["" if r.num is None else str(r.num), r.model, r.recipe, r.target] + (
            [_overrides_text(r, keys)] if keys else []) + [
            _f(r.artifact_mb, 2), _f(r.ms_per_sample, 3), _f(r.samples_per_s, 1), _f(r.speedup_vs_fp32, 2),
            _f(r.peak_rss_mb, 0),
            _f(r.embedding_cosine, 6), _f(r.top1_agreement, 3), "*" if r.pareto else "", r.status,
            f"`{r.run_dir}`" if r.run_dir else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    front = [r for r in rows if r.pareto]
    if front:
        lines += ["Pareto front (lower ms/sample, higher embedding cosine to fp32): "
                  + ", ".join(_point_label(r, keys) for r in sorted(front, key=lambda r: r.ms_per_sample)) + ".", "",
                  "![latency vs fidelity](pareto.png)", ""]
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
            w.writerow(["" if d.get(c) is None else d.get(c) for c in CSV_COLUMNS])
    return Path(path)


def plot_pareto(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """Latency (ms/sample) against fidelity (mean embedding cosine to fp32), Pareto front marked.
    The y axis is 1 - cosine on a log scale, labelled in cosine: 0.99, 0.999 and 0.9999 stay apart."""
    import matplotlib

    matplotlib.use("Agg")  # no display: sweeps run headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    keys = varied_keys(rows)
    pts = _measured(rows)
    floor = 1e-7  # fp32 has cosine 1.0 exactly: 1 - cos = 0 has no place on a log axis
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    if not pts:
        ax.text(0.5, 0.5, "no run finished with latency and fidelity numbers", ha="center", va="center",
                transform=ax.transAxes)
    for status, marker, color in ((Status.PASSED, "o", "tab:blue"), (Status.GATE_FAILED, "x", "tab:red")):
        sel = [r for r in pts if r.status == status]
        if sel:
            ax.scatter([r.ms_per_sample for r in sel], [max(1 - r.embedding_cosine, floor) for r in sel],
                       marker=marker, color=color, s=45, label=status, zorder=3)
    front = sorted((r for r in pts if r.pareto), key=lambda r: r.ms_per_sample)
    if front:
        ax.step([r.ms_per_sample for r in front], [max(1 - r.embedding_cosine, floor) for r in front],
                where="post", color="tab:green", lw=1.5, zorder=2, label="Pareto front")
        ax.scatter([r.ms_per_sample for r in front], [max(1 - r.embedding_cosine, floor) for r in front],
                   s=160, facecolors="none", edgecolors="tab:green", lw=1.5, zorder=4)
    label, legend_note = _plot_labeller(rows, keys)
    if pts:
        ax.set_yscale("log")
        ds = [max(1 - r.embedding_cosine, floor) for r in pts]
        ax.set_ylim(max(ds) * 4, min(ds) / 4)  # inverted: up = closer to fp32
        ax.margins(x=0.15)  # room for the labels of the rightmost points
        def as_cosine(y, _pos=None):  # tick at 1 - cos = y, labelled as the cosine with the digits it needs
            return f"{1 - y:.{max(1, math.ceil(round(-math.log10(y), 6)))}f}" if y > 0 else "1"

        ax.yaxis.set_major_formatter(FuncFormatter(as_cosine))
        # minor ticks (2..9 x 10^-k) get labels only when the plot spans less than ~1.5 decades
        few = math.log10(max(ds) * 4) - math.log10(min(ds) / 4) <= 1.6
        if few:
            ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(as_cosine) if few else NullFormatter())
        xs = [r.ms_per_sample for r in pts]
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        else:
            lo, hi = ax.get_xlim()
            ax.set_xlim(max(lo, 0.0), hi)  # the label margin must not invent negative latencies
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("latency, ms per sample (lower is better)")
    ax.set_ylabel("mean embedding cosine to fp32 (higher is better)")
    ax.set_title(title or "qcompile sweep: latency vs fidelity", fontsize=10)
    if legend_note:
        fig.text(0.01, 0.01, legend_note, fontsize=7, color="dimgray")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    if pts:
        _place_labels(fig, ax, [(label(r), (r.ms_per_sample, max(1 - r.embedding_cosine, floor))) for r in pts])
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
    return max((exit_code(r.status) for r in rows), default=0)


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
        if not isinstance(ret, dict):  # the task raised: a bug, not one of qcompile's errors
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
