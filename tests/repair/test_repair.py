"""Repair (recipe.repair): a tiny BERT with a PLANTED sensitive layer (the value projection of block 0, one weight
column scaled 300x, so its per-channel int8 weight scales crush the rest of every row) is quantized W8A8; the
sensitivity ranks that layer first by far, the search meets a budget that only its fallback meets, the map is
written into recipe.yaml and a rebuild replays it without searching. An unmet budget exits 3 saying what it would
take; bad settings exit 2 before any weights load."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import FAST, PLANTED_LAYER, finished_run, run_cli

PLANTED = PLANTED_LAYER
# measured (32 sentences, seq 32): all 12 layers int8 -> mean embedding cosine 0.999866 (drop 1.3e-4);
# the planted layer alone in fp32 -> 0.9999977; every other layer in fp32 but the planted one -> 0.999866
BUDGET = 2e-5
ARGS = [*FAST, "bench.enabled=false", "recipe=int8", "target=torch", "recipe.steps.int8.exclude=[]",
        "recipe.repair.enabled=true", "recipe.repair.fallback=fp32",
        # the built-in data is labeled (retrieval pairs): budget the embedding cosine, the metric the planted
        # column damages measurably on a random-init model
        f"recipe.repair.max_fidelity_drop={BUDGET}"]


@pytest.fixture(scope="module")
def repaired(planted_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("repair")
    return cwd, finished_run(cwd, "model=hf", f"model.path={planted_dir}", *ARGS)


def test_planted_layer_ranks_first_and_alone_meets_the_budget(repaired):
    _, run = repaired
    sens = json.loads((run / "sensitivity.json").read_text())
    first, second = sens["layers"][0], sens["layers"][1]
    assert first["name"] == PLANTED and first["role"] == "attention_qkv"
    assert first["gain"] > 1e-4 and first["gain"] > 20 * max(second["gain"], 1e-7), sens["layers"][:3]
    assert sens["chosen"] == [PLANTED] and sens["met"]
    search = {p["fallback_layers"]: p for p in sens["search"]}
    assert search[0]["drop"] > 1e-4  # all quantized: over budget
    assert search[1]["drop"] <= BUDGET
    assert search[1]["weight_bytes"] > search[0]["weight_bytes"]  # one layer back to 4 bytes per weight
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "passed"
    # the build applies the map through the step (not the search's module swap) and measures the same
    assert abs(report["check"]["fidelity"]["embedding_cosine_mean"] - search[1]["metric"]) < 1e-6
    assert set(report["steps"]["int8"]["excluded_layers"]) == {"inner.pooler.dense", PLANTED}
    recipe = OmegaConf.load(run / "recipe.yaml")
    assert dict(recipe.recipe.repair.layers) == {PLANTED: "fp32"}
    assert f"{PLANTED}: {{role: attention_qkv, format: fp32}}" in (run / "layers.yaml").read_text()
    assert (run / "sensitivity.png").stat().st_size > 1000
    md = (run / "REPORT.md").read_text()
    assert "## Repair" in md and "1 of 12 quantized layers fell back" in md


def test_rebuild_replays_the_map_without_searching(repaired):
    cwd, run = repaired
    res = run_cli(cwd, "rebuild", str(run))
    assert res.rc == 0, res
    (again,) = [d for d in (cwd / "outputs" / "rebuild").glob("*/*") if (d / "report.json").exists()]
    rep = json.loads((again / "report.json").read_text())
    assert rep["repair"] == {"replayed": True, "fallback_layers": 1, "layers": {PLANTED: "fp32"}}
    assert "repair" not in rep["timings_s"] or rep["timings_s"]["repair"] < 5
    assert not (again / "sensitivity.json").exists()
    orig = json.loads((run / "report.json").read_text())
    assert rep["check"]["fidelity"] == orig["check"]["fidelity"]
    assert (again / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()


def test_unmet_budget_exits_3_with_what_it_would_take(planted_dir, tmp_path):
    res = run_cli(tmp_path, "model=hf", f"model.path={planted_dir}", *ARGS, "recipe.repair.max_fallback_fraction=0")
    assert res.rc == 3, res
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("qcompile:"))
    assert "budget met with 1 of 12 layers in fp32; max_fallback_fraction=0 allows 0" in line, line
    (run,) = res.run_dirs()
    assert json.loads((run / "sensitivity.json").read_text())["needed"] == 1
    # a status of its own (compiler/core/status.py), in a directory named like a failed gate
    assert json.loads((run / "report.json").read_text())["status"] == "repair budget not met"
    assert run.name.endswith(".gate-failed")


@pytest.mark.parametrize("args,text", [
    (["recipe=int8", "recipe.repair.enabled=true", "recipe.repair.max_task_drop=-0.01"],
     "recipe.repair.max_task_drop: -0.01 is below zero"),
    (["recipe=int8", "recipe.repair.enabled=true", "recipe.repair.max_fallback_fraction=1.5"],
     "recipe.repair.max_fallback_fraction: 1.5 is outside [0, 1]"),
    (["recipe=int8", "target=ort", "export.opset=17", "recipe.repair.enabled=true", "recipe.repair.fallback=fp8"],
     "recipe.repair.fallback: fp8 layers are not runnable on target=ort at export.opset=17"),
    (["recipe=int8", "recipe.repair.enabled=true", "recipe.repair.fallback=bf8"],
     "recipe.repair.fallback: unknown format 'bf8'"),
    (["recipe=nvfp4", "target=torch", "recipe.repair.enabled=true", "recipe.repair.fallback=fp16"],
     "recipe.repair.fallback: step nvfp4 cannot give a layer 'fp16'"),
    (["recipe=fp32", "recipe.repair.enabled=true"], "recipe.repair.enabled: the recipe quantizes nothing"),
    (["recipe=int8", "target=ort", "+recipe.steps.int8_dynamic={}", "recipe.repair.enabled=true"],
     "recipe.repair.enabled: ['int8'] quantize the torch model and ['int8_dynamic'] the ONNX graph on target=ort"),
    (["recipe=int8", "recipe.steps.int8.exclude=[ffn_dwn]"], "recipe.steps.int8.exclude: 'ffn_dwn' is not a layer role"),
])
def test_bad_repair_settings_are_recipe_errors(args, text):
    """Validation (which reads config.json only, never weights) names the key, the value and the fix."""
    from compiler.core.errors import RecipeError
    from compiler.stages.validate import validate
    from tests.conftest import compose

    with pytest.raises(RecipeError) as e:
        validate(compose("model=tiny_bert", *args))
    assert text in str(e.value), str(e.value)


def test_bad_repair_setting_exits_2_before_loading(tmp_path):
    res = run_cli(tmp_path, "model=tiny_bert", "recipe=int8", "recipe.repair.enabled=true",
              "recipe.repair.max_task_drop=-0.01", timeout=300)
    assert res.rc == 2, res
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("qcompile:"))
    assert "recipe.repair.max_task_drop: -0.01 is below zero" in line, line
    assert "Traceback" not in res.stderr and not res.run_dirs()


def test_default_build_runs_no_search(qcompile):
    res = qcompile("model=tiny_bert", "recipe=int8", "target=torch", "bench.enabled=false", *FAST)
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    report = json.loads((run / "report.json").read_text())
    assert "repair" not in report and "repair" not in report["timings_s"]
    assert not (run / "sensitivity.json").exists()


@pytest.mark.parametrize("recipe,target,fallback", [("nvfp4", "torch", "fp8"), ("nvfp4_rotate", "trt", "fp8"),
                                                    ("int8", "torch", "fp32"), ("fp8", "torch", "fp32")])
def test_auto_fallback_from_the_steps_declared_formats(recipe, target, fallback):
    """auto: fp8 under a step narrower than 8 bits that can give layers fp8 (mixed NVFP4/FP8), else fp32."""
    from compiler.stages.validate import validate
    from tests.conftest import compose

    spec = validate(compose("model=tiny_bert", f"recipe={recipe}", f"target={target}", "recipe.repair.enabled=true"))
    assert spec.repair.fallback == fallback


def test_int8_dynamic_on_torch_is_searched(qcompile):
    # torch's dynamic int8 Linear carries no modelopt quantizer: the search must still find its 12 layers and, under
    # a budget the all-int8 model misses, keep layers in fp32 until the metric meets it
    res = qcompile("model=tiny_bert", "recipe=int8_dynamic", "target=torch", "bench.enabled=false", *FAST,
                   "recipe.gate.min_top1_agreement=0", "recipe.repair.enabled=true", "recipe.repair.metric=fidelity",
                   "recipe.repair.max_fidelity_drop=1e-9", "recipe.repair.max_fallback_fraction=1.0")
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    rep = json.loads((run / "report.json").read_text())["repair"]
    assert rep["quantized_layers"] == 12 and rep["met"]
    # the search stops at the first point that meets the budget: every earlier point of its path misses it
    path = rep["search"]
    assert path[0]["fallback_layers"] == 0 and path[0]["drop"] > 1e-9  # all-int8 misses the tight budget
    assert path[-1]["drop"] <= 1e-9 and all(p["drop"] > 1e-9 for p in path[:-1])
    assert rep["fallback_layers"] == path[-1]["fallback_layers"] == len(rep["layers"]) >= 1
    assert set(rep["layers"].values()) == {"fp32"}
    layers = (run / "layers.yaml").read_text()
    assert layers.count("format: fp32") == rep["fallback_layers"] and layers.count("format: int8") == 12 - rep["fallback_layers"]


def test_a_gate_threshold_the_budget_leaves_unmet_decides_the_map(planted_dir, tmp_path):
    """Issue 17 item 2: the budget (max_fidelity_drop=1e-3) holds with no fallback (all-int8 drop 1.3e-4), the
    gate's min_embedding_cosine=0.99998 does not: the search keeps the planted layer in fp32 for the gate, the
    build passes its gate, and report.json / REPORT.md say the gate threshold decided the map."""
    args = [a for a in ARGS if not a.startswith("recipe.repair.max_fidelity_drop=")]
    run = finished_run(tmp_path, "model=hf", f"model.path={planted_dir}", *args,
                       "recipe.repair.max_fidelity_drop=0.001", "recipe.gate.min_embedding_cosine=0.99998")
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "passed" and report["check"]["fidelity"]["embedding_cosine_mean"] >= 0.99998
    rep = report["repair"]
    assert rep["layers"] == {PLANTED: "fp32"} and rep["max_fidelity_drop"] == 0.001
    first, last = rep["search"][0], rep["search"][-1]
    assert first["fallback_layers"] == 0 and first["drop"] <= 0.001 and first["unmet"] == ["embedding_cosine_mean"]
    assert "unmet" not in last and last["conditions"]["embedding_cosine_mean"] >= 0.99998
    decided = "embedding_cosine_mean >= 0.99998 (recipe.gate.min_embedding_cosine=0.99998)"
    assert rep["decided_by"] == [decided]
    assert rep["budget_note"] == ("Repair budget: embedding_cosine_mean drop <= 0.001, set by "
                                  "recipe.repair.max_fidelity_drop=0.001.")
    md = (run / "REPORT.md").read_text()
    assert f"Decided by: {decided}" in md and rep["budget_note"] in md
