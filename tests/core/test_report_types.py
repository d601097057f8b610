"""report.json's types: the schema in docs/ is the one the types generate, the writer goes through them and
(in the tests) through the schema, readers of old or cut-short reports get None instead of a crash."""

from __future__ import annotations

import json

import pytest

from compiler.core.report_types import SCHEMA_PATH, SCHEMA_VERSION, BaselineKind, Report, schema_text
from compiler.core.status import Status
from compiler.core.typed_json import TypedJSONError
from compiler.stages.report import VALIDATE_ENV, write_report


def _minimal(**over):
    rep = {"status": "passed", "build": {"model": "m", "recipe": "fp32", "target": "ort", "run_dir": "/r"},
           "gate": {"min_embedding_cosine": 0.99}, "steps": {}, "timings_s": {"load": 1.0}, "notes": [],
           "bench": {"latency_ms_p50": 2.0, "latency_ms_p90": 3.0, "latency_ms_mean": 2.1, "ms_per_sample": 0.25,
                     "samples_per_s": 4000.0, "iterations": 4, "shapes": "fixed", "batch_size": 8, "seq_len": 32,
                     "threads": 1, "rounds": 2, "cpu_ms_p50": 1.9, "peak_rss_mb": 600.0,
                     "peak_rss_increase_mb": 10.0, "artifact_bytes": 1000, "artifact_mb": 0.001,
                     "baseline": "none: the build is the fp32 engine itself", "baseline_kind": BaselineKind.SELF}}
    rep.update(over)
    return rep


def test_docs_schema_is_generated_from_the_types():
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "docs/report.schema.json is stale: python -m compiler.core.report_types > docs/report.schema.json")
    schema = json.loads(schema_text())
    assert schema["properties"]["schema_version"] == {"type": "integer"}
    assert "repair budget not met" in schema["properties"]["status"]["enum"]
    assert schema["$defs"]["BenchResult"]["properties"]["baseline_kind"] == {"enum": ["fp32_same_run", "self", "none"]}


def test_written_report_has_schema_version_and_keeps_its_layout(tmp_path):
    write_report(tmp_path, _minimal())
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["bench"]["baseline_kind"] == "self" and "speedup_vs_fp32" not in data["bench"]  # unset: absent
    rep = Report.read(tmp_path / "report.json")
    assert rep.status is Status.PASSED and rep.bench.is_fp32_self and rep.bench.speed_ratio() == 1.0
    assert rep.to_dict() == data


def test_a_key_no_type_declares_fails_schema_validation(tmp_path, monkeypatch):
    # the planted fault: a stage adds a bench key without declaring it (how check.task -> check.fidelity went
    # unnoticed by every reader)
    bad = _minimal()
    bad["bench"]["speedup"] = 2.0
    monkeypatch.setenv(VALIDATE_ENV, "1")
    with pytest.raises(ValueError, match=r"bench: Additional properties are not allowed \('speedup' was unexpected\)"):
        write_report(tmp_path, bad)
    assert not (tmp_path / "report.json").exists()
    monkeypatch.delenv(VALIDATE_ENV)
    write_report(tmp_path, bad)  # outside the tests the key is kept, not lost
    assert json.loads((tmp_path / "report.json").read_text())["bench"]["speedup"] == 2.0


def test_a_declared_key_of_the_wrong_type_is_refused_before_writing(tmp_path):
    bad = _minimal()
    bad["bench"]["ms_per_sample"] = "fast"
    with pytest.raises(TypedJSONError, match=r"Report.bench.ms_per_sample: expected a number, got 'fast'"):
        write_report(tmp_path, bad)
    with pytest.raises(TypedJSONError, match="Report.status: 'finished' is not one of 'passed', 'gate failed'"):
        write_report(tmp_path, _minimal(status="finished"))
    assert not (tmp_path / "report.json").exists()


def test_readers_get_none_for_what_a_report_lacks_and_refuse_a_newer_version():
    rep = Report.from_dict({"schema_version": 1, "status": "gate failed", "bench": {"ms_per_sample": "nan"}},
                           partial=True)
    assert rep.status is Status.GATE_FAILED and rep.build is None and rep.bench.artifact_mb is None
    assert rep.bench.speed_ratio() is None
    with pytest.raises(TypedJSONError, match="schema_version 2; this qcompile reads up to 1: update qcompile"):
        Report.from_dict({"schema_version": 2, "status": "passed"}, partial=True)


def test_a_report_from_before_schema_version_reads_its_baseline_kind():
    # the one place the old words are read: reports written before bench.baseline_kind existed
    old = {"status": "passed", "bench": {"baseline": "none: the build is the fp32 engine itself"}}
    assert Report.from_dict(old, partial=True).bench.baseline_kind is BaselineKind.SELF
    old["bench"]["baseline"] = "fp32 engine of the same model on target ort, timed round-robin in this run"
    assert Report.from_dict(old, partial=True).bench.baseline_kind is BaselineKind.FP32_SAME_RUN
    # a current report is never read from its words
    new = {"schema_version": 1, "status": "passed",
           "bench": {"baseline": "none: the build is the fp32 engine itself", "baseline_kind": "none"}}
    assert not Report.from_dict(new, partial=True).bench.is_fp32_self


def test_a_report_from_before_schema_version_reads_its_repair_budget():
    """The old repair section kept its budget under max_drop; it reads under the key that now names it."""
    def old(metric):
        return {"status": "passed", "repair": {"metric": metric, "max_drop": 0.01, "met": True,
                                               "fallback_layers": 2, "layers": {"a": "fp8", "b": "fp8"}}}

    cos = Report.from_dict(old("embedding_cosine_mean"), partial=True).repair
    assert (cos.max_fidelity_drop, cos.max_task_drop, cos.budget) == (0.01, None, 0.01) and not cos.extra
    task = Report.from_dict(old("retrieval accuracy_at_1"), partial=True).repair
    assert (task.max_task_drop, task.max_fidelity_drop, task.budget) == (0.01, None, 0.01)
