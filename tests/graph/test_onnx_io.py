"""compiler.graph.io past protobuf's 2 GB limit: a graph is sized by its tensors (ModelProto.ByteSize raises
past 2 GB with protobuf 7), saved with external data and checked by path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import EncodeError
from onnx import TensorProto, helper

from compiler.graph.io import PROTOBUF_LIMIT, onnx_files, save_onnx


def _gather_model(rows: int, cols: int, fill: float = 0.5) -> onnx.ModelProto:
    """ids -> Gather(table); the table is one initializer of rows x cols float32 (raw_data)."""
    shift = helper.make_node("Constant", [], ["shift"], value=helper.make_tensor("s", TensorProto.FLOAT, [1], [1.0]))
    graph = helper.make_graph(
        [shift, helper.make_node("Gather", ["table", "ids"], ["g"]), helper.make_node("Add", ["g", "shift"], ["out"])],
        "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", cols])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # filled in place: protobuf copies a message by serializing it, which fails past 2 GB
    table = model.graph.initializer.add()
    table.name, table.data_type = "table", TensorProto.FLOAT
    table.dims.extend([rows, cols])
    table.raw_data = np.full((rows, cols), fill, np.float32).tobytes()
    return model


def test_model_bytes_sizes_the_tensors_of_a_small_graph():
    from compiler.graph.io import model_bytes

    model = _gather_model(100, 10)
    tensors = 100 * 10 * 4 + 4  # the table and the Constant's one float
    assert model_bytes(model) == tensors
    # everything else in the proto (names, nodes, types) is a few hundred bytes
    assert 0 < model.ByteSize() - tensors < 1024


def test_save_onnx_small_graph_stays_in_one_file(tmp_path):
    from compiler.graph.io import needs_external_data

    out = save_onnx(_gather_model(100, 10), tmp_path / "m.onnx")
    assert onnx_files(out) == [out]
    assert not needs_external_data(out)


@pytest.mark.slow  # 2 GB of memory copies: about a minute on 2 cores
def test_save_onnx_writes_a_graph_past_2gb_with_external_data(tmp_path):
    """A 2 GiB + 4 MiB table: before the fix, save_onnx died in model.ByteSize() with EncodeError."""
    cols = 1024
    rows = (PROTOBUF_LIMIT + 4 * 2**20) // (cols * 4)
    model = _gather_model(rows, cols)
    with pytest.raises(EncodeError):  # the failure this guards against: protobuf cannot size the proto
        model.ByteSize()
    out = save_onnx(model, tmp_path / "big.onnx")  # "auto" external data + onnx.checker by path
    del model
    files = onnx_files(out)
    assert [f.name for f in files] == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < 2**20 and files[1].stat().st_size >= rows * cols * 4
    from compiler.graph.io import needs_external_data

    assert needs_external_data(out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"ids": np.array([0, rows - 1], np.int64)})
    np.testing.assert_array_equal(got, np.full((2, cols), 1.5, np.float32))


def test_save_onnx_with_external_data_leaves_the_callers_model_whole(tmp_path):
    """onnx.save_model(save_as_external_data=True) empties the tensors of the model it is given and points them
    at the file; a caller that goes on using its model (fp16 probes the fp32 graph, then converts it) would read
    a temporary file that is gone."""
    model = _gather_model(64, 32, fill=0.25)
    (tmp_path / "a").mkdir()
    save_onnx(model, tmp_path / "a" / "m.onnx", "always", check=False)
    table = model.graph.initializer[0]
    assert table.data_location == TensorProto.DEFAULT and not table.external_data
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(table), np.full((64, 32), 0.25, np.float32))
    import shutil

    shutil.rmtree(tmp_path / "a")  # the model no longer needs the file
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert float(sess.run(None, {"ids": np.array([3], np.int64)})[0][0, 0]) == 1.25
