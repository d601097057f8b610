"""The spine's stage functions on a tiny model: data, export, check, bench, report, manifest."""

import contextlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.numerics.metrics import embedding_fidelity
from compiler.stages.check import gate_failures, run_check
from compiler.core.feeds import synthetic_feed
from compiler.stages.data import load_data
from compiler.core.errors import BuildError, RecipeError
from compiler.graph.io import op_histogram, save_onnx
from compiler.stages.export import export_onnx
from compiler.rundir.manifest import read_manifest, write_manifest
from compiler.stages.report import render_markdown, write_report
from compiler.runners.callable import CallableRunner, torch_predictor
from compiler.core.schema import ExportConfig, GateConfig
from conftest import data_cfg


def test_data_tokenizes_to_fixed_length(tiny_bert, tiny_data):
    cal, ev = tiny_data.calibration, tiny_data.evaluation
    assert len(cal) == 16 and len(ev) == 32
    assert set(cal.arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    assert cal.arrays["input_ids"].shape == (16, 32) and cal.arrays["input_ids"].dtype == np.int64
    assert (cal.arrays["input_ids"][:, 0] == 101).all()  # [CLS]
    assert cal.texts[0] != ev.texts[0]
    assert len(list(ev.batches(8))) == 4


def test_data_clamps_or_errors_when_short(tmp_path, tiny_bert, caplog):
    f = tmp_path / "three.txt"
    f.write_text("one sentence here.\nanother one.\nand a third.\n")
    d = load_data(data_cfg(calibration_file=str(f), calibration_samples=10, evaluation_samples=4, seq_len=16),
                  tiny_bert.tokenizer, tiny_bert.input_names)
    assert len(d.calibration) == 3
    assert "has only 3 sentences" in caplog.text
    with pytest.raises(RecipeError, match=r"data.calibration_samples: 10 samples asked but three.txt has 3"):
        load_data(data_cfg(calibration_file=str(f), calibration_samples=10, on_short_data="error"),
                  tiny_bert.tokenizer, tiny_bert.input_names)


def test_data_sha_changes_with_one_sentence(tmp_path, tiny_bert):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the cat sat on the mat.\nit rained all day.\n")
    b.write_text("the cat sat on the mat.\nit rained all night.\n")
    da = load_data(data_cfg(calibration_file=str(a), calibration_samples=2), tiny_bert.tokenizer, tiny_bert.input_names)
    db = load_data(data_cfg(calibration_file=str(b), calibration_samples=2), tiny_bert.tokenizer, tiny_bert.input_names)
    assert da.files_sha256["calibration"] != db.files_sha256["calibration"]
    assert da.calibration.sha256() != db.calibration.sha256()


@pytest.mark.parametrize("model_name,exporter", [("tiny_bert", "torchscript"), ("tiny_modernbert", "torchscript"),
                                                 ("tiny_bert", "dynamo"), ("tiny_modernbert", "dynamo")])
def test_export_matches_torch_with_dynamic_axes(model_name, exporter, tmp_path, request):
    model = request.getfixturevalue(model_name)
    path = export_onnx(model.module, model.input_names, model.output_names, tmp_path / "m.onnx",
                       ExportConfig(exporter=exporter))
    onnx.checker.check_model(str(path))
    ops = op_histogram(path)
    assert ops.get("MatMul", 0) >= 8  # q, k, v, o, 2 ffn per layer x 2 layers
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predict = torch_predictor(model.module, model.input_names, model.output_names)
    for batch, seq in ((1, 7), (3, 40)):  # shapes other than the export's (2, 16)
        feed = synthetic_feed(model.input_names, batch, seq, seed=batch)
        feed["attention_mask"][:, seq // 2:] = 0  # padded
        ref = predict(feed)
        got = dict(zip(model.output_names, sess.run(model.output_names, feed)))
        for n in model.output_names:
            np.testing.assert_allclose(got[n], ref[n], atol=1e-4, rtol=1e-4)


def test_save_onnx_uses_external_data_when_asked(tmp_path, tiny_bert):
    path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "m.onnx",
                       ExportConfig(external_data="always"))
    assert (tmp_path / "m.onnx.data").stat().st_size > 1_000_000
    assert path.stat().st_size < 200_000
    (tmp_path / "again").mkdir()
    again = save_onnx(onnx.load(str(path)), tmp_path / "again" / "m.onnx", "always")  # deterministic bytes
    assert (tmp_path / "again" / "m.onnx.data").read_bytes() == (tmp_path / "m.onnx.data").read_bytes()
    assert again.read_bytes() == path.read_bytes()


def test_export_failure_is_a_build_error(tmp_path, tiny_bert):
    import torch

    class Broken(torch.nn.Module):
        def forward(self, input_ids, attention_mask, token_type_ids):
            raise RuntimeError("planted failure")

    with pytest.raises(BuildError, match=r"export \(torchscript, opset 17\) failed: RuntimeError: planted failure"):
        export_onnx(Broken(), tiny_bert.input_names, tiny_bert.output_names, tmp_path / "x.onnx", ExportConfig())


def test_embedding_metrics_on_known_values():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 16))
    m = embedding_fidelity(ref, ref)
    assert m["embedding_cosine_mean"] == pytest.approx(1.0) and m["top1_agreement"] == 1.0
    flipped = ref.copy()
    flipped[0] *= -1
    m2 = embedding_fidelity(ref, flipped)
    assert m2["embedding_cosine_min"] == pytest.approx(-1.0)
    assert m2["embedding_cosine_mean"] == pytest.approx((19 - 1) / 20)


def test_check_passes_identical_and_fails_perturbed(tiny_bert, tiny_data):
    predict = torch_predictor(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names)
    feeds = list(tiny_data.evaluation.batches(8))
    ref = CallableRunner(predict, tiny_bert.input_names, tiny_bert.output_names, name="ref")
    same = CallableRunner(predict, tiny_bert.input_names, tiny_bert.output_names, name="same")
    ok = run_check(ref, same, feeds, "embedding", GateConfig())
    assert ok["passed"] and ok["samples"] == 32
    assert ok["per_output"]["sentence_embedding"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(0)

    def noisy(feed):
        out = predict(feed)
        out["last_hidden_state"] = out["last_hidden_state"] + rng.normal(0, 2.0, out["last_hidden_state"].shape)
        return out

    bad = CallableRunner(noisy, tiny_bert.input_names, tiny_bert.output_names, name="noisy")
    res = run_check(ref, bad, feeds, "embedding", GateConfig())
    assert not res["passed"]
    assert res["gate_failures"][0].startswith("output last_hidden_state: cosine 0.")
    assert "< 0.98" in res["gate_failures"][0]


def test_check_skips_only_polygraphy_hidden_stats_log(tiny_bert, tiny_data, monkeypatch):
    """The check skips Polygraphy's statistics log while it is hidden: its numbers are those of a check that
    formats them (the statistics come from the compare results), the log function is called by Polygraphy and
    is Polygraphy's own again afterwards."""
    from polygraphy.comparator import util as comp_util

    from compiler.stages import check

    predict = torch_predictor(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names)
    feeds = list(tiny_data.evaluation.batches(8))
    rng = np.random.default_rng(0)
    noise = {}

    def noisy(feed):  # the same noise on every call: both checks compare the same outputs
        out = predict(feed)
        key = feed["input_ids"].tobytes()
        noise.setdefault(key, rng.normal(0, 0.01, out["last_hidden_state"].shape))
        out["last_hidden_state"] = out["last_hidden_state"] + noise[key]
        return out

    def runners():
        return (CallableRunner(predict, tiny_bert.input_names, tiny_bert.output_names, name="ref"),
                CallableRunner(noisy, tiny_bert.input_names, tiny_bert.output_names, name="noisy"))

    original = comp_util.log_output_stats
    skipped = run_check(*runners(), feeds, "embedding", GateConfig())
    assert comp_util.log_output_stats is original
    formatted = []
    monkeypatch.setattr(check, "_unlogged_output_stats", contextlib.nullcontext)
    monkeypatch.setattr(comp_util, "log_output_stats", lambda *a, **k: formatted.append(original(*a, **k)))
    logged = run_check(*runners(), feeds, "embedding", GateConfig())
    assert formatted  # Polygraphy does call it: without the skip it formats the statistics
    assert skipped["per_output"] == logged["per_output"] and skipped["fidelity"] == logged["fidelity"]
    assert skipped["per_output"]["last_hidden_state"]["max_absdiff"] > 0


def test_gate_failure_messages_name_metric_and_shortfall():
    fails = gate_failures({"y": {"cosine_mean": 0.95, "tolerance_passed": True}},
                          {"embedding_cosine_mean": 0.97, "top1_agreement": 0.5}, GateConfig())
    assert fails == ["output y: cosine 0.95000 < 0.98 (short by 0.03000)",
                     "fidelity: mean embedding cosine 0.97000 < 0.99 (short by 0.02000)",
                     "fidelity: retrieval top-1 agreement 0.5000 < 0.9 (short by 0.4000)"]


def test_report_and_manifest(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    # a whole report (the writer refuses one that lacks a section every build has: compiler/core/report_types.py)
    report = {"build": {"model": "m", "recipe": "r", "target": "ort", "run_dir": str(tmp_path)}, "status": "passed",
              "gate": {}, "steps": {}, "timings_s": {}, "notes": [],
              "check": {"samples": 4, "per_output": {"y": {"cosine_mean": 0.999, "cosine_min": 0.99, "iterations": 1,
                                                          "max_absdiff": 0.1, "tolerance_passed": True}},
                        "fidelity": {"embedding_cosine_mean": 0.995, "top1_agreement": 1.0}, "gate_failures": [],
                        "passed": True},
              "bench": {"latency_ms_p50": 1.5, "latency_ms_p90": float("nan"), "latency_ms_mean": 1.5,
                        "ms_per_sample": 1.5, "samples_per_s": 666.0, "iterations": 2, "shapes": "fixed",
                        "batch_size": 1, "seq_len": 8, "threads": 1, "rounds": 1, "cpu_ms_p50": 1.4,
                        "peak_rss_mb": 100.0, "peak_rss_increase_mb": 1.0, "artifact_bytes": 2_000_000,
                        "artifact_mb": 2.0, "baseline": "none: bench.baseline=none", "baseline_kind": "none"}}
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["bench"]["latency_ms_p90"] == "nan"
    md = (tmp_path / "REPORT.md").read_text()
    assert "| y | 0.999000 |" in md and "Gate: passed." in md
    write_manifest(tmp_path, {"weights_sha256": "ab"}, seed=3)
    man = read_manifest(tmp_path)
    import hashlib

    assert man["artifacts"] == {"model.onnx": hashlib.sha256(b"graph").hexdigest()}
    assert man["seed"] == 3 and "torch" in man["versions"] and "onnxruntime" in man["versions"]


def test_report_markdown_lists_gate_failures():
    md = render_markdown({"build": {}, "status": "gate failed", "reason": "x",
                          "check": {"per_output": {}, "fidelity": {}, "gate_failures": ["output y: cosine 0.5 < 0.9"]}})
    assert "### Gate failures" in md and "- output y: cosine 0.5 < 0.9" in md
