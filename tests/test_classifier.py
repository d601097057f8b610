"""Classification task metrics on a trained sentiment classifier (tests/classifier_fixture.py): fp32 accuracy
against a hand computation from the logits, planted label flips, planted target damage against the gate, and a
whole int8_static build on ONNX Runtime reporting fp32 / target / drop."""

import json

import numpy as np
import pytest
from conftest import FAST, data_cfg, model_cfg

from compiler.core.schema import GateConfig
from compiler.runners.callable import CallableRunner, torch_predictor
from compiler.stages.check import run_check
from compiler.stages.data import load_data
from compiler.stages.models import label_names, load_model

# the trained classifier (a session fixture, ~30-65 s) is shared with test_classifier_repair.py in the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier(sentiment_classifier):
    model_dir, train_tsv, held_out_tsv = sentiment_classifier
    cfg = model_cfg("hf", path=str(model_dir), task="classification")
    model = load_model(cfg)
    data = load_data(data_cfg(calibration_file=str(train_tsv), evaluation_file=str(held_out_tsv),
                              calibration_samples=64, evaluation_samples=1000, seq_len=16),
                     model.tokenizer, model.input_names, label_names=label_names(cfg))
    return model, data, held_out_tsv


def _logits(model, data):
    predict = torch_predictor(model.module, model.input_names, model.output_names)
    return np.concatenate([predict(f)["logits"] for f in data.evaluation.batches(32)])


def test_label_set_is_read_from_the_config(sentiment_classifier):
    cfg = model_cfg("hf", path=str(sentiment_classifier[0]), task="classification")
    assert label_names(cfg) == {0: "negative", 1: "positive"}


def test_held_out_accuracy_is_clearly_above_chance_and_matches_the_logits(classifier):
    model, data, held_out_tsv = classifier
    labels = data.evaluation_labels
    assert labels.task == "classification" and len(labels) == 140 and labels.label_names == ("negative", "positive")
    gold_names = [ln.split("\t")[1] for ln in held_out_tsv.read_text().splitlines()[1:]]
    np.testing.assert_array_equal(labels.labels, [{"negative": 0, "positive": 1}[g] for g in gold_names])
    logits = _logits(model, data)
    hand = float(np.mean(np.argmax(logits, axis=1) == labels.labels))
    assert hand >= 0.8  # measured 0.921 (seed 0): the classifier learned the task, its logits mean something
    predict = torch_predictor(model.module, model.input_names, model.output_names)
    runner = CallableRunner(predict, model.input_names, model.output_names, name="ref")
    same = CallableRunner(predict, model.input_names, model.output_names, name="same")
    res = run_check(runner, same, list(data.evaluation.batches(32)), "classification", GateConfig(), labels=labels)
    acc = res["task"]["metrics"]["accuracy"]
    assert acc["fp32"] == pytest.approx(hand) and acc["target"] == pytest.approx(hand) and acc["drop"] == 0.0
    assert res["fidelity"] == {"label_agreement": 1.0, "kl_target_reference_mean": 0.0, "max_abs_logit_diff": 0.0}
    assert "cosine_mean" not in res["per_output"]["logits"]  # no cosine of logits for a classifier
    assert res["passed"]


def test_planted_label_flips_change_accuracy_by_the_expected_amount(classifier, tmp_path):
    model, data, held_out_tsv = classifier
    logits = _logits(model, data)
    right = np.argmax(logits, axis=1) == data.evaluation_labels.labels
    lines = held_out_tsv.read_text().splitlines()
    flip = [i for i in range(len(right)) if right[i]][:7]  # 7 rows the model gets right get the wrong label
    for i in flip:
        text, lab = lines[i + 1].split("\t")
        lines[i + 1] = f"{text}\t{'negative' if lab == 'positive' else 'positive'}"
    flipped = tmp_path / "flipped.tsv"
    flipped.write_text("\n".join(lines) + "\n")
    cfg = model_cfg("hf", path=str(held_out_tsv.parent / "model"), task="classification")
    data2 = load_data(data_cfg(evaluation_file=str(flipped), evaluation_samples=1000, seq_len=16, calibration_samples=4),
                      model.tokenizer, model.input_names, label_names=label_names(cfg))
    from compiler.numerics.metrics import task_metric

    before = task_metric(data.evaluation_labels, logits, "accuracy")
    after = task_metric(data2.evaluation_labels, logits, "accuracy")
    assert before - after == pytest.approx(7 / 140)


def test_gate_names_metric_values_drop_and_budget(classifier):
    model, data, _ = classifier
    predict = torch_predictor(model.module, model.input_names, model.output_names)
    labels = data.evaluation_labels
    seen = {"n": 0}

    def damaged(feed):  # planted: the target swaps the two logits of every 10th example
        out = predict(feed)
        n = len(out["logits"])
        rows = [i for i in range(n) if (seen["n"] + i) % 10 == 0]
        out["logits"][rows] = out["logits"][rows][:, ::-1]
        seen["n"] += n
        return out

    ref = CallableRunner(predict, model.input_names, model.output_names, name="ref")
    bad = CallableRunner(damaged, model.input_names, model.output_names, name="bad")
    gate = GateConfig(max_task_drop=0.005, min_top1_agreement=0.5)
    res = run_check(ref, bad, list(data.evaluation.batches(32)), "classification", gate, labels=labels)
    acc = res["task"]["metrics"]["accuracy"]
    assert res["fidelity"]["label_agreement"] == pytest.approx(1 - 14 / 140)
    assert acc["drop"] == pytest.approx(acc["fp32"] - acc["target"]) and acc["drop"] > 0.005
    lo, hi = acc["drop_ci95"]
    assert lo <= acc["drop"] <= hi
    (fail,) = res["gate_failures"]
    assert fail == (f"task: classification accuracy dropped {acc['drop']:.4f} (fp32 {acc['fp32']:.4f} -> target "
                    f"{acc['target']:.4f}, 95% interval of the drop [{lo:.4f}, {hi:.4f}]) > max_task_drop 0.005")
    f1 = run_check(ref, bad, list(data.evaluation.batches(32)), "classification",
                   GateConfig(max_task_drop=1.0, task_metric="macro_f1", min_top1_agreement=0.95), labels=labels)
    assert f1["task"]["metric"] == "macro_f1" and f1["gate_failures"] == [
        "fidelity: label agreement 0.9000 < 0.95 (short by 0.0500)"]


def test_int8_static_build_reports_accuracy_fp32_target_and_drop(qcompile, sentiment_classifier):
    model_dir, train_tsv, held_out_tsv = sentiment_classifier
    res = qcompile("model=hf", f"model.path={model_dir}", "model.task=classification", "recipe=int8_static",
                   "target=ort", *FAST, f"data.calibration_file={train_tsv}", f"data.evaluation_file={held_out_tsv}",
                   "data.evaluation_samples=140", "recipe.gate.max_task_drop=0.03")
    assert res.rc == 0, res
    (run_dir,) = res.run_dirs()
    report = json.loads((run_dir / "report.json").read_text())
    task = report["check"]["task"]
    assert task["task"] == "classification" and task["metric"] == "accuracy" and task["examples"] == 140
    acc = task["metrics"]["accuracy"]
    assert acc["fp32"] >= 0.8 and abs(acc["drop"]) <= 0.03, acc
    assert report["check"]["fidelity"]["label_agreement"] >= 0.95
    assert set(report["check"]["fidelity"]) == {"label_agreement", "kl_target_reference_mean", "max_abs_logit_diff"}
    assert report["data"]["evaluation_task"] == "classification"
    md = (run_dir / "REPORT.md").read_text()
    assert "### Task metrics against gold labels (classification, 140 examples)" in md
    assert "| label agreement with fp32 |" in md and "embedding cosine" not in md
    assert f"task metric: classification accuracy: fp32 {acc['fp32']:.4f} / target {acc['target']:.4f}" in res.stdout
