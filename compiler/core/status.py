"""How a build, a sweep's run or a guard rail ended: one vocabulary, its exit codes and run-directory suffixes."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """Values are the words report.json, FAILED.md, summary.md and the rail table show (a str, so they
    compare equal to and serialize as those words)."""

    # a build (report.json "status", FAILED.md's kind) and a sweep's row
    PASSED = "passed"
    GATE_FAILED = "gate failed"
    # the repair search (recipe.repair.enabled) found no precision map within max_fallback_fraction: a kind of
    # gate failure (exit 3, a .gate-failed directory), with the search's best point as its reason
    REPAIR_BUDGET_NOT_MET = "repair budget not met"
    BUILD_FAILED = "build failed"
    INTERNAL_ERROR = "internal error"
    INTERRUPTED = "interrupted"
    RECIPE_ERROR = "recipe error"
    NOT_RUNNABLE = "not runnable"  # a recipe error because a step cannot run on the target (capability table)
    INCOMPLETE = "incomplete"  # a .partial dir: still building, or its process was killed
    # a guard rail (PASSED too)
    WARNED = "warned"
    FAILED = "failed"
    SKIPPED = "skipped"

    # "{status}" prints the word, not "Status.PASSED" (str mix-ins format by name since Python 3.11)
    __str__ = str.__str__
    __format__ = str.__format__


# What each outcome exits with (the README's exit codes; docs/bad-input.md). A sweep exits like its worst run: the highest
# code; combinations the capability table rules out are holes in the matrix, not failures.
EXIT_CODES = {
    Status.PASSED: 0,
    Status.NOT_RUNNABLE: 0,
    Status.BUILD_FAILED: 1,
    Status.INTERNAL_ERROR: 1,
    Status.INCOMPLETE: 1,
    Status.RECIPE_ERROR: 2,
    Status.GATE_FAILED: 3,
    Status.REPAIR_BUDGET_NOT_MET: 3,
    Status.INTERRUPTED: 130,
}


def exit_code(status: str) -> int:
    """The exit code of a build or sweep row status; an unknown word (a newer kind) is a failure, 1."""
    try:
        return EXIT_CODES[Status(status)]
    except (ValueError, KeyError):
        return 1


# A run directory's name says how it ended: builds write into <name>.partial (compiler/rundir/lifecycle.py)
# and rename it when they end.
PARTIAL_SUFFIX = ".partial"
FAILED_SUFFIX = ".FAILED"
GATE_FAILED_SUFFIX = ".gate-failed"
RUN_DIR_SUFFIXES = (GATE_FAILED_SUFFIX, FAILED_SUFFIX, PARTIAL_SUFFIX)
# the statuses of a build that finished (report.json written, the directory renamed, not failed): their suffix
FINISHED_SUFFIXES = {Status.PASSED: "", Status.GATE_FAILED: GATE_FAILED_SUFFIX,
                     Status.REPAIR_BUDGET_NOT_MET: GATE_FAILED_SUFFIX}


def run_dir_suffix(status: str) -> str:
    """The suffix of a run directory whose build ended with `status`: "" for a passing build, .gate-failed for
    a build that ran to its gate (or its repair budget) and failed it, .FAILED for any other ending."""
    try:
        return FINISHED_SUFFIXES.get(Status(status), FAILED_SUFFIX)
    except ValueError:
        return FAILED_SUFFIX
