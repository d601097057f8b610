"""Reading a sweep directory: one Row per run directory (report.json read through compiler.core.report_types,
failed and unfinished runs included) plus the jobs that left no directory (their records in .jobs/)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from compiler.commands.sweep.axes import mark_pareto
from compiler.commands.sweep.row import Row
from compiler.core.report_types import RepairSection, Report
from compiler.core.status import FAILED_SUFFIX, GATE_FAILED_SUFFIX, PARTIAL_SUFFIX, Status

JOBS_DIR = ".jobs"  # one record per job, written by the job itself: parallel jobs never share a file


def _num(x) -> Optional[float]:
    if isinstance(x, bool):
        return None
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


def _read_report(run_dir: Path) -> Optional[Report]:
    """The run's report (report.json, or report.json.incomplete of a failed build), typed; missing or mistyped
    values read as None: a summary shows whatever a run left."""
    for name in ("report.json", "report.json.incomplete"):
        data = _read_json(run_dir / name)
        if isinstance(data, dict) and data:
            try:
                return Report.from_dict(data, partial=True)
            except ValueError:  # a schema_version newer than this qcompile
                return None
    return None


def read_run(run_dir: Path, sweep_dir: Optional[Path] = None) -> Row:
    """One row from one run directory, whatever state it ended in."""
    run_dir = Path(run_dir)
    hyd = _hydra_info(run_dir)
    choices = hyd.get("choices", {})
    name = run_dir.name
    report = _read_report(run_dir)
    if name.endswith(FAILED_SUFFIX) or (run_dir / "FAILED.md").exists():
        status, reason = _failed_md(run_dir)
    elif name.endswith(PARTIAL_SUFFIX) or report is None:
        status, reason = Status.INCOMPLETE, "still building, or its process was killed (a .partial directory)"
    else:
        status = report.status or (Status.GATE_FAILED if name.endswith(GATE_FAILED_SUFFIX) else Status.PASSED)
        reason = report.reason or ""
    report = report or Report.from_dict({}, partial=True)
    build = report.build
    bench = report.bench
    check = report.check
    fidelity = check.fidelity if check is not None else None
    task = check.task if check is not None else None
    try:
        rel = str(run_dir.relative_to(sweep_dir)) if sweep_dir else str(run_dir)
    except ValueError:
        rel = str(run_dir)
    return Row(
        num=hyd.get("num"),
        model=str((build and build.model) or choices.get("model") or "?"),
        recipe=str((build and build.recipe) or choices.get("recipe") or "?"),
        target=str((build and build.target) or choices.get("target") or "?"),
        status=str(status), run_dir=rel, overrides=_split_overrides(hyd.get("overrides", [])),
        artifact_mb=_num(bench and bench.artifact_mb), ms_per_sample=_num(bench and bench.ms_per_sample),
        samples_per_s=_num(bench and bench.samples_per_s), speedup_vs_fp32=_num(bench and bench.speedup_vs_fp32),
        peak_rss_mb=_num(bench and bench.peak_rss_mb),
        embedding_cosine=_num(fidelity and fidelity.embedding_cosine_mean),
        top1_agreement=_num(fidelity and fidelity.top1_agreement),
        reason=str(reason), cache=_cache_text(report.cache),
        task_metric=str((task and task.metric) or ""),
        task_drop=_num(getattr((task.metrics or {}).get(task.metric), "drop", None)) if task is not None else None,
        **_repair_row(report.repair),
        fp32_self=bool(bench and bench.is_fp32_self),
    )


def _repair_row(repair: Optional[RepairSection]) -> Dict[str, Any]:
    """repair_budget, repair_metric, and fallback_layers, repair_drop and repair_weight_mb of a repair that met
    its budget: the count it chose and what its search measured at that count (the last probe with it). An unmet
    budget chose nothing: all empty (the row's reason has the best point); a replayed map (rebuild) has its count
    but no search."""
    out = {"repair_budget": _num(repair and repair.budget), "repair_metric": str((repair and repair.metric) or ""),
           "fallback_layers": None, "repair_drop": None, "repair_weight_mb": None}
    if repair is None or repair.met is False or repair.fallback_layers is None:
        return out
    n = int(repair.fallback_layers)
    probes = [p for p in repair.search or [] if p is not None and p.fallback_layers == n]
    wb = _num(probes[-1].weight_bytes) if probes else None
    return {**out, "fallback_layers": n, "repair_drop": _num(probes[-1].drop) if probes else None,
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

