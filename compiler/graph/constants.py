"""Post-export fix-up of constants: evaluate constant subgraphs into initializers and promote large
Constant nodes to initializers, so weight passes find weights where they expect them and external data
can hold every big tensor.

Why by hand: the exporters leave weights in Constant nodes or in small subgraphs over constants
(Reshape/MatMul/Mul/Add/Sub/Div/Cast/Transpose, e.g. a weight multiplied by a rotation at run time);
modelopt's ONNX weight exporters (NVFP4QuantExporter.compute_scales, ...) assert that a quantized weight
is a graph initializer, and `onnx.save_model(save_as_external_data=True)` only moves initializers out of
the protobuf, so a large Constant keeps a graph over 2 GB unsaveable. onnx's own tools do neither:
onnx.shape_inference does not fold, and onnxruntime folds only inside a session (its optimized graph
is for that runtime only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

from compiler.core.schema import CONSTANT_PROMOTE_BYTES
from compiler.graph.io import save_onnx

# Ops folded when every input is a constant. Ops that only build shapes or masks (Shape, Range,
# ConstantOfShape, Expand, Tile, Where ...) are left alone: folding them cannot help a weight pass and
# can turn a tiny subgraph into a large tensor.
FOLDABLE = {"Reshape", "MatMul", "Gemm", "Mul", "Add", "Sub", "Div", "Cast", "Transpose", "Identity", "Neg",
            "Unsqueeze", "Squeeze", "Concat", "Flatten", "Sqrt", "Reciprocal", "Pow", "Abs", "Slice"}


def _is_default_domain(node) -> bool:
    return node.domain in ("", "ai.onnx")


def _constant_value(node) -> Optional[np.ndarray]:
    """The tensor of a Constant node (any of its value_* attributes)."""
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            v = helper.get_attribute_value(attr)
            return np.asarray(v, dtype=np.float32 if "float" in attr.name else np.int64)
    return None


def constant_nbytes(node) -> int:
    """Size of a Constant node's tensor in bytes (0 for sparse / string constants)."""
    for attr in node.attribute:
        if attr.name == "value":
            t = attr.t
            if t.raw_data:
                return len(t.raw_data)
            return int(np.prod(t.dims or [1])) * max(np.dtype(_np_dtype(t.data_type)).itemsize, 1)
    return 0


def _np_dtype(onnx_type: int):
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        return tensor_dtype_to_np_dtype(onnx_type)
    except Exception:
        return np.uint8


def promote_constants(model, min_bytes: int, names: Optional[Iterable[str]] = None) -> Tuple[object, int]:
    """Replace every top-level Constant node whose tensor has >= min_bytes (or whose output is in
    `names`) by an initializer of the same name. Returns (model, number promoted). Bit-exact."""
    from onnx import numpy_helper

    wanted: Set[str] = set(names or ())
    graph = model.graph
    keep, promoted = [], 0
    for node in graph.node:
        if node.op_type == "Constant" and _is_default_domain(node) and (
                constant_nbytes(node) >= min_bytes or node.output[0] in wanted):
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                tensor = type(attr.t)()
                tensor.CopyFrom(attr.t)
            else:
                value = _constant_value(node)
                if value is None:  # sparse or string constant: leave it
                    keep.append(node)
                    continue
                tensor = numpy_helper.from_array(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            promoted += 1
            continue
        keep.append(node)
    if promoted:
        del graph.node[:]
        graph.node.extend(keep)
    return model, promoted


def _constant_nodes(graph) -> List[int]:
    """Indices of top-level nodes that compute a constant (Constant nodes, and foldable nodes whose
    inputs are all initializers or outputs of constant nodes), in graph order."""
    known: Set[str] = {t.name for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input} - known
    const_idx = []
    for i, node in enumerate(graph.node):
        if not _is_default_domain(node):
            continue
        if node.op_type == "Constant":
            known.update(node.output)
            const_idx.append(i)
            continue
        if node.op_type not in FOLDABLE:
            continue
        ins = [x for x in node.input if x]
        if not ins or any(x in graph_inputs or x not in known for x in ins):
            continue
        if node.op_type == "Identity" and ins[0] in {t.name for t in graph.initializer}:
            continue  # the exporter's alias of a shared (deduplicated) weight: nothing to compute
        known.update(node.output)
        const_idx.append(i)
    return const_idx


def fold_constant_subgraphs(model) -> Tuple[object, int]:
    """Evaluate every subgraph of constants (at least one foldable op over Constants/initializers) with
    onnx.reference and replace it by initializers holding its results; Constant nodes that only fed the
    folded ops disappear. Returns (model, number of nodes folded away). The reference evaluator computes in
    the graph's own dtypes; a folded MatMul equals the runtime's up to fp32 accumulation order."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    const_idx = _constant_nodes(graph)
    compute_idx = [i for i in const_idx if graph.node[i].op_type != "Constant"]
    if not compute_idx:
        return model, 0
    const_set = set(const_idx)
    const_outputs = {o for i in const_idx for o in graph.node[i].output}
    # the results the rest of the graph reads: consumed by a non-constant node, or a graph output
    needed: List[str] = []
    for j, node in enumerate(graph.node):
        if j in const_set:
            continue
        for x in node.input:
            if x in const_outputs and x not in needed:
                needed.append(x)
    for name in [o.name for o in graph.output] + sorted(_subgraph_inputs(graph)):
        if name in const_outputs and name not in needed:
            needed.append(name)
    computed = {o for i in compute_idx for o in graph.node[i].output}
    fold = [n for n in needed if n in computed]
    if not fold:
        return model, 0
    sub = helper.make_graph([graph.node[i] for i in const_idx], "constants", [],
                            [onnx.ValueInfoProto(name=n) for n in fold],
                            initializer=list(graph.initializer))
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    values = ReferenceEvaluator(sub_model).run(None, {})
    # drop the constant nodes; Constant nodes still read by live nodes are kept as they were
    still_read = {x for j, n in enumerate(graph.node) if j not in const_set for x in n.input}
    still_read |= {o.name for o in graph.output} | _subgraph_inputs(graph)
    keep = []
    for j, node in enumerate(graph.node):
        if j in const_set:
            if node.op_type == "Constant" and node.output[0] in still_read:
                keep.append(node)
            continue
        keep.append(node)
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    for name, value in zip(fold, values):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    # value_info of folded tensors would now describe initializers: harmless, but keep the graph tidy
    folded = set(fold)
    vis = [vi for vi in graph.value_info if vi.name not in folded]
    del graph.value_info[:]
    graph.value_info.extend(vis)
    _drop_unused_initializers(graph)
    return model, removed


def _drop_unused_initializers(graph) -> None:
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    used |= _subgraph_inputs(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _subgraph_inputs(graph) -> Set[str]:
    """Names read inside If/Loop/Scan bodies (outer-scope references keep their initializers alive)."""
    names: Set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for n in g.node:
                    names.update(n.input)
                names |= _subgraph_inputs(g)
    return names


def fix_constants(onnx_path: Path, out_path: Path, promote_bytes: int = CONSTANT_PROMOTE_BYTES,
                  external_data: str = "auto") -> Tuple[Path, Dict[str, int]]:
    """The export-stage fix-up on a file: fold constant subgraphs, promote Constants >= promote_bytes.
    Writes out_path only when something changed; returns (the graph to continue with, counts)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=True)
    model, folded = fold_constant_subgraphs(model)
    model, promoted = promote_constants(model, int(promote_bytes))
    counts = {"folded_nodes": folded, "promoted_constants": promoted}
    if not folded and not promoted:
        return Path(onnx_path), counts
    return save_onnx(model, Path(out_path), external_data, check=False), counts
