"""The shared modelopt helpers: config building (exclusions, Linear-only), the calibration forward loop,
calibration methods, and the quantizer counts steps report."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compiler.steps import modelopt as mq
from compiler.core.errors import BuildError
from compiler.steps.base import StepContext
from modelopt_cases import caps


def _ctx(model, data, exclude=None, batch_size=8):
    return StepContext(target=caps("ort"), model_info=model.info, calibration=data.calibration,
                       exclude=list(exclude or []), batch_size=batch_size)


def test_excluded_modules_match_module_names_with_fnmatch(tiny_bert):
    names = mq.excluded_modules(tiny_bert.module, ["*pooler*"])
    assert names == ["inner.pooler.dense"]
    # an exact module name (no wildcard) works too: this is why patterns are expanded against module names
    assert mq.excluded_modules(tiny_bert.module, ["inner.encoder.layer.1.output.dense"]) == [
        "inner.encoder.layer.1.output.dense"]
    assert mq.excluded_modules(tiny_bert.module, ["*nomatch*"]) == []


def test_build_config_appends_disable_entries_after_preset(tiny_bert):
    cfg = mq.build_config(tiny_bert.module, "int8", ["*pooler*"])
    entries = cfg["quant_cfg"]
    preset = mq.preset_config("int8")["quant_cfg"]
    assert entries[:len(preset)] == preset  # preset untouched and first
    tail = entries[len(preset):]
    assert {"quantizer_name": "inner.pooler.dense.*", "enable": False} in tail
    # LayerNorms and embeddings are switched off by linear_only, each by name
    disabled = {e["quantizer_name"] for e in tail}
    assert "inner.encoder.layer.0.output.LayerNorm.*" in disabled
    assert "inner.embeddings.word_embeddings.*" in disabled
    assert not any("attention.self.query" in n for n in disabled)
    assert cfg["algorithm"] == "max"
    assert mq.build_config(tiny_bert.module, "int8", [], algorithm={"method": "smoothquant", "alpha": 0.3})[
        "algorithm"] == {"method": "smoothquant", "alpha": 0.3}


def test_preset_config_is_a_copy_and_unknown_format_fails():
    a = mq.preset_config("int8")
    a["quant_cfg"].clear()
    assert mq.preset_config("int8")["quant_cfg"], "preset_config must not hand out modelopt's own dict"
    with pytest.raises(KeyError, match="no modelopt preset for format 'int3'"):
        mq.preset_config("int3")


def test_needs_activation_data():
    assert mq._needs_activation_data(mq.preset_config("int8"))
    assert mq._needs_activation_data(mq.preset_config("fp8"))
    assert not mq._needs_activation_data(mq.preset_config("int8_weight_only"))
    assert mq._needs_activation_data(mq.preset_config("int8_smoothquant"))  # smoothquant reads activations


def test_forward_loop_runs_every_calibration_sample_in_batches(tiny_bert, tiny_data):
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, *args):
            calls.append([tuple(a.shape) for a in args])

    mq.forward_loop(_ctx(tiny_bert, tiny_data, batch_size=5))(Spy())
    n = len(tiny_data.calibration)
    assert [c[0][0] for c in calls] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert all(len(c) == len(tiny_bert.input_names) for c in calls)  # positional, every input

    empty = StepContext(target=caps("ort"), model_info=tiny_bert.info, calibration=None)
    with pytest.raises(BuildError, match="calibration needs data"):
        mq.forward_loop(empty)


def test_default_exclude_when_model_names_none(tiny_bert, tiny_data):
    ctx = _ctx(tiny_bert, tiny_data, exclude=[])
    assert mq.exclude_patterns(ctx) == mq.DEFAULT_EXCLUDE
    mod = mq.quantize_module(copy.deepcopy(tiny_bert.module), "int8", ctx)
    assert ctx.report["excluded_layers"] == ["inner.pooler.dense"]
    assert ctx.report["excluded_patterns"] == mq.DEFAULT_EXCLUDE
    per_layer = mq.enabled_quantizers(mod)
    assert per_layer["inner.pooler.dense"] == {"weight": False, "input": False}


def test_counts_per_linear_and_no_quantizer_outside_linear(tiny_bert, tiny_data):
    ctx = _ctx(tiny_bert, tiny_data, exclude=["*pooler*", "*layer.1.output.dense"])
    mod = mq.quantize_module(copy.deepcopy(tiny_bert.module), "int8", ctx)
    r = ctx.report
    # tiny_bert: 2 layers x 6 Linear + the pooler = 13 Linear; 2 excluded
    assert (r["linear_layers"], r["quantized_layers"]) == (13, 11)
    assert (r["weight_quantizers"], r["input_quantizers"], r["other_quantizers"]) == (11, 11, 0)
    assert r["excluded_layers"] == ["inner.encoder.layer.1.output.dense", "inner.pooler.dense"]
    assert r["calibration_samples"] == len(tiny_data.calibration)
    # modelopt's preset alone would also quantize LayerNorm inputs: linear_only turned them off
    ln = mod.get_submodule("inner.encoder.layer.0.output.LayerNorm")
    assert not ln.input_quantizer.is_enabled


def test_attention_registered_by_modelopt_keeps_its_linears_quantized(tiny_bert, tiny_data):
    """Planted: once any Hugging Face PreTrainedModel is quantized in a process, modelopt registers its attention
    class (BertSelfAttention) for KV-cache quantization. A `<attention>.*` disable entry then also turned off the
    q/k/v Linears inside it: every later quantization in that process left 6 of tiny BERT's 12 layers in fp32
    (found in a bench script; on MiniLM NVFP4 it read as cosine 0.976 instead of 0.965)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from transformers.models.bert.modeling_bert import BertSelfAttention

    was = BertSelfAttention in QuantModuleRegistry
    try:
        feed = [torch.from_numpy(tiny_data.calibration.arrays[n][:2]) for n in tiny_bert.input_names]
        mtq.quantize(copy.deepcopy(tiny_bert.module.inner), mq.preset_config("int8"),
                     forward_loop=lambda m: m(input_ids=feed[0], attention_mask=feed[1]))
        assert BertSelfAttention in QuantModuleRegistry  # the planted process state
        ctx = _ctx(tiny_bert, tiny_data, exclude=["*pooler*"])
        mod = mq.quantize_module(copy.deepcopy(tiny_bert.module), "int8", ctx)
        assert (ctx.report["quantized_layers"], ctx.report["other_quantizers"]) == (12, 0)
        assert mod.get_submodule("inner.encoder.layer.0.attention.self.query").weight_quantizer.is_enabled
        attention = mod.get_submodule("inner.encoder.layer.0.attention.self")
        own = [c for c in attention.children() if type(c).__name__ == "TensorQuantizer"]
        assert own and not any(q.is_enabled for q in own)  # its own (bmm) quantizers stay off
    finally:
        if not was and BertSelfAttention in QuantModuleRegistry:
            QuantModuleRegistry.unregister(BertSelfAttention)


def test_everything_excluded_is_an_error(tiny_bert, tiny_data):
    with pytest.raises(BuildError, match=r"exclude patterns \[.\*.\] leave none of the model.s 13 Linear layers"):
        mq.quantize_module(copy.deepcopy(tiny_bert.module), "int8", _ctx(tiny_bert, tiny_data, exclude=["*"]))


def test_unknown_calibration_method(tiny_bert, tiny_data):
    with pytest.raises(ValueError, match="calibration: unknown method 'kl'"):
        mq.quantize_module(copy.deepcopy(tiny_bert.module), "int8", _ctx(tiny_bert, tiny_data), calibration="kl")


def _input_amax(mod):
    return {n: float(m.input_quantizer.amax) for n, m in mod.named_modules()
            if isinstance(m, torch.nn.Linear) and m.input_quantizer.is_enabled}


def test_histogram_calibration_clips_below_max(tiny_modernbert, tiny_modernbert_data):
    """percentile / entropy pick an activation amax from the histogram: never above the observed max, and
    for at least one layer strictly below it (otherwise the method silently equals minmax)."""
    m, d = tiny_modernbert, tiny_modernbert_data
    amax = {}
    for method in ("minmax", "percentile", "entropy"):
        mod = mq.quantize_module(copy.deepcopy(m.module), "int8", _ctx(m, d, ["*embeddings*"]), calibration=method,
                                 percentile=99.0)
        amax[method] = _input_amax(mod)
    assert amax["minmax"].keys() == amax["percentile"].keys() == amax["entropy"].keys()
    assert len(amax["minmax"]) == 8
    for method in ("percentile", "entropy"):
        ratios = np.array([amax[method][k] / amax["minmax"][k] for k in amax["minmax"]])
        # histogram bins reach at most the max (+ one bin width of slack)
        assert ratios.max() <= 1.0 + 1e-3, (method, ratios)
        assert ratios.min() < 0.99, (method, ratios)


def test_weight_only_needs_no_calibration_data(tiny_bert):
    ctx = StepContext(target=caps("ort"), model_info=tiny_bert.info, calibration=None, exclude=["*pooler*"])
    mq.quantize_module(copy.deepcopy(tiny_bert.module), "int8_weight_only", ctx)
    assert (ctx.report["weight_quantizers"], ctx.report["input_quantizers"]) == (12, 0)
    assert ctx.report["calibration"] == "none (weights only)"


def test_histogram_calibrator_merged_into_preset_entries(tiny_bert):
    """modelopt replaces all attributes on a "cfg" entry: the calibrator must join the preset's entry, not
    follow it as a new one (which would reset fp8's num_bits (4, 3) to the default 8)."""
    preset = mq.preset_config("fp8")["quant_cfg"]
    cfg = mq.build_config(tiny_bert.module, "fp8", [], input_calibrator="histogram")["quant_cfg"]
    inputs = [e for e in cfg if e.get("quantizer_name") == "*input_quantizer"]
    preset_input = next(e for e in preset if e.get("quantizer_name") == "*input_quantizer")
    assert inputs == [{"quantizer_name": "*input_quantizer", "cfg": {**preset_input["cfg"], "calibrator": "histogram"}}]
    assert tuple(inputs[0]["cfg"]["num_bits"]) == (4, 3)
    weights = [e for e in cfg if e.get("quantizer_name") == "*weight_quantizer"]
    assert weights == [e for e in preset if e.get("quantizer_name") == "*weight_quantizer"]
