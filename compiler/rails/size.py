"""Rail 6: a graph must fit protobuf's 2 GB limit, or keep its tensors in external data; a large tensor
inside a Constant node cannot go to external data (only initializers can), so it must be promoted
to an initializer first (compiler/graph/constants.py does that after export)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from compiler.rails import FAILED, PASSED, PROTOBUF_LIMIT, SKIPPED, WARNED, RailContext, iter_nodes, result

NAME = "size"
APPLIES_TO = "targets that run an ONNX graph"


def applies_to(caps) -> bool:
    return caps.runs_onnx


def _tensor_bytes(t) -> int:
    import numpy as np
    import onnx

    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        item = 4
    return n * item


def large_constants(model, threshold: int) -> List[Tuple[str, int]]:
    """(node name, bytes) of every Constant node whose tensor is at least threshold bytes."""
    out = []
    for n in iter_nodes(model.graph):
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value" and a.HasField("t"):
                b = _tensor_bytes(a.t)
                if b >= threshold:
                    out.append((n.name or n.output[0], b))
    return out


def uses_external_data(model) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def judge(proto_bytes: int, external: bool, constants: List[Tuple[str, int]], threshold: int, limit: int,
          file_bytes: int = 0) -> Dict:
    """proto_bytes: the serialized graph without external data (what protobuf must hold)."""
    numbers = dict(proto_bytes=proto_bytes, file_bytes=file_bytes, external_data=external,
                   large_constants=len(constants), large_constant_bytes=sum(b for _, b in constants),
                   constant_threshold=threshold, limit_bytes=limit)
    names = ", ".join(f"{n} ({b} B)" for n, b in constants[:5])
    if proto_bytes >= limit:
        why = (f"; {len(constants)} Constant nodes of >= {threshold} bytes stay inside it ({names}) -- promote them "
               "to initializers (compiler/graph/constants.py) so they can go to external data") if constants else (
               " -- save it with external data (export.external_data=always)")
        return result(NAME, FAILED, f"the graph proto is {proto_bytes} bytes, over protobuf's limit of {limit}{why}",
                      **numbers)
    if constants:
        return result(NAME, WARNED, f"{len(constants)} Constant nodes of >= {threshold} bytes ({names}) would block "
                      "external data if the graph grew past 2 GB -- promote them to initializers", **numbers)
    ext = ", tensors in external data" if external else ""
    return result(NAME, PASSED, f"graph proto {proto_bytes / 2**20:.1f} MiB (limit {limit / 2**30:.3g} GiB){ext}; "
                  f"no Constant node >= {threshold} bytes", **numbers)


def run(ctx: RailContext) -> Dict:
    if ctx.onnx_path is None:
        return result(NAME, SKIPPED, "no ONNX graph (torch target)")
    path = Path(ctx.onnx_path)
    if path.stat().st_size >= PROTOBUF_LIMIT:  # protobuf cannot even parse it
        return result(NAME, FAILED, f"{path.name} is {path.stat().st_size} bytes, over protobuf's limit -- "
                      "save it with external data", proto_bytes=path.stat().st_size, limit_bytes=PROTOBUF_LIMIT)
    model = ctx.model()
    files = [path] + [p for p in path.parent.glob(path.name + ".data")]
    return judge(model.ByteSize(), uses_external_data(model), large_constants(model, ctx.constant_limit),
                 ctx.constant_limit, ctx.proto_limit, sum(f.stat().st_size for f in files))
