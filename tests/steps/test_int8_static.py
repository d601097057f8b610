"""int8_static on the ONNX side (onnxruntime quantize_static Q/DQ) and its hand-over to modelopt on torch:
numbers against fp32, coverage, the guard rails (zero matches, pre-processing failures), calibration
methods, the cache, validation errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.core.errors import BuildError, RecipeError
from compiler.steps.base import StepContext
from tests.steps.modelopt_cases import caps
from compiler.steps.int8_static import Int8StaticStep, Params, compute_ranges

MODELS = ["tiny_bert", "tiny_modernbert"]  # the `exported` fixture (tests/conftest.py) holds both


def run(path: Path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["sentence_embedding"], f)[0] for f in feeds])


def mean_cosine(a, b) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=-1)))


def quantize(exported, name, tmp_path, target="ort", cache=None, model_exclude=(), **params):
    """Int8StaticStep(Params(**params)) on the model's fp32 graph; model_exclude plays model.exclude."""
    model, data, fp32 = exported[name]
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(target=caps(target), model_info=model.info, calibration=data.calibration, work_dir=tmp_path,
                      exclude=list(model_exclude), cache=cache)
    out = Int8StaticStep(Params(**params)).apply_onnx(fp32, tmp_path / "q.onnx", ctx)
    return out, ctx.report


def producers(path: Path):
    g = onnx.load(str(path)).graph
    return g, {o: n for n in g.node for o in n.output}


# onnxruntime.quantization's own QDQ output, without the ORT graph passes (compiler/graph/qdq_ort.py)
QUANTIZER_ONLY = {"quantize_activation_products": True, "keep_float_path": False, "fuse_bias": False}


@pytest.mark.parametrize("name", MODELS)
def test_embeddings_close_to_fp32_and_every_linear_quantized(exported, name, tmp_path):
    model, data, fp32 = exported[name]
    out, report = quantize(exported, name, tmp_path, **QUANTIZER_ONLY)
    feeds = list(data.evaluation.batches(8))
    cos = mean_cosine(run(out, feeds), run(fp32, feeds))
    # measured at seq 32, 16 calibration sentences: tiny_bert 0.99991, tiny_modernbert 0.99996 (minilm:
    # 0.989); 0.9995 is ~5x the larger tiny loss, and far above what a broken scale gives (< 0.9)
    assert cos > 0.9995, cos
    linear = {"tiny_bert": 16, "tiny_modernbert": 12}[name]  # 2 layers x (Q, K, V, O, QK^T, PV, FFN in/out)
    assert report["total"] == linear and report["quantized"] == linear and report["fraction"] == 1.0
    assert report["calibration"] == "minmax" and report["calibration_samples"] == len(data.calibration)
    assert report["activation_type"] == "uint8" and report["weight_type"] == "int8"
    g, prod = producers(out)
    matmuls = [n for n in g.node if n.op_type == "MatMul"]
    assert all(any(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in n.input)
               for n in matmuls)
    # no Q/DQ on MatMul outputs (quantize_outputs=false): on minilm those cost 0.938 -> 0.989 cosine
    assert not [n for n in g.node if n.op_type == "QuantizeLinear" and prod.get(n.input[0]) is not None
                and prod[n.input[0]].op_type == "MatMul"]
    # uint8 activations, int8 per-channel weights
    inits = {i.name: i for i in g.initializer}
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weight_dq)
    assert any(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq)


@pytest.mark.parametrize("name", MODELS)
def test_ort_graph_passes_keep_the_numbers_and_leave_no_float_only_qdq(exported, name, tmp_path):
    """The defaults on target=ort: attention products fp32, float ops read float tensors, every quantized
    MatMul fused with its bias into MatMulIntegerToFloat; outputs equal the quantizer-only graph's within
    the rounding the residual no longer gets."""
    from compiler.graph.qdq_ort import float_consumers_read_float, qdq_fed_only_float

    model, data, fp32 = exported[name]
    out, report = quantize(exported, name, tmp_path / "passes")
    # the same quantization (attention products fp32 too), without the two graph passes
    plain, _ = quantize(exported, name, tmp_path / "plain", keep_float_path=False, fuse_bias=False)
    feeds = list(data.evaluation.batches(8))
    got, ref = run(out, feeds), run(plain, feeds)
    assert mean_cosine(got, run(fp32, feeds)) > 0.9995
    assert mean_cosine(got, ref) > 0.9999 and np.max(np.abs(got - ref)) < 0.02
    linear = {"tiny_bert": 16, "tiny_modernbert": 12}[name]
    assert report["activation_products_fp32"] == 4  # 2 layers x (QK^T, PV)
    assert report["total"] == linear and report["quantized"] == linear - 4
    g = onnx.load(str(out)).graph
    fused = [n for n in g.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == linear - 4 == report["ort_graph_passes"]["matmuls_fused_with_bias"]
    assert report["ort_graph_passes"]["float_inputs_rewired"] > 0
    # MatMuls left: the attention products, in float; no bias Add behind a fused MatMul
    assert sum(n.op_type == "MatMul" for n in g.node) == 4
    assert all(len(n.input) == 7 and n.input[6] for n in fused) if name == "tiny_bert" else True
    assert qdq_fed_only_float(onnx.load(str(out))) == []
    # nothing left to rewire; in the quantizer's own graph the residual path read LayerNorm outputs' Q/DQ copy
    assert float_consumers_read_float(onnx.load(str(out))) == 0
    assert float_consumers_read_float(onnx.load(str(plain))) == report["ort_graph_passes"]["float_inputs_rewired"]


def test_bias_fusion_only_where_the_session_runs_cpu_kernels(exported, tmp_path):
    """fuse_bias writes onnxruntime's MatMulIntegerToFloat, a CPU kernel: with the CUDA EP first in
    target.providers the capabilities say so and the bias stays an Add (the float-path pass, standard ops,
    still runs); the same step on the CPU EP fuses. The graph without the fusion computes the same numbers."""
    from compiler.core.schema import TargetConfig
    from targets import get_target

    model, data, fp32 = exported["tiny_bert"]
    gpu_caps = get_target("ort").capabilities_for(TargetConfig(providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert gpu_caps.ort_session and not gpu_caps.ort_cpu_kernels
    assert get_target("ort").capabilities_for(TargetConfig()).ort_cpu_kernels
    ctx = StepContext(target=gpu_caps, model_info=model.info, calibration=data.calibration, work_dir=tmp_path)
    out = Int8StaticStep(Params()).apply_onnx(fp32, tmp_path / "q.onnx", ctx)
    g = onnx.load(str(out)).graph
    assert not any(n.op_type == "MatMulIntegerToFloat" or n.domain == "com.microsoft" for n in g.node)
    passes = ctx.report["ort_graph_passes"]
    assert "matmuls_fused_with_bias" not in passes and passes["float_inputs_rewired"] > 0
    assert "MatMulIntegerToFloat has no kernel there" in passes["fuse_bias_skipped"]
    fused, _ = quantize(exported, "tiny_bert", tmp_path / "cpu")
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in onnx.load(str(fused)).graph.node) == 12
    feeds = list(data.evaluation.batches(8))
    np.testing.assert_allclose(run(out, feeds), run(fused, feeds), atol=1e-4)


def test_trt_graph_gets_no_ort_passes(exported, tmp_path):
    out, report = quantize(exported, "tiny_bert", tmp_path, target="trt")
    g = onnx.load(str(out)).graph
    assert "ort_graph_passes" not in report and "activation_products_fp32" not in report
    assert not any(n.domain == "com.microsoft" for n in g.node) and report["quantized"] == 16


def test_zero_matched_ops_is_a_build_error(exported, tmp_path):
    with pytest.raises(BuildError) as e:
        quantize(exported, "tiny_bert", tmp_path, op_types_to_quantize=["Conv"])
    assert str(e.value) == ("recipe.steps.int8_static: op_types_to_quantize=['Conv'] matched no node: the graph's "
                            "linear layers are MatMul x16")


def test_everything_excluded_is_a_build_error_not_a_silent_fp32_graph(exported, tmp_path):
    with pytest.raises(BuildError, match=r"quantize_static quantized none of the 12 MatMul/Gemm nodes "
                                         r"\(excluded: 12\)"):
        quantize(exported, "tiny_modernbert", tmp_path, model_exclude=["*layers*"])


def test_exclude_patterns_use_module_names(exported, tmp_path):
    # the same pattern as a torch-side exclude: inner.encoder.layer.0.output.dense <- /inner/encoder/layer.0/...
    out, report = quantize(exported, "tiny_bert", tmp_path, model_exclude=["*pooler*"],
                           exclude=["*encoder.layer.0.output.dense"], **QUANTIZER_ONLY)
    assert report["quantized"] == 15 and report["total"] == 16
    g, prod = producers(out)
    (ffn_down,) = [n for n in g.node if n.name == "/inner/encoder/layer.0/output/dense/MatMul"]
    assert not any(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in ffn_down.input)


def test_gather_stores_embedding_tables_int8(exported, tmp_path):
    model, data, fp32 = exported["tiny_bert"]
    # model.exclude's "*embeddings*" is about compute (torch side), not about storing the table int8
    out, report = quantize(exported, "tiny_bert", tmp_path, model_exclude=["*embeddings*"],
                           op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    assert report["embedding_gathers_quantized"] == 3  # word, position, token type
    assert report["quantized"] == 12  # the 4 attention products stay fp32 on ort
    # the word table (30522 x 64) dominates: int8 storage makes the graph > 3x smaller
    assert out.stat().st_size * 3 < fp32.stat().st_size
    feeds = list(data.evaluation.batches(8))
    assert mean_cosine(run(out, feeds), run(fp32, feeds)) > 0.9995


def test_trt_gets_symmetric_int8_activations_and_no_gather(exported, tmp_path):
    out, report = quantize(exported, "tiny_bert", tmp_path, target="trt", op_types_to_quantize=["MatMul", "Gather"])
    assert report["activation_type"] == "int8" and report["op_types_to_quantize"] == ["MatMul"]
    g = onnx.load(str(out)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    zps = [inits[n.input[2]] for n in g.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # TensorRT: zero point 0


def test_preprocess_shape_inference_failure_is_retried_and_reported(exported, tmp_path):
    # quant_pre_process fails on BERT with "Incomplete symbolic shape inference" (FIELD_NOTES); auto_merge fixes it
    _, report = quantize(exported, "tiny_bert", tmp_path)
    assert report["preprocess"] == "auto_merge"
    assert report["preprocess_failures"] == ["default: Exception: Incomplete symbolic shape inference"]
    _, report = quantize(exported, "tiny_modernbert", tmp_path)
    assert report["preprocess"] == "default" and "preprocess_failures" not in report


def _ranges(exported, name, tmp_path, **params):
    model, data, fp32 = exported[name]
    r = compute_ranges(fp32, data.calibration, Params(**params), 8, tmp_path)
    return {k: np.ravel(r[k].range_value).astype(np.float64) for k in r.keys()}


def test_entropy_and_percentile_ranges_differ_from_minmax(exported, tmp_path):
    minmax = _ranges(exported, "tiny_modernbert", tmp_path)
    # 256 bins keeps the test short (entropy's search costs ~bins^2); the step's default is 512
    entropy = _ranges(exported, "tiny_modernbert", tmp_path, calibration="entropy", num_bins=256)
    percentile = _ranges(exported, "tiny_modernbert", tmp_path, calibration="percentile")
    assert minmax.keys() == entropy.keys() == percentile.keys() and len(minmax) == 28
    differ = [k for k in minmax if not np.allclose(minmax[k], entropy[k], rtol=1e-4)]
    assert len(differ) >= 2, differ  # measured (deterministic): 2 of 28 tensors at 256 bins, 14 at 512
    # entropy only ever clips: its threshold lies inside the observed range
    for k in differ:
        assert entropy[k][1] - entropy[k][0] < minmax[k][1] - minmax[k][0]
    # percentile is symmetric around 0 by onnxruntime's default and so differs everywhere
    assert sum(not np.allclose(minmax[k], percentile[k], rtol=1e-4) for k in minmax) == len(minmax)


def test_entropy_with_onnxruntimes_default_bins_equals_minmax(exported, tmp_path):
    # why the step runs the calibrator itself (FIELD_NOTES): 128 bins and 128 quantized bins leave a single
    # candidate threshold, the full range, so quantize_static's entropy is MinMax under another name
    minmax = _ranges(exported, "tiny_modernbert", tmp_path)
    entropy128 = _ranges(exported, "tiny_modernbert", tmp_path, calibration="entropy", num_bins=128)
    assert all(np.allclose(minmax[k], entropy128[k], rtol=1e-5) for k in minmax)


def test_calibration_ranges_come_from_the_cache_and_any_input_change_misses(exported, tmp_path):
    from compiler.rundir.cache import Cache
    from compiler.stages.data import Features

    cache = Cache(tmp_path / "cache", versions={"test": "1"})
    model, data, fp32 = exported["tiny_bert"]
    first, r1 = quantize(exported, "tiny_bert", tmp_path / "a", cache=cache)
    second, r2 = quantize(exported, "tiny_bert", tmp_path / "b", cache=cache)
    assert (r1["calibration_cache"], r2["calibration_cache"]) == ("miss", "hit")
    assert first.read_bytes() == second.read_bytes()
    # one sentence changed -> a different key
    arrays = {k: v.copy() for k, v in data.calibration.arrays.items()}
    arrays["input_ids"][0, 1] += 1
    changed = Features(texts=list(data.calibration.texts), arrays=arrays)
    ctx = StepContext(target=caps("ort"), model_info=model.info, calibration=changed, work_dir=tmp_path, cache=cache)
    Int8StaticStep(Params()).apply_onnx(fp32, tmp_path / "c.onnx", ctx)
    assert ctx.report["calibration_cache"] == "miss"
    # another method -> a different key
    _, r3 = quantize(exported, "tiny_bert", tmp_path / "d", cache=cache, calibration="percentile")
    assert r3["calibration_cache"] == "miss"
    assert [e["result"] for e in cache.events if e["kind"] == "ort_calibration"] == ["miss", "hit", "miss", "miss"]


def test_preprocessed_graph_comes_from_the_cache_with_its_report(exported, tmp_path):
    # quant_pre_process (shape inference + ORT's optimizer) is a pure function of the graph: one run per export
    from compiler.rundir.cache import Cache

    cache = Cache(tmp_path / "cache", versions={"test": "1"})
    first, r1 = quantize(exported, "tiny_bert", tmp_path / "a", cache=cache)
    second, r2 = quantize(exported, "tiny_bert", tmp_path / "b", cache=cache)
    uncached, r0 = quantize(exported, "tiny_bert", tmp_path / "c")
    assert [e["result"] for e in cache.events if e["kind"] == "ort_preprocess"] == ["miss", "hit"]
    # the retried attempt is reported on a hit as on the run that computed it
    assert r1["preprocess"] == r2["preprocess"] == r0["preprocess"] == "auto_merge"
    assert r2["preprocess_failures"] == r0["preprocess_failures"]
    assert first.read_bytes() == second.read_bytes() == uncached.read_bytes()


def _validate(steps, target="ort", info=None):
    from omegaconf import OmegaConf

    from compiler.steps.base import ModelInfo
    from compiler.stages.validate import validate_steps

    info = info or ModelInfo("tiny_bert", "bert", 64, 256, 4, 512)
    return validate_steps(OmegaConf.create({"name": "t", "steps": steps}), caps(target), info)


@pytest.mark.parametrize("steps,key,text", [
    ({"calibration": "kl"}, "recipe.steps.int8_static.calibration",
     "recipe.steps.int8_static.calibration: unknown method 'kl' -- use one of minmax, entropy, percentile"),
    ({"activation_type": "int4"}, "recipe.steps.int8_static.activation_type",
     "recipe.steps.int8_static.activation_type: bad value 'int4' -- use auto, uint8 or int8"),
    ({"op_types_to_quantize": []}, "recipe.steps.int8_static.op_types_to_quantize",
     "recipe.steps.int8_static.op_types_to_quantize: is empty -- use e.g. [MatMul, Gemm]"),
    ({"num_bins": 64}, "recipe.steps.int8_static.num_bins",
     "recipe.steps.int8_static.num_bins: 64 is below num_quantized_bins (128) -- use e.g. 512 or 2048, or null "
     "for the method's default"),
    ({"percentile": 0}, "recipe.steps.int8_static.percentile",
     "recipe.steps.int8_static.percentile: 0.0 is not in (0, 100] -- use e.g. 99.999"),
    ({"calibraton": "minmax"}, "recipe.steps.int8_static.calibraton",
     "recipe.steps.int8_static.calibraton: unknown key -- did you mean 'calibration'?"),
])
def test_bad_params_are_recipe_errors_naming_the_key(steps, key, text):
    with pytest.raises(RecipeError) as e:
        _validate({"int8_static": steps})
    assert e.value.key == key
    assert str(e.value) == text


def test_uint8_activations_on_trt_are_a_recipe_error():
    with pytest.raises(RecipeError) as e:
        _validate({"int8_static": {"activation_type": "uint8"}}, target="trt")
    assert e.value.key == "recipe.steps.int8_static.activation_type"
    assert "target=trt (its explicit quantization needs symmetric int8, zero point 0)" in str(e.value)


def test_bad_calibration_fails_at_cli_validation_with_exit_2(qcompile):
    res = qcompile("model=tiny_bert", "recipe=int8_static", "target=ort", "recipe.steps.int8_static.calibration=kl")
    assert res.rc == 2, res
    assert "recipe.steps.int8_static.calibration: unknown method 'kl'" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_torch_target_passes_calibration_and_exclude_to_modelopt(tiny_bert, tiny_data, tmp_path):
    """The torch side calls modelopt's quantize directly with the step's own calibration, percentile and
    exclude patterns (no other step is built through the registry)."""
    import copy

    (step,), _ = _validate({"int8_static": {"calibration": "percentile", "percentile": 99.9,
                                            "exclude": ["*layer.0.output.dense"]}}, target="torch")
    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, calibration=tiny_data.calibration,
                      work_dir=tmp_path, exclude=["*pooler*", "*embeddings*"])
    step.apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    assert ctx.report["calibration"] == "percentile"
    assert ctx.report["excluded_layers"] == ["inner.encoder.layer.0.output.dense", "inner.pooler.dense"]
    assert ctx.report["excluded_patterns"] == ["*pooler*", "*embeddings*", "*layer.0.output.dense"]


def test_torch_target_quantizes_with_modelopt_close_to_fp32(tiny_bert, tiny_data, tmp_path):
    import copy

    from compiler.runners.callable import torch_predictor

    step = Int8StaticStep(Params())
    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, calibration=tiny_data.calibration, work_dir=tmp_path,
                      exclude=["*pooler*", "*embeddings*"])
    module = step.apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    assert ctx.report["delegated_to"] == "int8 (modelopt W8A8, calibration=minmax)"
    assert ctx.report["quantized_layers"] == 12  # 13 Linear minus the pooler
    fp32 = torch_predictor(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names)
    q = torch_predictor(module, tiny_bert.input_names, tiny_bert.output_names)
    feeds = list(tiny_data.evaluation.batches(8))
    ref = np.concatenate([fp32(f)["sentence_embedding"] for f in feeds])
    got = np.concatenate([q(f)["sentence_embedding"] for f in feeds])
    # modelopt W8A8 on tiny_bert measured 0.99999+ (FIELD_NOTES: 0.9997 incl. ORT); 0.999 bounds it with margin
    assert mean_cosine(got, ref) > 0.999
    assert not np.allclose(got, ref, atol=1e-7)  # it did quantize


@pytest.mark.parametrize("target,kept", [("ort", []), ("trt", ["ffn_down[0]"]), ("torch", ["ffn_down[0]"])])
def test_exclude_on_ort_replaces_exclude_only_where_onnxruntime_runs_the_graph(target, kept):
    (step,), _ = _validate({"int8_static": {"exclude": ["ffn_down[0]"], "exclude_on_ort": []}}, target=target)
    assert step.params.exclude == kept
    (step,), _ = _validate({"int8_static": {"exclude": ["ffn_down[0]"]}}, target=target)  # unset: exclude everywhere
    assert step.params.exclude == ["ffn_down[0]"]


def test_exclude_on_ort_quantizes_the_layer_exclude_keeps_fp32(exported, tmp_path):
    """The ORT graph of a step resolved for target=ort quantizes the layer `exclude` names; the trt graph keeps it
    fp32, and the report says which list applied."""
    params = {"exclude": ["*encoder.layer.0.output.dense"], "exclude_on_ort": []}
    outs = {}
    for target in ("ort", "trt"):
        (step,), _ = _validate({"int8_static": params}, target=target)
        model, data, fp32 = exported["tiny_bert"]
        ctx = StepContext(target=caps(target), model_info=model.info, calibration=data.calibration,
                          work_dir=tmp_path / target, exclude=["*pooler*"])
        outs[target] = (step.apply_onnx(fp32, tmp_path / f"{target}.onnx", ctx), ctx.report)
    (_, ort_report), (_, trt_report) = outs["ort"], outs["trt"]
    # ort: 12 linears (its 4 attention products stay fp32, quantize_activation_products), none excluded;
    # trt: 16 MatMuls less the excluded one
    assert ort_report["quantized"] == 12 and ort_report["excluded_nodes"] == 0
    assert ort_report["exclude_from"] == "exclude_on_ort"
    assert trt_report["quantized"] == 15 and "exclude_from" not in trt_report
    assert "/inner/encoder/layer.0/output/dense/MatMul" in trt_report["excluded_node_names"]


def test_a_misspelt_role_in_exclude_on_ort_names_that_key():
    with pytest.raises(RecipeError) as e:
        _validate({"int8_static": {"exclude_on_ort": ["ffn_dwn[0]"]}}, target="torch")
    assert e.value.key == "recipe.steps.int8_static.exclude_on_ort"
    assert "'ffn_dwn[0]' is not a layer role" in str(e.value)


@pytest.mark.parametrize("name,node", [("tiny_bert", "/inner/encoder/layer.0/output/dense/MatMul"),
                                       ("tiny_modernbert", "/inner/layers.0/mlp/Wo/MatMul")])
def test_a_role_in_exclude_keeps_that_layers_node_fp32_on_each_family(exported, name, node, tmp_path):
    """`exclude: [ffn_down[0]]` (the recipe's trt/torch list) resolved by the model's roles, as the pipeline does
    (resolve_roles), keeps the first block's FFN down-projection node fp32 and no other."""
    from compiler.pipeline import resolve_roles

    model, data, fp32 = exported[name]
    (step,), _ = _validate({"int8_static": {"exclude": ["ffn_down[0]"], "exclude_on_ort": []}}, target="trt")
    (step,) = resolve_roles([step], model.roles)
    ctx = StepContext(target=caps("trt"), model_info=model.info, calibration=data.calibration, work_dir=tmp_path)
    step.apply_onnx(fp32, tmp_path / "q.onnx", ctx)
    assert [n for n in ctx.report["excluded_node_names"] if n.endswith("MatMul")] == [node]
