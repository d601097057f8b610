"""Rail 4 (input dependence): a tiny model whose output leaves the traced graph (through numpy) is
exported with that output baked into a Constant; the rail must catch it, and pass the honest one."""

import warnings

import numpy as np
import onnx
import pytest
import torch

from compiler.core.schema import DoctorConfig
from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext
from compiler.rails import input_dependence as dep
from targets import capabilities_of


class Embed(torch.nn.Module):
    def __init__(self, baked: bool, vocab: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.baked = baked

    def forward(self, input_ids, attention_mask):
        hidden = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        pooled = hidden.mean(1)
        if self.baked:
            # the planted fault: a value computed outside torch is a constant to the tracer
            pooled = torch.from_numpy(pooled.detach().numpy().copy())
        return hidden, pooled


def _export(tmp_path, baked: bool, vocab: int = 50):
    path = tmp_path / f"{'baked' if baked else 'live'}_{vocab}.onnx"
    ids = torch.randint(1, 50, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TracerWarning is what users miss
        torch.onnx.export(Embed(baked, vocab), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state", "sentence_embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    return path


def test_baked_constant_output_fails(tmp_path):
    path = _export(tmp_path, baked=True)
    r = dep.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=path))
    assert r["status"] == FAILED
    assert r["constant_outputs"] == ["sentence_embedding"]
    assert "sentence_embedding are bit-identical for two different inputs" in r["message"]
    assert r["max_abs_change"]["sentence_embedding"] == 0.0 and r["max_abs_change"]["last_hidden_state"] > 0


def test_live_model_passes(tmp_path):
    r = dep.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=_export(tmp_path, baked=False)))
    assert r["status"] == PASSED and r["constant_outputs"] == []
    assert min(r["max_abs_change"].values()) > 1e-3


def test_feeds_differ_and_stay_inside_the_embedding_table(tmp_path):
    model = onnx.load(str(_export(tmp_path, baked=False)))
    a, b = dep.feeds_for_graph(model)
    assert set(a) == {"input_ids", "attention_mask"} and a["input_ids"].shape == (2, 16)
    assert not np.array_equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].max() < 50 and a["input_ids"].min() >= 1  # vocabulary read from the Gather's table
    assert (a["attention_mask"] == 1).all()


def test_compare_is_pure():
    x = {"y": np.ones((2, 3), np.float32), "ids": np.array([1, 2])}
    y = {"y": np.ones((2, 3), np.float32) * 2, "ids": np.array([1, 2])}
    assert dep.compare(x, y)["status"] == WARNED  # only an integer output unchanged
    assert dep.compare(x, x)["status"] == FAILED
    assert dep.compare({"y": x["y"]}, {"y": y["y"]})["status"] == PASSED


def test_engine_predictor_is_used_when_given():
    calls = []

    def predict(feed):
        calls.append(feed)
        return {"sentence_embedding": np.zeros((2, 4), np.float32)}  # ignores its input

    ctx = RailContext(target=capabilities_of("torch"), config=DoctorConfig(), predict=predict,
                      input_names=["input_ids", "attention_mask"])
    r = dep.run(ctx)
    assert r["status"] == FAILED and len(calls) == 2
    assert not np.array_equal(calls[0]["input_ids"], calls[1]["input_ids"])


def test_switched_off_and_unrunnable_graphs_skip(tmp_path):
    assert dep.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(input_dependence=False)))["status"] == SKIPPED
    from onnx import TensorProto as T
    from onnx import helper as h

    g = h.make_graph([h.make_node("NoSuchOp", ["x"], ["y"], domain="custom.dom")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2])], [h.make_tensor_value_info("y", T.FLOAT, [2])])
    path = tmp_path / "custom.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("custom.dom", 1)]), str(path))
    r = dep.run(RailContext(target=capabilities_of("trt"), config=DoctorConfig(), onnx_path=path))
    assert r["status"] == SKIPPED and "could not run" in r["message"]


def test_the_rail_and_the_export_stage_share_one_check(tmp_path):
    """The rail and the export stage judge a graph through the same compiler.graph.input_flow check:
    same verdict, same runner, on a larger vocabulary too."""
    from compiler.core.errors import BuildError
    from compiler.graph.input_flow import MESSAGE, check_input_flow

    with pytest.raises(BuildError, match=MESSAGE):
        check_input_flow(_export(tmp_path, True, vocab=2000))
    assert check_input_flow(_export(tmp_path, False, vocab=2000))["runner"] == "onnxruntime"
    ort_caps = capabilities_of("ort")
    baked = dep.run(RailContext(target=ort_caps, config=DoctorConfig(), onnx_path=_export(tmp_path, True, vocab=2000)))
    assert baked["status"] == FAILED and baked["checked_by"] == "compiler.graph.input_flow"
    assert "sentence_embedding" in baked["message"]
    live = dep.run(RailContext(target=ort_caps, config=DoctorConfig(), onnx_path=_export(tmp_path, False, vocab=2000)))
    assert live["status"] == PASSED and live["checked_by"] == "compiler.graph.input_flow"
    assert live["runner"] == "onnxruntime"
