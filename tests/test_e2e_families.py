"""Every shipped recipe builds on four model families that name their layers differently (BERT, DistilBERT,
RoBERTa, ModernBERT): the recipes choose layers by role in the graph (compiler/graph/roles.py), so the same
recipe keeps / rotates the same kind of layer on each. Two multiruns (ort, torch) of tiny models, fast settings."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, run_cli

FAMILIES = ["tiny_bert", "tiny_distilbert", "tiny_roberta", "tiny_modernbert"]
ORT = ["fp32", "fp16", "int8_dynamic", "int8_static", "fp8"]
TORCH = ["int8", "int8_smoothquant", "int8_weight_only", "nvfp4", "nvfp4_rotate"]
# tiny random models: retrieval top-1 agreement is noise (see tests/test_e2e_spine.py); gate on cosines only
ARGS = [*FAST, "recipe.gate.min_top1_agreement=0.0", "bench.enabled=false", "export.opset=19"]

pytestmark = pytest.mark.slow  # 40 builds in two multiruns (~70 s quiet)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(model, recipe, target): report} of both multiruns."""
    out = {}
    for target, recipes in (("ort", ORT), ("torch", TORCH)):
        cwd = tmp_path_factory.mktemp(f"families_{target}")
        args = ["-m", f"model={','.join(FAMILIES)}", f"recipe={','.join(recipes)}", f"target={target}", *ARGS]
        if target == "torch":
            args.remove("export.opset=19")  # nvfp4 asks for opset 23 itself
        res = run_cli(cwd, *args)
        assert res.rc == 0, res
        for d in res.run_dirs():
            report = json.loads((d / "report.json").read_text())
            b = report["build"]
            out[(b["model"], b["recipe"], b["target"])] = report
    return out


def test_every_recipe_passes_on_every_family(runs):
    want = {(m, r, "ort") for m in FAMILIES for r in ORT} | {(m, r, "torch") for m in FAMILIES for r in TORCH}
    assert set(runs) == want
    assert all(rep["status"] == "passed" for rep in runs.values()), {k: v.get("reason") for k, v in runs.items()}


@pytest.mark.parametrize("model", FAMILIES)
def test_roles_found_on_every_family(runs, model):
    roles = runs[(model, "fp32", "ort")]["model"]["layer_roles"]
    qkv = 2 if model == "tiny_modernbert" else 6  # ModernBERT fuses q, k, v into one Wqkv per block
    assert {k: v for k, v in roles.items() if k != "head"} == {"attention_qkv": qkv, "attention_output": 2,
                                                               "ffn_up": 2, "ffn_down": 2}


@pytest.mark.parametrize("model", FAMILIES)
def test_role_choices_pick_the_same_layers_on_every_family(runs, model):
    # int8 / int8_smoothquant keep every FFN down-projection fp32 (exclude: [ffn_down]) and the head (model.exclude)
    for recipe in ("int8", "int8_smoothquant"):
        step = runs[(model, recipe, "torch")]["steps"][recipe]
        heads = runs[(model, recipe, "torch")]["model"]["layer_roles"].get("head", 0)
        assert len(step["excluded_layers"]) == 2 + heads, step["excluded_layers"]
    # nvfp4_rotate rotates the attention-output inputs, online: one per block (2)
    rotate = runs[(model, "nvfp4_rotate", "torch")]["steps"]["rotate"]
    assert (rotate["rotated_layers"], rotate["online_rotations"]) == (2, 2)
    # int8_static on ort keeps no encoder layer out (the recipe's exclude_on_ort: []; its `exclude`, the first
    # block's FFN down-projection, is for trt and torch; role selection of ONNX nodes: tests/steps/test_int8_static.py)
    step = runs[(model, "int8_static", "ort")]["steps"]["int8_static"]
    assert step["exclude_from"] == "exclude_on_ort"
    assert not any("layer" in n for n in step.get("excluded_node_names", [])), step
