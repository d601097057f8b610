"""Rail 1 (Memcpy): counting on a planted ORT-optimized graph, the threshold, and a real CPU session."""

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from compiler.core.schema import DoctorConfig
from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext, memcpy
from targets import capabilities_of


def planted_graph(n_from: int, n_to: int, in_subgraph: int = 0):
    """A chain x -> MemcpyFromHost... -> MemcpyToHost... like ORT writes for a CUDA session,
    in the com.microsoft domain; `in_subgraph` more MemcpyToHost inside an If branch."""
    nodes, cur = [], "x"
    for i in range(n_from):
        nodes.append(h.make_node("MemcpyFromHost", [cur], [f"f{i}"], domain="com.microsoft", name=f"from{i}"))
        cur = f"f{i}"
    for i in range(n_to):
        nodes.append(h.make_node("MemcpyToHost", [cur], [f"t{i}"], domain="com.microsoft", name=f"to{i}"))
        cur = f"t{i}"
    if in_subgraph:
        body_nodes, bcur = [], cur
        for i in range(in_subgraph):
            body_nodes.append(h.make_node("MemcpyToHost", [bcur], [f"b{i}"], domain="com.microsoft"))
            bcur = f"b{i}"
        then = h.make_graph(body_nodes, "then", [], [h.make_tensor_value_info(bcur, T.FLOAT, [2])])
        other = h.make_graph([h.make_node("Identity", [cur], ["e0"])], "else", [],
                             [h.make_tensor_value_info("e0", T.FLOAT, [2])])
        nodes.append(h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other))
        cur = "y"
    else:
        nodes.append(h.make_node("Identity", [cur], ["y"]))
    g = h.make_graph(nodes, "planted", [h.make_tensor_value_info("x", T.FLOAT, [2]),
                                        h.make_tensor_value_info("c", T.BOOL, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])


def test_count_memcpy_on_planted_graph_including_subgraphs():
    counts = memcpy.count_memcpy(planted_graph(n_from=3, n_to=2, in_subgraph=4))
    assert counts == {"MemcpyToHost": 6, "MemcpyFromHost": 3}
    assert memcpy.count_memcpy(planted_graph(0, 0)) == {"MemcpyToHost": 0, "MemcpyFromHost": 0}


def test_threshold_fails_above_and_names_the_exporter():
    counts = {"MemcpyToHost": 30, "MemcpyFromHost": 26}
    r = memcpy.judge(counts, {}, max_memcpy=8, exporter="dynamo", primary="CUDAExecutionProvider")
    assert r["status"] == FAILED and r["memcpy_nodes"] == 56
    assert "56 Memcpy nodes" in r["message"] and "exporter: dynamo" in r["message"]
    assert "export.exporter=torchscript" in r["message"]
    # at the threshold: a warning, not a failure
    r = memcpy.judge({"MemcpyToHost": 4, "MemcpyFromHost": 4}, {}, max_memcpy=8, exporter="dynamo",
                     primary="CUDAExecutionProvider")
    assert r["status"] == WARNED and r["memcpy_nodes"] == 8
    r = memcpy.judge({"MemcpyToHost": 0, "MemcpyFromHost": 0}, {}, 8, "torchscript", "CUDAExecutionProvider")
    assert r["status"] == PASSED


def test_cpu_placed_nodes_counted_only_under_a_gpu_provider():
    placement = {"CUDAExecutionProvider": {"MatMul": 12}, "CPUExecutionProvider": {"Shape": 3, "Gather": 2}}
    assert memcpy.cpu_placed(placement, "CUDAExecutionProvider") == {"Shape": 3, "Gather": 2}
    assert memcpy.cpu_placed(placement, "CPUExecutionProvider") == {}
    r = memcpy.judge({"MemcpyToHost": 1, "MemcpyFromHost": 0}, memcpy.cpu_placed(placement, "CUDAExecutionProvider"),
                     8, "torchscript", "CUDAExecutionProvider")
    assert r["cpu_placed_nodes"] == 5 and "Shape x3" in r["message"]


def test_rail_reads_the_optimized_graph_file(tmp_path):
    path = tmp_path / "optimized.onnx"
    onnx.save(planted_graph(n_from=6, n_to=5), str(path))
    ctx = RailContext(target=capabilities_of("ort"), config=DoctorConfig(max_memcpy=10), optimized_path=path, exporter="dynamo",
                      providers=["CUDAExecutionProvider"])
    r = memcpy.run(ctx)
    assert r["status"] == FAILED and r["memcpy_nodes"] == 11
    ctx.config = DoctorConfig(max_memcpy=11)
    assert memcpy.run(ctx)["status"] == WARNED


def test_real_cpu_session_has_no_memcpy(tmp_path):
    """On the CPU provider ORT inserts no copies: the optimized graph of a real model counts zero."""
    import numpy as np
    from onnx import numpy_helper

    from compiler.rails.doctor import probe_ort

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Relu", ["m"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["b", 4])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     initializer=[w])
    src = tmp_path / "m.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(src))
    probe = probe_ort(src, ["CPUExecutionProvider"], tmp_path)
    assert Path(probe["optimized_path"]).exists() and not probe.get("provider_error")
    ctx = RailContext(target=capabilities_of("ort"), config=DoctorConfig(), optimized_path=probe["optimized_path"],
                      placement=probe["placement"])
    r = memcpy.run(ctx)
    assert r["status"] == PASSED and r["memcpy_nodes"] == 0 and r["cpu_placed_nodes"] == 0


@pytest.mark.parametrize("target", ["torch", "trt"])
def test_not_applicable_targets_skip(target):
    from compiler.rails import applies

    assert not applies(memcpy, capabilities_of(target)) and applies(memcpy, capabilities_of("ort"))
    assert memcpy.run(RailContext(target=capabilities_of(target), config=DoctorConfig()))["status"] == SKIPPED
