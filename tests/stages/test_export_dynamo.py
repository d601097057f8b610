"""Both exporters on every modelopt step: the exported (and post-processed) graph computes what the torch
fake-quant module computes: ONNX Runtime for ort graphs, the reference runner (TensorRT custom ops) for trt
graphs. The dynamo exporter goes through compiler.steps.modelopt_dynamo (modelopt's quantizers have no
translation of their own for it)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.steps.modelopt_cases import (
    caps,
    context,
    eval_feed,
    make_step,
    op_counts,
    ort_outputs,
    rel_err,
    torch_outputs,
)

EXPORTERS = ["torchscript", "dynamo"]

# (case id, model, recipe steps in order, target): every shipped recipe with a torch-side modelopt step, on
# each ONNX target it ships for. int8_static is an ONNX-side step on ort/trt (ONNX Runtime's quantize_static
# on the exported fp32 graph) and exports nothing on torch, so the fp32 export covers it.
CASES = [
    ("int8-ort", "tiny_bert", [("int8", {})], "ort"),
    ("int8-ort-modernbert", "tiny_modernbert", [("int8", {})], "ort"),
    ("int8_smoothquant-ort", "tiny_bert", [("int8_smoothquant", {})], "ort"),
    ("int8_weight_only-ort", "tiny_bert", [("int8_weight_only", {})], "ort"),
    ("fp8-ort", "tiny_bert", [("fp8", {})], "ort"),
    ("fp8-trt", "tiny_bert", [("fp8", {})], "trt"),
    ("nvfp4-trt", "tiny_bert", [("nvfp4", {})], "trt"),
    ("nvfp4_rotate-trt", "tiny_bert", [("rotate", {"block_size": 16, "layers": ["*output.dense"]}),
                                       ("nvfp4", {})], "trt"),
]

# the torch fake-quant and the graph differ only in float rounding order: ~1e-7 relative when no value sits
# on a rounding boundary; the rotation MatMuls move a few e2m1 boundary values (test_nvfp4 measures it)
TOLERANCE = {"nvfp4_rotate-trt": 1e-3}

# A dynamo export costs 10-40 s on 2 cores: the fast tier exports one case per format translation
# (compiler.steps.modelopt_dynamo: int8, fp8, nvfp4) with dynamo; the other dynamo cases are the slow tier's.
FAST_DYNAMO = {"int8-ort", "fp8-trt", "nvfp4-trt"}
PARAMS = [pytest.param(case, exporter, marks=() if exporter == "torchscript" or case in FAST_DYNAMO
                       else pytest.mark.slow, id=f"{case}-{exporter}")
          for case in [c[0] for c in CASES] for exporter in EXPORTERS]


@pytest.fixture(scope="module")
def quantized(request, tmp_path_factory):
    """case id -> (loaded model, its data, the quantized module, the steps), each quantized once."""
    cache = {}

    def get(case_id):
        if case_id not in cache:
            _, model_name, steps, target = next(c for c in CASES if c[0] == case_id)
            model = request.getfixturevalue(model_name)
            data = request.getfixturevalue("tiny_data" if model_name == "tiny_bert" else "tiny_modernbert_data")
            module = copy.deepcopy(model.module)
            made = [make_step(name, **params) for name, params in steps]
            for step in made:
                module = step.apply_torch(module, context(model, data, target=target))
            cache[case_id] = (model, data, module, made)
        return cache[case_id]

    return get


def _export(model, module, steps, target, exporter, tmp_path: Path) -> Path:
    """What the pipeline's export stage does: export at the steps' opset, constant fix-ups, each step's
    after_export pass."""
    from compiler import graph as graph_passes
    from compiler.core.schema import DEFAULT_OPSET, ExportConfig
    from compiler.stages.export import export_onnx

    # the opset validation resolves: the highest min_opset the steps declare on this target
    opset = max([DEFAULT_OPSET] + [s.min_opset(caps(target)) for s in steps])
    cfg = ExportConfig(exporter=exporter, opset=opset)
    path = export_onnx(module, model.input_names, model.output_names, tmp_path / "export.onnx", cfg)
    path = graph_passes.fix_exported(path, tmp_path, cfg, {})
    for i, step in enumerate(steps):
        ctx = context(model, None, target=target, opset=opset, work_dir=tmp_path)
        path = Path(step.after_export(path, tmp_path / f"after_{i}.onnx", ctx))
    return path


@pytest.fixture(scope="module")
def exported_graph(quantized, tmp_path_factory):
    """(case id, exporter) -> the exported graph's path, each exported once for the tests that only read it."""
    paths = {}

    def get(case_id, exporter):
        if (case_id, exporter) not in paths:
            _, _, _, target = next(c for c in CASES if c[0] == case_id)
            model, _, module, steps = quantized(case_id)
            paths[case_id, exporter] = _export(model, module, steps, target, exporter,
                                               tmp_path_factory.mktemp(f"{case_id}-{exporter}"))
        return paths[case_id, exporter]

    return get


@pytest.mark.parametrize("case,exporter", PARAMS)
def test_exported_graph_equals_torch_fake_quant(case, exporter, quantized, exported_graph):
    from compiler.runners.reference import reference_predictor

    _, _, _, target = next(c for c in CASES if c[0] == case)
    model, data, module, steps = quantized(case)
    path = exported_graph(case, exporter)
    feed = eval_feed(data, 8)
    want = torch_outputs(module, feed)
    if target == "ort":
        got = ort_outputs(path, feed)
    else:
        out = reference_predictor(path)(feed)
        got = [out[n] for n in model.output_names]
    for name, g, w in zip(model.output_names, got, want):
        assert rel_err(g, w) < TOLERANCE.get(case, 1e-5), (name, rel_err(g, w))
    ops = op_counts(path)
    # the quantizers are in the graph as the format's ops (not constant-folded away, not dropped)
    if target == "ort":
        assert ops.get("DequantizeLinear", 0) >= 8, ops
        assert not [k for k in ops if k.startswith("trt::")], ops
    elif any(s.name == "nvfp4" for s in steps):
        assert ops.get("trt::TRT_FP4DynamicQuantize", 0) >= 4 and "trt::TRT_FP4QDQ" not in ops, ops
    else:
        assert ops.get("trt::TRT_FP8QuantizeLinear", 0) >= 8, ops


def test_int8_weights_stored_as_int8_with_both_exporters(exported_graph):
    """The weight Q/DQ of both exporters' graphs folds into int8 initializers (compiler.graph.qdq_weights),
    so the artifact is the same size whichever exporter wrote it."""
    types = {}
    for exporter in EXPORTERS:
        path = exported_graph("int8-ort", exporter)
        m = onnx.load(str(path))
        inits = {t.name: t.data_type for t in m.graph.initializer}
        types[exporter] = sorted(onnx.TensorProto.DataType.Name(inits[n.input[0]]) for n in m.graph.node
                                 if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    assert types["dynamo"] == types["torchscript"]
    assert types["dynamo"].count("INT8") >= 8, types


def test_export_mode_leaves_the_module_as_it_was(quantized, tmp_path):
    """The dynamo export patches the quantizers only while it runs: afterwards the module computes the same
    outputs and holds no patched method."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    model, data, module, steps = quantized("int8-ort")
    feed = eval_feed(data, 4)
    before = torch_outputs(module, feed)
    _export(model, module, steps, "ort", "dynamo", tmp_path)
    assert not [m for m in module.modules() if isinstance(m, TensorQuantizer) and "_fake_quantize" in m.__dict__]
    for a, b in zip(torch_outputs(module, feed), before):
        np.testing.assert_array_equal(a, b)
