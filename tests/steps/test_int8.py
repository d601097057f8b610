"""int8 step (modelopt W8A8): quantizers per Linear, error vs fp32, the exported Q/DQ graph (int8 weights
folded, op types), ORT = torch fake-quant, the calibration parameter, and a CLI build on target=ort.

Error bound, int8 W8A8 vs fp32 (relative L2 of last_hidden_state): 1e-2. Per-tensor int8 activations round
to a step of amax/127, a uniform error of rms step/sqrt(12) ~ 0.2% of amax; with activation crest factors
(amax / rms) of 3-5 on these models that is ~1% of each Linear input's rms, and errors of successive layers
add in quadrature through the LayerNorms of 2 layers. The tiny models measure 8e-4 (BERT) and 6e-5
(ModernBERT): 1e-2 catches a broken scale (a factor-2 scale error gives ~30%) without flaking."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from modelopt_cases import (caps, eval_feed, export, make_step, op_counts, ort_outputs, quantize, rel_err, torch_outputs,
                            weight_dq_initializer_types)

from compiler.core.errors import RecipeError
from compiler.graph.qdq_weights import quantize_array

INT8_REL_BOUND = 1e-2


@pytest.fixture(scope="module")
def bert_int8(tiny_bert, tiny_data):
    return quantize(make_step("int8"), tiny_bert, tiny_data)


@pytest.fixture(scope="module")
def modernbert_int8(tiny_modernbert, tiny_modernbert_data):
    return quantize(make_step("int8"), tiny_modernbert, tiny_modernbert_data)


def test_quantizers_per_linear_bert(bert_int8):
    _, ctx = bert_int8
    r = ctx.report
    # 2 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler
    assert r["linear_layers"] == 13
    assert (r["weight_quantizers"], r["input_quantizers"]) == (12, 12)
    assert r["excluded_layers"] == ["inner.pooler.dense"]  # tiny_bert's model.exclude: *pooler*
    assert r["other_quantizers"] == 0


def test_quantizers_per_linear_modernbert(modernbert_int8):
    module, ctx = modernbert_int8
    r = ctx.report
    # 2 layers x (attn.Wqkv, attn.Wo, mlp.Wi, mlp.Wo); embeddings are not Linear; no head in the base model
    assert (r["linear_layers"], r["weight_quantizers"], r["input_quantizers"]) == (8, 8, 8)
    assert r["excluded_layers"] == []
    wqkv = module.get_submodule("inner.layers.0.attn.Wqkv")
    assert wqkv.weight_quantizer.num_bits == 8 and wqkv.weight_quantizer.axis == 0  # per output channel
    assert wqkv.input_quantizer.axis is None  # per tensor
    assert float(wqkv.input_quantizer.amax) > 0


@pytest.mark.parametrize("which", ["bert", "modernbert"])
def test_error_vs_fp32_within_bound(which, request):
    model = request.getfixturevalue("tiny_bert" if which == "bert" else "tiny_modernbert")
    data = request.getfixturevalue("tiny_data" if which == "bert" else "tiny_modernbert_data")
    module, _ = request.getfixturevalue(f"{which}_int8")
    feed = eval_feed(data)
    ref, got = torch_outputs(model.module, feed), torch_outputs(module, feed)
    err = rel_err(got[0], ref[0])
    assert 1e-6 < err < INT8_REL_BOUND, err  # > 1e-6: the quantizers really round


@pytest.mark.parametrize("which", ["bert", "modernbert"])
def test_export_qdq_with_int8_weights_and_ort_equals_torch(which, request, tmp_path):
    model = request.getfixturevalue("tiny_bert" if which == "bert" else "tiny_modernbert")
    data = request.getfixturevalue("tiny_data" if which == "bert" else "tiny_modernbert_data")
    module, ctx = request.getfixturevalue(f"{which}_int8")
    n = ctx.report["weight_quantizers"]
    path = export(make_step("int8"), module, model, tmp_path)
    ops = op_counts(path)
    # activations keep Q -> DQ; weights are int8 initializers -> DQ (their Q folded away)
    assert ops.get("QuantizeLinear") == n and ops.get("DequantizeLinear") == 2 * n, ops
    assert weight_dq_initializer_types(path) == {"INT8": n}
    assert not any("::" in k for k in ops), ops  # no custom domain
    onnx.checker.check_model(str(path), full_check=True)

    feed = eval_feed(data)
    fq = torch_outputs(module, feed)
    ref = torch_outputs(model.module, feed)
    # the graph as written computes what the torch fake-quant model computes (float32 rounding of x/scale
    # vs x*(1/scale) may move a rare value across a rounding tie: 1e-4, far below the int8 error itself)
    plain = ort_outputs(path, feed)
    for o, t in zip(plain, fq):
        assert rel_err(o, t) < 1e-4, rel_err(o, t)
    # what target=ort runs: ORT fuses Q/DQ + MatMul into MatMulIntegerToFloat; its integer kernels add a
    # little (measured 2e-3 on tiny BERT) but stay within the int8 bound of fp32
    fused = ort_outputs(path, feed, optimize=True)
    assert rel_err(fused[0], ref[0]) < INT8_REL_BOUND


def test_folded_weights_equal_onnx_quantize_linear():
    """quantize_array is QuantizeLinear: compare with onnx's reference implementation, per channel."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    w[0, 0] = 2.5 * 0.1  # an exact .5 tie: ONNX rounds half to even
    scale = np.abs(w).max(axis=1).astype(np.float32) / 127
    scale[0] = np.float32(0.1)
    zp = np.zeros(6, np.int8)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=0)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 10]),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, [6]),
                                            helper.make_tensor_value_info("z", TensorProto.INT8, [6])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, [6, 10])])
    ref = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    expected = ref.run(None, {"x": w, "s": scale, "z": zp})[0]
    np.testing.assert_array_equal(quantize_array(w, scale, zp, axis=0), expected)
    assert quantize_array(w, scale, zp, axis=0)[0, 0] == 2  # 2.5 -> 2 (half to even)


def test_calibration_parameter():
    step = make_step("int8", calibration="max")
    assert step.calibration() == "minmax" and step.params.problems() == []  # modelopt's name accepted
    assert make_step("int8", calibration="entropy").calibration() == "entropy"
    assert make_step("int8", calibration="kl").params.problems() == [
        ("calibration", "unknown method 'kl'", "use one of minmax, entropy, percentile")]
    assert make_step("int8", percentile=0.0).params.problems() == [
        ("percentile", "0.0 is not in (0, 100]", "use e.g. 99.99")]


def test_bad_calibration_is_a_recipe_error(tiny_bert):
    from omegaconf import OmegaConf

    from compiler.stages.validate import validate_steps

    node = OmegaConf.create({"name": "int8", "steps": {"int8": {"calibration": "kl"}}})
    with pytest.raises(RecipeError, match=r"^recipe.steps.int8.calibration: unknown method 'kl' -- use one of minmax"):
        validate_steps(node, caps("ort"), tiny_bert.info)


def test_calibration_reaches_modelopt(tiny_modernbert, tiny_modernbert_data):
    """The step's calibration parameter picks the calibrator (the methods' numerics: test_modelopt_quant)."""
    step = make_step("int8", calibration="percentile", percentile=99.0)
    module, ctx = quantize(step, tiny_modernbert, tiny_modernbert_data)
    assert ctx.report["calibration"] == "percentile" and ctx.report["input_quantizers"] == 8
    from modelopt.torch.quantization.calib import HistogramCalibrator

    wqkv = module.get_submodule("inner.layers.0.attn.Wqkv")
    assert isinstance(wqkv.input_quantizer._calibrator, HistogramCalibrator)
    feed = eval_feed(tiny_modernbert_data)
    err = rel_err(torch_outputs(module, feed)[0], torch_outputs(tiny_modernbert.module, feed)[0])
    assert err < INT8_REL_BOUND


def test_cli_tiny_bert_ort(qcompile):
    from conftest import FAST

    res = qcompile("model=tiny_bert", "recipe=int8", "target=ort", *FAST)
    assert res.rc == 0, res
    import json

    (run,) = res.run_dirs()
    report = json.loads((run / "report.json").read_text())
    step = report["steps"]["int8"]
    # the recipe keeps the FFN down-projections (encoder.layer.N.output.dense) fp32, and the pooler
    assert (step["weight_quantizers"], step["input_quantizers"]) == (10, 10)
    assert step["excluded_layers"] == ["inner.encoder.layer.0.output.dense", "inner.encoder.layer.1.output.dense",
                                       "inner.pooler.dense"]
    assert report["onnx"]["ops"]["QuantizeLinear"] == 10
    assert report["check"]["fidelity"]["embedding_cosine_mean"] > 0.99
    assert report["status"] == "passed"
