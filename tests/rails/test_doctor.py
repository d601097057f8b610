"""The doctor: every rail on a real tiny export, `qcompile doctor` on files with planted faults, and a
failed rail inside a build (BuildError naming the rail, DOCTOR.md, no finished-looking run dir)."""

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from compiler.rails import doctor
from compiler.core.errors import BuildError, RecipeError
from compiler.rails import FAILED, PASSED, RAIL_NAMES, SKIPPED
from compiler.core.schema import DoctorConfig, ExportConfig, TargetConfig
from targets import capabilities_of
from tests.conftest import FAST


@pytest.fixture(scope="module")
def bert_onnx(tiny_bert, tmp_path_factory):
    from compiler.stages.export import export_onnx

    out = tmp_path_factory.mktemp("doctor") / "model.onnx"
    return export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, out, ExportConfig())


@pytest.fixture(scope="module")
def baked_onnx(tmp_path_factory):
    """A graph whose sentence_embedding is a Constant (what a traced custom op becomes), beside a live
    output: the shape of the fault the input-dependence rail exists for."""
    emb = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32), "emb")
    const = onnx.numpy_helper.from_array(np.full((1, 8), 0.5, np.float32))
    g = h.make_graph([h.make_node("Gather", ["emb", "input_ids"], ["last_hidden_state"]),
                      h.make_node("Constant", [], ["sentence_embedding"], value=const)], "baked",
                     [h.make_tensor_value_info("input_ids", T.INT64, ["b", "s"])],
                     [h.make_tensor_value_info("last_hidden_state", T.FLOAT, ["b", "s", 8]),
                      h.make_tensor_value_info("sentence_embedding", T.FLOAT, [1, 8])], initializer=[emb])
    path = tmp_path_factory.mktemp("baked") / "baked.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def test_doctor_file_runs_every_rail_in_order(bert_onnx):
    results = doctor.doctor_file(bert_onnx, target=capabilities_of("ort"))
    assert [r["rail"] for r in results] == list(RAIL_NAMES)
    by = {r["rail"]: r for r in results}
    assert not doctor.failures(results), doctor.render_table(results)
    assert by["memcpy"]["memcpy_nodes"] == 0
    assert by["coverage"]["compute_ops"] == 16 and by["coverage"]["quantized_ops"] == 0  # 2 layers x 8 MatMul
    assert by["provider_fallback"]["status"] == PASSED and by["provider_fallback"]["nodes"] > 100
    assert by["input_dependence"]["status"] == PASSED
    assert by["fp16_types"]["status"] == SKIPPED
    table = doctor.render_table(results)
    assert table.count("\n") == len(RAIL_NAMES) + 1


def test_doctor_file_trt_target_skips_ort_only_rails(bert_onnx):
    by = {r["rail"]: r for r in doctor.doctor_file(bert_onnx, target=capabilities_of("trt"))}
    assert by["memcpy"]["status"] == SKIPPED and by["provider_fallback"]["status"] == SKIPPED
    assert by["coverage"]["status"] == PASSED and by["input_dependence"]["status"] == PASSED


def test_rails_run_by_declared_capabilities_not_by_name(bert_onnx):
    """A target the rails have never heard of, described only by its capabilities: each rail runs or is
    skipped by its own applies_to declaration (an ORT session, symmetric int8), whatever the name."""
    from compiler.core.capabilities import TargetCapabilities

    caps = TargetCapabilities("some_new_runtime", runs_onnx=True, ort_session=True, trt_custom_ops=False,
                              symmetric_int8_only=True, gpu=False)
    by = {r["rail"]: r for r in doctor.doctor_file(bert_onnx, target=caps)}
    assert by["memcpy"]["status"] == PASSED and by["provider_fallback"]["status"] == PASSED  # ORT session: probed
    assert by["trt_explicit_quant"]["status"] == SKIPPED and "no Q/DQ nodes" in by["trt_explicit_quant"]["message"]
    trt_like = TargetCapabilities("another", runs_onnx=True, ort_session=False, trt_custom_ops=True,
                                  symmetric_int8_only=False, gpu=True)
    by = {r["rail"]: r for r in doctor.doctor_file(bert_onnx, target=trt_like)}
    assert by["memcpy"]["message"] == ("applies to targets that run an ONNX Runtime session (TensorRT builds the "
                                       "whole graph on the GPU); target=another is not one")
    assert "target=another is not one" in by["trt_explicit_quant"]["message"]


def test_cli_doctor_passes_a_good_graph(qcompile, bert_onnx, tmp_path):
    out = tmp_path / "rails.json"
    r = qcompile("doctor", str(bert_onnx), "target=ort", f"json={out}", timeout=300)
    assert r.rc == 0, r
    for name in RAIL_NAMES:
        assert f"| {name} |" in r.stdout
    assert "0 failed" in r.stdout and "Traceback" not in r.stderr
    saved = json.loads(out.read_text())
    assert [x["rail"] for x in saved] == list(RAIL_NAMES)


def test_cli_doctor_fails_a_baked_constant(qcompile, baked_onnx):
    r = qcompile("doctor", str(baked_onnx), timeout=300)
    assert r.rc == 1, r
    assert "| input_dependence | failed | output(s) sentence_embedding are bit-identical" in r.stdout
    assert "Traceback" not in r.stderr


def test_cli_doctor_fails_a_missing_provider(qcompile, bert_onnx):
    """Asking for CUDA where onnxruntime has none: the silent fallback is named, exit 1."""
    r = qcompile("doctor", str(bert_onnx), "providers=CUDAExecutionProvider", timeout=300)
    assert r.rc == 1, r
    assert "| provider_fallback | failed |" in r.stdout and "CUDAExecutionProvider" in r.stdout


def test_cli_doctor_quantized_graph_expected(qcompile, bert_onnx):
    r = qcompile("doctor", str(bert_onnx), "quantized=true", timeout=300)
    assert r.rc == 1, r
    assert "| coverage | failed | 0 of 16 MatMul/Gemm/Conv are quantized" in r.stdout


@pytest.mark.parametrize("args,rc,text", [
    (["/nonexistent/model.onnx"], 2, "path: /nonexistent/model.onnx is not an ONNX file"),
    (["{onnx}", "max_memcpi=3"], 2, "max_memcpi: unknown doctor option -- did you mean 'max_memcpy'?"),
    (["{onnx}", "target=tensorrt"], 2, "target: bad value 'tensorrt' -- use target=ort or target=trt"),
    (["{onnx}", "max_memcpy=lots"], 2, "doctor.max_memcpy: bad value 'lots' -- expected int"),
    # an unreadable file is a bad argument (exit 2), not a failed build
    (["{garbage}"], 2, "qcompile: recipe error: path: {garbage} is not a readable ONNX model (Error parsing message"),
])
def test_cli_doctor_bad_arguments(qcompile, bert_onnx, tmp_path, args, rc, text):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    args = [a.format(onnx=bert_onnx, garbage=garbage) for a in args]
    r = qcompile("doctor", *args, timeout=300)
    assert r.rc == rc, r
    assert text.format(garbage=garbage) in r.stderr
    assert "Traceback" not in r.stderr and "build" not in r.stderr


@pytest.mark.parametrize("content", [b"\x00\xffnot a protobuf" * 10, b"", b"hello world\n"])
def test_doctor_refuses_a_file_that_is_no_onnx_model_as_a_bad_argument(tmp_path, content):
    """Garbage, an empty file (protobuf reads it as an empty ModelProto) or text: exit 2 naming the path."""
    from compiler.commands import subcommands

    bad = tmp_path / "not-an-onnx-file.onnx"
    bad.write_bytes(content)
    with pytest.raises(RecipeError, match=rf"^path: {bad} is not a readable ONNX model \(.+\) -- give an ONNX file"):
        subcommands.doctor([str(bad)])


def _spec(target="ort", **doctor_cfg):
    return SimpleNamespace(target=TargetConfig(name=target), capabilities=capabilities_of(target), export=ExportConfig(),
                           doctor=DoctorConfig(**doctor_cfg), steps=[])


def test_after_lower_failed_rail_is_a_build_error_naming_it(tiny_bert, bert_onnx, tmp_path):
    from targets.ort import OrtTarget

    target = OrtTarget(TargetConfig())
    engine = target.lower(tiny_bert, bert_onnx, tmp_path)
    report = {"build": {"run_dir": str(tmp_path)}, "steps": {}}
    results = doctor.after_lower(engine, bert_onnx, target, _spec(), report)
    assert [r["rail"] for r in results] == list(RAIL_NAMES) and not doctor.failures(results)
    with pytest.raises(BuildError, match=r"guard rail coverage failed: 0 of 16 MatMul/Gemm/Conv are quantized"):
        doctor.after_lower(engine, bert_onnx, target, _spec(quantized=True), report)
    assert "| coverage | failed |" in (tmp_path / "DOCTOR.md").read_text()
    assert [r["status"] for r in report["doctor"] if r["rail"] == "coverage"] == [FAILED]
    off = doctor.after_lower(engine, bert_onnx, target, _spec(enabled=False), report)
    assert off == [{"rail": "doctor", "status": SKIPPED, "message": "doctor.enabled=false: no guard rail ran"}]


def test_after_export_records_the_export_rails(bert_onnx):
    report = {}
    assert doctor.after_export(bert_onnx, _spec(), report) == bert_onnx
    assert [(r["rail"], r["status"], r["stage"]) for r in report["doctor_export"]] == [
        ("shape_inference", PASSED, "export"), ("size", PASSED, "export")]


def test_build_report_lists_every_rail(qcompile):
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=ort", *FAST)
    assert r.rc == 0, r
    (run,) = r.run_dirs()
    report = json.loads((run / "report.json").read_text())
    assert [x["rail"] for x in report["doctor"]] == list(RAIL_NAMES)
    assert {x["status"] for x in report["doctor"]} <= {PASSED, SKIPPED}
    md = (run / "REPORT.md").read_text()
    assert "## Guard rails" in md and "| input_dependence | passed |" in md


def test_failed_rail_fails_the_build_and_keeps_the_table(qcompile):
    """doctor.quantized=true on the fp32 recipe plants 'a quantized recipe that quantized nothing'."""
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=ort", "doctor.quantized=true", *FAST)
    assert r.rc == 1, r
    assert "guard rail coverage failed" in r.stderr and "Traceback" not in r.stderr
    (run,) = r.run_dirs()
    assert run.name.endswith(".FAILED")
    assert "guard rail coverage failed" in (run / "FAILED.md").read_text()
    assert "| coverage | failed |" in (run / "DOCTOR.md").read_text()
    assert not (run / "report.json").exists() and not (run / "manifest.json").exists()


def test_torch_target_build_rails(qcompile):
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=torch", "bench.enabled=false", *FAST)
    assert r.rc == 0, r
    (run,) = r.run_dirs()
    by = {x["rail"]: x for x in json.loads((run / "report.json").read_text())["doctor"]}
    assert by["coverage"]["compute_ops"] > 0 and by["coverage"]["quantized_ops"] == 0
    assert by["provider_fallback"]["status"] == PASSED and by["input_dependence"]["status"] == PASSED
    assert by["memcpy"]["status"] == SKIPPED and by["size"]["status"] == SKIPPED
