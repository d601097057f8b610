"""Plain subcommands of `qcompile` besides builds: capabilities (more are added by their issues)."""

from __future__ import annotations

from typing import List

from compiler.core.errors import RecipeError
from compiler.core.schema import DoctorConfig
from compiler.stages.report import _clean
from compiler.steps.base import STEP_REGISTRY, load_all_steps
from targets.base import get_target, target_names


def capabilities(argv: List[str]) -> int:
    """Print the step x target capability table."""
    load_all_steps()
    targets = target_names()
    print("| step | " + " | ".join(targets) + " | calibration | what it does |")
    print("|---|" + "---|" * len(targets) + "---|---|")
    for name in sorted(STEP_REGISTRY):
        cls = STEP_REGISTRY[name]
        cells = [cls.runs_on.get(t, "-") for t in targets]
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if cls.needs_calibration else 'no'} | {cls.summary} |")
    return 0


DOCTOR_USAGE = ("usage: qcompile doctor path/to/model.onnx [target=ort|trt (a target that runs ONNX)] "
                "[providers=CUDAExecutionProvider,...] [quantized=true|false] [max_memcpy=N] "
                "[min_quantized_fraction=F] [max_constant_bytes=N] [input_dependence=true|false] [json=out.json]")


def doctor(argv: List[str]) -> int:
    """Run every guard rail on an ONNX file (or a run directory's model.onnx); print the table.
    Exit 0 when no rail failed, 1 when one did, 2 for bad arguments."""
    import json
    import sys
    from pathlib import Path

    from omegaconf import OmegaConf

    # why: each command loads its own implementation; other commands start without it
    from compiler.rails.doctor import doctor_file, failures, render_table
    from compiler.stages.validate import _closest, _typed

    paths = [a for a in argv if "=" not in a]
    if len(paths) != 1 or any(a in ("-h", "--help") for a in argv):
        print(DOCTOR_USAGE, file=sys.stderr)
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    target = opts.pop("target", "ort")
    # the doctor judges ONNX graphs: any target that declares it runs one
    graph_targets = [t for t in target_names() if get_target(t).capabilities.runs_onnx]
    if target not in graph_targets:
        raise RecipeError("target", f"bad value {target!r}",
                          f"use {' or '.join(f'target={t}' for t in graph_targets)} "
                          "(the targets that run an ONNX graph)")
    providers = [p.strip() for p in opts.pop("providers", "CPUExecutionProvider").strip("[]").split(",") if p.strip()]
    json_out = opts.pop("json", None)
    fields = [f for f in DoctorConfig.__dataclass_fields__ if f != "enabled"]
    for key in opts:
        if key not in fields:
            raise RecipeError(key, "unknown doctor option", _closest(key, fields + ["target", "providers", "json"]))
    cfg = _typed(DoctorConfig, OmegaConf.from_dotlist([f"{k}={v}" for k, v in opts.items()]), "doctor")
    path = Path(paths[0]).expanduser()
    if path.is_dir() and (path / "model.onnx").is_file():  # a run directory
        path = path / "model.onnx"
    if not path.is_file():
        raise RecipeError("path", f"{paths[0]} is not an ONNX file", "give path/to/model.onnx or a run directory")
    results = doctor_file(path, target=get_target(target).capabilities, config=cfg, providers=providers)
    print(f"qcompile doctor: {path} (target={target}, providers={','.join(providers)})")
    print(render_table(results))
    failed = failures(results)
    print(f"{len(results)} rails: {len(failed)} failed, "
          f"{sum(r['status'] == 'warned' for r in results)} warned, "
          f"{sum(r['status'] == 'passed' for r in results)} passed, "
          f"{sum(r['status'] == 'skipped' for r in results)} skipped")
    if json_out:
        Path(json_out).write_text(json.dumps(_clean(results), indent=2, sort_keys=True) + "\n")
    return 1 if failed else 0


def summarize(argv: List[str]) -> int:
    """qcompile summarize [<sweep dir>]: summary.md, summary.csv, pareto.png for a multirun directory."""
    # why: each command loads its own implementation; other commands start without it
    from compiler.commands.sweep import summarize_main

    return summarize_main(argv)


def verify(argv: List[str]) -> int:
    """qcompile verify <run dir> [--strict] [--json]: artifacts vs manifest.json, versions, hardware."""
    # why: each command loads its own implementation; other commands start without it
    from compiler.commands.reproduce import verify_main

    return verify_main(argv)


def rebuild(argv: List[str]) -> int:
    """qcompile rebuild <run dir> [--out DIR] [--use-cache] [--json]: rebuild and compare artifact hashes."""
    # why: each command loads its own implementation; other commands start without it
    from compiler.commands.reproduce import rebuild_main

    return rebuild_main(argv)


def predict(argv: list[str]) -> int:
    """qcompile predict <run dir> "a sentence" ... [--file F] [--json]: text through the run's engine."""
    # why: each command loads its own implementation; other commands start without it
    from compiler.commands.predict import main

    return main(argv)
