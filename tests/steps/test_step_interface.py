"""The Step interface (compiler/steps/base.py): a step declares its facts and every other module asks it.

A new step is one file: defined here with a precision no other module knows ("int3"), it shows up in
`qcompile capabilities`, the TensorRT hardware check, the coverage rail and the fp16 rail. The per-layer
hooks (layers / with_layer_formats) are tested on a tiny model per step family: the layer kept out stays
exactly fp32 while the others are quantized (or rotated)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from modelopt_cases import caps

from compiler.core.errors import RecipeError
from compiler.steps.base import (
    STEP_REGISTRY,
    TORCH,
    Step,
    StepContext,
    StepParams,
    load_all_steps,
)

KEPT = "inner.encoder.layer.0.output.dense"  # the layer kept out in the per-layer tests (tiny_bert)
KEPT_NODE = "/inner/encoder/layer.0/output/dense/MatMul"  # its MatMul in the TorchScript-exported graph


# -- adding a step is one file ------------------------------------------------------------------------------

@dataclass
class _Int3Params(StepParams):
    bits: int = 3

    def problems(self) -> list[tuple[str, str, str]]:
        return [] if self.bits == 3 else [("bits", f"{self.bits} is not 3", "use bits: 3")]


@pytest.fixture
def int3_step():
    """A throwaway step registered by defining it, removed after the test."""

    class Int3Step(Step):
        name = "_test_int3"
        Params = _Int3Params
        runs_on = {"torch": TORCH, "ort": TORCH, "trt": TORCH}
        summary = "a throwaway 3-bit step"
        precision = frozenset({"int3"})
        quantizes_compute = True
        kept_fp32_report_keys = ("kept_layers",)

    yield Int3Step
    STEP_REGISTRY.pop("_test_int3", None)


def test_a_new_step_is_seen_by_every_module_that_asks(int3_step, capsys):
    from compiler.commands.subcommands import capabilities
    from compiler.core.schema import DoctorConfig
    from compiler.rails import FAILED, RailContext, coverage, fp16_types
    from targets.base import target_names
    from targets.trt_hardware import recipe_precisions

    step = int3_step(_Int3Params())
    # the capability table
    assert capabilities([]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| _test_int3 |"))
    assert row == "| _test_int3 | " + " | ".join(TORCH for _ in target_names()) + " | no | a throwaway 3-bit step |"
    # the TensorRT hardware check's precision list: from step objects and from a recipe's steps mapping
    assert recipe_precisions([step]) == ["int3"]
    assert recipe_precisions({"_test_int3": {}, "int8_static": {}}) == ["int8", "int3"]
    # the coverage rail: a quantizing recipe whose graph has no quantized op fails
    assert coverage.recipe_quantizes([step])
    counts = {"compute_ops": 4, "quantized_ops": 0, "fraction": 0.0, "by_op": {"MatMul": {"total": 4, "quantized": 0}},
              "quantization_nodes": 0}
    assert coverage.judge(counts, coverage.recipe_quantizes([step]))["status"] == FAILED
    # the fp16 rail shows what the step says it kept in full precision
    reports = {"_test_int3": {"kept_layers": ["a.dense", "b.dense"], "bits": 3}}
    assert fp16_types.blocked_from_steps([step], reports) == {"kept_layers": ["a.dense", "b.dense"]}
    ctx = RailContext(target="torch", config=DoctorConfig(), steps=reports, recipe_steps=[step],
                      module=torch.nn.Linear(2, 2).half())
    assert fp16_types.run(ctx)["kept_fp32"] == {"kept_layers": ["a.dense", "b.dense"]}
    # its parameters are validated the one way every step's are
    with pytest.raises(RecipeError, match=r"^recipe.steps._test_int3.bits: 4 is not 3 -- use bits: 3$"):
        int3_step(_Int3Params(bits=4)).validate(None, caps("ort"))


def test_declared_facts_of_the_shipped_steps():
    load_all_steps()
    want = {"int8": {"int8"}, "int8_static": {"int8"}, "int8_dynamic": {"int8"}, "int8_smoothquant": {"int8"},
            "int8_weight_only": {"int8"}, "fp8": {"fp8"}, "nvfp4": {"nvfp4"}, "fp16": {"fp16"}, "rotate": set()}
    for name, precision in want.items():
        cls = STEP_REGISTRY[name]
        assert cls.precision == precision, name
        assert cls.quantizes_compute == (name not in ("fp16", "rotate")), name
        assert cls.summary, name
    fp8, nvfp4 = STEP_REGISTRY["fp8"](STEP_REGISTRY["fp8"].Params()), STEP_REGISTRY["nvfp4"](STEP_REGISTRY["nvfp4"].Params())
    assert [fp8.min_opset(caps(t)) for t in ("ort", "trt", "torch")] == [19, 0, 0]
    assert [nvfp4.min_opset(caps(t)) for t in ("ort", "trt", "torch")] == [23, 23, 0]
    assert STEP_REGISTRY["rotate"].must_precede_quantizers
    # a layer given another format adds it to what the configured step produces
    assert nvfp4.with_layer_formats({KEPT: "fp8"}).precisions() == {"nvfp4", "fp8"}
    assert nvfp4.precisions() == {"nvfp4"}  # the original is unchanged


def test_a_format_the_step_cannot_give_is_a_recipe_error():
    load_all_steps()
    step = STEP_REGISTRY["int8_static"](STEP_REGISTRY["int8_static"].Params())
    with pytest.raises(RecipeError) as e:
        step.with_layer_formats({KEPT: "nvfp4"})
    assert str(e.value) == (f"recipe.steps.int8_static.layer_formats.{KEPT}: int8_static cannot give a layer format "
                            "'nvfp4' -- use one of ['fp32']")
    assert step.with_layer_formats({KEPT: None}).kept_layers() == [KEPT]


# -- per-layer hooks, one tiny model per family ---------------------------------------------------------------

def _ctx(model, data, target, tmp_path=None, exclude=("*pooler*", "*embeddings*")):
    return StepContext(target=caps(target), model_info=model.info, calibration=data.calibration, work_dir=tmp_path,
                       exclude=list(exclude))


def _layer_out(module, name, x):
    with torch.no_grad():
        return module.get_submodule(name)(x).numpy()


def test_modelopt_layer_kept_out_and_layer_given_fp8(tiny_bert, tiny_data):
    load_all_steps()
    cls = STEP_REGISTRY["int8"]
    step = cls(cls.Params())
    layers = step.layers(tiny_bert.module, ["*pooler*", "*embeddings*"])
    assert len(layers) == 12 and KEPT in layers and "inner.pooler.dense" not in layers
    other = "inner.encoder.layer.1.output.dense"
    configured = step.with_layer_formats({KEPT: None, other: "fp8"})
    module = configured.apply_torch(copy.deepcopy(tiny_bert.module), _ctx(tiny_bert, tiny_data, "ort"))
    kept = module.get_submodule(KEPT)
    assert not kept.weight_quantizer.is_enabled and not kept.input_quantizer.is_enabled
    x = torch.randn(3, kept.in_features)
    np.testing.assert_array_equal(_layer_out(module, KEPT, x), _layer_out(tiny_bert.module, KEPT, x))
    fp8 = module.get_submodule(other)
    assert fp8.weight_quantizer.is_enabled and tuple(fp8.weight_quantizer.num_bits) == (4, 3)
    q = module.get_submodule("inner.encoder.layer.0.intermediate.dense")
    assert q.weight_quantizer.is_enabled and q.weight_quantizer.num_bits == 8
    x = torch.randn(3, q.in_features)
    assert not np.array_equal(_layer_out(module, "inner.encoder.layer.0.intermediate.dense", x),
                              _layer_out(tiny_bert.module, "inner.encoder.layer.0.intermediate.dense", x))
    assert configured.layer_formats == {KEPT: "fp32", other: "fp8"}


def _weight_dq(path, node_name) -> bool:
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    node = next(n for n in g.node if n.name == node_name)
    # on ort a quantized MatMul is fused with its bias into MatMulIntegerToFloat (compiler/graph/qdq_ort.py)
    return node.op_type == "MatMulIntegerToFloat" or any(
        producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input)


def test_ort_static_layer_kept_out_has_no_qdq(exported, tmp_path):
    load_all_steps()
    model, data, fp32 = exported["tiny_bert"]
    cls = STEP_REGISTRY["int8_static"]
    step = cls(cls.Params()).with_layer_formats({KEPT: None})
    ctx = _ctx(model, data, "ort", tmp_path, exclude=())
    out = step.apply_onnx(fp32, tmp_path / "q.onnx", ctx)
    assert not _weight_dq(out, KEPT_NODE)
    assert _weight_dq(out, "/inner/encoder/layer.1/output/dense/MatMul")
    assert ctx.report["excluded_node_names"] == [KEPT_NODE]
    assert ctx.report["quantized"] == ctx.report["total"] - 1 - ctx.report["activation_products_fp32"]  # attention products: fp32 on ort


def test_ort_dynamic_layer_kept_out_stays_float(exported, tmp_path):
    load_all_steps()
    model, data, fp32 = exported["tiny_bert"]
    cls = STEP_REGISTRY["int8_dynamic"]
    step = cls(cls.Params()).with_layer_formats({KEPT: None})
    out = step.apply_onnx(fp32, tmp_path / "d.onnx", _ctx(model, data, "ort", tmp_path, exclude=()))
    ops = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops[KEPT_NODE] == "MatMul"
    assert "/inner/encoder/layer.1/output/dense/MatMul" not in ops  # replaced by the dynamic int8 kernel
    assert sum(op == "MatMulInteger" for op in ops.values()) > 0


def test_ort_dynamic_torch_layer_kept_out(tiny_bert, tiny_data):
    load_all_steps()
    cls = STEP_REGISTRY["int8_dynamic"]
    step = cls(cls.Params()).with_layer_formats({KEPT: None})
    ctx = _ctx(tiny_bert, tiny_data, "torch")
    module = step.apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    assert type(module.get_submodule(KEPT)) is torch.nn.Linear
    assert ctx.report["excluded"] == [KEPT, "inner.pooler.dense"]  # the kept layer and model.exclude's pooler
    assert ctx.report["quantized"] == ctx.report["total"] - 2


def test_rotate_layer_kept_out_is_not_rotated(tiny_bert, tiny_data):
    from compiler.steps.rotate import RotatedLinear, RotateParams, RotateStep

    step = RotateStep(RotateParams(block_size=16, layers=["*output.dense"]))
    assert KEPT in step.layers(tiny_bert.module, ["*pooler*", "*embeddings*"])
    module = copy.deepcopy(tiny_bert.module)
    step.with_layer_formats({KEPT: None}).apply_torch(module, _ctx(tiny_bert, tiny_data, "torch"))
    kept = module.get_submodule(KEPT)
    assert type(kept) is torch.nn.Linear
    torch.testing.assert_close(kept.weight, tiny_bert.module.get_submodule(KEPT).weight, rtol=0, atol=0)
    assert isinstance(module.get_submodule("inner.encoder.layer.1.output.dense"), RotatedLinear)


def test_rotated_layer_given_fp8_carries_fp8(tiny_bert, tiny_data):
    """nvfp4 after rotate: an online-rotated layer is a RotatedLinear whose quantizers sit on its inner
    `.linear`; a fallback format named by the layer's own name must reach them (it used to match nothing, so
    nvfp4_rotate's repair measured its FFN down projections in NVFP4 while the map said fp8)."""
    from compiler.steps.rotate import RotatedLinear, RotateParams, RotateStep

    load_all_steps()
    module = copy.deepcopy(tiny_bert.module)
    ctx = _ctx(tiny_bert, tiny_data, "torch")
    RotateStep(RotateParams(block_size=16, layers=["*output.dense"], fuse_attention=False)).apply_torch(module, ctx)
    rotated = "inner.encoder.layer.1.output.dense"
    assert isinstance(module.get_submodule(rotated), RotatedLinear)
    cls = STEP_REGISTRY["nvfp4"]
    step = cls(cls.Params()).with_layer_formats({rotated: "fp8", KEPT: None})
    step.apply_torch(module, ctx)
    inner = module.get_submodule(rotated).linear
    assert tuple(inner.weight_quantizer.num_bits) == (4, 3) and tuple(inner.input_quantizer.num_bits) == (4, 3)
    assert inner.weight_quantizer.block_sizes is None  # per-tensor fp8, not NVFP4's blocks of 16
    assert not module.get_submodule(KEPT).linear.weight_quantizer.is_enabled
    other = module.get_submodule("inner.encoder.layer.1.attention.output.dense").linear
    assert tuple(other.weight_quantizer.num_bits) == (2, 1)  # the rest stays NVFP4 (e2m1)


def test_a_layer_format_that_reaches_no_quantizer_fails_the_build(tiny_bert, tiny_data, monkeypatch):
    """The check behind the fix above: a per-layer format whose entries match no quantizer is a BuildError
    naming the layer, not a silent NVFP4 layer under an fp8 label."""
    from compiler.core.errors import BuildError
    from compiler.steps import modelopt

    load_all_steps()
    monkeypatch.setattr(modelopt, "layer_entries", lambda layer, fmt: [])  # the old, non-matching entries
    cls = STEP_REGISTRY["nvfp4"]
    other = "inner.encoder.layer.1.output.dense"
    with pytest.raises(BuildError, match=f"layer {other} was given format fp8"):
        cls(cls.Params()).with_layer_formats({other: "fp8"}).apply_torch(
            copy.deepcopy(tiny_bert.module), _ctx(tiny_bert, tiny_data, "torch"))


def test_fp16_layer_kept_out_stays_fp32(exported, tmp_path):
    from compiler.steps.fp16 import Fp16Step, Params

    model, data, fp32 = exported["tiny_bert"]
    ctx = _ctx(model, data, "ort", tmp_path, exclude=())
    out = Fp16Step(Params()).with_layer_formats({KEPT: None}).apply_onnx(fp32, tmp_path / "h.onnx", ctx)
    assert KEPT_NODE in ctx.report["blocked_node_names"]
    g = onnx.load(str(out)).graph
    weights = {t.name: t.data_type for t in g.initializer}
    node = next(n for n in g.node if n.name == KEPT_NODE)
    assert weights[node.input[1]] == onnx.TensorProto.FLOAT
    other = next(n for n in g.node if n.name == "/inner/encoder/layer.1/output/dense/MatMul")
    assert weights[other.input[1]] == onnx.TensorProto.FLOAT16
