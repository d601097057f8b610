"""int8_dynamic: onnxruntime quantize_dynamic on the exported graph (ort) and torchao's dynamic int8 Linear
(torch): numbers against fp32, what got quantized, the zero-match rail, validation errors."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.core.errors import BuildError, RecipeError
from compiler.steps.base import StepContext
from modelopt_cases import caps
from compiler.steps.int8_dynamic import Int8DynamicStep, Params

MODELS = ["tiny_bert", "tiny_modernbert"]  # the `exported` fixture (tests/conftest.py) holds both
DATA = {"tiny_bert": "tiny_data", "tiny_modernbert": "tiny_modernbert_data"}


def mean_cosine(a, b) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=-1)))


def embeddings_onnx(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["sentence_embedding"], f)[0] for f in feeds])


def ctx(model, target, tmp_path, exclude=()):
    return StepContext(target=caps(target), model_info=model.info, work_dir=tmp_path, exclude=list(exclude), report={})


@pytest.mark.parametrize("name", MODELS)
def test_ort_quantize_dynamic_close_to_fp32(exported, name, tmp_path):
    model, data, fp32 = exported[name]
    c = ctx(model, "ort", tmp_path)
    out = Int8DynamicStep(Params()).apply_onnx(fp32, tmp_path / "dyn.onnx", c)
    feeds = list(data.evaluation.batches(8))
    cos = mean_cosine(embeddings_onnx(out, feeds), embeddings_onnx(fp32, feeds))
    # measured: tiny_bert 0.999994, tiny_modernbert 0.999995 (minilm 0.993); 0.9999 is >10x the tiny loss
    assert cos > 0.9999, cos
    # only MatMuls with a constant weight are quantized in dynamic mode; attention QK^T and PV stay fp32
    weights, total = {"tiny_bert": (12, 16), "tiny_modernbert": (8, 12)}[name]
    assert (c.report["quantized"], c.report["total"]) == (weights, total)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == weights and ops.count("DynamicQuantizeLinear") >= 1
    assert ops.count("MatMul") == total - weights


def test_ort_zero_matched_ops_is_a_build_error(exported, tmp_path):
    model, _, fp32 = exported["tiny_modernbert"]
    with pytest.raises(BuildError) as e:
        Int8DynamicStep(Params(op_types_to_quantize=["Conv"])).apply_onnx(fp32, tmp_path / "d.onnx",
                                                                           ctx(model, "ort", tmp_path))
    assert str(e.value) == ("recipe.steps.int8_dynamic: op_types_to_quantize=['Conv'] matched no node: the graph's "
                            "linear layers are MatMul x12")


def test_ort_per_channel_changes_the_weight_scales(exported, tmp_path):
    model, _, fp32 = exported["tiny_bert"]

    def scales(per_channel):
        out = Int8DynamicStep(Params(per_channel=per_channel)).apply_onnx(
            fp32, tmp_path / f"d{per_channel}.onnx", ctx(model, "ort", tmp_path))
        g = onnx.load(str(out)).graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
        return sorted(inits[n.input[1]].size for n in g.node if n.op_type == "DequantizeLinear" or
                      (n.op_type == "Mul" and n.input[1] in inits and "scale" in n.input[1]))

    assert max(scales(False)) == 1 and max(scales(True)) > 1


@pytest.mark.parametrize("name", MODELS)
def test_torch_dynamic_linear_close_to_fp32(request, name, tmp_path):
    import torch

    from compiler.runners.callable import torch_predictor

    model = request.getfixturevalue(name)
    data = request.getfixturevalue(DATA[name])
    exclude = {"tiny_bert": ["*pooler*", "*embeddings*"], "tiny_modernbert": ["*embeddings*", "*head*"]}[name]
    c = ctx(model, "torch", tmp_path, exclude)
    q = Int8DynamicStep(Params()).apply_torch(copy.deepcopy(model.module), c)
    dyn = [m for m in q.modules() if type(getattr(m, "weight", None)).__name__ == "Int8Tensor"]
    expected = {"tiny_bert": 12, "tiny_modernbert": 8}[name]  # every nn.Linear except tiny_bert's pooler
    assert len(dyn) == expected == c.report["quantized"]
    # torchao tensors: int8 data, and activation quantization per call (the int8 x int8 path, not weight-only)
    assert all(m.weight.qdata.dtype == torch.int8 and m.weight.act_quant_kwargs is not None for m in dyn)
    assert c.report["kernels"] == "real" and c.report["backend"] == "torchao Int8DynamicActivationInt8WeightConfig"
    if name == "tiny_bert":
        assert c.report["excluded"] == ["inner.pooler.dense"]
        assert isinstance(q.inner.pooler.dense, torch.nn.Linear)
    feeds = list(data.evaluation.batches(8))
    ref = torch_predictor(model.module, model.input_names, model.output_names)
    got = torch_predictor(q, model.input_names, model.output_names)
    r = np.concatenate([ref(f)["sentence_embedding"] for f in feeds])
    g = np.concatenate([got(f)["sentence_embedding"] for f in feeds])
    # measured: 0.9999998 on both tiny models (minilm 0.994); the tiny models' weights are small and
    # near-Gaussian, so int8 per-channel loses almost nothing: 0.9999 bounds it
    assert mean_cosine(g, r) > 0.9999
    assert not np.allclose(g, r, atol=1e-7)


def test_torch_exclude_everything_is_a_build_error(tiny_modernbert, tmp_path):
    with pytest.raises(BuildError, match=r"no nn.Linear left to quantize: the model has 8 and the exclude "
                                         r"patterns \['\*'\] match all of them"):
        Int8DynamicStep(Params()).apply_torch(copy.deepcopy(tiny_modernbert.module),
                                             ctx(tiny_modernbert, "torch", tmp_path, ["*"]))


def _validate(steps, target):
    from omegaconf import OmegaConf

    from compiler.steps.base import ModelInfo
    from compiler.stages.validate import validate_steps

    info = ModelInfo("tiny_bert", "bert", 64, 256, 4, 512)
    return validate_steps(OmegaConf.create({"name": "t", "steps": {"int8_dynamic": steps}}), caps(target), info)


@pytest.mark.parametrize("steps,target,key,text", [
    ({"weight_type": "int4"}, "ort", "recipe.steps.int8_dynamic.weight_type",
     "recipe.steps.int8_dynamic.weight_type: bad value 'int4' -- use int8 or uint8"),
    ({"weight_type": "uint8"}, "torch", "recipe.steps.int8_dynamic.weight_type",
     "recipe.steps.int8_dynamic.weight_type: uint8 is not runnable on target=torch (torchao's dynamic int8 Linear "
     "has int8 weights only) -- use weight_type=int8"),
    ({"op_types_to_quantize": []}, "ort", "recipe.steps.int8_dynamic.op_types_to_quantize",
     "recipe.steps.int8_dynamic.op_types_to_quantize: is empty -- use e.g. [MatMul, Gemm]"),
    ({"per_channel": "yes please"}, "ort", "recipe.steps.int8_dynamic.per_channel",
     "recipe.steps.int8_dynamic.per_channel: bad value 'yes please' -- expected bool"),
])
def test_bad_params_are_recipe_errors_naming_the_key(steps, target, key, text):
    with pytest.raises(RecipeError) as e:
        _validate(steps, target)
    assert e.value.key == key
    assert str(e.value) == text
