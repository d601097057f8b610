"""The `qcompile` command: a Hydra app for builds and sweeps, plus a few plain subcommands
(doctor, summarize, verify, rebuild, capabilities)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Tuple

from compiler.core.paths import RECIPES_DIR
from compiler.core.errors import BuildError, GateError, InterruptedBuild, QcompileError, RecipeError
from compiler.core.logs import console_for_qcompile_only, log_file, route_library_logs, strip_ansi

SUBCOMMANDS = ("doctor", "summarize", "verify", "rebuild", "capabilities")

log = logging.getLogger("qcompile")
_state = {"job_started": False, "failures": [], "last_error": None}


def _verbose(cfg=None) -> bool:
    if os.environ.get("QCOMPILE_VERBOSE") or os.environ.get("HYDRA_FULL_ERROR"):
        return True
    try:
        return bool(cfg is not None and cfg.get("verbose", False))
    except Exception:
        return False


def _print_error(err: QcompileError) -> None:
    _state["last_error"] = f"{err.kind}: {err.message}"  # a sweep's job record and summary show it
    print(f"qcompile: {err.kind}: {err.message}", file=sys.stderr)


def _last_error():
    # a module-level function: launchers pickle the task closure by value, this one by reference
    return _state["last_error"]


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def build_job(cfg) -> int:
    """The Hydra task: validate, build into the staging run dir, finalize it. Returns the exit code."""
    from hydra.core.hydra_config import HydraConfig

    from compiler.stages import rundir

    _state["job_started"] = True
    _state["last_error"] = None
    route_library_logs()  # Hydra has set up logging by now: libraries' logs to the run's log file only
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    verbose = _verbose(cfg)
    try:
        rundir.begin(run_dir)
        from compiler.stages.validate import validate

        spec = validate(cfg)
    except (RecipeError, BuildError) as e:  # BuildError: a target's check_environment (no GPU, no TensorRT)
        rundir.discard(run_dir)
        _print_error(e)
        if verbose:  # the traceback, but the error's own exit code (Hydra would make it 1)
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:  # nothing was built yet: leave nothing behind
        rundir.discard(run_dir)
        err = InterruptedBuild("interrupted before the build started; nothing was written")
        _print_error(err)
        return err.exit_code
    from compiler.stages.cache import open_cache
    from compiler.pipeline import run_build

    try:
        # library output during the build goes to the run's log file (cli.log), the console keeps the stages
        with console_for_qcompile_only(log_file()):
            report = run_build(spec, run_dir, cache=open_cache(spec.cache),
                               overrides=list(HydraConfig.get().overrides.task))
    except GateError as e:
        final = rundir.succeed(run_dir, gate_failed=True)
        _print_error(e)
        print(f"qcompile: report: {final / 'REPORT.md'}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        final = rundir.fail(run_dir, "interrupted (Ctrl-C) during the build", kind="interrupted")
        err = InterruptedBuild(f"interrupted; partial files kept in {final}")
        _print_error(err)
        return err.exit_code
    except QcompileError as e:
        final = rundir.fail(run_dir, e.message, kind=e.kind)
        _print_error(e)
        print(f"qcompile: failed build kept in {final}", file=sys.stderr)
        if verbose:  # the traceback, but the error's own exit code (Hydra would make it 1)
            traceback.print_exc()
        return e.exit_code
    except Exception as e:  # a bug or an unexpected library error: still never a finished-looking dir
        text = strip_ansi(str(e))  # library error text may be coloured (QcompileError strips its own)
        final = rundir.fail(run_dir, f"{type(e).__name__}: {text}", kind="internal error")
        if verbose:  # the traceback, but the error's own exit code (Hydra would make it 1)
            traceback.print_exc()
        print(f"qcompile: internal error: {type(e).__name__}: {text.splitlines()[0] if text else ''} "
              f"(rerun with verbose=true or HYDRA_FULL_ERROR=1 for the traceback; dir: {final})", file=sys.stderr)
        return 1
    final = rundir.succeed(run_dir)
    print_summary(report, final)
    return 0


def print_summary(report, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    b = report["build"]
    table = Table(title=f"qcompile {b['model']} / {b['recipe']} / {b['target']}: {report.get('status')}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    chk = report.get("check", {})
    for k, v in chk.get("fidelity", {}).items():
        table.add_row(k, f"{v:.5f}")
    for name, s in chk.get("per_output", {}).items():
        if "cosine_mean" in s:
            table.add_row(f"{name} cosine (mean)", f"{s['cosine_mean']:.6f}")
        table.add_row(f"{name} max abs diff", f"{s.get('max_absdiff', float('nan')):.4g}")
    bench = report.get("bench", {})
    for k in ("latency_ms_p50", "latency_ms_p90", "samples_per_s", "peak_rss_mb", "artifact_mb"):
        if k in bench:
            table.add_row(k, f"{bench[k]:.3f}")
    console.print(table)
    if chk.get("task"):
        from compiler.stages.report import task_line

        console.print(f"task metric: {task_line(chk['task'])}", markup=False, soft_wrap=True)
    for note in report.get("notes") or []:
        console.print(f"note: {note}", style="yellow", markup=False)
    console.print(f"run directory: {run_dir}")


def _key_fix(full_key: str) -> Tuple[str, str]:
    """(what is wrong, what to write instead) for an unknown dotted key: the closest real key of its section."""
    from compiler.core.schema import RECIPE_KEYS, SECTIONS, TOP_LEVEL_KEYS, GateConfig
    from compiler.stages.validate import _closest
    from compiler.steps.base import STEP_REGISTRY, load_all_steps

    parts = full_key.split(".")
    unknown = "unknown key"
    if len(parts) == 1:
        return unknown, _closest(parts[0], TOP_LEVEL_KEYS)
    if parts[0] in SECTIONS and len(parts) == 2:
        return unknown, _closest(parts[1], SECTIONS[parts[0]].__dataclass_fields__)
    if parts[0] == "recipe":
        if len(parts) == 2:
            return unknown, _closest(parts[1], RECIPE_KEYS)
        if parts[1] == "gate" and len(parts) == 3:
            return unknown, _closest(parts[2], GateConfig.__dataclass_fields__)
        if parts[1] == "steps" and len(parts) >= 3:
            load_all_steps()
            if parts[2] not in STEP_REGISTRY:
                return "unknown step", _closest(parts[2], STEP_REGISTRY)
            if len(parts) == 4:
                return unknown, _closest(parts[3], STEP_REGISTRY[parts[2]].Params.__dataclass_fields__)
    return "not in the composed recipe", f"to add it, write +{full_key}=..."


def _precheck(argv: List[str]) -> Optional[RecipeError]:
    """Hydra reports a recipe it cannot compose (recipe=nope, a misspelled key, a bad override) in
    several lines of its own; compose it first with Hydra's compose API so each becomes one line that
    names the key and the fix. Also refuse a run directory that cannot be created, before Hydra
    tries (and prints a traceback). Hydra flags (-m, --cfg ...) are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException, OverrideParseException

    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3", job_name="qcompile"):
            compose("config", overrides=list(argv))
    except MissingConfigException as e:
        missing = str(getattr(e, "missing_cfg_file", "") or "")
        group, _, name = missing.rpartition("/")
        options = list(getattr(e, "options", None) or [])
        return RecipeError(group or "recipe", f"no {group or 'config'} named {name!r}",
                           f"available: {', '.join(options)}" if options else f"add recipes/{missing}.yaml")
    except OverrideParseException as e:
        bad = next((a for a in argv if "=" not in a or a.count("[") != a.count("]")), " ".join(argv))
        return RecipeError("", f"cannot parse the override {bad!r}: {str(e).splitlines()[0]}",
                           "write key=value, e.g. data.seq_len=64 (lists: key=[a,b])")
    except Exception as e:
        cause = e.__cause__
        key = str(getattr(cause, "full_key", "") or "")
        if key and "Could not override" in str(e):
            return RecipeError(key, *_key_fix(key))
        return RecipeError("", " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())[:400])
    explicit = next((a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "+hydra.run.dir="))), None)
    where = Path(explicit).expanduser() if explicit else Path.cwd() / "outputs"
    if explicit and any((where / f).exists() for f in ("report.json", "manifest.json")):
        # refused before Hydra starts: it would already rewrite .hydra/ and cli.log in there
        return RecipeError("hydra.run.dir", f"{where} already holds a finished run",
                           "choose another hydra.run.dir; finished runs are never overwritten")
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        what = "is not a directory" if not probe.is_dir() else "is not writable"
        return RecipeError("hydra.run.dir" if explicit else "outputs", f"cannot create {where}: {probe} {what}",
                           "pass hydra.run.dir=<a writable directory>" if explicit else
                           "run from a writable directory or pass hydra.run.dir=<a writable directory>")
    return None


def _hydra_main(argv: List[str]) -> int:
    import hydra

    code = {"value": 0}

    @hydra.main(config_path=str(RECIPES_DIR), config_name="config", version_base="1.3")
    def _task(cfg):
        rc = build_job(cfg)
        if rc:
            _state["failures"].append(rc)
        if not _is_multirun():
            code["value"] = rc
        # the job's outcome travels back from launcher processes (joblib, SLURM) in the JobReturn;
        # compiler.commands.sweep.SweepSummary records it per job
        return {"exit_code": rc, "error": _last_error()}

    err = _precheck(argv)
    if err is not None:
        _print_error(err)
        return err.exit_code
    sys.argv = [sys.argv[0]] + argv
    try:
        _task()
    except SystemExit as e:
        # Hydra exits 1 when the config cannot even be composed (recipe=nope, a bad override):
        # that is a recipe error, so exit 2
        rc = e.code if isinstance(e.code, int) else 1
        if rc == 1 and not _state["job_started"]:
            return 2
        return rc
    from compiler.commands.sweep import SweepSummary

    if SweepSummary.last is not None and SweepSummary.last.get("exit_code") is not None:
        # a multirun: its jobs may have run in other processes, so the per-job records decide
        return int(SweepSummary.last["exit_code"])
    if _state["failures"] and code["value"] == 0:
        return max(_state["failures"])
    return code["value"]


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        from compiler.commands import subcommands as commands

        try:
            rc = getattr(commands, argv[0])(argv[1:])
        except QcompileError as e:
            _print_error(e)
            rc = e.exit_code
        sys.exit(rc)
    try:
        sys.exit(_hydra_main(argv))
    except KeyboardInterrupt:  # Ctrl-C outside a build job (Hydra starting up, a sweep between jobs)
        _print_error(InterruptedBuild("interrupted"))
        sys.exit(InterruptedBuild.exit_code)


if __name__ == "__main__":
    main()
