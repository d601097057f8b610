"""The `qcompile` command line as a new user meets it: --help, sweep errors, a build with its checks off."""

from __future__ import annotations

import re

from compiler.commands.cli import SUBCOMMANDS
from tests.conftest import FAST


def test_help_lists_every_subcommand_with_an_example_and_typical_invocations(qcompile):
    res = qcompile("--help", fresh_process=True)  # the page a terminal shows
    assert res.rc == 0, res
    # predict is added by its own change; the help names it already
    for sub in sorted(set(SUBCOMMANDS) | {"predict"}):
        assert re.search(rf"^\s+qcompile {sub}\b.*\S\s{{2,}}\S", res.stdout, flags=re.M), (sub, res.stdout)
    assert re.search(r"^\s+qcompile model=\S+ recipe=\S+ target=\S+", res.stdout, flags=re.M)  # one build
    assert re.search(r"^\s+qcompile -m recipe=\S+,\S+", res.stdout, flags=re.M)  # a sweep
    assert "data.calibration_samples=32" in res.stdout  # an override of a nested key
    assert "recipe: " in res.stdout and "int8_static" in res.stdout  # the config groups and their options
    assert "Powered by Hydra" not in res.stdout  # not Hydra's generic page


def test_multirun_bad_override_is_one_line(qcompile):
    # a fresh interpreter: nothing it prints on start-up or exit may add to the one line
    res = qcompile("-m", "model=tiny_bert", "recipe=fp32", "data.seq_lenn=16,32", fresh_process=True)
    assert res.rc == 2, res
    assert res.stderr.strip().splitlines() == [
        "qcompile: recipe error: data.seq_lenn: unknown key -- did you mean 'seq_len'?"], res
    assert not (res.cwd / "outputs").exists()


def test_multirun_unknown_option_in_a_later_sweep_value_is_one_line(qcompile):
    res = qcompile("-m", "model=tiny_bert", "recipe=fp32,nope", "target=ort")
    assert res.rc == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: recipe error: recipe: no recipe named 'nope'"), res
    assert "fp32" in lines[0]  # the options that exist


def test_multirun_unparsable_override_is_one_line(qcompile):
    res = qcompile("-m", "model=tiny_bert", "data.seq_len=[16,32")
    assert res.rc == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot parse the override 'data.seq_len=[16,32'" in lines[0], res


def test_build_with_check_and_bench_off_says_what_was_skipped(qcompile):
    res = qcompile("model=tiny_bert", "recipe=fp32", "target=ort", *FAST, "check.enabled=false",
                   "bench.enabled=false")
    assert res.rc == 0, res
    assert "check skipped (check.enabled=false); bench skipped (bench.enabled=false)" in res.stdout, res
    assert "metric" not in res.stdout and "value" not in res.stdout  # no empty metrics table
    assert "qcompile tiny_bert / fp32 / ort: passed" in res.stdout


def test_importing_compiler_main_runs_nothing(monkeypatch):
    """`python -m compiler` runs the CLI; importing compiler.__main__ (a tool walking the package) does not."""
    import importlib
    import sys

    import compiler.commands.cli as cli

    calls = []
    monkeypatch.setattr(cli, "main", lambda *a, **k: calls.append(a))
    monkeypatch.delitem(sys.modules, "compiler.__main__", raising=False)
    importlib.import_module("compiler.__main__")
    assert calls == []
