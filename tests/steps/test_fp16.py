"""fp16: onnxruntime's float16 converter with the nodes to keep in fp32 found automatically (planted
load failures and overflows, the rotary angle subgraph), and the torch module in half precision."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from compiler.core.errors import BuildError, RecipeError
from compiler.steps.base import StepContext
from modelopt_cases import caps
from compiler.steps.fp16 import Fp16Step, Params, convert_fp16, drop_fp16_roundtrips

MODELS = ["tiny_bert", "tiny_modernbert"]  # the `exported` fixture (tests/conftest.py) holds both
DATA = {"tiny_bert": "tiny_data", "tiny_modernbert": "tiny_modernbert_data"}


def run(path, feeds, output="sentence_embedding"):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([output], f)[0] for f in feeds])


def mean_cosine(a, b) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=-1)))


def tensor_types(model):
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


@pytest.mark.parametrize("name", MODELS)
def test_fp16_graph_runs_in_ort_close_to_fp32(exported, name, tmp_path):
    model, data, fp32 = exported[name]
    ctx = StepContext(target=caps("ort"), model_info=model.info, calibration=data.calibration, work_dir=tmp_path, report={})
    out = Fp16Step(Params()).apply_onnx(fp32, tmp_path / "fp16.onnx", ctx)
    feeds = list(data.evaluation.batches(8))
    # measured: embedding cosine 1 - 1e-7 on both tiny models, last_hidden_state the same (minilm 1 - 1e-6);
    # 0.9999 bounds fp16 with >100x margin and still fails for any fp16 range damage
    assert mean_cosine(run(out, feeds), run(fp32, feeds)) > 0.9999
    assert mean_cosine(run(out, feeds, "last_hidden_state"), run(fp32, feeds, "last_hidden_state")) > 0.9999
    g = onnx.load(str(out))
    weights = [i for i in g.graph.initializer if len(i.dims) == 2 and min(i.dims) >= 64]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)  # the weights really are fp16
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in g.graph.output)  # keep_io_types
    assert ctx.report["attempts"] == 1 and ctx.report["fixes"] == []
    assert ctx.report["probe_rel_error"] < 0.01


def test_modernbert_rotary_angles_stay_fp32_without_fp16_round_trips(exported, tmp_path):
    model, data, fp32 = exported["tiny_modernbert"]
    ctx = StepContext(target=caps("ort"), model_info=model.info, calibration=data.calibration, work_dir=tmp_path, report={})
    out = Fp16Step(Params()).apply_onnx(fp32, tmp_path / "fp16.onnx", ctx)
    # found by walking up from Sin/Cos, not from a list of names: positions (Range, Cast), inv_freq (Mul), Concat
    assert ctx.report["blocked_reasons"] == {"rotary angle (Sin/Cos input)": 17}
    assert {"Sin": 1, "Cos": 1, "Range": 1, "Mul": 1, "Concat": 1}.items() <= ctx.report["blocked_ops"].items()
    # onnxruntime's converter alone would round the angle to fp16 between the blocked Mul, Concat and Cos
    assert ctx.report["fp16_roundtrips_removed"] == 4
    g = onnx.load(str(out))
    types = tensor_types(g)
    trig = [n for n in g.graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) == 2 and all(types[n.input[0]] == TensorProto.FLOAT for n in trig)
    producer = {o: n for n in g.graph.node for o in n.output}
    for n in trig:  # the angle is computed in fp32 all the way up: no Cast to fp16 on the path
        stack, seen = [n.input[0]], set()
        while stack:
            t = stack.pop()
            p = producer.get(t)
            if p is None or p.name in seen:
                continue
            seen.add(p.name)
            assert not (p.op_type == "Cast" and p.attribute[0].i == TensorProto.FLOAT16), p.name
            stack.extend(p.input)


def test_bert_has_nothing_to_block(exported, tmp_path):
    model, data, fp32 = exported["tiny_bert"]
    ctx = StepContext(target=caps("ort"), model_info=model.info, calibration=data.calibration, work_dir=tmp_path, report={})
    Fp16Step(Params()).apply_onnx(fp32, tmp_path / "fp16.onnx", ctx)
    assert ctx.report["blocked_nodes"] == 0 and ctx.report["fp16_roundtrips_removed"] == 0


def planted_graph():
    """positions = Range(0.0, len(x), 1.0) as floats (fp16 Range has no ONNX type), then y = pos * x * 300 * 300
    / 90000: the exact result is pos * x, but pos * x * 90000 overflows fp16 and the converter clamps the
    90000 constant to 65504 without a word."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Squeeze", ["sf"], ["n"], name="squeeze"),
        helper.make_node("Range", ["zero", "n", "one"], ["pos"], name="range"),
        helper.make_node("Mul", ["pos", "x"], ["y0"], name="mul"),
        helper.make_node("Mul", ["y0", "k300"], ["y1"], name="mul300"),
        helper.make_node("Mul", ["y1", "k300"], ["y2"], name="mul300b"),
        helper.make_node("Div", ["y2", "k90000"], ["y"], name="div"),
    ]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
             (("zero", 0.0), ("one", 1.0), ("k300", 300.0), ("k90000", 90000.0))]
    g = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_planted_faults_the_plain_converter_leaves_in(tmp_path):
    """What the step exists for: onnxruntime's converter alone gives a graph ORT rejects, and, with the Range
    blocked by hand, one that runs and is silently wrong (90000 clamped to 65504: 37% off)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = planted_graph()
    onnx.save(convert_float_to_float16(copy.deepcopy(m), keep_io_types=True, op_block_list=[]), str(tmp_path / "a.onnx"))
    with pytest.raises(Exception, match=r"Type Error: Type 'tensor\(float16\)' of input parameter"):
        ort.InferenceSession(str(tmp_path / "a.onnx"))
    fixed = convert_float_to_float16(copy.deepcopy(m), keep_io_types=True, op_block_list=[], node_block_list=["range"])
    onnx.save(fixed, str(tmp_path / "b.onnx"))
    y = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"x": np.ones(4, np.float32)})[0]
    np.testing.assert_allclose(y[1:] / np.arange(1, 4), 90000 / 65504, rtol=1e-3)


def test_planted_type_error_and_overflow_are_blocked_automatically(tmp_path):
    feed = {"x": np.ones(4, np.float32)}
    result = convert_fp16(planted_graph(), tmp_path / "fp16.onnx", feed, op_block_list=[], keep_rotary=False)
    # 1st attempt: ORT rejects the fp16 Range -> blocked; 2nd: outputs 37% off fp32 -> the nodes whose fp32
    # values pass 65504 (y2 = 270000 and the 90000 constant) are blocked; 3rd: runs, exactly
    assert result["attempts"] == 3
    assert sorted(result["blocked"]) == ["div", "mul300b", "range"]
    assert result["blocked"]["range"].startswith("onnxruntime: [ONNXRuntimeError]")
    assert result["blocked"]["div"] == "values beyond fp16 range (|x| > 65504)"
    y = ort.InferenceSession(str(tmp_path / "fp16.onnx")).run(None, feed)[0]
    np.testing.assert_allclose(y, [0.0, 1.0, 2.0, 3.0], rtol=1e-3)
    # the blocked mul300b -> div edge stays fp32 (the converter alone would pass 270000 through fp16)
    assert result["roundtrips_removed"] >= 1


def test_unfixable_graph_is_a_build_error(tmp_path):
    with pytest.raises(BuildError, match=r"fp16: the graph still fails after 0 fixes \(1 node\(s\) kept fp32\); last: "
                                         r"blocked range: \[ONNXRuntimeError\]"):
        convert_fp16(planted_graph(), tmp_path / "fp16.onnx", {"x": np.ones(4, np.float32)}, op_block_list=[],
                     keep_rotary=False, max_fixes=0)


def test_drop_roundtrips_keeps_int_casts():
    # Cast(int64 -> fp16) -> Cast(fp16 -> fp32) is a real conversion, not a round trip: it must stay
    nodes = [helper.make_node("Cast", ["i"], ["h"], to=TensorProto.FLOAT16, name="c16"),
             helper.make_node("Cast", ["h"], ["f"], to=TensorProto.FLOAT, name="c32"),
             helper.make_node("Identity", ["f"], ["y"], name="id")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert drop_fp16_roundtrips(m) == 0 and len(m.graph.node) == 3


@pytest.mark.parametrize("name", MODELS)
def test_torch_half_runs_on_cpu_close_to_fp32(request, name):
    import torch

    from compiler.runners.callable import torch_predictor

    model = request.getfixturevalue(name)
    data = request.getfixturevalue(DATA[name])
    ctx = StepContext(target=caps("torch"), model_info=model.info, report={})
    half = Fp16Step(Params()).apply_torch(copy.deepcopy(model.module), ctx)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    feeds = list(data.evaluation.batches(8))
    ref = torch_predictor(model.module, model.input_names, model.output_names)
    got = torch_predictor(half, model.input_names, model.output_names)  # casts outputs to float32
    r = np.concatenate([ref(f)["sentence_embedding"] for f in feeds])
    g = np.concatenate([got(f)["sentence_embedding"] for f in feeds])
    assert g.dtype == np.float32 and np.isfinite(g).all()
    # measured 0.99999+ on both tiny models (minilm 0.9998): fp16's 11-bit mantissa; 0.999 with margin
    assert mean_cosine(g, r) > 0.999


def test_bfloat16_is_a_torch_only_choice():
    from omegaconf import OmegaConf

    from compiler.steps.base import ModelInfo
    from compiler.stages.validate import validate_steps

    info = ModelInfo("tiny_bert", "bert", 64, 256, 4, 512)
    node = OmegaConf.create({"name": "t", "steps": {"fp16": {"dtype": "bfloat16"}}})
    (step,), _ = validate_steps(node, caps("torch"), info)
    assert step.params.dtype == "bfloat16"
    with pytest.raises(RecipeError) as e:
        validate_steps(node, caps("ort"), info)
    assert e.value.key == "recipe.steps.fp16.dtype"
    assert str(e.value) == ("recipe.steps.fp16.dtype: bfloat16 is not runnable on target=ort (the ONNX side "
                            "converts to float16) -- use dtype=float16, or target=torch")
    with pytest.raises(RecipeError, match=r"^recipe.steps.fp16.dtype: bad value 'fp8' -- use float16 or bfloat16$"):
        validate_steps(OmegaConf.create({"name": "t", "steps": {"fp16": {"dtype": "fp8"}}}), caps("torch"), info)
