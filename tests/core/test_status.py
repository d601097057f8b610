"""One status vocabulary: the words files show, the exit codes, the run-directory suffixes."""

from __future__ import annotations

import json

from compiler.core.errors import BuildError, GateError, InterruptedBuild, NotRunnableError, RecipeError
from compiler.core.status import RUN_DIR_SUFFIXES, Status, exit_code


def test_status_prints_and_serializes_as_its_word():
    assert f"{Status.GATE_FAILED}" == str(Status.GATE_FAILED) == "gate failed"
    assert json.dumps({"status": Status.PASSED}) == '{"status": "passed"}'
    assert Status.WARNED == "warned"


def test_errors_exit_with_their_status_code():
    assert [e.exit_code for e in (BuildError("x"), RecipeError("k", "x"), GateError("x"), InterruptedBuild("x"))] \
        == [1, 2, 3, 130]
    nr = NotRunnableError("recipe.steps.nvfp4", "nvfp4 is not runnable on target=ort")
    assert nr.exit_code == 2 and nr.kind == Status.RECIPE_ERROR and nr.status == Status.NOT_RUNNABLE
    assert exit_code(nr.status) == 0  # a hole in a sweep's matrix, not a failure
    assert exit_code("some newer kind") == 1


def test_run_dir_suffixes_are_distinct_and_dotted():
    assert len(set(RUN_DIR_SUFFIXES)) == 3 and all(s.startswith(".") for s in RUN_DIR_SUFFIXES)
