"""Reading and writing ONNX files: protobuf's 2 GB limit, external data beside the graph, sizes and op counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from compiler.core.errors import BuildError

PROTOBUF_LIMIT = 2 * 1024**3
# graph structure, names and attributes besides the tensors: the room kept below the limit
PROTOBUF_MARGIN = 64 * 1024**2


def iter_tensors(model) -> Iterator:
    """Every TensorProto a model holds: initializers and attribute tensors (Constant values), in subgraphs too.
    (onnx.external_data_helper has this walk only as private helpers.)"""
    import onnx

    def graph_tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(attr.g)
                for g in attr.graphs:
                    yield from graph_tensors(g)

    yield from graph_tensors(model.graph)


def tensor_bytes(t) -> int:
    """Bytes a tensor's data takes inside the proto (0 for data already in an external file)."""
    import numpy as np
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except KeyError:  # an undefined or unknown type
        item = 0
    if not item or t.data_type == onnx.TensorProto.STRING:
        return t.ByteSize()  # strings are never large in a graph this compiler writes
    # from the shape: reading t.raw_data would copy the bytes (seconds for a 2 GB table)
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    bits = {getattr(onnx.TensorProto, k, -1): b for k, b in
            (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))}
    if t.data_type in bits:  # packed sub-byte types: numpy's item is a whole byte
        return (n * bits[t.data_type] + 7) // 8
    return n * item


def model_bytes(model) -> int:
    """The size of a model's tensor data, which dominates its serialized size. ModelProto.ByteSize() cannot
    size a proto past 2 GB (protobuf 7 raises EncodeError), which is exactly when the size matters."""
    return sum(tensor_bytes(t) for t in iter_tensors(model))


def exceeds_protobuf(model) -> bool:
    """Whether a model in memory is too big to serialize as one proto (what onnx.shape_inference.infer_shapes,
    SerializeToString and an InferenceSession on bytes all do)."""
    return model_bytes(model) >= PROTOBUF_LIMIT - PROTOBUF_MARGIN


def structure_only(model, keep_bytes: int = 4096):
    """A copy of a model whose large tensors (the weights) carry no data; their types and dims stay. Small
    tensors keep their values: shape inference evaluates them (Reshape targets, axes, Range bounds)."""
    import copy

    out = copy.deepcopy(model)
    for t in iter_tensors(out):
        if tensor_bytes(t) > keep_bytes:
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
    return out


def infer_shapes(model, **kwargs):
    """onnx.shape_inference.infer_shapes for a model of any size. onnx serializes the model to infer it and
    fails past protobuf's 2 GB; types and shapes never depend on the weights' values, so a large model is
    inferred on its structure_only() copy (the result then has no weight data: read types from it, not values)."""
    import onnx

    return onnx.shape_inference.infer_shapes(structure_only(model) if exceeds_protobuf(model) else model, **kwargs)


def needs_external_data(path: Path) -> bool:
    """Whether a graph file must be written back with external data: it already keeps tensors outside the
    proto, or the file alone comes near protobuf's limit. Reads the structure only, never the weights."""
    import onnx

    path = Path(path)
    if len(onnx_files(path)) > 1 or path.stat().st_size >= PROTOBUF_LIMIT - PROTOBUF_MARGIN:
        return True
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(model))


def save_onnx(model, out_path: Path, external_data: str = "auto", check: bool = True) -> Path:
    """Save an ONNX model, with its tensors in out_path.data when it would pass protobuf's 2 GB limit
    (or when asked). Deterministic: same graph -> same bytes."""
    import onnx

    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    for stale in (out_path, out_path.with_name(data_name)):
        if stale.exists():
            stale.unlink()
    use_external = external_data == "always" or (
        external_data == "auto" and model_bytes(model) >= PROTOBUF_LIMIT - PROTOBUF_MARGIN)
    if use_external:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        # onnx moved the given model's tensors out to the file (data cleared, location set to it): read them
        # back so that the caller's model stays whole after the save (a copy before saving would double the
        # memory of a 2 GB model; the bytes are in the page cache)
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(out_path.parent))
    else:
        onnx.save_model(model, str(out_path))
    if check:
        try:
            # by path: the checker then reads external data itself, and never serializes a >2 GB proto
            onnx.checker.check_model(str(out_path))
        except Exception as e:
            raise BuildError(f"onnx.checker rejected {out_path.name}: {str(e).splitlines()[0]}") from e
    return out_path


def onnx_files(path: Path) -> list[Path]:
    """The model file and its external-data file, if any."""
    path = Path(path)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files


def onnx_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in onnx_files(path))


def op_histogram(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if not node.domain or node.domain == "ai.onnx" else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
