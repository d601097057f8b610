"""nvfp4 step: the CPU NVFP4 numerics against a straightforward reference, quantizers where expected,
error bounds vs fp32, the TensorRT NVFP4 export (op types, opset, rotation kept) and the exported graph
run by the reference runner against the torch fake-quant."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch

from compiler.core.errors import RecipeError
from compiler.numerics.nvfp4 import E2M1_GRID, nvfp4_fake_quant, nvfp4_quantize, round_to_e2m1
from compiler.steps.base import ModelInfo, StepContext
from modelopt_cases import caps
from compiler.steps.nvfp4 import NVFP4Params, NVFP4Step
from tests.conftest import model_exclude

# ---- numerics -----------------------------------------------------------------------------------------


def _reference_fake_quant(x: np.ndarray, amax: float, block: int = 16) -> np.ndarray:
    """Straightforward NVFP4: per block, scale = e4m3(block_amax / 6 / gs) * gs (gs = amax / 2688); each
    value goes to the nearest e2m1 grid point of |x| / scale (ties: even mantissa), saturating at 6."""
    grid = np.array(E2M1_GRID)
    gs = np.float32(amax) / np.float32(6 * 448)
    out = np.empty_like(x)
    flat, res = x.reshape(-1, block), out.reshape(-1, block)
    for i, blk in enumerate(flat):
        bmax = np.abs(blk).max()
        s8 = np.float32(min(bmax / (6 * gs), 448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        scale = np.float32(1.0) if bmax == 0 else s8 * gs
        if scale == 0:
            res[i] = 0
            continue
        mag = np.minimum(np.abs(blk) / scale, 6.0)
        dist = np.abs(mag[:, None] - grid[None, :])
        idx = np.argmin(dist, axis=1)
        tie = np.isclose(dist.min(axis=1), dist[np.arange(16), np.minimum(idx + 1, 7)]) & (idx < 7) & (
            dist[np.arange(16), np.minimum(idx + 1, 7)] == dist.min(axis=1))
        odd = np.isin(idx, [1, 3, 5, 7])  # 0.5, 1.5, 3, 6 have an odd mantissa: a tie moves up
        idx = np.where(tie & odd, idx + 1, idx)
        res[i] = np.sign(blk) * grid[idx] * scale
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fake_quant_matches_reference(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((8, 64)) * rng.lognormal(0, 1.5, size=(8, 64))).astype(np.float32)
    x[0, :16] = 0  # an all-zero block
    amax = float(np.abs(x).max()) * (0.7 if seed == 1 else 1.0)  # seed 1: calibrated amax below the data max
    got = nvfp4_fake_quant(torch.from_numpy(x), torch.tensor(amax)).numpy()
    np.testing.assert_array_equal(got, _reference_fake_quant(x, amax))


def test_quantized_values_are_on_the_grids():
    x = torch.randn(32, 128) * torch.rand(32, 128) * 10
    q, s8, gs = nvfp4_quantize(x, x.abs().max())
    assert set(np.unique(np.abs(q.numpy()))) <= set(E2M1_GRID)
    s = s8.numpy()
    np.testing.assert_array_equal(s.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), s)  # e4m3-representable
    assert s8.shape == (32, 8) and s.max() <= 448
    assert gs.dtype == torch.float32 and float(gs) == pytest.approx(float(x.abs().max()) / 2688, rel=1e-6)


def test_e2m1_rounding_ties_go_to_even():
    mags = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, 0.26, 0.74])
    assert round_to_e2m1(mags).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.5, 0.5]


def _nearest_e2m1_reference(x: np.ndarray) -> np.ndarray:
    """The e2m1 rule written from its definition: the nearest grid value of |x| (saturating at 6), on a tie the
    one with an even mantissa (0, 1, 2, 4, 6 ... i.e. grid index even), with x's sign."""
    grid = np.array(E2M1_GRID)
    mag = np.minimum(np.abs(x), 6.0)
    dist = np.abs(mag[:, None] - grid[None, :])
    best = dist.min(axis=1, keepdims=True)
    ties = np.isclose(dist, best, rtol=0, atol=0)
    idx = np.where(ties.sum(axis=1) > 1, np.argmax(ties & (np.arange(len(grid)) % 2 == 0), axis=1), dist.argmin(axis=1))
    return np.sign(x) * grid[idx]


def test_e2m1_rounding_equals_the_nearest_grid_value_rule():
    """round_to_e2m1 (a binade-step formula, for speed) against the rule itself, on signed values: every midpoint
    and grid point, both sides of each binade edge, saturation, tiny and huge values, and random ones."""
    grid = np.array(E2M1_GRID)
    mids = (grid[1:] + grid[:-1]) / 2
    edges = np.array([1.0, 2.0, 4.0, 6.0, 8.0])
    special = np.concatenate([grid, mids, np.nextafter(mids, 0), np.nextafter(mids, 10), np.nextafter(edges, 0),
                              np.nextafter(edges, 10), [1e-30, 1e-8, 0.2499, 7.0, 100.0, 3e38]]).astype(np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([special, -special, rng.uniform(-8, 8, 20000), rng.normal(0, 0.3, 5000)]).astype(np.float32)
    got = round_to_e2m1(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, _nearest_e2m1_reference(x))


def test_relative_error_bound_on_gaussian_blocks():
    """The bound the model-level tests rely on: NVFP4 of Gaussian data has a relative RMS error of ~9%
    (e2m1 has 3 bits of magnitude; a block's max maps to 6, so typical values land where the grid step is
    0.5-1, i.e. 10-25% of their size, and round to half of that on average); well under 12%, and not a
    no-op (> 3%)."""
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))
    y = nvfp4_fake_quant(x, x.abs().max())
    rel = float((y - x).norm() / x.norm())
    assert 0.03 < rel < 0.12, rel


# ---- the step on tiny models -------------------------------------------------------------------------


def _quantize(loaded, data, rotate_block=None, target="trt"):
    from compiler.steps.rotate import RotateParams, RotateStep

    module = copy.deepcopy(loaded.module)
    ctx = StepContext(target=caps(target), model_info=loaded.info, calibration=data.calibration,
                      exclude=model_exclude(loaded))
    if rotate_block:
        module = RotateStep(RotateParams(block_size=rotate_block)).apply_torch(module, ctx)
        ctx.report = {}
    module = NVFP4Step(NVFP4Params()).apply_torch(module, ctx)
    return module, ctx


def _embeddings(module, loaded, data):
    outs = []
    with torch.no_grad():
        for feed in data.evaluation.batches(16):
            outs.append([o.numpy() for o in module(*[torch.from_numpy(feed[n]) for n in loaded.input_names])])
    return [np.concatenate([o[i] for o in outs]) for i in range(2)]


@pytest.fixture(scope="module")
def bert_nvfp4(tiny_bert, tiny_data):
    return _quantize(tiny_bert, tiny_data)


def test_quantizers_inserted_where_expected(bert_nvfp4):
    from modelopt.torch.quantization.nn import TensorQuantizer

    module, ctx = bert_nvfp4
    layer = module.inner.encoder.layer[0]
    for lin in (layer.attention.self.query, layer.attention.output.dense, layer.intermediate.dense,
                layer.output.dense):
        assert lin.weight_quantizer.is_enabled and lin.input_quantizer.is_enabled
        assert lin.weight_quantizer.num_bits == (2, 1) and lin.weight_quantizer.block_sizes[-1] == 16
        assert lin.input_quantizer.block_sizes["scale_bits"] == (4, 3)
    assert not module.inner.pooler.dense.weight_quantizer.is_enabled  # excluded by the model's patterns
    enabled_ln = [n for n, q in module.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled
                  and "LayerNorm" in n]
    assert enabled_ln == []  # Linear layers only
    assert ctx.report["quantized_layers"] == 12 and ctx.report["weight_quantizers"] == 12
    assert ctx.report["input_quantizers"] == 12 and ctx.report["trt_export_quantizers"] == 24


def test_error_vs_fp32_within_bound(bert_nvfp4, tiny_bert, tiny_data):
    """Bound: ~9% relative error per quantized operand (test_relative_error_bound_on_gaussian_blocks), two
    operands per Linear in quadrature ~13% per layer; LayerNorm after each block renormalizes, so the
    final hidden states stay within ~25% relative RMS error, and the mean-pooled, normalized embedding
    (errors average out over tokens) within cosine 0.99."""
    module, _ = bert_nvfp4
    ref_h, ref_e = _embeddings(tiny_bert.module, tiny_bert, tiny_data)
    got_h, got_e = _embeddings(module, tiny_bert, tiny_data)
    rel = np.linalg.norm(got_h - ref_h) / np.linalg.norm(ref_h)
    cos = np.sum(ref_e * got_e, -1) / np.linalg.norm(ref_e, axis=-1) / np.linalg.norm(got_e, axis=-1)
    assert 0.005 < rel < 0.25, rel  # not a no-op, not a collapse
    assert cos.mean() > 0.99, cos.mean()


def test_not_runnable_on_ort_names_the_fix():
    from omegaconf import OmegaConf

    from compiler.stages.validate import validate_steps

    info = ModelInfo("tiny_bert", "bert", 64, 256, 4, 512)
    node = OmegaConf.create({"name": "nvfp4", "steps": {"nvfp4": {}}})
    with pytest.raises(RecipeError) as e:
        validate_steps(node, caps("ort"), info)
    assert str(e.value) == ("recipe.steps.nvfp4: nvfp4 is not runnable on target=ort -- "
                            "use target=torch or target=trt")
    with pytest.raises(RecipeError, match=r"recipe.steps.nvfp4.block_size: NVFP4 uses blocks of 16 values \(got 32\) "
                       r"-- set block_size: 16"):
        validate_steps(OmegaConf.create({"steps": {"nvfp4": {"block_size": 32}}}), caps("trt"), info)


def _export(module, loaded, tmp_path, name):
    from compiler import graph as graph_passes
    from compiler.stages.export import export_onnx
    from compiler.core.schema import ExportConfig

    step = NVFP4Step(NVFP4Params())
    assert step.min_opset(caps("trt")) == 23  # validation resolves the auto opset to this
    cfg = ExportConfig(opset=step.min_opset(caps("trt")))
    path = export_onnx(module, loaded.input_names, loaded.output_names, tmp_path / f"{name}.onnx", cfg)
    path = graph_passes.fix_exported(path, tmp_path, cfg, {})
    return NVFP4Step(NVFP4Params()).after_export(path, tmp_path / f"{name}_trt.onnx", None)


def _fp4_weight_dqs(model):
    fp4 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in fp4]


def test_export_is_the_tensorrt_nvfp4_graph_and_matches_torch(bert_nvfp4, tiny_bert, tiny_data, tmp_path):
    from compiler.graph.input_flow import check_input_flow
    from compiler.runners.reference import reference_predictor

    module, _ = bert_nvfp4
    path = _export(module, tiny_bert, tmp_path, "nvfp4")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("TRT_FP4DynamicQuantize") == 12  # one per quantized Linear input
    assert "TRT_FP4QDQ" not in ops  # replaced by modelopt's post-processing
    assert len(_fp4_weight_dqs(model)) == 12  # FLOAT4E2M1 weights + DequantizeLinear(block 16)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 23
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.output[0].endswith("_f16")]
    check_input_flow(path, tiny_bert.input_names)  # runs through the reference runner (trt ops)
    predict = reference_predictor(path)
    feed = next(tiny_data.evaluation.batches(8))
    got = predict(feed)
    with torch.no_grad():
        want = module(*[torch.from_numpy(feed[n]) for n in tiny_bert.input_names])
    np.testing.assert_allclose(got["last_hidden_state"], want[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["sentence_embedding"], want[1].numpy(), atol=1e-6)


def test_nvfp4_rotate_export_keeps_rotation_live(tiny_bert, tiny_data, tmp_path):
    """rotate then nvfp4: the Hadamard MatMuls stay in the TensorRT graph in front of the FP4 quantize of
    each Linear input, and the graph equals the torch model."""
    from compiler.runners.reference import reference_predictor

    module, _ = _quantize(tiny_bert, tiny_data, rotate_block=128)
    assert module.inner.encoder.layer[0].attention.self.query.linear.input_quantizer.is_enabled
    path = _export(module, tiny_bert, tmp_path, "nvfp4_rotate")
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    live = set(tiny_bert.input_names)
    for n in model.graph.node:
        if any(i in live for i in n.input):
            live.update(n.output)
    rot = [n for n in model.graph.node if n.op_type == "MatMul"
           and alias.get(n.input[1], n.input[1]).endswith("rotation.hadamard") and alias.get(n.input[1], n.input[1]) in inits]
    assert len(rot) == 12 and all(n.input[0] in live for n in rot)

    def feeds_fp4_quantize(name, depth=0):  # through the block-diagonal Reshape, if any
        return depth < 4 and any(c.op_type == "TRT_FP4DynamicQuantize" or
                                 (c.op_type == "Reshape" and feeds_fp4_quantize(c.output[0], depth + 1))
                                 for c in consumers.get(name, []))

    assert all(feeds_fp4_quantize(n.output[0]) for n in rot)
    feed = next(tiny_data.evaluation.batches(8))
    got = reference_predictor(path)(feed)
    with torch.no_grad():
        want = module(*[torch.from_numpy(feed[n]) for n in tiny_bert.input_names])
    # the extra rotation MatMuls accumulate in another order in numpy than in torch, so now and then a
    # value on an e2m1 rounding boundary goes the other way: a few elements off by ~1e-5, never more
    diff = np.abs(got["sentence_embedding"] - want[1].numpy())
    assert diff.max() < 1e-3 and diff.mean() < 1e-5, (diff.max(), diff.mean())


def test_cli_nvfp4_rotate_trt_end_to_end(qcompile):
    """The mission's build on a tiny model: rotate + NVFP4, TensorRT-ready graph checked on the CPU."""
    import json

    from tests.conftest import FAST

    r = qcompile("model=tiny_bert", "recipe=nvfp4_rotate", "target=trt", *FAST)
    assert r.rc == 0, r
    (run,) = r.run_dirs()
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "passed"
    assert report["onnx"]["opset"] == 23
    assert report["onnx"]["ops"]["trt::TRT_FP4DynamicQuantize"] == 12
    # the recipe rotates attention.output.dense online (fuse_attention: false): the model's 16 MatMuls + one
    # explicit Hadamard MatMul per layer
    rot = report["steps"]["rotate"]
    assert (rot["rotated_layers"], rot["fused_rotations"], rot["online_rotations"]) == (2, 0, 2)
    assert report["onnx"]["ops"]["MatMul"] == 16 + 2
    assert report["export"]["input_flow"]["runner"] == "reference"
    assert report["check"]["fidelity"]["embedding_cosine_mean"] > 0.99


def test_cli_nvfp4_on_ort_is_a_recipe_error(qcompile):
    r = qcompile("model=tiny_bert", "recipe=nvfp4", "target=ort")
    assert r.rc == 2, r
    assert "recipe.steps.nvfp4: nvfp4 is not runnable on target=ort -- use target=torch or target=trt" in r.stdout + r.stderr


def test_fp4_weights_found_behind_aliases_constants_and_subgraphs():
    """modelopt's NVFP4 exporter asserts each TRT_FP4QDQ reads an initializer: a weight behind an Identity
    alias, in a small Constant, or computed by a constant subgraph (W_flat reshaped, as a rotation computed
    at run time would export) is turned into one first."""
    from onnx import TensorProto, helper, numpy_helper

    from compiler.steps.nvfp4 import resolve_fp4_weights

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["w"], ["w_alias"]),
        helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(w * 2, "c")),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([16, 32], np.int64), "s")),
        helper.make_node("Reshape", ["w_flat", "shape"], ["w_sub"]),
    ]
    outs = []
    for i, src in enumerate(["w_alias", "w_const", "w_sub"]):
        nodes.append(helper.make_node("TRT_FP4QDQ", [src], [f"q{i}"], domain="trt", block_size=16))
        nodes.append(helper.make_node("MatMul", ["x", f"q{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 32]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])], outs,
                          initializer=[numpy_helper.from_array(w, "w"),
                                       numpy_helper.from_array(w.reshape(-1) * 3, "w_flat")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt", 1)])
    resolve_fp4_weights(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    srcs = [n.input[0] for n in model.graph.node if n.op_type == "TRT_FP4QDQ"]
    assert srcs == ["w", "w_const", "w_sub"] and all(s in inits for s in srcs)
    np.testing.assert_array_equal(inits["w_sub"], w * 3)
    np.testing.assert_array_equal(inits["w_const"], w * 2)
