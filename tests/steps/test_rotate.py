"""rotate step: exact in fp32 (tiny BERT, tiny ModernBERT, MiniLM), a live MatMul after export, and the
block-size validation error before any model loads."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from compiler.core.errors import RecipeError
from compiler.numerics.hadamard import sylvester
from compiler.steps.base import ModelInfo, StepContext
from modelopt_cases import caps
from compiler.steps.rotate import RotatedLinear, RotateParams, RotateStep
from tests.conftest import model_cfg, model_exclude


def _rotate(loaded, block_size=128):
    module = copy.deepcopy(loaded.module)
    ctx = StepContext(target=caps("torch"), model_info=loaded.info, exclude=model_exclude(loaded))
    module = RotateStep(RotateParams(block_size=block_size)).apply_torch(module, ctx)
    return module, ctx.report


def _feed(loaded, seed=0, batch=2, seq=32):
    from compiler.core.feeds import synthetic_feed

    feed = synthetic_feed(loaded.input_names, batch, seq, seed=seed)
    feed["attention_mask"][1, seq // 2:] = 0  # padding exercises the mask path too
    return [torch.from_numpy(feed[n]) for n in loaded.input_names]


def _assert_equivalent(loaded, rotated):
    for seed in (0, 1):
        args = _feed(loaded, seed)
        with torch.no_grad():
            want, got = loaded.module(*args), rotated(*args)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_tiny_bert_rotated_equals_original(tiny_bert):
    rotated, report = _rotate(tiny_bert)
    # 2 layers x (q, k, v, attention output, intermediate, output); pooler and embeddings excluded
    assert report["rotated_layers"] == 12
    assert report["blocks"] == {"64": 64, "256": 128}  # hidden 64: Sylvester; intermediate 256: 2 blocks
    assert isinstance(rotated.inner.encoder.layer[0].attention.self.query, RotatedLinear)
    assert isinstance(rotated.inner.pooler.dense, torch.nn.Linear)
    _assert_equivalent(tiny_bert, rotated)


def test_tiny_modernbert_rotated_equals_original(tiny_modernbert):
    rotated, report = _rotate(tiny_modernbert)
    assert report["rotated_layers"] == 8  # 2 layers x (Wqkv, attn Wo, mlp Wi, mlp Wo)
    _assert_equivalent(tiny_modernbert, rotated)


def test_minilm_rotated_equals_original():
    """The default model: hidden 384 = 3 x 128 and intermediate 1536 = 12 x 128, block-diagonal."""
    from compiler.stages.models import load_model

    minilm = load_model(model_cfg("minilm"))
    rotated, report = _rotate(minilm)
    assert report["rotated_layers"] == 36 and report["blocks"] == {"384": 128, "1536": 128}
    _assert_equivalent(minilm, rotated)


def test_rotation_really_changes_the_weights(tiny_bert):
    rotated, _ = _rotate(tiny_bert)
    w0 = tiny_bert.module.inner.encoder.layer[0].attention.self.query.weight
    w1 = rotated.inner.encoder.layer[0].attention.self.query.linear.weight
    assert (w0 - w1).abs().max() > 0.01
    h = torch.from_numpy(sylvester(64))  # hidden 64 < block 128: one Sylvester block of the whole dimension
    torch.testing.assert_close(w1.double(), w0.double() @ h, atol=1e-6, rtol=0)


def test_export_keeps_the_rotation_as_live_matmuls(tmp_path, tiny_bert):
    """Every rotated layer contributes one MatMul of a live activation by a Hadamard initializer; the graph
    passes the input-flow check and ORT matches the torch module."""
    import onnxruntime as ort

    from compiler.stages.export import export_onnx
    from compiler.graph.input_flow import check_input_flow
    from compiler.core.schema import ExportConfig

    rotated, report = _rotate(tiny_bert)
    path = export_onnx(rotated, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "r.onnx",
                       ExportConfig(opset=17))
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    hadamards = {name for name, t in inits.items() if name.endswith("rotation.hadamard")}
    live = set(tiny_bert.input_names)
    for n in model.graph.node:
        if any(i in live for i in n.input):
            live.update(n.output)
    rot_mm = [n for n in model.graph.node if n.op_type == "MatMul" and alias.get(n.input[1], n.input[1]) in hadamards]
    assert len(rot_mm) == report["rotated_layers"]
    assert all(n.input[0] in live for n in rot_mm)
    check_input_flow(path, tiny_bert.input_names)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = _feed(tiny_bert, 3)
    got = sess.run(None, {n: a.numpy() for n, a in zip(tiny_bert.input_names, args)})
    with torch.no_grad():
        want = tiny_bert.module(*args)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4)


MINILM = ModelInfo(name="minilm", architecture="bert", hidden_size=384, intermediate_size=1536, num_heads=12,
                   max_positions=512)


def test_bad_block_size_names_dimension_and_working_sizes():
    with pytest.raises(RecipeError) as e:
        RotateStep(RotateParams(block_size=256)).validate(MINILM, caps("trt"))
    assert str(e.value) == ("recipe.steps.rotate.block_size: block_size 256 cannot rotate minilm's hidden_size 384 "
                            "(a Hadamard block must divide it, or be at least a power-of-two dimension) -- use "
                            "block_size in [2, 4, 8, 16, 32, 64, 128] (hidden_size=384, intermediate_size=1536)")
    RotateStep(RotateParams(block_size=128)).validate(MINILM, caps("trt"))  # the default works


def test_params_reject_bad_values():
    with pytest.raises(RecipeError, match=r"^recipe.steps.rotate.block_size: 96 is not a power of two"):
        RotateStep(RotateParams(block_size=96)).validate(MINILM, caps("trt"))
    with pytest.raises(RecipeError, match="^recipe.steps.rotate.method: unknown rotation 'givens'"):
        RotateStep(RotateParams(method="givens")).validate(MINILM, caps("trt"))


def test_cli_bad_block_size_exits_2_before_loading(qcompile):
    r = qcompile("model=minilm", "recipe=nvfp4_rotate", "target=trt", "recipe.steps.rotate.block_size=256")
    assert r.rc == 2, r
    out = r.stdout + r.stderr
    assert "recipe.steps.rotate.block_size: block_size 256 cannot rotate minilm's hidden_size 384" in out
    assert "use block_size in [2, 4, 8, 16, 32, 64, 128]" in out
    assert not r.run_dirs()


def test_layers_selects_which_inputs_rotate(tiny_bert):
    module = copy.deepcopy(tiny_bert.module)
    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, exclude=model_exclude(tiny_bert))
    RotateStep(RotateParams(block_size=16, layers=["*output.dense"])).apply_torch(module, ctx)
    assert ctx.report["rotated_layers"] == 4  # attention.output.dense and output.dense, 2 layers
    assert ctx.report["blocks"] == {"64": 16, "256": 16}
    assert isinstance(module.inner.encoder.layer[1].output.dense, RotatedLinear)
    assert isinstance(module.inner.encoder.layer[1].attention.self.query, torch.nn.Linear)
    _assert_equivalent(tiny_bert, module)
    from compiler.core.errors import BuildError

    with pytest.raises(BuildError, match=r"no Linear layer matches recipe.steps.rotate.layers=\['\*nothing\*'\]"):
        RotateStep(RotateParams(layers=["*nothing*"])).apply_torch(copy.deepcopy(tiny_bert.module), ctx)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_modernbert"])
def test_attention_output_rotation_fused_into_value_projection(fixture, request):
    """With a block that fits in a head (head_dim 16 here), the attention-output projection's rotation moves
    into the value projection's output rows: no online module there, still exact."""
    loaded = request.getfixturevalue(fixture)
    module = copy.deepcopy(loaded.module)
    ctx = StepContext(target=caps("torch"), model_info=loaded.info, exclude=model_exclude(loaded))
    RotateStep(RotateParams(block_size=16)).apply_torch(module, ctx)
    assert ctx.report["fused_rotations"] == 2  # one per layer
    assert ctx.report["online_rotations"] == ctx.report["rotated_layers"] - 2
    attn = module.inner.encoder.layer[0].attention if fixture == "tiny_bert" else module.inner.layers[0].attn
    out = attn.output.dense if fixture == "tiny_bert" else attn.Wo
    assert isinstance(out, torch.nn.Linear) and not isinstance(out, RotatedLinear)
    _assert_equivalent(loaded, module)
    module2 = copy.deepcopy(loaded.module)
    ctx2 = StepContext(target=caps("torch"), model_info=loaded.info, exclude=model_exclude(loaded))
    RotateStep(RotateParams(block_size=16, fuse_attention=False)).apply_torch(module2, ctx2)
    assert ctx2.report["fused_rotations"] == 0 and ctx2.report["online_rotations"] == ctx2.report["rotated_layers"]
