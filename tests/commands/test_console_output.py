"""What a build prints: one line per stage, the summary table (the same-run speed ratio next to the latency),
the run directory; qcompile's warnings and errors on stderr; everything else (qcompile's INFO records, the
libraries' logs, prints and warnings) in the run's log file (cli.log); errors rendered without terminal
colour codes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.commands.cli import print_job_line, print_summary
from compiler.core.logs import ConsoleFilter, ConsoleHandler, configure_console, stage_extra
from tests.conftest import FAST, REPO, run_cli

# a log record as Hydra's default job_logging prints it: "[time][logger][LEVEL] - message"
RECORD = re.compile(r"^\[[^\]]+\]\[([^\]]+)\]\[(\w+)\] - ")
# a stage's console line: "  export             1.8 s"
STAGE = re.compile(r"^  (\S+) +(\d+\.\d) s$")
# what the libraries print during an NVFP4 build (seen on the console before the fix)
LIBRARY_TEXT = ("initializer_deduplication", "TRT_FP4QDQ", "Inserted ", "[modelopt]", "[torch.onnx]",
                "onnxscript", "Warning:")


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    """One default-recipe build (int8_static on ort, bench on) shared by the console tests. The cache is off so
    onnxruntime's quant_pre_process runs (and falls back) in this build, whatever ran before; the top-1 gate is
    relaxed because 32 evaluation sentences at seq 32 sit near its 0.9."""
    res = run_cli(tmp_path_factory.mktemp("console"), "model=tiny_bert", "recipe=int8_static", "target=ort", *FAST,
                  "cache.enabled=false", "recipe.gate.min_top1_agreement=0.5")
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    return res, run, json.loads((run / "report.json").read_text())


def test_console_is_a_line_per_stage_then_the_table_then_the_run_directory(int8_build):
    res, run, report = int8_build
    lines = res.stdout.rstrip("\n").splitlines()
    assert not [ln for ln in lines + res.stderr.splitlines() if RECORD.match(ln)], res  # no timestamped records
    stages = [m.groups() for m in map(STAGE.match, lines) if m]
    assert {name: float(t) for name, t in stages} == {k: round(t, 1) for k, t in report["timings_s"].items()}, res
    assert len(stages) == len(report["timings_s"])  # one line each
    assert lines[:len(stages)] == [ln for ln in lines if STAGE.match(ln)]  # the stages come first
    assert lines[len(stages)].strip() == "qcompile tiny_bert / int8_static / ort: passed"  # then the table
    assert lines[-1] == f"run directory: {run}"  # last, on one line
    assert res.stderr == "", res  # no warning in this build
    log = (run / "cli.log").read_text()
    assert "[load] ..." in log and "[bench] done in" in log  # the rest is in cli.log, timestamped
    assert RECORD.match(log.splitlines()[0])


def test_an_expected_preprocess_fallback_stays_in_cli_log_in_words(int8_build):
    """onnxruntime's quant_pre_process fails on BERT exports with its default settings and auto_merge fixes it:
    a fallback that works is no console warning."""
    res, run, report = int8_build
    assert report["steps"]["int8_static"]["preprocess"] == "auto_merge"
    assert "quant_pre_process" not in res.stdout + res.stderr, res
    log = (run / "cli.log").read_text()
    assert ("quant_pre_process: settings auto_merge worked after default failed (expected on BERT and ModernBERT "
            "exports") in log


def test_console_shows_the_same_run_speed_ratio_with_its_spread_next_to_the_latency(int8_build):
    res, _, report = int8_build
    bench = report["bench"]
    lo, hi = bench["speedup_vs_fp32_spread"]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("│")]
    names = [r.split("│")[1].strip() for r in rows]
    i = names.index("speedup_vs_fp32 (same run)")
    assert names[i - 1] == "latency_ms_p50"
    assert rows[i].split("│")[2].strip() == f"{bench['speedup_vs_fp32']:.2f}x (rounds {lo:.2f}..{hi:.2f})"


def _report(**extra):
    report = {"build": {"model": "m", "recipe": "r", "target": "t"}, "status": "passed",
              "check": {"fidelity": {"embedding_cosine_mean": 0.99}},
              "bench": {"latency_ms_p50": 2.0, "speedup_vs_fp32": 1.4242, "speedup_vs_fp32_spread": [1.3812, 1.4749]}}
    report.update(extra)
    return report


def test_summary_prints_the_repair_budget_note(capsys, tmp_path):
    note = ("budget: drop of embedding cosine <= 0.1, from gate.min_embedding_cosine=0.9; "
            "recipe.repair.max_task_drop=0.01 sets a tighter one")
    print_summary(_report(repair={"fallback_layers": 0, "budget_note": note}), tmp_path)
    out = capsys.readouterr().out
    assert f"repair budget: {note}\n" in out  # on one line, whatever the width
    print_summary(_report(repair={"fallback_layers": 0}), tmp_path)
    assert "repair budget" not in capsys.readouterr().out


def test_summary_without_an_fp32_baseline_has_no_ratio_row(capsys, tmp_path):
    print_summary(_report(bench={"latency_ms_p50": 2.0, "baseline": "none: the build is the fp32 engine itself"}),
                  tmp_path)
    out = capsys.readouterr().out
    assert "latency_ms_p50" in out and "speedup" not in out


def test_sweep_job_line_says_the_build_its_fidelity_and_speed_ratio_or_its_error(capsys, tmp_path):
    print_job_line(3, "m / r / t", {"status": "passed", "error": None}, _report(), tmp_path, 12.34)
    assert capsys.readouterr().out == (f"#3 m / r / t: passed in 12.3 s -- embedding_cosine_mean 0.99000 -- "
                                       f"p50 2.000 ms, 1.42x fp32 (rounds 1.38..1.47) -> {tmp_path}\n")
    print_job_line(4, "m / r / t", {"status": "recipe error", "error": "recipe error: data.seq_len: bad value"},
                   None, None, 0.5)
    assert capsys.readouterr().out == "#4 m / r / t: recipe error in 0.5 s -- recipe error: data.seq_len: bad value\n"


def test_console_handlers_show_stages_and_qcompile_warnings_only(tmp_path):
    """The handlers recipes/hydra/job_logging/qcompile.yaml wires: stages on one, warnings on the other; a
    library's warning and qcompile's INFO records reach neither; a sweep turns the stage lines off."""
    out, err = (tmp_path / "out.txt").open("w+"), (tmp_path / "err.txt").open("w+")
    stages, warnings = ConsoleHandler(out), ConsoleHandler(err)
    stages.addFilter(ConsoleFilter("stages"))
    warnings.addFilter(ConsoleFilter("warnings"))
    root = logging.getLogger()
    root.addHandler(stages)
    root.addHandler(warnings)
    log = logging.getLogger("compiler.stages.example")
    log.setLevel(logging.INFO)  # the handlers decide, not the test run's root level
    try:
        log.info("[load] done in 2.0s", extra=stage_extra("load", 2.04))
        log.info("cache: export hit")
        log.warning("data.evaluation_samples=8 but three.txt has only 3 sentences: using all 3 " + "x" * 100)
        logging.getLogger("onnxruntime.example").warning("a library's warning")
        configure_console(stages=False)
        log.info("[export] done in 1.0s", extra=stage_extra("export", 1.0))
        configure_console(verbose=True)
        log.info("cache: export miss")
    finally:
        root.removeHandler(stages)
        root.removeHandler(warnings)
    out.seek(0)
    err.seek(0)
    assert out.read() == "  load               2.0 s\ncache: export miss\n"
    assert err.read() == "warning: data.evaluation_samples=8 but three.txt has only 3 sentences: using all 3 " + \
        "x" * 100 + "\n"


def test_sweep_console_is_a_line_per_job_and_the_log_files_keep_the_library_output(qcompile):
    """An NVFP4 TensorRT build with each exporter (one multirun): a line per job (no stage lines); the dynamo
    exporter's onnx_ir INFO flood, the TorchScript exporter's "shape inference of trt::TRT_FP4QDQ" C++ warning
    and modelopt's prints reach the runs' cli.log, not the console."""
    r = qcompile("-m", "model=tiny_bert", "recipe=nvfp4", "target=trt", "export.exporter=torchscript,dynamo",
                 "bench.enabled=false", *FAST, timeout=1800,
                 fresh_process=True)  # once-per-process library warnings: only a fresh one prints them
    assert r.rc == 0, r
    console = r.stdout + r.stderr
    leaked = [ln for ln in console.splitlines() if any(t in ln for t in LIBRARY_TEXT)]
    assert not leaked, leaked[:5]
    assert not [ln for ln in console.splitlines() if RECORD.match(ln) or STAGE.match(ln)], console
    jobs = [ln for ln in r.stdout.splitlines() if re.match(r"#\d tiny_bert / nvfp4 / trt: passed in ", ln)]
    assert len(jobs) == 2, r.stdout
    logs = {p.parent.name: p.read_text() for p in r.cwd.rglob("cli.log")}
    assert len(logs) == 2, list(logs)
    text = "\n".join(logs.values())
    assert "[export] done in" in text  # the stages are in the log files
    assert "initializer_deduplication" in text  # routed, not dropped
    assert "shape inference of trt::TRT_FP4QDQ" in text
    assert "Inserted " in text


# a build whose pipeline raises coloured text, as torch.export's errors are ("\x1b[96mThis is step 1/3")
PLANT = """
import sys
import compiler.pipeline as pipeline
from compiler.core.errors import BuildError

KIND = sys.argv[1]  # read now: the CLI rewrites sys.argv for Hydra

def run_build(*args, **kwargs):
    if KIND == "qcompile-error":
        raise BuildError("export failed: \\x1b[96mThis is step 1/3\\x1b[0m of exporting the model")
    raise RuntimeError("\\x1b[1m\\x1b[31mFailed\\x1b[0m to export the model: \\x1b[96m*torch.export*\\x1b[0m")

pipeline.run_build = run_build
from compiler.commands.cli import main
main(sys.argv[2:])
"""


def _planted(tmp_path: Path, kind: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", PLANT, kind, "model=tiny_bert", "recipe=fp32", "target=ort"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, check=False)


def test_coloured_error_text_is_rendered_without_ansi_codes(tmp_path):
    for kind, words in (("qcompile-error", "This is step 1/3 of exporting"),
                        ("internal-error", "Failed to export the model: *torch.export*")):
        cwd = tmp_path / kind
        cwd.mkdir()
        proc = _planted(cwd, kind)
        assert proc.returncode == 1, proc.stderr[-2000:]
        line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("qcompile: "))
        assert words in line and "\x1b" not in line, line
        failed = list(cwd.rglob("FAILED.md"))
        assert len(failed) == 1
        text = failed[0].read_text()
        assert words in text and "\x1b" not in text, text
