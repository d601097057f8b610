"""reorder step: exact in fp32 on every family, the fault it checks for (a reader of the residual stream the roles
do not show) planted, a planted large channel that NVFP4 resolves better sorted, the hidden states a distillation
compares put back in order, and the exported NVFP4 graph equal to the torch model with one Gather added."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from compiler.core.errors import BuildError
from compiler.steps import reorder as R
from compiler.steps.base import StepContext
from compiler.steps.nvfp4 import NVFP4Params, NVFP4Step
from compiler.steps.reorder import ReorderParams, ReorderStep
from modelopt_cases import caps
from tests.conftest import model_cfg, model_exclude


def _data(loaded, n=16, seq=32):
    from compiler.stages.data import load_data
    from tests.conftest import data_cfg

    return load_data(data_cfg(calibration_samples=n, evaluation_samples=32, seq_len=seq), loaded.tokenizer,
                     loaded.input_names)


def _reorder(loaded, data, ffn=True):
    module = copy.deepcopy(loaded.module)
    ctx = StepContext(target=caps("trt"), model_info=loaded.info, calibration=data.calibration,
                      exclude=model_exclude(loaded))
    module = ReorderStep(ReorderParams(ffn=ffn)).apply_torch(module, ctx)
    return module, ctx.report


def _outputs(module, loaded, data):
    with torch.no_grad():
        return [module(*[torch.from_numpy(f[n]) for n in loaded.input_names]) for f in data.evaluation.batches(16)]


@pytest.fixture(scope="module", params=["tiny_bert", "tiny_distilbert", "tiny_roberta", "tiny_modernbert"])
def family(request):
    from compiler.stages.models import load_model

    loaded = load_model(model_cfg(request.param))
    return request.param, loaded, _data(loaded)


# 2 blocks each: readers q, k, v, FFN up (ModernBERT: fused Wqkv, gated Wi); writers attention output, FFN down;
# LayerNorms on the stream: the embeddings' + 2 per block (ModernBERT: block 0 has no attention norm, + final_norm)
STREAM = {"tiny_bert": (8, 4, 5, 3), "tiny_distilbert": (8, 4, 5, 2), "tiny_roberta": (8, 4, 5, 3),
          "tiny_modernbert": (4, 4, 5, 1)}


def test_reordered_model_equals_the_original(family):
    name, loaded, data = family
    module, report = _reorder(loaded, data)
    layers = loaded.info
    assert (report["stream_readers"], report["stream_writers"], report["layernorms"],
            report["embedding_tables"]) == STREAM[name], report
    assert report["ffn_reordered"] == 2 and report["hidden_channels"] == layers.hidden_size
    assert report["max_relative_difference_fp32"] < 1e-5
    for want, got in zip(_outputs(loaded.module, loaded, data), _outputs(module, loaded, data)):
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # it really moved the weights: the embedding table's columns are a non-trivial permutation of the original
    order = getattr(module, R.ORDER_ATTR)
    assert not torch.equal(order, torch.arange(order.numel()))
    table = next(m for m in module.modules() if isinstance(m, torch.nn.Embedding)
                 and m.embedding_dim == layers.hidden_size)
    original = next(m for m in loaded.module.modules() if isinstance(m, torch.nn.Embedding)
                    and m.embedding_dim == layers.hidden_size)
    torch.testing.assert_close(table.weight, original.weight[:, order], atol=0, rtol=0)


def test_a_reader_the_roles_miss_fails_the_build(monkeypatch):
    """The fault the check is for: a Linear reading the residual stream that the step does not permute (planted by
    hiding the FFN up-projections from the readers) would silently change the model; the build stops instead."""
    from compiler.stages.models import load_model

    loaded = load_model(model_cfg("tiny_bert"))
    monkeypatch.setattr(R, "READER_ROLES", ("attention_qkv",))
    with pytest.raises(BuildError, match=r"^reorder: the reordered fp32 model differs from the original by "
                                         r"[0-9.e+-]+ \(relative; exact would be below 0.0001\): this architecture "
                                         r"has a reader or writer of its residual stream that the layer roles do not "
                                         r"show; remove the reorder step for this model$"):
        _reorder(loaded, _data(loaded))


def _plant_channel_sizes(loaded, sigma=1.0, seed=0):
    """tiny BERT whose residual stream has channels of spread sizes that its readers' weights make up for, as in a
    trained encoder (a large activation channel meets small weights, a small one larger weights): every LayerNorm's
    weight and bias scaled by one lognormal factor per channel, the q/k/v and FFN-up columns by its inverse. A random
    tiny model's channels are all alike, and its small channels' lost 4-bit levels would cost nothing downstream."""
    planted = copy.deepcopy(loaded)
    size = torch.from_numpy(np.random.default_rng(seed).lognormal(0.0, sigma, 64).astype(np.float32))
    with torch.no_grad():
        for name, m in planted.module.named_modules():
            if isinstance(m, torch.nn.LayerNorm) and m.normalized_shape == (64,):
                m.weight.mul_(size)
                m.bias.mul_(size)
            elif isinstance(m, torch.nn.Linear) and name.endswith(("query", "key", "value", "intermediate.dense")):
                m.weight.div_(size)
    return planted, size


def _nvfp4(module, loaded, data):
    ctx = StepContext(target=caps("trt"), model_info=loaded.info, calibration=data.calibration,
                      exclude=model_exclude(loaded))
    return NVFP4Step(NVFP4Params()).apply_torch(module, ctx)


def _relative_error(got, ref):
    return float((got - ref).norm() / ref.norm())


def test_sorted_channels_quantize_better_under_nvfp4(tiny_bert, tiny_data):
    """With channel sizes spread as in a trained encoder, NVFP4 of the reordered model is closer to fp32 than of the
    original: unsorted, each block's scale is set by its largest channel and its small ones lose their 4-bit levels."""
    planted, size = _plant_channel_sizes(tiny_bert)
    ref = _outputs(planted.module, planted, tiny_data)
    plain = _nvfp4(copy.deepcopy(planted.module), planted, tiny_data)
    sorted_, report = _reorder(planted, tiny_data)
    order = getattr(sorted_, R.ORDER_ATTR)
    assert int(order[0]) == int(size.argmax())  # the largest planted channel leads the first block
    assert report["largest_channel_rms_over_median"] > 3
    sorted_ = _nvfp4(sorted_, planted, tiny_data)
    err_plain = np.mean([_relative_error(p[0], r[0]) for p, r in zip(_outputs(plain, planted, tiny_data), ref)])
    err_sorted = np.mean([_relative_error(s[0], r[0]) for s, r in zip(_outputs(sorted_, planted, tiny_data), ref)])
    assert err_sorted < 0.8 * err_plain, (err_sorted, err_plain)


def test_distill_compares_hidden_states_in_the_original_order(tiny_bert, tiny_data):
    """The distillation's per-block hidden-state term reads the student's block outputs: after reorder they are
    permuted, so Capture puts them back; the fp32 reordered student then matches the teacher block for block."""
    from compiler.steps.distill import Capture, blocks_of

    module, _ = _reorder(tiny_bert, tiny_data)
    blocks = blocks_of(module)
    s_cap, t_cap = Capture(module, blocks), Capture(tiny_bert.module, blocks)
    feed = [torch.from_numpy(tiny_data.evaluation.arrays[n][:4]) for n in tiny_bert.input_names]
    with torch.no_grad():
        module(*feed)
        tiny_bert.module(*feed)
    s_cap.close()
    t_cap.close()
    for b in blocks:
        torch.testing.assert_close(s_cap.out[b], t_cap.out[b], atol=1e-5, rtol=1e-5)
    raw = Capture(module, blocks)
    raw.module = torch.nn.Module()  # no order: the permuted state itself differs
    with torch.no_grad():
        module(*feed)
    raw.close()
    assert (raw.out[blocks[0]] - t_cap.out[blocks[0]]).abs().max() > 0.1


def test_export_adds_one_gather_and_matches_torch(tiny_bert, tiny_data, tmp_path):
    """reorder + nvfp4 exported as the TensorRT NVFP4 graph: one Gather more than nvfp4 alone (the encoder's output
    put back in order), and the graph run by the reference runner equals the torch fake-quant."""
    from compiler.runners.reference import reference_predictor
    from tests.steps.test_nvfp4 import _export

    module, _ = _reorder(tiny_bert, tiny_data)
    module = _nvfp4(module, tiny_bert, tiny_data)
    plain = _nvfp4(copy.deepcopy(tiny_bert.module), tiny_bert, tiny_data)
    path = _export(module, tiny_bert, tmp_path, "nvfp4_reorder")
    plain_path = _export(plain, tiny_bert, tmp_path, "nvfp4")

    def gathers(p):
        return [n.op_type for n in onnx.load(str(p)).graph.node].count("Gather")

    assert gathers(path) == gathers(plain_path) + 1
    predict = reference_predictor(path)
    for feed in tiny_data.evaluation.batches(16):
        got = predict({n: feed[n] for n in tiny_bert.input_names})
        with torch.no_grad():
            want = module(*[torch.from_numpy(feed[n]) for n in tiny_bert.input_names])
        np.testing.assert_allclose(got["sentence_embedding"], want[1].numpy(), atol=1e-5)


def test_recipe_errors_before_any_model_loads():
    from omegaconf import OmegaConf

    from compiler.core.errors import RecipeError
    from compiler.stages.validate import validate_steps
    from compiler.steps.base import ModelInfo

    info = ModelInfo("tiny_bert", "bert", 64, 256, 4, 512)
    with pytest.raises(RecipeError) as e:
        validate_steps(OmegaConf.create({"steps": {"nvfp4": {}, "reorder": {}}}), caps("trt"), info)
    assert str(e.value) == ("recipe.steps: reorder must come before nvfp4 (it changes the weights nvfp4 quantizes) "
                            "-- write steps: {reorder: ..., nvfp4: ...}")
    with pytest.raises(RecipeError) as e:
        validate_steps(OmegaConf.create({"steps": {"reorder": {"fn": True}, "nvfp4": {}}}), caps("trt"), info)
    assert str(e.value) == "recipe.steps.reorder.fn: unknown key -- did you mean 'ffn'?"
