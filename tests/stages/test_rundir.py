"""Run directories: a build is visible under its name only when complete (`<name>.partial` renamed), a
failed one ends `<name>.FAILED` with FAILED.md and never a report.json, a finished run is never
overwritten, and run dirs stay under outputs/ unless an explicit path is given."""

import json

import pytest

from compiler.stages import rundir
from compiler.core.errors import RecipeError
from compiler.core.status import PARTIAL_SUFFIX
from tests.conftest import FAST

BASE = ["model=tiny_bert", "recipe=fp32", "target=ort"]


def _staging(tmp_path, name="12-00-00_tiny_bert_fp32_ort"):
    d = tmp_path / (name + PARTIAL_SUFFIX)
    d.mkdir()
    (d / "recipe.yaml").write_text("recipe: fp32\n")
    return d


def test_success_renames_the_staging_dir(tmp_path):
    d = _staging(tmp_path)
    rundir.begin(d)
    assert not (d / rundir.BUILDING_MARKER).exists()  # a .partial name already says "not finished"
    final = rundir.succeed(d)
    assert final == tmp_path / "12-00-00_tiny_bert_fp32_ort" and final.is_dir() and not d.exists()


def test_a_finished_name_is_never_reused(tmp_path):
    (tmp_path / "12-00-00_tiny_bert_fp32_ort").mkdir()
    (tmp_path / "12-00-00_tiny_bert_fp32_ort" / "report.json").write_text("{}")
    final = rundir.succeed(_staging(tmp_path))
    assert final.name == "12-00-00_tiny_bert_fp32_ort-1"
    assert (tmp_path / "12-00-00_tiny_bert_fp32_ort" / "report.json").read_text() == "{}"


def test_failure_marks_the_dir_and_hides_the_report(tmp_path):
    d = _staging(tmp_path)
    (d / "report.json").write_text("{}")  # written before a late stage failed
    (d / "manifest.json").write_text("{}")
    final = rundir.fail(d, "export failed: boom", kind="build failed")
    assert final.name == "12-00-00_tiny_bert_fp32_ort.FAILED"
    assert "# qcompile: build failed" in (final / "FAILED.md").read_text()
    assert "export failed: boom" in (final / "FAILED.md").read_text()
    assert not (final / "report.json").exists() and not (final / "manifest.json").exists()
    assert (final / "report.json.incomplete").exists()


def test_gate_failure_is_marked_in_the_name(tmp_path):
    assert rundir.succeed(_staging(tmp_path), gate_failed=True).name.endswith(".gate-failed")


def test_recipe_error_discards_the_staging_dir(tmp_path):
    d = _staging(tmp_path)
    rundir.discard(d)
    assert not d.exists()


def test_begin_refuses_a_finished_run_and_marks_explicit_dirs(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text("{}")
    with pytest.raises(RecipeError, match="already holds a finished run"):
        rundir.begin(done)
    explicit = tmp_path / "mine"
    explicit.mkdir()
    rundir.begin(explicit)  # an explicit name cannot carry .partial: a marker says it is being written
    assert (explicit / rundir.BUILDING_MARKER).exists()
    assert rundir.succeed(explicit) == explicit and not (explicit / rundir.BUILDING_MARKER).exists()


def test_build_lands_under_outputs_and_is_never_overwritten(qcompile, tmp_path):
    r = qcompile(*BASE, *FAST, "bench.enabled=false")
    assert r.rc == 0, r
    (run,) = r.run_dirs()
    assert run.parent.parent == tmp_path / "outputs"  # outputs/<date>/<time>_<model>_<recipe>_<target>
    assert run.name.endswith("_tiny_bert_fp32_ort") and not list((tmp_path / "outputs").rglob("*.partial"))
    assert {"report.json", "manifest.json", "recipe.yaml", "model.onnx", "REPORT.md"} <= {p.name for p in run.iterdir()}
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    again = qcompile(*BASE, *FAST, f"hydra.run.dir={run}")
    assert again.rc == 2, again
    assert f"hydra.run.dir: {run} already holds a finished run -- choose another hydra.run.dir" in again.stderr
    assert "Traceback" not in again.stderr
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert after == before, "a finished run was touched"


def test_explicit_run_dir_is_used_as_given(qcompile, tmp_path):
    target = tmp_path / "elsewhere" / "my_build"
    r = qcompile(*BASE, *FAST, "bench.enabled=false", "check.enabled=false", f"hydra.run.dir={target}")
    assert r.rc == 0, r
    assert (target / "report.json").exists() and not (target / rundir.BUILDING_MARKER).exists()
    assert json.loads((target / "report.json").read_text())["status"] == "passed"
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("report.json"))
