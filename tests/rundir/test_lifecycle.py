"""Run directories: a build is visible under its name only when complete (`<name>.partial` renamed), a
failed one ends `<name>.FAILED` with FAILED.md and never a report.json, a finished run is never
overwritten, and run dirs stay under outputs/ unless an explicit path is given; an explicit path ends with the
same suffixes."""

import json

import pytest

from compiler.rundir import lifecycle
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
    lifecycle.begin(d)
    assert not (d / lifecycle.BUILDING_MARKER).exists()  # a .partial name already says "not finished"
    final = lifecycle.succeed(d)
    assert final == tmp_path / "12-00-00_tiny_bert_fp32_ort" and final.is_dir() and not d.exists()


def test_a_finished_name_is_never_reused(tmp_path):
    (tmp_path / "12-00-00_tiny_bert_fp32_ort").mkdir()
    (tmp_path / "12-00-00_tiny_bert_fp32_ort" / "report.json").write_text("{}")
    final = lifecycle.succeed(_staging(tmp_path))
    assert final.name == "12-00-00_tiny_bert_fp32_ort-1"
    assert (tmp_path / "12-00-00_tiny_bert_fp32_ort" / "report.json").read_text() == "{}"


def test_failure_marks_the_dir_and_hides_the_report(tmp_path):
    d = _staging(tmp_path)
    (d / "report.json").write_text("{}")  # written before a late stage failed
    (d / "manifest.json").write_text("{}")
    final = lifecycle.fail(d, "export failed: boom", kind="build failed")
    assert final.name == "12-00-00_tiny_bert_fp32_ort.FAILED"
    assert "# qcompile: build failed" in (final / "FAILED.md").read_text()
    assert "export failed: boom" in (final / "FAILED.md").read_text()
    assert not (final / "report.json").exists() and not (final / "manifest.json").exists()
    assert (final / "report.json.incomplete").exists()


def test_gate_failure_is_marked_in_the_name(tmp_path):
    assert lifecycle.succeed(_staging(tmp_path), gate_failed=True).name.endswith(".gate-failed")


def test_recipe_error_discards_the_staging_dir(tmp_path):
    d = _staging(tmp_path)
    lifecycle.discard(d)
    assert not d.exists()


def test_begin_refuses_a_finished_run_and_marks_explicit_dirs(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text("{}")
    with pytest.raises(RecipeError, match="already holds a finished run"):
        lifecycle.begin(done)
    explicit = tmp_path / "mine"
    explicit.mkdir()
    lifecycle.begin(explicit)  # an explicit name cannot carry .partial: a marker says it is being written
    assert (explicit / lifecycle.BUILDING_MARKER).exists()
    assert lifecycle.succeed(explicit) == explicit and not (explicit / lifecycle.BUILDING_MARKER).exists()


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
    assert (target / "report.json").exists() and not (target / lifecycle.BUILDING_MARKER).exists()
    assert json.loads((target / "report.json").read_text())["status"] == "passed"
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("report.json"))


def test_an_explicit_dir_ends_with_the_same_suffixes(tmp_path):
    """Issue 17 item 3: hydra.run.dir=X kept its plain name after a failed gate. X ends as X.gate-failed or
    X.FAILED like a staging dir, so a directory without a suffix is a finished, passing run however named."""
    gate = tmp_path / "gate"
    gate.mkdir()
    lifecycle.begin(gate)
    (gate / "report.json").write_text('{"status": "gate failed"}')
    final = lifecycle.succeed(gate, gate_failed=True)
    assert final == tmp_path / "gate.gate-failed" and not gate.exists()
    assert (final / "report.json").exists() and not (final / lifecycle.BUILDING_MARKER).exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    lifecycle.begin(broken)
    final = lifecycle.fail(broken, "export failed: boom")
    assert final == tmp_path / "broken.FAILED" and not broken.exists()
    assert "export failed: boom" in (final / "FAILED.md").read_text()


def test_recipe_error_leaves_no_explicit_dir_behind(tmp_path):
    """A recipe error found inside the job (after Hydra wrote .hydra/ and cli.log into X) leaves no X: only a
    finished, passing run has a name without a suffix."""
    explicit = tmp_path / "mine"
    (explicit / ".hydra").mkdir(parents=True)
    (explicit / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (explicit / "cli.log").write_text("log\n")
    lifecycle.begin(explicit)
    lifecycle.discard(explicit)
    assert not explicit.exists()


def test_an_explicit_dir_must_be_new_or_empty(tmp_path, monkeypatch):
    """It is renamed when its build fails and all its files are hashed as artifacts: a directory holding other
    files is refused before Hydra writes into it (an empty one, e.g. from mktemp -d, is fine)."""
    from compiler.commands.cli import _precheck

    monkeypatch.chdir(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    err, _, _ = _precheck([*BASE, f"hydra.run.dir={busy}"])
    assert str(err) == (f"hydra.run.dir: {busy} exists and is not empty -- name a new or empty directory: a run "
                        "directory holds one build's files only")
    (tmp_path / "empty").mkdir()
    for fresh in (tmp_path / "empty", tmp_path / "new" / "dir"):
        assert _precheck([*BASE, f"hydra.run.dir={fresh}"])[0] is None


def test_gate_failed_build_in_an_explicit_dir_is_marked_by_its_name(qcompile, tmp_path, capsys):
    target = tmp_path / "mine"
    r = qcompile(*BASE, *FAST, "bench.enabled=false", "recipe.gate.min_embedding_cosine=1.5",
                 f"hydra.run.dir={target}")
    assert r.rc == 3, r
    failed = tmp_path / "mine.gate-failed"
    assert not target.exists() and json.loads((failed / "report.json").read_text())["status"] == "gate failed"
    assert f"qcompile: report: {failed / 'REPORT.md'}" in r.stderr
    from compiler.commands.cli import main

    with pytest.raises(SystemExit) as info:  # predict names it too
        main(["predict", str(failed), "a sentence"])
    assert info.value.code == 2 and "failed its accuracy gate" in capsys.readouterr().err
