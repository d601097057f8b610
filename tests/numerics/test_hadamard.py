"""The explicit Hadamard matrices and the module that applies them online (exported as a live MatMul)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compiler.numerics.hadamard import OnlineHadamard, block_for, hadamard_matrix, sylvester, valid_blocks


@pytest.mark.parametrize("n", [2, 4, 16, 64, 128, 512])
def test_sylvester_is_normalized_orthogonal_symmetric(n):
    h = sylvester(n)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=0, atol=1e-15)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)


def test_sylvester_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two, got 384"):
        sylvester(384)


def test_block_rules():
    assert block_for(384, 128) == 128  # MiniLM hidden: block-diagonal, 3 blocks
    assert block_for(1536, 128) == 128
    assert block_for(64, 128) == 64  # tiny models: one Sylvester block of the whole dimension
    assert block_for(64, 16) == 16
    with pytest.raises(ValueError, match="dimension 384 is not a multiple of block_size 256"):
        block_for(384, 256)
    with pytest.raises(ValueError, match="not a power of two"):
        block_for(384, 96)
    assert valid_blocks(384) == [2, 4, 8, 16, 32, 64, 128]


def test_block_diagonal_matrix():
    h = hadamard_matrix(384, 128)
    np.testing.assert_allclose(h @ h.T, np.eye(384), atol=1e-12)
    np.testing.assert_array_equal(h[:128, 128:], 0)
    np.testing.assert_array_equal(h[128:256, 128:256], sylvester(128))


@pytest.mark.parametrize("dim,block", [(64, 128), (384, 128), (256, 16)])
def test_online_module_equals_dense_matmul(dim, block):
    x = torch.randn(3, 5, dim, dtype=torch.float64)
    mod = OnlineHadamard(dim, block, dtype=torch.float64)
    want = x @ torch.from_numpy(hadamard_matrix(dim, block))
    torch.testing.assert_close(mod(x), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(mod(mod(x)), x, atol=1e-12, rtol=0)  # H H = I


@pytest.mark.parametrize("dim,block", [(64, 128), (384, 128)])
def test_export_is_a_live_matmul(tmp_path, dim, block):
    """Exported (TorchScript exporter), the rotation is a MatMul whose data input comes from the graph
    input, not a Constant; ONNX Runtime reproduces x @ H for two different inputs."""
    import onnx
    import onnxruntime as ort

    mod = OnlineHadamard(dim, block)
    path = tmp_path / "h.onnx"
    torch.onnx.export(mod, (torch.randn(2, 7, dim),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}}, opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    live = {"x"}
    for n in model.graph.node:  # graph order is topological
        if any(i in live for i in n.input):
            live.update(n.output)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 1
    a, b = matmuls[0].input
    assert a in live and (b in inits or b in consts)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h = hadamard_matrix(dim, block).astype(np.float32)
    for seed in (0, 1):
        x = np.random.default_rng(seed).standard_normal((3, 9, dim)).astype(np.float32)
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ h, atol=1e-5)
