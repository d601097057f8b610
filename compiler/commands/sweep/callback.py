"""The end of a sweep: the Hydra callback that records each job and writes the summary files and exit code,
and `qcompile summarize <sweep dir>`, which rewrites them."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback

from compiler.commands.search import BuildResult
from compiler.commands.sweep.axes import mark_pareto
from compiler.commands.sweep.plot import plot_pareto
from compiler.commands.sweep.row import STATUS_ORDER, Row
from compiler.commands.sweep.runs import JOBS_DIR, _read_json, collect_rows, read_job_records
from compiler.commands.sweep.tables import render_markdown, write_csv
from compiler.core.errors import RecipeError
from compiler.core.status import Status, exit_code

log = logging.getLogger("qcompile")


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
