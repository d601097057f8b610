"""End-to-end CLI builds of the spine's recipes (fp32, fp16, int8_dynamic, int8_static) for both targets
(torch, ort) on both tiny models, with the numbers read back from each run's report. The 16 builds run as one
Hydra multirun (`qcompile -m ...`, one process: ~45 s instead of ~4 min of 16 interpreter start-ups), which
also checks that a sweep writes one finished run directory per combination; one build also runs alone."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import FAST, run_cli

MODELS = ["tiny_bert", "tiny_modernbert"]
RECIPES = ["fp32", "fp16", "int8_dynamic", "int8_static"]
TARGETS = ["torch", "ort"]

# Lowest mean embedding cosine to fp32 measured on the tiny models, per recipe, minus a margin: tiny_bert
# int8_static on ort is the worst at 0.99991 (seq 32, 16 calibration sentences). These are much tighter
# than the recipes' gates, which are set for the real model (minilm int8_static: 0.990).
TINY_BOUND = {"fp32": 0.99999, "fp16": 0.9999, "int8_dynamic": 0.9995, "int8_static": 0.9995}

# Retrieval top-1 agreement is meaningless on a random-initialized model: tiny_bert's 32 evaluation embeddings
# all lie within cosine 0.93-0.985 of each other and a sentence's nearest and second-nearest neighbours differ
# by a median 2e-3, so an int8 error of 1e-4 flips some (measured 0.875 for int8_static on ort, 1.0 on
# minilm for every recipe). The tiny builds gate on cosines only.
TINY = FAST + ["recipe.gate.min_top1_agreement=0.5"]

STEP_OF = {"fp16": "fp16", "int8_dynamic": "int8_dynamic", "int8_static": "int8_static"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`qcompile -m model=... recipe=... target=...` over the whole matrix, once for the module."""
    cwd = tmp_path_factory.mktemp("spine")
    args = ["-m", f"model={','.join(MODELS)}", f"recipe={','.join(RECIPES)}", f"target={','.join(TARGETS)}", *TINY]
    return run_cli(cwd, *args)


@pytest.mark.slow  # the 16-build matrix (~45 s quiet); test_single_build keeps one whole build in the fast tier
def test_sweep_writes_one_finished_run_per_combination(sweep):
    assert sweep.rc == 0, sweep
    names = sorted(d.name.split("_", 1)[1] for d in sweep.run_dirs())
    assert names == sorted(f"{m}_{r}_{t}" for m in MODELS for r in RECIPES for t in TARGETS)


def test_single_build(qcompile):
    res = qcompile("model=tiny_modernbert", "recipe=int8_static", "target=ort", *TINY)
    assert res.rc == 0, res
    (run_dir,) = res.run_dirs()
    check_run(run_dir, "tiny_modernbert", "int8_static", "ort")


@pytest.mark.slow  # reads the matrix sweep's runs
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", MODELS)
def test_build(sweep, model, recipe, target):
    assert sweep.rc == 0, sweep
    (run_dir,) = [d for d in sweep.run_dirs() if d.name.endswith(f"_{model}_{recipe}_{target}")]
    check_run(run_dir, model, recipe, target)


def check_run(run_dir, model, recipe, target):
    assert run_dir.name.endswith(f"_{model}_{recipe}_{target}"), run_dir.name  # finished: not .partial/.FAILED
    report = json.loads((run_dir / "report.json").read_text())
    files = ["report.json", "REPORT.md", "manifest.json", "recipe.yaml"]
    # target=torch: the exported program (int8_static too: the lowering runs modelopt's W8A8 as int8 products)
    files += ["model.onnx", "engine.ort.onnx"] if target == "ort" else ["engine.pt2"]
    for name in files:
        assert (run_dir / name).is_file(), name
    if target == "torch":
        assert not (run_dir / "model.onnx").exists()
        assert report["lower"]["artifact"] == "exported_program"

    resolved = OmegaConf.load(run_dir / "recipe.yaml")
    assert resolved.recipe.name == recipe
    gate = resolved.recipe.gate
    task = report["check"]["fidelity"]
    assert report["status"] == "passed" and report["check"]["gate_failures"] == []
    assert task["embedding_cosine_mean"] >= gate.min_embedding_cosine
    assert task["embedding_cosine_mean"] >= TINY_BOUND[recipe], task
    for name, stats in report["check"]["per_output"].items():
        assert stats["cosine_mean"] >= gate.min_output_cosine, (name, stats)
    assert "Gate: passed." in (run_dir / "REPORT.md").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {f for f in files if f not in ("manifest.json", "report.json", "REPORT.md")} <= set(manifest["artifacts"])

    if recipe == "fp32":
        assert report["steps"] == {}
        return
    step = report["steps"][STEP_OF[recipe]]
    assert step["where"] == ("torch" if target == "torch" else "onnx")
    ops = report["onnx"]["ops"] if target == "ort" else {}
    if recipe == "int8_static" and target == "ort":
        # on ort the recipe keeps no Linear fp32 (exclude_on_ort: []; trt and torch keep the first FFN down
        # projection), the attention products stay fp32 and every quantized MatMul is fused with its bias
        assert step["exclude_from"] == "exclude_on_ort" and step["excluded_nodes"] == 0
        assert step["quantized"] == step["total"] - step.get("activation_products_fp32", 0)
        assert step["total"] > 0 and step["embedding_gathers_quantized"] >= 1
        assert ops["QuantizeLinear"] > 0 and 0 < ops["com.microsoft::MatMulIntegerToFloat"] <= step["quantized"]
    elif recipe == "int8_static":
        assert step["delegated_to"].startswith("int8 (modelopt W8A8")
        assert step["quantized_layers"] > 0
        # the step leaves modelopt's calibrated fake-quant; on the CPU the lowering runs it as int8 products
        assert step["kernels"] == "fake_quant" and report["lower"]["kernels"]["mode"] == "real"
        assert report["lower"]["kernels"]["cpu_int8_linear"] == step["quantized_layers"]
    elif recipe == "int8_dynamic" and target == "ort":
        assert ops["MatMulInteger"] == step["quantized"] > 0
    elif recipe == "int8_dynamic":
        assert step["quantized"] > 0 and step["backend"] == "torchao Int8DynamicActivationInt8WeightConfig"
        assert step["kernels"] == report["lower"]["kernels"]["mode"] == "real"
    elif recipe == "fp16" and target == "ort":
        assert step["attempts"] >= 1
        if model == "tiny_modernbert":  # the rotary angle subgraph, kept fp32
            assert step["blocked_ops"]["Sin"] == 1 and step["blocked_ops"]["Cos"] == 1
        assert report["onnx"]["bytes"] < 0.6 * report["model"]["parameters"] * 4  # fp16 weights: about half
    else:
        assert step["dtype"] == "float16"
