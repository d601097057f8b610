"""Facts declared once (compiler/core/tasks.py, compiler/core/formats.py): a throwaway task kind and a throwaway
number format, registered here and nowhere else, reach validation, the data reader, the metrics and the report
-- as the throwaway int3 step of tests/steps/test_step_interface.py reaches every module that asks steps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import FAST, compose

from compiler.core.errors import RecipeError
from compiler.core.formats import FORMATS, INT, NumberFormat, number_format, register_format
from compiler.core.tasks import (
    EVAL_TASKS,
    SCORED_PAIRS,
    TASK_KINDS,
    EvalTask,
    TaskKind,
    register_eval_task,
    register_task_kind,
    task_kind,
)
from compiler.steps.base import STEP_REGISTRY, TORCH, Step, StepParams
from targets.base import get_target


def caps(target: str):
    return get_target(target).capabilities

ROWS = "left\tright\tgold\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in [
    ("a cat sat on the mat.", "a kitten sat on the rug.", 4.5), ("the car is red.", "a song played.", 0.5),
    ("he runs fast.", "he sprints.", 4.0), ("the sky is blue.", "prices went up.", 1.0),
    ("she reads books.", "she is reading.", 3.5), ("rain fell all day.", "the market opened.", 0.2)])


@pytest.fixture
def throwaway_task():
    """A model kind with an embedding model's outputs and its own labeled task (columns left,right,gold scored
    by spearman alone), removed after the test."""
    embedding = task_kind("embedding")
    kind = register_task_kind(TaskKind(
        name="_test_kind", outputs=embedding.outputs, primary=embedding.primary, wrapper=embedding.wrapper,
        head=embedding.head, fidelity=embedding.fidelity, output_cosine=True, labeled=False,
        builtin_evaluation="text", fidelity_summary="embedding cosine"))
    task = register_eval_task(EvalTask("_test_pairs", ("left", "right", "gold"), ("spearman",), "_test_kind",
                                       SCORED_PAIRS))
    yield kind, task
    TASK_KINDS.pop("_test_kind", None)
    EVAL_TASKS.pop("_test_pairs", None)


def test_a_new_task_kind_reaches_validation_metrics_and_the_report(throwaway_task, tmp_path):
    from compiler.pipeline import run_build
    from compiler.rundir.cache import open_cache
    from compiler.stages.validate import validate

    f = tmp_path / "pairs.tsv"
    f.write_text(ROWS)
    args = ["model=tiny_bert", "recipe=fp32", "target=ort", f"data.evaluation_file={f}", "bench.enabled=false",
            f"cache.dir={tmp_path / 'cache'}", *FAST]
    # validation: model.task accepts the kind; the file's columns name its task; the gate's metric must be one of
    # the task's; a model of another kind cannot score its rows
    with pytest.raises(RecipeError, match=r"'pearson' does not fit the _test_pairs task of .* use one of spearman$"):
        validate(compose(*args, "model.task=_test_kind", "recipe.gate.task_metric=pearson"))
    with pytest.raises(RecipeError, match=r"holds _test_pairs rows \(left, right, gold\) but model.task=embedding"):
        validate(compose(*args))
    spec = validate(compose(*args, "model.task=_test_kind", "recipe.gate.max_task_drop=0.5"))
    # the data reader, the metrics and the report
    (tmp_path / "run").mkdir()
    report = run_build(spec, tmp_path / "run", cache=open_cache(spec.cache))
    assert report["data"]["evaluation_task"] == "_test_pairs" and report["data"]["evaluation_samples"] == 12  # texts: two per pair
    task = report["check"]["task"]
    assert task["task"] == "_test_pairs" and task["metric"] == "spearman" and list(task["metrics"]) == ["spearman"]
    assert task["examples"] == 6 and task["metrics"]["spearman"]["drop"] == pytest.approx(0.0, abs=1e-9)
    assert report["check"]["passed"] and "embedding_cosine_mean" in report["check"]["fidelity"]


def test_a_header_names_a_new_task_by_its_columns(throwaway_task, tmp_path):
    from compiler.stages.data import read_rows

    f = tmp_path / "bad.tsv"
    f.write_text("sentence\tgold\na.\tb.\n")
    with pytest.raises(RecipeError) as e:
        read_rows(f, "auto", "data.evaluation_file")
    assert "| left<TAB>right<TAB>gold)" in str(e.value)
    f.write_text(ROWS)
    assert read_rows(f, "auto", "data.evaluation_file").task == "_test_pairs"


@dataclass
class _NoParams(StepParams):
    pass


@pytest.fixture
def int3_format():
    """A throwaway 3-bit integer format whose standard ONNX form needs opset 24, and a step that produces it."""
    fmt = register_format(NumberFormat("_test_int3", 3, INT, onnx_opset=24, opset_reason="int3 DequantizeLinear",
                                       fallbacks=("int8",)))

    class Int3Step(Step):
        name = "_test_int3_step"
        Params = _NoParams
        runs_on = {"torch": TORCH, "ort": TORCH, "trt": TORCH}
        summary = "a throwaway step producing _test_int3"
        precision = frozenset({"_test_int3"})
        quantizes_compute = True
        layer_format_choices = frozenset(fmt.fallbacks)

    yield fmt, Int3Step
    FORMATS.pop("_test_int3", None)
    STEP_REGISTRY.pop("_test_int3_step", None)


def test_a_new_format_reaches_validation_and_the_precision_list(int3_format):
    from compiler.core.schema import ExportConfig
    from compiler.stages.validate import validate
    from targets.trt_hardware import recipe_precisions

    fmt, cls = int3_format
    step = cls(_NoParams())
    assert number_format("_test_int3").quantized and fmt.min_opset(caps("torch")) == 0
    assert [step.min_opset(caps(t)) for t in ("ort", "trt", "torch")] == [24, 24, 0]
    with pytest.raises(RecipeError) as e:
        step.validate_export(ExportConfig(opset=17), caps("ort"))
    assert str(e.value) == ("export.opset: 17 is too old for _test_int3_step on target=ort (int3 DequantizeLinear "
                            "need opset >= 24) -- pass export.opset=24 (or higher), or leave export.opset unset (auto)")
    # validation resolves the auto opset from the format; a recipe's precision list puts it narrowest first
    spec = validate(compose("model=tiny_bert", "recipe=fp32", "target=ort", "+recipe.steps._test_int3_step={}"))
    assert spec.export.opset == 24 and spec.raw.export.opset == 24
    assert recipe_precisions([step, STEP_REGISTRY["int8_static"](STEP_REGISTRY["int8_static"].Params())]) == [
        "_test_int3", "int8"]
    # its fallbacks are the formats a layer of it may be given
    assert step.with_layer_formats({"a.dense": "int8"}).precisions() == {"_test_int3", "int8"}


def test_shipped_format_facts():
    """fp8's opset 19 and nvfp4's 23 are stated once, in the registry; the steps and the fp8 lowering ask it."""
    from compiler.graph.fp8_qdq import MIN_OPSET
    from compiler.steps.base import load_all_steps

    load_all_steps()
    assert MIN_OPSET == number_format("fp8").onnx_opset == 19 and number_format("nvfp4").onnx_opset == 23
    assert STEP_REGISTRY["nvfp4"].layer_format_choices == {"fp8", "int8"}
    assert [f.name for f in FORMATS.values() if f.quantized] == ["int8", "fp8", "nvfp4", "int4"]
