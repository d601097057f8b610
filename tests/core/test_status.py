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


def test_repair_budget_not_met_is_a_status_that_exits_3_in_any_directory():
    from compiler.commands.sweep import Row, sweep_exit_code
    from compiler.core.status import GATE_FAILED_SUFFIX, run_dir_suffix
    from compiler.repair.result import RepairBudgetError

    assert Status("repair budget not met") is Status.REPAIR_BUDGET_NOT_MET
    assert exit_code(Status.REPAIR_BUDGET_NOT_MET) == 3
    err = RepairBudgetError("budget not met")
    assert err.status == Status.REPAIR_BUDGET_NOT_MET and err.exit_code == 3
    assert run_dir_suffix(Status.REPAIR_BUDGET_NOT_MET) == run_dir_suffix(Status.GATE_FAILED) == GATE_FAILED_SUFFIX
    assert run_dir_suffix(Status.PASSED) == "" and run_dir_suffix(Status.BUILD_FAILED) == ".FAILED"
    # an explicit hydra.run.dir keeps its plain name: the status alone says 3, no suffix needed
    row = Row(num=0, model="m", recipe="nvfp4", target="torch", status=Status.REPAIR_BUDGET_NOT_MET, run_dir="mine")
    assert sweep_exit_code([row]) == 3
