"""Run directories that look finished only when they are: a build writes into `<name>.partial`; on
success it is renamed to `<name>`, on a failed gate to `<name>.gate-failed`, on failure to `<name>.FAILED`
with FAILED.md saying why. A directory named explicitly (hydra.run.dir=X, which the command line accepts
only new or empty) is written as X with a BUILDING marker and ends the same way: X, X.gate-failed or
X.FAILED, so a directory without a suffix is a finished, passing run however it was named."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from compiler.core.errors import RecipeError
from compiler.core.status import FAILED_SUFFIX, GATE_FAILED_SUFFIX, PARTIAL_SUFFIX, Status

BUILDING_MARKER = "BUILDING"  # inside an explicitly named run dir (hydra.run.dir=...) while it builds


def final_name(staging: Path, suffix: str = "") -> Path:
    """The directory name a staging directory gets when it ends: never one that exists already."""
    staging = Path(staging)
    base = staging.name[: -len(PARTIAL_SUFFIX)] if staging.name.endswith(PARTIAL_SUFFIX) else staging.name
    candidate = staging.with_name(base + suffix)
    n = 1
    while candidate.exists() and candidate != staging:
        candidate = staging.with_name(f"{base}-{n}{suffix}")
        n += 1
    return candidate


def is_staging(path: Path) -> bool:
    return Path(path).name.endswith(PARTIAL_SUFFIX)


def begin(run_dir: Path) -> None:
    """Refuse to build into a directory that holds a finished run; mark explicit dirs as building."""
    run_dir = Path(run_dir)
    if (run_dir / "report.json").exists() or (run_dir / "manifest.json").exists():
        raise RecipeError("hydra.run.dir", f"{run_dir} already holds a finished run",
                          "choose another hydra.run.dir; finished runs are never overwritten")
    if not os.access(run_dir, os.W_OK):
        raise RecipeError("hydra.run.dir", f"{run_dir} is not writable", "pass a writable hydra.run.dir=...")
    if not is_staging(run_dir):
        (run_dir / BUILDING_MARKER).write_text("a qcompile build is writing this directory\n")


def succeed(run_dir: Path, gate_failed: bool = False) -> Path:
    run_dir = Path(run_dir)
    (run_dir / BUILDING_MARKER).unlink(missing_ok=True)
    if not is_staging(run_dir) and not gate_failed:  # an explicit name that passed keeps it
        return run_dir
    dest = final_name(run_dir, GATE_FAILED_SUFFIX if gate_failed else "")
    run_dir.rename(dest)
    return dest


def fail(run_dir: Path, reason: str, kind: str = Status.BUILD_FAILED) -> Optional[Path]:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    (run_dir / "FAILED.md").write_text(f"# qcompile: {kind}\n\n{reason}\n\nThis directory is not a usable build.\n")
    for name in ("report.json", "manifest.json"):  # a failed build must never look complete
        if (run_dir / name).exists():
            (run_dir / name).rename(run_dir / f"{name}.incomplete")
    (run_dir / BUILDING_MARKER).unlink(missing_ok=True)
    dest = final_name(run_dir, FAILED_SUFFIX)
    run_dir.rename(dest)
    return dest


def discard(run_dir: Path) -> None:
    """A recipe error: nothing was built, so the staging directory goes away entirely."""
    import shutil

    run_dir = Path(run_dir)
    if is_staging(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    # an explicit dir (new or empty when the build began, cli._precheck): Hydra's files go, and the dir with
    # them if nothing else is in it
    (run_dir / BUILDING_MARKER).unlink(missing_ok=True)
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    for log_file in run_dir.glob("*.log"):
        log_file.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:  # something else is in it: left as it is
        pass
