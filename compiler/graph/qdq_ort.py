"""Graph passes on a static QDQ graph that let onnxruntime's CPU kernels run it as fast as dynamic int8:
float ops read the float tensor instead of its quantize-dequantize copy, and a quantized MatMul with its bias
Add becomes one MatMulIntegerToFloat (docs/speed.md, "int8_static on ORT")."""

from __future__ import annotations

from collections.abc import Iterable

from compiler.graph.quantized import is_int8_compute

__all__ = ["MS_DOMAIN", "activation_products", "float_consumers_read_float", "fuse_matmul_bias", "qdq_fed_only_float"]

MS_DOMAIN = "com.microsoft"
# ops that compute on the dequantized tensor with an integer kernel once onnxruntime fuses their Q/DQ
INTEGER_CONSUMERS = frozenset({"MatMul", "Gemm"})
# data-movement ops whose Q/DQ onnxruntime drops so they move int8 data (an int8 embedding table's Gather
# needs the Q/DQ on its output for that: kept)
INT8_MOVERS = frozenset({"Gather"})
# ops a stored weight may pass through on its way into a MatMul
WEIGHT_PATH = frozenset({"DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity"})


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph) -> dict:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _integer_consumer(node, producer: dict) -> bool:
    """A node that computes in int8 on onnxruntime: a MatMul/Gemm whose two operands are both dequantized
    (one dequantized operand leaves it in float), or a Gather of a dequantized table."""
    if node.op_type in INTEGER_CONSUMERS:
        ops = [i for i in node.input[:2] if i]
        return len(ops) == 2 and all(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in ops)
    return node.op_type in INT8_MOVERS


def _drop_dead_qdq(graph) -> int:
    outputs = {o.name for o in graph.output}
    dropped = 0
    while True:
        used = _consumers(graph)
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not used.get(n.output[0]) and n.output[0] not in outputs]
        if not dead:
            return dropped
        for n in dead:
            graph.node.remove(n)
        dropped += len(dead)


def float_consumers_read_float(model) -> int:
    """Rewire every float consumer of an activation's QuantizeLinear -> DequantizeLinear pair to the float
    tensor itself; a pair left without consumers is removed. Returns the inputs rewired.

    onnxruntime.quantization's QDQ quantizer puts one Q/DQ pair on a tensor and points every consumer at the
    dequantized copy, so the residual Add / SkipLayerNormalization behind a LayerNorm whose output feeds the
    next block's MatMuls reads a rounded residual and pays a DequantizeLinear per block (MiniLM: 18 of them);
    no option of quantize_static keeps the float path (library gap). The Q/DQ on an int8 Gather's output
    stays: it is what lets onnxruntime gather int8 rows."""
    graph = model.graph
    producer = _producers(graph)
    consumers = _consumers(graph)
    rewired = 0
    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DequantizeLinear (initializer input)
        src = q.input[0]
        if getattr(producer.get(src), "op_type", "") in INT8_MOVERS:
            continue
        for node in consumers.get(dq.output[0], []):
            if _integer_consumer(node, producer):
                continue
            for k, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[k] = src
                    rewired += 1
    _drop_dead_qdq(graph)
    return rewired


def qdq_fed_only_float(model) -> list[str]:
    """Activation QuantizeLinear nodes that feed no int8 computation, neither an integer op (MatMulIntegerToFloat)
    directly nor a MatMul/Gemm through their DequantizeLinear: pure cost (float_consumers_read_float leaves
    none; an int8 Gather's output pair is not counted)."""
    graph = model.graph
    producer = _producers(graph)
    consumers = _consumers(graph)
    out = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or getattr(producer.get(q.input[0]), "op_type", "") in INT8_MOVERS:
            continue
        direct = consumers.get(q.output[0], [])
        readers = [c for dq in direct if dq.op_type == "DequantizeLinear" for c in consumers.get(dq.output[0], [])]
        if not any(is_int8_compute(c.op_type) for c in direct) and not any(_integer_consumer(c, producer)
                                                                           for c in readers):
            out.append(q.name or q.output[0])
    return out


def activation_products(model, names: Iterable[str] | None = None) -> list[str]:
    """MatMul nodes (by name) neither of whose operands is a stored weight: the attention products
    (query x key, probabilities x value) of a transformer."""
    graph = model.graph
    producer = _producers(graph)
    inits = {t.name for t in graph.initializer}

    def stored(name: str, depth: int = 0) -> bool:
        if name in inits:
            return True
        n = producer.get(name)
        if n is None or depth > 4 or not n.input:
            return False
        return n.op_type in ("Constant",) or (n.op_type in WEIGHT_PATH and stored(n.input[0], depth + 1))

    wanted = set(names) if names is not None else None
    return [n.name for n in graph.node if n.op_type == "MatMul" and (wanted is None or n.name in wanted)
            and not any(stored(i) for i in n.input[:2])]


def fuse_matmul_bias(model) -> int:
    """DequantizeLinear(activation) + DequantizeLinear(constant int8 weight) -> MatMul [-> Add(1-D constant
    bias)] into one com.microsoft MatMulIntegerToFloat (A, B, a_scale, b_scale, a_zero_point, b_zero_point,
    bias), keeping the MatMul's name. Returns the nodes fused.

    onnxruntime turns a DQ -> MatMul pair into MatMulIntegerToFloat itself at session start, but leaves the bias
    Add beside it (its MatMulIntegerToFloatFusion takes the bias only on the MatMulInteger -> Cast -> Mul
    pattern of dynamic quantization, with a scale computed at run time): on MiniLM 29 separate Adds over
    128 x 384 activations, the Adds quantize_dynamic's graphs do not run (library gap). Only for onnxruntime:
    the op is its own contrib op (CPU kernel)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = _producers(graph)
    consumers = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    fused: dict[int, object] = {}
    removed: set[int] = set()
    for mm in graph.node:
        if mm.op_type != "MatMul":
            continue
        a, b = (producer.get(i) for i in mm.input[:2])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue
        if b.input[0] not in inits or len(b.input) < 2 or b.input[1] not in inits:
            continue  # MatMulIntegerToFloat: B constant
        # the activation's scale and zero point must be scalars (per-tensor): the kernel's rule
        if any(len(a.input) > k and a.input[k] and (a.input[k] not in inits
               or numpy_helper.to_array(inits[a.input[k]]).size != 1) for k in (1, 2)):
            continue
        bias, out = "", mm.output[0]
        users = consumers.get(mm.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add" and mm.output[0] not in outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
            width = numpy_helper.to_array(inits[b.input[0]]).shape[-1] if other in inits else 0
            if other in inits and numpy_helper.to_array(inits[other]).shape == (width,):
                bias, out = other, add.output[0]
                removed.add(id(add))
        inputs = [a.input[0], b.input[0], a.input[1], b.input[1],
                  a.input[2] if len(a.input) > 2 else "", b.input[2] if len(b.input) > 2 else "", bias]
        while inputs and not inputs[-1]:
            inputs.pop()
        fused[id(mm)] = helper.make_node("MatMulIntegerToFloat", inputs, [out], name=mm.name, domain=MS_DOMAIN)
    if not fused:
        return 0
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_dead_qdq(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(fused)
