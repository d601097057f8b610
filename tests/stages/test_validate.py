"""Validation: every recipe error names the key, the bad value and the fix, before any weights load."""

from dataclasses import dataclass

import pytest
from conftest import compose
from omegaconf import OmegaConf

from compiler.core.errors import NotRunnableError, RecipeError
from compiler.core.paths import RECIPES_DIR
from compiler.stages.validate import validate
from compiler.steps.base import (
    ONNX,
    STEP_REGISTRY,
    TORCH,
    Step,
    StepParams,
    load_all_steps,
)


def _err(*overrides, edit=None) -> str:
    cfg = compose(*overrides)
    if edit:
        edit(cfg)
    with pytest.raises(RecipeError) as info:
        validate(cfg)
    return str(info.value)


def test_valid_recipe_gives_typed_spec():
    spec = validate(compose("model=tiny_bert", "recipe=fp32", "target=ort", "data.seq_len=64"))
    assert spec.model.name == "tiny_bert"
    assert spec.data.seq_len == 64
    assert spec.target.name == "ort"
    assert spec.steps == []
    assert spec.gate.min_embedding_cosine == pytest.approx(0.9999)
    assert spec.model_info.hidden_size == 64


def test_unknown_model_key_suggests_the_right_one():
    msg = _err("model=tiny_bert", "recipe=fp32", "+model.taks=embedding")
    assert msg.startswith("model.taks: unknown key")
    assert "did you mean 'task'" in msg


def test_wrong_type_names_key_and_expected_type():
    msg = _err("model=tiny_bert", "recipe=fp32", "data.seq_len=long")
    assert msg.startswith("data.seq_len: bad value 'long'")
    assert "expected int" in msg


@pytest.mark.parametrize("key", ["data.calibration_samples", "data.evaluation_samples", "bench.iterations"])
def test_negative_counts_rejected(key):
    msg = _err("model=tiny_bert", "recipe=fp32", f"{key}=-4")
    assert msg.startswith(f"{key}: must be > 0, got -4")


def test_seq_len_above_model_maximum():
    msg = _err("model=tiny_bert", "recipe=fp32", "data.seq_len=4096")
    assert "data.seq_len: 4096 is above tiny_bert's maximum of 512 positions" in msg
    assert "data.seq_len<=512" in msg


def test_unknown_step_suggests_close_name():
    def edit(cfg):
        cfg.recipe.steps = OmegaConf.create({"int8_statc": {}})

    msg = _err("model=tiny_bert", "recipe=fp32", edit=edit)
    assert msg.startswith("recipe.steps.int8_statc: unknown step")


def test_unknown_top_level_key():
    def edit(cfg):
        cfg.exprt = {"opset": 17}

    msg = _err("model=tiny_bert", "recipe=fp32", edit=edit)
    assert msg.startswith("exprt.opset: unknown top-level key")  # the key as written
    assert "did you mean 'export'" in msg


def test_unknown_recipe_key():
    def edit(cfg):
        cfg.recipe.stpes = {}

    msg = _err("model=tiny_bert", "recipe=fp32", edit=edit)
    assert msg.startswith("recipe.stpes: unknown key")
    assert "did you mean 'steps'" in msg


def test_gate_key_typo():
    def edit(cfg):
        cfg.recipe.gate.min_cosine = 0.5

    msg = _err("model=tiny_bert", "recipe=fp32", edit=edit)
    assert msg.startswith("recipe.gate.min_cosine: unknown key")


def test_missing_model_path_fails_before_loading():
    msg = _err("model=hf", "model.path=/nonexistent/model", "recipe=fp32")
    assert msg.startswith("model.path: '/nonexistent/model' is not a directory")


@dataclass
class _NoParams(StepParams):
    pass


@pytest.fixture
def test_steps():
    """Steps registered for one test only, removed again so no other test sees them."""
    specs = {"_test_only_torch": {"torch": TORCH}, "_test_onnx_step": {"ort": ONNX, "torch": TORCH},
             "_test_torch_step": {"ort": TORCH, "torch": TORCH}}
    for name, runs_on in specs.items():
        type(name, (Step,), {"name": name, "runs_on": runs_on, "Params": _NoParams})
    yield
    for name in specs:
        STEP_REGISTRY.pop(name, None)


def test_step_the_target_cannot_run(test_steps):
    def edit(cfg):
        cfg.recipe.steps = OmegaConf.create({"_test_only_torch": {}})

    msg = _err("model=tiny_bert", "recipe=fp32", "target=ort", edit=edit)
    assert msg == "recipe.steps._test_only_torch: _test_only_torch is not runnable on target=ort -- use target=torch"


def test_torch_step_after_onnx_step_is_rejected(test_steps):
    def edit(cfg):
        cfg.recipe.steps = OmegaConf.create({"_test_onnx_step": {}, "_test_torch_step": {}})

    msg = _err("model=tiny_bert", "recipe=fp32", "target=ort", edit=edit)
    assert "torch-side step _test_torch_step comes after ONNX-side step _test_onnx_step" in msg


def test_capability_table_is_consistent():
    """Every real step names only known targets and a known stage; every shipped recipe validates
    on each target its steps can run on."""

    from targets.base import target_names

    load_all_steps()
    targets = set(target_names())
    for name, cls in STEP_REGISTRY.items():
        assert cls.runs_on, f"{name} runs nowhere"
        assert set(cls.runs_on) <= targets, f"{name}: unknown target in {cls.runs_on}"
        assert set(cls.runs_on.values()) <= {TORCH, ONNX}
        assert cls.summary, f"{name} has no summary"
    recipes = sorted(p.stem for p in (RECIPES_DIR / "recipe").glob("*.yaml"))
    assert "fp32" in recipes
    for recipe in recipes:
        steps = compose(f"recipe={recipe}").recipe.steps
        runnable = targets.copy()
        for step in steps:
            runnable &= set(STEP_REGISTRY[step].runs_on)
        assert runnable, f"recipe {recipe} runs on no target"
        for t in sorted(runnable):  # the auto opset gives fp8 on ort its float8 QuantizeLinear (19)
            try:
                validate(compose("model=tiny_bert", f"recipe={recipe}", f"target={t}"))
            except NotRunnableError as e:
                # only a parameter of the shipped recipe may rule out a target its steps run on
                # (int4_weight_only's asymmetric blocks on torch), never the step as a whole
                assert e.key.startswith("recipe.steps.") and e.key.count(".") == 3, e.message


# -- export.opset: auto from the steps' min_opset, explicit values kept (issue 10) -------------------------

@pytest.mark.parametrize("recipe,target,opset", [
    ("fp8", "ort", 19),  # float8 QuantizeLinear/DequantizeLinear
    ("fp8", "trt", 17),  # TensorRT reads its own FP8 ops at any opset
    ("nvfp4", "trt", 23),  # FLOAT4E2M1 DequantizeLinear
    ("int8_static", "ort", 17),
])
def test_unset_opset_becomes_the_highest_the_steps_need(recipe, target, opset):
    spec = validate(compose("model=tiny_bert", f"recipe={recipe}", f"target={target}"))
    assert spec.export.opset == opset
    # the resolved recipe.yaml carries it, so a rebuild exports at the same opset
    assert OmegaConf.to_container(spec.raw, resolve=True)["export"]["opset"] == opset


def test_explicit_opset_below_a_steps_need_stays_an_error():
    msg = _err("model=tiny_bert", "recipe=fp8", "target=ort", "export.opset=17")
    assert msg == ("export.opset: 17 is too old for fp8 on target=ort (float8e4m3fn QuantizeLinear/DequantizeLinear "
                   "need opset >= 19) -- pass export.opset=19 (or higher), or leave export.opset unset (auto)")
    assert validate(compose("model=tiny_bert", "recipe=fp8", "target=ort", "export.opset=21")).export.opset == 21


# -- step order (issue 10): a step that rewrites weights must come before the step that quantizes them --------

def test_rotate_after_nvfp4_is_rejected_naming_the_order_that_works():
    def edit(cfg):
        cfg.recipe.steps = OmegaConf.create({"nvfp4": {}, "rotate": {"block_size": 16}})

    msg = _err("model=tiny_bert", "recipe=nvfp4_rotate", "target=trt", edit=edit)
    assert msg == ("recipe.steps: rotate must come before nvfp4 (it changes the weights nvfp4 quantizes) -- "
                   "write steps: {rotate: ..., nvfp4: ...}")

