"""check.loss_sources (compiler/repair/loss_sources.py): where a 4-bit build's loss comes from. A tiny BERT with a
PLANTED sensitive attention output projection (block 0: one weight column scaled 300x and the value projection's
matching output channel scaled 1/300, the same fp32 function; in NVFP4 that column's block scale crushes the other
15 weights of its block in every row, and the small input channel rounds away in its block) is built NVFP4 on
torch; its attention_output row dominates the role rows, its "both" row is the build's own fidelity drop, a second
build reads the table from the cache without a forward. int4 weight-only shows the activation-only row as n/a; the
switch off, or an int8 build, has no table."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, finished_run, save_planted_tiny_bert

PLANTED = "inner.encoder.layer.0.attention.output.dense"
FEEDER = "inner.encoder.layer.0.attention.self.value"  # context channel 7 is value channel 7, mixed by attention
ARGS = [*FAST, "bench.enabled=false", "recipe=nvfp4", "target=torch"]


@pytest.fixture(scope="module")
def planted_output(tmp_path_factory):
    return save_planted_tiny_bert(tmp_path_factory.mktemp("planted_attn_out") / "tiny_bert", PLANTED, feeder=FEEDER)


@pytest.fixture(scope="module")
def nvfp4_run(planted_output, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("loss_sources")
    return cwd, finished_run(cwd, "model=hf", f"model.path={planted_output}", *ARGS)


def _report(run):
    return json.loads((run / "report.json").read_text())


def test_both_row_is_the_builds_own_fidelity_drop(nvfp4_run):
    from compiler.core.report_types import loss_text

    _, run = nvfp4_run
    report = _report(run)
    ls = report["loss_sources"]
    both = ls["operands"]["both"]
    check = report["check"]["fidelity"]["embedding_cosine_mean"]
    # the same 32 rows in the check's own batches: the same number up to the float64 metric's last digits
    assert ls["rows"] == report["check"]["samples"] == 32
    assert abs(both["metric"] - check) < 1e-9, (both, check)
    assert abs(both["loss"] - (1 - check)) < 1e-9
    assert ls["metric"] == "embedding_cosine_mean" and not ls["cached"]
    # the fp32 reference, then one forward per distinct row: three operand rows and four roles
    assert ls["forwards"] == 1 + 3 + 4
    assert {k: r["layers"] for k, r in ls["roles"].items()} == {
        "attention_qkv": 6, "attention_output": 2, "ffn_up": 2, "ffn_down": 2}
    assert both["layers"] == 12
    for r in (*ls["operands"].values(), *ls["roles"].values()):
        assert r["loss"] > 0 and r.get("not_applicable") is None
    md = (run / "REPORT.md").read_text()
    assert "## Where the 4-bit loss comes from" in md
    assert f"| the build: everything it quantizes | 12 | {loss_text(both['loss'])} | 100% |" in md
    assert ls["reading"] in md


def test_planted_role_dominates_the_role_rows(nvfp4_run):
    _, run = nvfp4_run
    ls = _report(run)["loss_sources"]
    roles = {k: r["loss"] for k, r in ls["roles"].items()}
    others = max(v for k, v in roles.items() if k != "attention_output")
    # measured: attention_output 1.05e-4, then ffn_up 9.7e-6 (unplanted tiny_bert: every role within 3x)
    assert roles["attention_output"] > 5 * others, roles
    # the planted column is a weight outlier: weight rounding carries the loss (measured 1.22e-4 vs 8.7e-6)
    w, a = ls["operands"]["weights_only"]["loss"], ls["operands"]["activations_only"]["loss"]
    assert w > 5 * a, ls["operands"]
    assert ls["reading"].startswith("Weights carry most of the loss")
    assert "attention_output costs most" in ls["reading"]
    assert "algorithm=max" in ls["reading"]


def test_role_rows_quantize_only_that_role(tiny_bert, tiny_data):
    """role_steps keeps every other layer out through with_layer_formats: only the role's layers carry enabled
    quantizers after the step runs; with_operands turns one operand off."""
    import copy

    from compiler.repair.loss_sources import operand_steps, role_steps
    from compiler.steps.base import StepContext
    from compiler.steps.modelopt import enabled_quantizers
    from compiler.steps.nvfp4 import NVFP4Params, NVFP4Step
    from targets.base import capabilities_of
    from tests.conftest import model_exclude

    step = NVFP4Step(NVFP4Params())
    exclude = model_exclude(tiny_bert)
    layers = step.layers(tiny_bert.module, exclude)
    caps = capabilities_of("torch")

    def run(steps):
        module = copy.deepcopy(tiny_bert.module)
        for s in steps:
            module = s.apply_torch(module, StepContext(target=caps, model_info=None, calibration=tiny_data.calibration,
                                                       exclude=exclude, batch_size=8))
        return {n: q for n, q in enabled_quantizers(module).items() if q["weight"] or q["input"]}

    for role in ("attention_qkv", "ffn_down"):
        keep = set(tiny_bert.roles.names(role))
        on = run(role_steps([step], keep, {"nvfp4": layers}))
        assert set(on) == keep, (role, sorted(on))
    weights, _ = operand_steps([step], True, False)
    acts, _ = operand_steps([step], False, True)
    assert {q["weight"] and not q["input"] for q in run(weights).values()} == {True}
    assert {q["input"] and not q["weight"] for q in run(acts).values()} == {True}
    assert len(run(acts)) == len(layers)


def test_second_build_reads_the_cached_table_without_a_forward(nvfp4_run, planted_output, monkeypatch):
    from compiler.repair import loss_sources
    from tests.conftest import run_cli

    cwd, first = nvfp4_run
    calls = []
    real = loss_sources.batch_outputs
    monkeypatch.setattr(loss_sources, "batch_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = run_cli(cwd, "model=hf", f"model.path={planted_output}", *ARGS)
    assert res.rc == 0, res
    (again,) = [d for d in res.run_dirs() if d != first]
    report = _report(again)
    ls = report["loss_sources"]
    assert calls == [] and ls["forwards"] == 0 and ls["cached"], ls
    assert report["cache"]["loss_sources"] == "hit"
    old = _report(first)["loss_sources"]
    assert ls["operands"] == old["operands"] and ls["roles"] == old["roles"] and ls["reading"] == old["reading"]
    assert "read from the cache" in (again / "REPORT.md").read_text()


def test_int4_weight_only_has_no_activation_row(qcompile):
    """target=torch, symmetric int4 (modelopt fake-quant): the activation-only row does not apply; weight-only is
    the build itself (measured once)."""
    res = qcompile("model=tiny_bert", "recipe=int4_weight_only", "target=torch",
                   "recipe.steps.int4_weight_only.is_symmetric=true", "bench.enabled=false", *FAST)
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    report = _report(run)
    ls = report["loss_sources"]
    acts = ls["operands"]["activations_only"]
    assert acts["loss"] is None and acts["metric"] is None and acts["not_applicable"] == "weights only"
    assert ls["operands"]["weights_only"]["metric"] == ls["operands"]["both"]["metric"]
    assert abs(ls["operands"]["both"]["metric"] - report["check"]["fidelity"]["embedding_cosine_mean"]) < 1e-9
    assert ls["forwards"] == 1 + 1 + 4
    assert ls["reading"].startswith("Weights carry all of the loss")
    assert "| 4-bit activations only |  | n/a (weights only) | |" in (run / "REPORT.md").read_text()


def test_int4_on_ort_measures_the_quantized_graph(qcompile):
    """target=ort: the int4 step quantizes the exported graph (MatMulNBits); the table's rows are that graph in
    onnxruntime, so its "both" row is the check's own number."""
    # the recipe's top-1 gate (0.98, set on MiniLM) is for a trained model: random tiny_bert measured 0.969
    res = qcompile("model=tiny_bert", "recipe=int4_weight_only", "target=ort", "bench.enabled=false",
                   "recipe.gate.min_top1_agreement=0.9", *FAST)
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    report = _report(run)
    ls = report["loss_sources"]
    assert ls["measured_on"].startswith("onnxruntime")
    assert ls["operands"]["activations_only"]["not_applicable"] == "weights only"
    assert abs(ls["operands"]["both"]["metric"] - report["check"]["fidelity"]["embedding_cosine_mean"]) < 1e-9
    assert all(r["loss"] is not None for r in ls["roles"].values())


@pytest.mark.parametrize("args", [["recipe=nvfp4", "check.loss_sources=false"], ["recipe=int8"]])
def test_no_table_when_off_or_not_4_bit(qcompile, args):
    res = qcompile("model=tiny_bert", "target=torch", "bench.enabled=false", *FAST, *args)
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    report = _report(run)
    assert "loss_sources" not in report and "loss-sources" not in report["timings_s"]
    assert "loss_sources" not in report["cache"]
    assert "Where the 4-bit loss comes from" not in (run / "REPORT.md").read_text()


def test_four_bit_is_read_from_the_declared_formats():
    from compiler.repair.loss_sources import narrow_steps
    from compiler.steps.int4_weight_only import Int4WeightOnlyStep, Params
    from compiler.steps.int8 import Int8Step
    from compiler.steps.nvfp4 import NVFP4Params, NVFP4Step

    int8 = Int8Step(Int8Step.Params())
    nvfp4, int4 = NVFP4Step(NVFP4Params()), Int4WeightOnlyStep(Params())
    assert narrow_steps([int8]) == [] and narrow_steps([int8, nvfp4]) == [nvfp4] and narrow_steps([int4]) == [int4]
    # an int8 step whose layers were given fp8 by a map is still 8-bit; nvfp4 with fp8 layers still 4-bit
    assert narrow_steps([int8.with_layer_formats({"x": "fp8"})]) == []
    assert narrow_steps([nvfp4.with_layer_formats({"x": "fp8"})])


def test_bad_switch_value_is_a_recipe_error():
    from compiler.core.errors import RecipeError
    from compiler.stages.validate import validate
    from tests.conftest import compose

    with pytest.raises(RecipeError) as e:
        validate(compose("model=tiny_bert", "recipe=nvfp4", "target=torch", "check.loss_sources=maybe"))
    assert "check.loss_sources: bad value 'maybe' -- expected bool" in str(e.value), str(e.value)


def test_a_distilled_build_measures_its_table_before_the_training(planted_output, nvfp4_run, tmp_path):
    """recipe=nvfp4_distill: the table leaves the training step out (it would train once per row and needs the
    teacher): its rows are the post-training quantization's, the same as plain nvfp4 (max rounding here) on the same
    rows, while the check measures the trained model; the reading says so. (Without the recipe's reorder step, so that
    the post-training model is plain nvfp4's.)"""
    _, plain = nvfp4_run
    run = finished_run(tmp_path, "model=hf", f"model.path={planted_output}", *FAST, "bench.enabled=false",
                       "recipe=nvfp4_distill", "~recipe.steps.reorder", "target=torch", "recipe.steps.nvfp4.algorithm=max",
                       "recipe.steps.distill.max_steps=20", "recipe.steps.distill.lr=1e-3",
                       "recipe.steps.distill.batch_size=8")
    report, before = _report(run), _report(plain)["loss_sources"]
    ls = report["loss_sources"]
    assert ls["operands"]["both"]["metric"] == pytest.approx(before["operands"]["both"]["metric"], abs=1e-9)
    assert {k: r["loss"] for k, r in ls["roles"].items()} == pytest.approx(
        {k: r["loss"] for k, r in before["roles"].items()}, abs=1e-9)
    # the check measures the trained model: not the table's "both" row
    assert report["check"]["fidelity"]["embedding_cosine_mean"] != pytest.approx(ls["operands"]["both"]["metric"],
                                                                                abs=1e-9)
    assert report["distill"]["fidelity_before"] == pytest.approx(ls["operands"]["both"]["metric"], abs=1e-3)
    assert ls["reading"].endswith("Measured before distill: the rows quantize without the training, the check "
                                  "measures the trained model.")
    assert report["distill"]["steps"] == 20
