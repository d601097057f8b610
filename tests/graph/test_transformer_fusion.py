"""export.transformer_fusion: onnxruntime's transformer optimizer as a graph pass (compiler/graph/transformer_fusion.py):
its validation, the fused graph against the plain one, and what report.json records."""

import json

import numpy as np
import pytest
from conftest import compose

from compiler.core.errors import NotRunnableError, RecipeError
from compiler.core.schema import ExportConfig
from compiler.graph.transformer_fusion import fuse, fused_op_types
from compiler.stages.validate import validate

# the fused graph against the plain export on onnxruntime's CPU kernels: fp32 sums in another order
# (Attention's softmax and products, EmbedLayerNormalization's sum of three embeddings), no numeric change
ATOL = 1e-5


def _err(*overrides, kind=RecipeError) -> str:
    with pytest.raises(kind) as info:
        validate(compose(*overrides))
    return str(info.value)


def test_bad_mode_names_the_key_and_the_values():
    msg = _err("model=tiny_bert", "recipe=fp32", "export.transformer_fusion=brt")
    assert msg == "export.transformer_fusion: bad value 'brt' -- use none or bert"


def test_bad_fusion_left_out_suggests_the_op_type():
    msg = _err("model=tiny_bert", "recipe=fp32", "export.transformer_fusion=bert",
               "export.transformer_fusion_off=[SkipLayerNorm]")
    assert msg == ("export.transformer_fusion_off: 'SkipLayerNorm' is not a fusion it can leave out -- "
                   "did you mean 'SkipLayerNormalization'?")


def test_bad_order_names_the_key():
    msg = _err("model=tiny_bert", "recipe=int8_dynamic", "export.transformer_fusion=bert",
               "export.transformer_fusion_order=later")
    assert msg == "export.transformer_fusion_order: bad value 'later' -- use before_quantize or after_quantize"


def test_refused_on_a_target_without_an_onnxruntime_session():
    msg = _err("model=tiny_bert", "recipe=fp32", "target=torch", "export.transformer_fusion=bert",
               kind=NotRunnableError)
    assert msg.startswith("export.transformer_fusion: bert writes onnxruntime contrib ops")
    assert msg.endswith("-- use target=ort, or export.transformer_fusion=none")


def test_refused_for_a_family_it_cannot_fuse():
    msg = _err("model=tiny_modernbert", "recipe=fp32", "export.transformer_fusion=bert")
    assert msg.startswith("export.transformer_fusion: onnxruntime's bert fusions do not match a modernbert graph")
    assert msg.endswith("-- use export.transformer_fusion=none")


def test_none_is_valid_anywhere():
    spec = validate(compose("model=tiny_modernbert", "recipe=fp32", "target=torch"))
    assert spec.export.transformer_fusion == "none"


def test_cli_bad_value_is_one_line_and_exit_2(qcompile):
    r = qcompile("model=tiny_bert", "recipe=fp32", "export.transformer_fusion=yes")
    assert r.rc == 2, r
    assert "export.transformer_fusion: bad value 'yes' -- use none or bert" in r.stderr
    assert not r.run_dirs()  # refused before a run directory (and before any weights load)


def _feeds(input_names, vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (4, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, :9] = 0  # left padding: the raw 2D mask keeps it exact (bert's default 1D mask index would not)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feed[n] for n in input_names}


@pytest.mark.parametrize("off, fused_ops", [
    (["SkipLayerNormalization"], {"Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1}),
    ([], {"Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}),
])
def test_fused_tiny_bert_equals_the_plain_export(exported, tmp_path, off, fused_ops):
    import onnxruntime as ort

    model, _, path = exported["tiny_bert"]
    cfg = ExportConfig(transformer_fusion="bert", transformer_fusion_off=off)
    out, facts = fuse(path, tmp_path / "fused.onnx", cfg, validate(compose("model=tiny_bert", "recipe=fp32")).model_info,
                      "fp32 export")
    assert {op: n for op, n in fused_op_types(out).items() if op != "LayerNormalization"} == fused_ops
    assert {k: v for k, v in facts["fused"].items() if k in fused_ops} == fused_ops
    assert (facts["num_heads"], facts["hidden_size"], facts["off"]) == (4, 64, sorted(off))
    feed = _feeds(model.input_names, model.vocab)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    fused = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(plain, fused):
        np.testing.assert_allclose(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("recipe, order, applied_to, fused_in_model", [
    ("fp32", "before_quantize", "fp32 export", {"com.microsoft::Attention": 2, "com.microsoft::BiasGelu": 2}),
    # quantize_dynamic writes QAttention where told to quantize Attention: the fused projections in int8
    ("int8_dynamic", "before_quantize", "fp32 export", {"com.microsoft::QAttention": 2}),
    # after quantization the Attention pattern (fp32 MatMul + Add) is gone: nothing of it is fused
    ("int8_static", "after_quantize", "quantized graph", {}),
])
def test_report_records_the_fusion(qcompile, recipe, order, applied_to, fused_in_model):
    extra = (["recipe.steps.int8_dynamic.op_types_to_quantize=[MatMul,Gemm,Attention]"]
             if recipe == "int8_dynamic" else [])
    r = qcompile("model=tiny_bert", f"recipe={recipe}", "export.transformer_fusion=bert",
                 f"export.transformer_fusion_order={order}", "bench.enabled=false", "data.calibration_samples=16",
                 "data.evaluation_samples=16", *extra)
    assert r.rc == 0, r
    (run,) = r.run_dirs()
    report = json.loads((run / "report.json").read_text())
    tf = report["transformer_fusion"]
    assert (tf["mode"], tf["order"], tf["applied_to"]) == ("bert", order, applied_to)
    assert (tf["num_heads"], tf["hidden_size"]) == (4, 64)  # tiny_bert's config
    assert {k: report["onnx"]["ops"].get(k) for k in fused_in_model} == fused_in_model
    if applied_to == "quantized graph":
        assert "Attention" not in tf["fused"] and "com.microsoft::Attention" not in report["onnx"]["ops"]
    assert report["check"]["passed"]
    assert f"Transformer fusion (bert, on the {applied_to}, num_heads 4, hidden 64" in (run / "REPORT.md").read_text()
    assert report["check"]["fidelity"]["embedding_cosine_mean"] >= 0.999


def test_report_has_no_fusion_section_by_default(qcompile):
    r = qcompile("model=tiny_bert", "recipe=fp32", "bench.enabled=false", "check.enabled=false")
    assert r.rc == 0, r
    (run,) = r.run_dirs()
    assert "transformer_fusion" not in json.loads((run / "report.json").read_text())
