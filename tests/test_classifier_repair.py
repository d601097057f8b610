"""The classifier goal of issue 12 on the trained sentiment classifier (tests/classifier_fixture.py): nvfp4 with
repair budgeting classification accuracy against the gold labels keeps label agreement >= 0.99 and the accuracy
drop <= 1 point on the 140 held-out rows; the search's fp32 reference is the check's fp32 accuracy (same rows).
bench/classifier_repair.py prints the same builds with and without repair."""

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # a classifier training (session fixture) and a full nvfp4 build: ~1-2 min


def test_nvfp4_repair_on_the_classifier_meets_the_accuracy_budget(sentiment_classifier, tmp_path):
    model_dir, train_tsv, held_out_tsv = sentiment_classifier
    args = ["model=hf", f"model.path={model_dir}", "model.task=classification", "recipe=nvfp4", "target=torch",
            f"data.calibration_file={train_tsv}", f"data.evaluation_file={held_out_tsv}",
            "data.calibration_samples=64", "data.evaluation_samples=1000", "data.seq_len=16", "bench.seq_len=16",
            "bench.enabled=false",
            "recipe.repair.enabled=true", "recipe.repair.max_task_drop=0.01", "recipe.repair.ranking_samples=1000"]
    res = run_cli(tmp_path, *args)
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    report = json.loads((run / "report.json").read_text())
    repair, check = report["repair"], report["check"]
    acc = check["task"]["metrics"]["accuracy"]
    assert repair["metric"] == "classification accuracy" and repair["max_task_drop"] == 0.01
    # the search scored the same 140 rows against the same gold labels as the check
    assert check["task"]["examples"] == 140
    assert repair["reference"] == pytest.approx(acc["fp32"], abs=1e-12)
    assert acc["fp32"] >= 0.8  # measured 0.9214 (seed 0)
    assert check["fidelity"]["label_agreement"] >= 0.99
    assert acc["drop"] <= 0.01
    final = next(p for p in repair["search"] if p["fallback_layers"] == repair["fallback_layers"])
    assert final["metric"] == pytest.approx(acc["target"], abs=1e-6)  # the map built measures what was searched
    sens = json.loads((run / "sensitivity.json").read_text())
    assert sens["metric"] == "classification accuracy" and sens["reference"] == pytest.approx(acc["fp32"])
