"""The `qcompile` command: a Hydra app for builds and sweeps, plus a few plain subcommands
(doctor, summarize, verify, rebuild, capabilities)."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from compiler.commands.search import BuildResult, check_objectives, objective_values, read_report
from compiler.commands.sweep import JOBS_DIR, read_sweep_exit_code
from compiler.core.errors import BuildError, GateError, InterruptedBuild, QcompileError, RecipeError
from compiler.core.logs import configure_console, console_for_qcompile_only, log_file, route_library_logs, strip_ansi
from compiler.core.paths import RECIPES_DIR
from compiler.core.status import Status, exit_code
from compiler.rundir import lifecycle
from compiler.stages.report import task_line
from compiler.steps.base import STEP_REGISTRY, load_all_steps

SUBCOMMANDS = ("doctor", "summarize", "verify", "rebuild", "capabilities", "predict")

log = logging.getLogger("qcompile")


def _verbose(cfg=None) -> bool:
    if os.environ.get("QCOMPILE_VERBOSE") or os.environ.get("HYDRA_FULL_ERROR"):
        return True
    try:
        return bool(cfg is not None and cfg.get("verbose", False))
    except Exception:
        return False


def _print_error(err: QcompileError) -> str:
    """Print the error's one line; return it without the prefix (a sweep's job record and summary show it)."""
    line = f"{err.kind}: {err.message}"
    print(f"qcompile: {line}", file=sys.stderr)
    return line


def _outcome(err: Optional[QcompileError] = None, *, code: Optional[int] = None, status: str = Status.PASSED,
             line: Optional[str] = None) -> Dict[str, Any]:
    """A build's outcome, carried by the BuildResult the job returns to Hydra (which hands it to
    compiler.commands.sweep.SweepSummary): a plain dict, so it pickles across launcher processes."""
    if err is not None:
        return {"exit_code": err.exit_code, "status": str(err.status), "error": line}
    return {"exit_code": exit_code(status) if code is None else code, "status": str(status), "error": line}


def _objective_names(cfg) -> Tuple[str, ...]:
    """search.objectives as composed (its checked form comes after validation; a recipe that fails before
    that still returns one NaN per name)."""
    try:
        return tuple(str(n) for n in cfg.search.objectives)
    except Exception:
        # why: core.schema reads every recipe section's YAML defaults when imported (0.4-0.7 s): --help starts without it
        from compiler.core.schema import SearchConfig

        return tuple(SearchConfig().objectives)


def build_job(cfg) -> BuildResult:
    """The Hydra task: one build, returned as its objectives for a sweeper (compiler/commands/search.py:
    measured values for a build that passed or failed its gate, a penalty that every real point dominates
    for one that failed) carrying its outcome (exit code, status, error line) for the sweep summary. In a
    sweep, the job's one console line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    started = time.perf_counter()
    outcome, final = _build(cfg)
    names = _objective_names(cfg)
    report = read_report(final) if outcome["status"] in (Status.PASSED, Status.GATE_FAILED) else None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        choices = hydra_cfg.runtime.choices
        print_job_line(hydra_cfg.job.num, f"{choices.get('model')} / {choices.get('recipe')} / {choices.get('target')}",
                       outcome, report.to_dict() if report is not None else None, final, time.perf_counter() - started)
    return BuildResult(objective_values(report, names), names, outcome)


def _build(cfg) -> Tuple[Dict[str, Any], Optional[Path]]:
    """Validate, build into the staging run dir, finalize it. Returns its outcome (exit code, status,
    error line) and the final run dir (None: none kept); prints errors as one line, tracebacks only with
    verbose=true."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    route_library_logs()  # Hydra has set up logging by now: libraries' logs to the run's log file only
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    verbose = _verbose(cfg)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    configure_console(verbose=verbose, stages=not in_sweep)  # a sweep: one line per job (build_job), not per stage
    try:
        lifecycle.begin(run_dir)
        # why: validate imports onnx, polygraphy and every step: --help and --cfg start without them
        from compiler.stages.validate import validate

        spec = validate(cfg)
        check_objectives(_objective_names(cfg), HydraConfig.get().sweeper.get("direction"))
    except (RecipeError, BuildError) as e:  # BuildError: a target's check_environment (no GPU, no TensorRT)
        lifecycle.discard(run_dir)
        line = _print_error(e)
        if verbose:  # the traceback, but the error's own exit code (Hydra would make it 1)
            traceback.print_exc()
        return _outcome(e, line=line), None
    except KeyboardInterrupt:  # nothing was built yet: leave nothing behind
        lifecycle.discard(run_dir)
        err = InterruptedBuild("interrupted before the build started; nothing was written")
        return _outcome(err, line=_print_error(err)), None
    # why: the pipeline imports torch (+2 s), the cache numpy: --help, --cfg and a recipe error start without them
    from compiler.pipeline import run_build
    from compiler.rundir.cache import open_cache

    try:
        # library output during the build goes to the run's log file (cli.log), the console keeps the stages
        with console_for_qcompile_only(log_file()):
            report = run_build(spec, run_dir, cache=open_cache(spec.cache),
                               overrides=list(HydraConfig.get().overrides.task))
    except GateError as e:
        final = lifecycle.succeed(run_dir, gate_failed=True)
        line = _print_error(e)
        print(f"qcompile: report: {final / 'REPORT.md'}", file=sys.stderr)
        return _outcome(e, line=line), final
    except KeyboardInterrupt:
        final = lifecycle.fail(run_dir, "interrupted (Ctrl-C) during the build", kind=Status.INTERRUPTED)
        err = InterruptedBuild(f"interrupted; partial files kept in {final}")
        return _outcome(err, line=_print_error(err)), final
    except QcompileError as e:
        final = lifecycle.fail(run_dir, e.message, kind=e.kind)
        line = _print_error(e)
        print(f"qcompile: failed build kept in {final}", file=sys.stderr)
        if verbose:  # the traceback, but the error's own exit code (Hydra would make it 1)
            traceback.print_exc()
        return _outcome(e, line=line), final
    except Exception as e:  # a bug or an unexpected library error: still never a finished-looking dir
        text = strip_ansi(str(e))  # library error text may be coloured (QcompileError strips its own)
        final = lifecycle.fail(run_dir, f"{type(e).__name__}: {text}", kind=Status.INTERNAL_ERROR)
        if verbose:  # the traceback, but the error's own exit code (Hydra would make it 1)
            traceback.print_exc()
        line = f"{Status.INTERNAL_ERROR}: {type(e).__name__}: {text.splitlines()[0] if text else ''}"
        print(f"qcompile: {line} (rerun with verbose=true or HYDRA_FULL_ERROR=1 for the traceback; dir: {final})",
              file=sys.stderr)
        return _outcome(status=Status.INTERNAL_ERROR, line=line), final
    final = lifecycle.succeed(run_dir)
    if not in_sweep:  # a sweep's job prints one line instead (build_job)
        print_summary(report, final, skipped=[f"{name} skipped ({name}.enabled=false)" for name in ("check", "bench")
                                              if not getattr(spec, name).enabled])
    return _outcome(), final


def speedup_text(bench: Dict[str, Any], suffix: str = "") -> Optional[str]:
    """The same-run speed ratio to the fp32 engine with its spread (min..max of the per-round ratios of the
    interleaved rounds, compiler/stages/bench/), e.g. "1.42x (rounds 1.38..1.47)"; None without an fp32
    baseline in the run."""
    if "speedup_vs_fp32" not in bench:
        return None
    spread = bench.get("speedup_vs_fp32_spread")
    rounds = f" (rounds {spread[0]:.2f}..{spread[1]:.2f})" if spread and len(spread) == 2 else ""
    return f"{bench['speedup_vs_fp32']:.2f}x{suffix}{rounds}"


def print_summary(report, run_dir: Path, skipped: Sequence[str] = ()) -> None:
    """The build's metrics as a table (the bench's same-run speed ratio to fp32 next to its latency); stages
    the recipe turned off are named instead of shown empty; notes; the repair's budget; the run directory."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, soft_wrap=True)
    b = report["build"]
    title = f"qcompile {b['model']} / {b['recipe']} / {b['target']}: {report.get('status')}"
    table = Table(title=title)
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
        if k == "latency_ms_p50" and speedup_text(bench):
            table.add_row("speedup_vs_fp32 (same run)", speedup_text(bench))  # clock: REPORT.md
    data = bench.get("data_shapes") or {}
    if speedup_text(data):
        table.add_row("speedup_vs_fp32 (evaluation sentences)", speedup_text(data))
    if table.row_count:
        console.print(table)
    else:
        console.print(title, markup=False)
    if skipped:
        console.print("; ".join(skipped), markup=False)
    if chk.get("task"):
        console.print(f"task metric: {task_line(chk['task'])}", markup=False)
    budget_note = (report.get("repair") or {}).get("budget_note")
    if budget_note:
        console.print(f"repair budget: {budget_note}", markup=False)
    for note in report.get("notes") or []:
        console.print(f"note: {note}", style="yellow", markup=False)
    console.print(f"run directory: {run_dir}", markup=False, highlight=False)


def print_job_line(num: int, build: str, outcome: Dict[str, Any], report: Optional[Dict[str, Any]],
                   run_dir: Optional[Path], seconds: float) -> None:
    """A sweep job's one console line: which build, how it ended, its fidelity and same-run speed ratio (or its
    error), where its run directory is."""
    parts = [f"#{num} {build}: {outcome['status']} in {seconds:.1f} s"]
    if outcome.get("error") and outcome["status"] != Status.PASSED:
        parts.append(str(outcome["error"]))
    fidelity = (report or {}).get("check", {}).get("fidelity", {})
    for k in ("embedding_cosine_mean", "label_agreement"):
        if k in fidelity:
            parts.append(f"{k} {fidelity[k]:.5f}")
    bench = (report or {}).get("bench", {})
    if "latency_ms_p50" in bench:
        speed = speedup_text(bench, " fp32")
        parts.append(f"p50 {bench['latency_ms_p50']:.3f} ms" + (f", {speed}" if speed else ""))
    print(" -- ".join(parts) + (f" -> {run_dir}" if run_dir is not None else ""), flush=True)


def _key_fix(full_key: str) -> Tuple[str, str]:
    """(what is wrong, what to write instead) for an unknown dotted key: the closest real key of its section."""
    # why: core.schema reads the recipes' YAML defaults, validate imports onnx and the steps: --help starts without them
    from compiler.core.schema import RECIPE_KEYS, SECTIONS, TOP_LEVEL_KEYS, GateConfig
    from compiler.stages.validate import _closest, top_level_fix

    parts = full_key.split(".")
    unknown = "unknown key"
    if parts[0] not in TOP_LEVEL_KEYS:  # e.g. repair.enabled: did you mean recipe.repair.enabled?
        return unknown, top_level_fix(full_key)
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
            fields = STEP_REGISTRY[parts[2]].Params.__dataclass_fields__
            if len(parts) == 4 and parts[3] not in fields:
                return unknown, _closest(parts[3], fields)
            # a real parameter the recipe file does not set (or a step it does not list): Hydra needs `+`
    return "not in the composed recipe", f"to add it, write +{full_key}=..."


HYDRA_FLAGS_WE_CHECK = ("-m", "--multirun")  # other Hydra flags (--cfg, --help, --info ...) go to Hydra unchecked


def _compose_error(e: Exception, override: str) -> RecipeError:
    """A Hydra composition error as one RecipeError line that names the key and the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException):
        missing = str(getattr(e, "missing_cfg_file", "") or "")
        group, _, name = missing.rpartition("/")
        options = list(getattr(e, "options", None) or [])
        return RecipeError(group or "recipe", f"no {group or 'config'} named {name!r}",
                           f"available: {', '.join(options)}" if options else f"add recipes/{missing}.yaml")
    if isinstance(e, OverrideParseException):
        return RecipeError("", f"cannot parse the override {override!r}: {str(e).splitlines()[0]}",
                           "write key=value, e.g. data.seq_len=64 (lists: key=[a,b]; a sweep: key=a,b with -m)")
    key = str(getattr(e.__cause__, "full_key", "") or "")
    if key and "." not in key:  # Hydra names only the unknown first part: the key as the user wrote it
        key = next((k for k in (a.split("=", 1)[0].lstrip("+~") for a in override.split()) if k.startswith(key + ".")),
                   key)
    if key and "Could not override" in str(e):
        return RecipeError(key, *_key_fix(key))
    return RecipeError("", " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())[:400])


def _job_overrides(overrides: List[str]) -> List[List[str]]:
    """The override lists to compose to check a multirun: each value of each sweep (key=a,b or range)
    once, the other sweeps at their first value (linear in the values, not their product). glob() sweeps
    need Hydra's config loader: left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
            continue
        try:
            values = list(o.sweep_string_iterator())
        except Exception:  # glob(): Hydra expands it against the config tree itself
            values = []
        choices.append([f"{o.get_key_element()}={v}" for v in values])
    firsts = [c[0] if c else None for c in choices]
    jobs = [firsts]
    for i, c in enumerate(choices):
        jobs += [firsts[:i] + [v] + firsts[i + 1:] for v in c[1:]]
    return [[o for o in job if o is not None] for job in jobs]


def _precheck(argv: List[str]) -> Tuple[Optional[RecipeError], List[str], Optional[Path]]:
    """Hydra reports a recipe it cannot compose (recipe=nope, a misspelled key, a bad override) in
    several lines of its own, for single builds and sweeps alike; compose it first with Hydra's compose
    API so each becomes one line that names the key and the fix. Also refuse a run directory that
    cannot be created, before Hydra tries (and prints a traceback). Returns (the error, the arguments
    to run Hydra with, the sweep directory): a multirun gets its sweep directory pinned, so main knows
    where the sweep's exit code will be written."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in HYDRA_FLAGS_WE_CHECK for f in flags):
        return None, argv, None
    multirun = bool(flags)
    overrides = [a for a in argv if not a.startswith("-")]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import OverrideParseException

    try:
        jobs = _job_overrides(overrides) if multirun else [overrides]
    except OverrideParseException as e:
        bad = next((a for a in overrides if "=" not in a or a.count("[") != a.count("]")), " ".join(overrides))
        return _compose_error(e, bad), argv, None
    sweep_dir = None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3", job_name="qcompile"):
            for job in jobs:
                try:
                    cfg = compose("config", overrides=job, return_hydra_config=multirun)
                except OverrideParseException as e:
                    if multirun:  # a value as the sweep iterator spelled it (the sweep itself parsed): Hydra's
                        continue
                    bad = next((a for a in job if "=" not in a or a.count("[") != a.count("]")), " ".join(job))
                    return _compose_error(e, bad), argv, None
                except Exception as e:
                    return _compose_error(e, " ".join(job)), argv, None
                if multirun and sweep_dir is None:
                    sweep_dir = str(cfg.hydra.sweep.dir)
                    try:  # a search's objectives against its sweeper's directions, before any job starts
                        check_objectives(_objective_names(cfg), cfg.hydra.sweeper.get("direction"))
                    except RecipeError as e:
                        return e, argv, None
    finally:
        GlobalHydra.instance().clear()
    if multirun and sweep_dir is None:  # no value could be composed on its own: Hydra reports it
        return None, argv, None
    if multirun:  # the resolved dir replaces any given one: ${now:...} in it resolves once, here
        quoted = sweep_dir.replace("\\", "\\\\").replace("'", "\\'")
        argv = [a for a in argv if not a.lstrip("+").startswith("hydra.sweep.dir=")] + [f"hydra.sweep.dir='{quoted}'"]
        where = Path(sweep_dir).expanduser()
        return _writable(where, "hydra.sweep.dir", explicit=True), argv, where
    explicit = next((a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "+hydra.run.dir="))), None)
    where = Path(explicit).expanduser() if explicit else Path.cwd() / "outputs"
    if explicit and any((where / f).exists() for f in ("report.json", "manifest.json")):
        # refused before Hydra starts: it would already rewrite .hydra/ and cli.log in there
        return RecipeError("hydra.run.dir", f"{where} already holds a finished run",
                           "choose another hydra.run.dir; finished runs are never overwritten"), argv, None
    if explicit and where.is_dir() and any(where.iterdir()):
        # the run dir is renamed X.gate-failed / X.FAILED when the build ends there (compiler/rundir/lifecycle.py),
        # and every file in it is hashed as an artifact: it must hold this build's files only
        return RecipeError("hydra.run.dir", f"{where} exists and is not empty",
                           "name a new or empty directory: a run directory holds one build's files only"), argv, None
    return _writable(where, "hydra.run.dir" if explicit else "outputs", explicit=bool(explicit)), argv, None


def _writable(where: Path, key: str, explicit: bool) -> Optional[RecipeError]:
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        what = "is not a directory" if not probe.is_dir() else "is not writable"
        return RecipeError(key, f"cannot create {where}: {probe} {what}",
                           f"pass {key}=<a writable directory>" if explicit else
                           "run from a writable directory or pass hydra.run.dir=<a writable directory>")
    return None


def _hydra_main(argv: List[str]) -> int:
    """Run Hydra. A single build's exit code is the task's return value, which Hydra's run() drops, so
    the task hands it over through `result`; a sweep's is the one its SweepSummary callback wrote into
    the (pinned) sweep directory, because launchers may run the jobs in other processes."""
    import hydra

    err, argv, sweep_dir = _precheck(argv)
    if err is not None:
        _print_error(err)
        return err.exit_code
    result: Dict[str, Any] = {}

    @hydra.main(config_path=str(RECIPES_DIR), config_name="config", version_base="1.3")
    def _task(cfg):
        ret = build_job(cfg)
        result.update(ret.outcome)
        return ret

    multirun = any(a in HYDRA_FLAGS_WE_CHECK for a in argv)
    sys.argv = [sys.argv[0]] + argv
    try:
        _task()
    except SystemExit as e:  # Hydra's own errors, those the precheck could not see (--cfg with a bad override)
        rc = e.code if isinstance(e.code, int) else 1
        started = result or (multirun and sweep_dir is not None and (sweep_dir / JOBS_DIR).is_dir())
        return 2 if rc == 1 and not started else rc  # 1 before any job: Hydra could not compose the recipe
    if multirun and sweep_dir is not None:
        code = read_sweep_exit_code(sweep_dir)
        return 1 if code is None else code  # no summary.json: the sweep did not end normally
    return int(result.get("exit_code", 0))  # no job ran: --cfg, --help, --info


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        # why: the subcommands load the steps and targets (numpy, polygraphy: +1.6 s measured); --help starts without them
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
