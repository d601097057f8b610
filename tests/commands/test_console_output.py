"""What a build prints: qcompile's stages on the console, the libraries' logs, prints and warnings in the
run's log file (cli.log); errors rendered without terminal colour codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST, REPO

# a log record on the console: "[time][logger][LEVEL] - message" (Hydra's job_logging format)
RECORD = re.compile(r"^\[[^\]]+\]\[([^\]]+)\]\[(\w+)\] - ")
OURS = ("qcompile", "compiler", "targets", "HYDRA")  # HYDRA: the sweep's "Launching 2 jobs" lines
# what the libraries print during an NVFP4 build (seen on the console before the fix)
LIBRARY_TEXT = ("initializer_deduplication", "TRT_FP4QDQ", "Inserted ", "[modelopt]", "[torch.onnx]",
                "onnxscript", "Warning:")


def test_build_console_shows_qcompile_stages_only_and_the_log_file_keeps_the_rest(qcompile):
    """An NVFP4 TensorRT build with each exporter (one multirun): the dynamo exporter's onnx_ir INFO flood,
    the TorchScript exporter's "shape inference of trt::TRT_FP4QDQ" C++ warning and modelopt's prints
    reach the run's cli.log, not the console."""
    r = qcompile("-m", "model=tiny_bert", "recipe=nvfp4", "target=trt", "export.exporter=torchscript,dynamo",
                 "bench.enabled=false", *FAST, timeout=1800,
                 fresh_process=True)  # once-per-process library warnings: only a fresh one prints them
    assert r.rc == 0, r
    console = r.stdout + r.stderr
    leaked = [ln for ln in console.splitlines() if any(t in ln for t in LIBRARY_TEXT)]
    assert not leaked, leaked[:5]
    loggers = {m.group(1) for m in map(RECORD.match, console.splitlines()) if m}
    assert loggers and all(name.split(".")[0] in OURS for name in loggers), loggers
    assert "[export] done" in console  # the stages are still shown
    logs = {p.parent.name: p.read_text() for p in r.cwd.rglob("cli.log")}
    assert len(logs) == 2, list(logs)
    text = "\n".join(logs.values())
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
