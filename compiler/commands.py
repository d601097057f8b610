"""Plain subcommands of `qcompile` besides builds: capabilities (more are added by their issues)."""

from __future__ import annotations

from typing import List


def capabilities(argv: List[str]) -> int:
    """Print the step x target capability table."""
    from compiler.steps.base import STEP_REGISTRY, load_all_steps
    from targets.base import target_names

    load_all_steps()
    targets = target_names()
    print("| step | " + " | ".join(targets) + " | calibration | what it does |")
    print("|---|" + "---|" * len(targets) + "---|---|")
    for name in sorted(STEP_REGISTRY):
        cls = STEP_REGISTRY[name]
        cells = [cls.runs_on.get(t, "-") for t in targets]
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if cls.needs_calibration else 'no'} | {cls.summary} |")
    return 0


def doctor(argv: List[str]) -> int:
    raise SystemExit("qcompile doctor: not available yet")


def summarize(argv: List[str]) -> int:
    raise SystemExit("qcompile summarize: not available yet")


def verify(argv: List[str]) -> int:
    raise SystemExit("qcompile verify: not available yet")


def rebuild(argv: List[str]) -> int:
    raise SystemExit("qcompile rebuild: not available yet")
