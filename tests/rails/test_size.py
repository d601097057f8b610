"""Rail 6 (size): with the 2 GB limit lowered to a few kilobytes, a large Constant node blocks external
data (fail), the same tensor as an initializer in external data passes."""

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from compiler.core.schema import DoctorConfig
from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext, size
from targets import capabilities_of

LIMIT = 4000  # stands in for protobuf's 2 GB
THRESHOLD = 1024  # stands in for export.constant_promote_bytes


def _graph(as_constant: bool, n: int = 1024):
    w = np.arange(n, dtype=np.float32).reshape(-1, 8)  # 4 KiB
    if as_constant:
        nodes = [h.make_node("Constant", [], ["w"], name="big_const", value=numpy_helper.from_array(w)),
                 h.make_node("MatMul", ["x", "w"], ["y"])]
        inits = []
    else:
        nodes, inits = [h.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, w.shape[0]])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 8])], initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _ctx(path):
    return RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=path, constant_limit=THRESHOLD,
                       proto_limit=LIMIT)


def test_large_constant_over_the_limit_fails(tmp_path):
    path = tmp_path / "const.onnx"
    onnx.save(_graph(as_constant=True), str(path))
    assert size.large_constants(onnx.load(str(path)), THRESHOLD) == [("big_const", 4096)]
    r = size.run(_ctx(path))
    assert r["status"] == FAILED and r["large_constants"] == 1 and r["proto_bytes"] > LIMIT
    assert "promote them to initializers" in r["message"] and "big_const (4096 B)" in r["message"]


def test_promoted_and_external_passes(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(_graph(as_constant=False), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    r = size.run(_ctx(path))
    assert r["status"] == PASSED and r["external_data"] is True and r["large_constants"] == 0
    assert r["proto_bytes"] < LIMIT and r["file_bytes"] >= 4096  # the data file counts in the size


def test_initializer_inside_the_proto_over_the_limit_fails(tmp_path):
    path = tmp_path / "inline.onnx"
    onnx.save(_graph(as_constant=False), str(path))
    r = size.run(_ctx(path))
    assert r["status"] == FAILED and "export.external_data=always" in r["message"]


def test_large_constant_under_the_limit_warns(tmp_path):
    path = tmp_path / "const.onnx"
    onnx.save(_graph(as_constant=True), str(path))
    ctx = _ctx(path)
    ctx.proto_limit = 10**9
    r = size.run(ctx)
    assert r["status"] == WARNED and "would block external data" in r["message"]
    ctx.constant_limit = 8192  # below the threshold: nothing to say
    ctx._model = None
    assert size.run(ctx)["status"] == PASSED


def test_constant_in_a_subgraph_is_found():
    inner = _graph(as_constant=True).graph
    then = h.make_graph(list(inner.node), "then", [], [h.make_tensor_value_info("y", T.FLOAT, [2, 8])])
    other = h.make_graph([h.make_node("Identity", ["x"], ["z"])], "else", [], [h.make_tensor_value_info("z", T.FLOAT, None)])
    g = h.make_graph([h.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other)], "g",
                     [h.make_tensor_value_info("c", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [2, 128])],
                     [h.make_tensor_value_info("out", T.FLOAT, None)])
    assert size.large_constants(h.make_model(g), THRESHOLD) == [("big_const", 4096)]


def test_torch_target_skips():
    assert size.run(RailContext(target=capabilities_of("torch"), config=DoctorConfig()))["status"] == SKIPPED


def test_constant_promotion_makes_the_rail_pass(tmp_path):
    """compiler.graph.constants.promote_constants on the failing graph: the Constant becomes an
    initializer, the graph saves with external data, the rail passes under the same limit."""
    from compiler.graph.constants import promote_constants

    model, promoted = promote_constants(_graph(as_constant=True), THRESHOLD)
    assert promoted == 1
    path = tmp_path / "promoted.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="promoted.onnx.data", size_threshold=0)
    r = size.run(_ctx(path))
    assert r["status"] == PASSED and r["large_constants"] == 0 and r["external_data"] is True
