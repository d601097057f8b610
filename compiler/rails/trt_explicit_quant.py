"""Rail 8: TensorRT's explicit-quantization rules on the graph it will parse. onnxruntime's U8S8 Q/DQ
graph (uint8 activations with non-zero zero points) or its QOperator ops load fine in onnxruntime and the
other rails, yet TensorRT rejects them or runs them in fp32; this rail names the node and the rule.

The rules (TensorRT developer guide, "Explicit Quantization" / "Q/DQ Layer-Placement" and its ONNX
parser's operator support): Q/DQ in int8 or fp8 e4m3 (int4 / fp4 blocks for weights and NVFP4), zero
points 0 (symmetric), no uint8, no QOperator ops (QLinearMatMul, QAttention, MatMulInteger, ...), no int32
DequantizeLinear (an integer bias) on a tensor that is not constant, per-channel (axis) scales on constant
weights only. onnx's checker knows none of them and no library checks them without TensorRT itself."""

from __future__ import annotations

import sys

from compiler.graph.quantized import QDQ_OPS, is_qoperator
from compiler.rails import FAILED, PASSED, SKIPPED, RailContext, iter_nodes, not_applicable, result

NAME = "trt_explicit_quant"
APPLIES_TO = "targets whose int8 must be symmetric (TensorRT explicit quantization)"


def applies_to(caps) -> bool:
    return caps.symmetric_int8_only


# ONNX TensorProto data types by number (stable across onnx versions)
UINT8, INT8, INT32, UINT16, INT16 = 2, 3, 6, 4, 5
FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ, UINT4, INT4, FLOAT4E2M1 = 17, 18, 19, 20, 21, 22, 23
TYPE_NAMES = {UINT8: "uint8", INT8: "int8", INT32: "int32", UINT16: "uint16", INT16: "int16",
              FLOAT8E4M3FN: "float8e4m3fn", FLOAT8E4M3FNUZ: "float8e4m3fnuz", FLOAT8E5M2: "float8e5m2",
              FLOAT8E5M2FNUZ: "float8e5m2fnuz", UINT4: "uint4", INT4: "int4", FLOAT4E2M1: "float4e2m1"}
ALLOWED_QTYPES = {INT8, FLOAT8E4M3FN, INT4, FLOAT4E2M1}

RULE_TYPE = "Q/DQ type: TensorRT takes int8 or fp8 e4m3 Q/DQ (int4 / fp4 blocks for weights), never {t}"
RULE_ZERO = "zero point: TensorRT quantization is symmetric, every zero point must be 0"
RULE_QOP = "QOperator op: TensorRT parses Q/DQ graphs only, not onnxruntime's fused integer ops"
RULE_BIAS = ("int32 DequantizeLinear: TensorRT has no int32 dequantization; an integer bias must fold into a "
             "constant, here it feeds a computed tensor")
RULE_AXIS = "per-channel scale: TensorRT takes per-channel (axis) Q/DQ on constant weights only, here on an activation"
FIX = ("re-quantize for TensorRT: qcompile's trt target makes this graph with signed, symmetric Q/DQ "
       "(recipe.steps.int8_static.activation_type=int8, onnxruntime QuantFormat.QDQ with ActivationSymmetric / "
       "WeightSymmetric and no bias quantization)")


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _constants(model) -> tuple[dict[str, object], set[str]]:
    """(name -> TensorProto of initializers and Constant outputs, names of every tensor computable from
    constants alone -- what TensorRT's parser folds)."""
    tensors: dict[str, object] = {t.name: t for t in model.graph.initializer}
    const: set[str] = set(tensors)
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Constant" and _attr(node, "value") is not None:
            tensors[node.output[0]] = _attr(node, "value")
            const.add(node.output[0])
        elif node.input and all((not i) or i in const for i in node.input) and node.op_type not in (
                "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
            const.update(o for o in node.output if o)
    return tensors, const


def _elem_types(model) -> dict[str, int]:
    """Element type of every tensor the graph declares (inputs, outputs, value_info, initializers)."""
    types: dict[str, int] = {}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


def _qtype(node, types: dict[str, int], tensors: dict[str, object]) -> int | None:
    """The integer / narrow-float type a Q or DQ node works in: its zero point's type, else QuantizeLinear's
    output_dtype (default uint8), else DequantizeLinear's input type."""
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp is not None:
        if zp in tensors:
            return tensors[zp].data_type
        if zp in types:
            return types[zp]
    if node.op_type == "QuantizeLinear":
        return int(_attr(node, "output_dtype", 0) or 0) or UINT8
    return types.get(node.input[0])


def _zero_point_nonzero(node, tensors: dict[str, object]) -> str | None:
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp is None or zp not in tensors:
        return None
    from onnx import numpy_helper

    tensor = tensors[zp]
    if tensor.HasField("data_location") and tensor.data_location == 1:  # external: zero points are never that big
        return None
    arr = numpy_helper.to_array(tensor)
    try:
        nonzero = arr.astype("float64") != 0
    except (TypeError, ValueError):
        return None
    if nonzero.any():
        vals = sorted({float(v) for v in arr.reshape(-1)[:64].astype("float64")})[:4]
        return ", ".join(f"{v:g}" for v in vals)
    return None


def _scale_elements(node, tensors: dict[str, object]) -> int:
    scale = tensors.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return 1
    n = 1
    for d in scale.dims:
        n *= int(d)
    return n


def violations(model) -> list[dict[str, str]]:
    """Every node that breaks one of TensorRT's explicit-quantization rules: {node, op, rule}."""
    tensors, const = _constants(model)
    types = _elem_types(model)
    consumers: dict[str, list] = {}
    for node in iter_nodes(model.graph):
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    # QuantizeLinear outputs carry the type of their zero point / output_dtype (not always in value_info)
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.output:
            t = _qtype(node, types, tensors)
            if t:
                types[node.output[0]] = t

    out: list[dict[str, str]] = []

    def bad(node, rule: str) -> None:
        out.append({"node": node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>",
                    "op": node.op_type, "rule": rule})

    for node in iter_nodes(model.graph):
        op = node.op_type
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue  # trt:: custom ops (TRT_FP8QuantizeLinear, TRT_FP4DynamicQuantize) are TensorRT's own
        if is_qoperator(op):
            bad(node, RULE_QOP)
            continue
        if op not in QDQ_OPS:
            continue
        qtype = _qtype(node, types, tensors)
        if op == "DequantizeLinear" and qtype == INT32:
            outputs_ok = all(all((not i) or i in const for i in c.input) for c in consumers.get(node.output[0], []))
            if node.input[0] not in const or not outputs_ok:
                bad(node, RULE_BIAS)
            continue
        if qtype is not None and qtype not in ALLOWED_QTYPES:
            bad(node, RULE_TYPE.format(t=TYPE_NAMES.get(qtype, f"type {qtype}")))
            continue
        nonzero = _zero_point_nonzero(node, tensors)
        if nonzero is not None:
            bad(node, f"{RULE_ZERO} (here {nonzero})")
            continue
        blocked = int(_attr(node, "block_size", 0) or 0) > 0
        if not blocked and _scale_elements(node, tensors) > 1 and node.input[0] not in const:
            bad(node, RULE_AXIS)
    return out


def judge(found: list[dict[str, str]], qdq_nodes: int) -> dict:
    by_rule: dict[str, int] = {}
    for f in found:
        key = f["rule"].split(":")[0]
        by_rule[key] = by_rule.get(key, 0) + 1
    numbers = {"violations": len(found), "qdq_nodes": qdq_nodes, "by_rule": by_rule,
               "nodes": [f"{f['node']} ({f['op']})" for f in found[:20]]}
    if found:
        first = found[0]
        more = f" (+{len(found) - 1} more node(s))" if len(found) > 1 else ""
        return result(NAME, FAILED, f"node {first['node']} ({first['op']}) breaks TensorRT's {first['rule']}{more} "
                      f"-- {FIX}", **numbers)
    if not qdq_nodes:
        return result(NAME, SKIPPED, "no Q/DQ nodes: nothing TensorRT quantizes explicitly", **numbers)
    return result(NAME, PASSED, f"{qdq_nodes} Q/DQ nodes follow TensorRT's explicit-quantization rules", **numbers)


def run(ctx: RailContext) -> dict:
    if not applies_to(ctx.target):
        return not_applicable(sys.modules[__name__], ctx.target)
    model = ctx.model()
    if model is None:
        return result(NAME, SKIPPED, "no ONNX graph")
    found = violations(model)
    qdq = sum(1 for n in iter_nodes(model.graph) if n.op_type in QDQ_OPS or n.domain == "trt")
    return judge(found, qdq)
