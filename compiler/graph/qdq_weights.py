"""Fold the weight QuantizeLinear of an exported fake-quant int8 graph: fp32 initializer -> Q -> DQ
[-> Transpose] -> MatMul becomes int8 initializer -> DQ -> MatMul, so the artifact stores int8 weights
(4x smaller) and every DQ feeds its MatMul directly, the pattern ORT's and TensorRT's Q/DQ fusions match.

Fills a gap in modelopt 0.47: its INT8QuantExporter is a stub and qdq_to_dq rejects the legacy exporter's
Linear pattern (DQ -> Transpose -> MatMul: "Unsupported op_type for real weight quantization: Transpose").
The arithmetic is QuantizeLinear's own (round half to even, saturate to the zero point's type), in float32
like ONNX Runtime, so the folded graph computes what the unfolded one did."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def _constants(model) -> Dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def quantize_array(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear on a constant: saturate(rint(w / scale) + zero_point), per tensor or per axis."""
    lo, hi = INT_RANGES[zero_point.dtype]
    w = w.astype(np.float32)
    scale = scale.astype(np.float32)
    zp = zero_point.astype(np.float32)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * w.ndim
        shape[axis % w.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return np.clip(np.rint(w / scale) + zp, lo, hi).astype(zero_point.dtype)


def fold_weight_quantizers(model) -> Tuple[object, int]:
    """Returns (model, number of weights folded). The model is edited in place. Weights whose zero point
    is not int8/uint8 (e.g. float8) are left alone."""
    from onnx import numpy_helper

    graph = model.graph
    consts = _constants(model)
    initializers = {t.name: t for t in graph.initializer}
    consumers: Dict[str, List] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    remove_nodes, folded = [], 0
    new_inits = []
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in initializers:
            continue
        if q.input[1] not in consts or (len(q.input) > 2 and q.input[2] and q.input[2] not in consts):
            continue
        zp = consts[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if zp.dtype not in INT_RANGES:
            continue
        dqs = consumers[q.output[0]]
        if not dqs or any(n.op_type != "DequantizeLinear" for n in dqs):
            continue
        w = consts[q.input[0]]
        axis = int(_attr(q, "axis", 1))
        qw = quantize_array(w, consts[q.input[1]], zp, axis)
        name = f"{q.input[0]}_quantized"
        # DQ -> Transpose -> MatMul (nn.Linear under the TorchScript exporter): store the transposed weight
        # and drop the Transpose, moving a per-channel DQ's axis with it.
        if len(dqs) == 1 and w.ndim == 2:
            dq = dqs[0]
            nxt = consumers[dq.output[0]]
            if (len(nxt) == 1 and nxt[0].op_type == "Transpose" and list(_attr(nxt[0], "perm", [1, 0])) == [1, 0]
                    and dq.output[0] not in {o.name for o in graph.output}):
                tr = nxt[0]
                qw = np.ascontiguousarray(qw.T)
                if consts[dq.input[1]].size > 1:
                    _set_attr(dq, "axis", 1 - (int(_attr(dq, "axis", 1)) % 2))
                for user in consumers[tr.output[0]]:
                    for i, inp in enumerate(user.input):
                        if inp == tr.output[0]:
                            user.input[i] = dq.output[0]
                for out in graph.output:
                    if out.name == tr.output[0]:
                        out.name = dq.output[0]
                remove_nodes.append(tr)
        new_inits.append(numpy_helper.from_array(qw, name))
        for dq in dqs:
            dq.input[0] = name
        remove_nodes.append(q)
        folded += 1
    for node in remove_nodes:
        graph.node.remove(node)
    graph.initializer.extend(new_inits)
    still_used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in list(graph.initializer):
        if t.name not in still_used:
            graph.initializer.remove(t)
    # value_info of removed tensors (transposed weights) would carry stale shapes
    live = still_used | {o for n in graph.node for o in n.output}
    for vi in list(graph.value_info):
        if vi.name not in live:
            graph.value_info.remove(vi)
    return model, folded
