"""Rail 10: int8 products whose numbers depend on the CPU. onnxruntime multiplies uint8 activations by int8 weights
(u8s8); on an x86 CPU without VNNI or AMX its kernels add each pair of u8*s8 products in int16 (vpmaddubsw), which
saturates when the weights use all 8 bits (255 * 128 * 2 > 32767). The graph then computes different numbers on
different CPUs: measured on MiniLM, int8_static 0.99285 embedding cosine on an AVX2 CPU against 0.99309 with VNNI,
int8_smoothquant 0.99684 against 0.99932 (docs/accuracy.md). The check measures the machine it runs on; this rail
says when the figure would differ on another, and what removes the dependence (7-bit weights: reduce_range)."""

from __future__ import annotations

from typing import Any

from compiler.core.cpu import cpu_info
from compiler.rails import PASSED, SKIPPED, WARNED, RailContext, iter_nodes, result

NAME = "int8_saturation"
APPLIES_TO = "targets that run the graph in onnxruntime on the CPU"
SEVEN_BIT = 64  # reduce_range weights lie in [-64, 64] (onnxruntime's qmin/qmax): 255 * 64 * 2 = 32640 fits int16
INT8 = 3  # onnx.TensorProto
# integer products and the input index of their weight (QDQ MatMul / Gemm: input 1 behind a DequantizeLinear)
WEIGHT_INPUT = {"MatMulInteger": 1, "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1, "QLinearMatMul": 3,
                "MatMul": 1, "Gemm": 1}


def applies_to(caps) -> bool:
    return caps.ort_session and not caps.gpu


def u8s8_products(model, base_dir=None) -> tuple[int, int]:
    """(integer products with a constant int8 weight, of them the ones whose weight uses more than 7 bits). The
    weight is an int8 initializer, or one behind DequantizeLinear / Transpose; a QDQ MatMul / Gemm counts only
    with a quantized activation (DequantizeLinear on both inputs: what onnxruntime fuses into an int8 kernel). The activation's type does not
    matter on x86: onnxruntime runs uint8 activations as u8s8, and turns int8 activation Q/DQ into uint8 too
    (its QDQ S8-to-U8 transform), so both meet the same kernels. base_dir: where a graph saved with external data
    keeps it (the rails load graphs without it; each weight is read from there one at a time)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(iter_nodes(graph))
    producer = {o: n for n in nodes for o in n.output}

    def through(name: str, ops=("Transpose", "Reshape", "Identity")):
        n = producer.get(name)
        while n is not None and n.op_type in ops:
            name, n = n.input[0], producer.get(n.input[0])
        return name, n

    def int8_weight(name: str):
        name, n = through(name)
        if n is not None and n.op_type == "DequantizeLinear":
            name, _ = through(n.input[0])
        t = inits.get(name)
        if t is None or t.data_type != INT8:
            return None
        return numpy_helper.to_array(t, base_dir=str(base_dir) if base_dir is not None else "")

    products = full = 0
    for node in nodes:
        at = WEIGHT_INPUT.get(node.op_type)
        if at is None or len(node.input) <= at:
            continue
        if node.op_type in ("MatMul", "Gemm") and (through(node.input[0])[1] or node).op_type != "DequantizeLinear":
            continue  # a float product (a weight-only DequantizeLinear feeds fp32 activations)
        w = int8_weight(node.input[at])
        if w is None or w.size == 0:
            continue
        products += 1
        full += int(int(abs(w.astype("int32")).max()) > SEVEN_BIT)
    return products, full


def judge(products: int, full_range: int, probe: dict[str, Any] | None, fix: str) -> dict[str, Any]:
    numbers = {"u8s8_products": products, "eight_bit_weights": full_range}
    if not products:
        return result(NAME, PASSED, "no u8s8 int8 product in this graph", **numbers)
    if not full_range:
        return result(NAME, PASSED, f"{products} u8s8 int8 products, every weight within 7 bits: exact on any CPU",
                      **numbers)
    flags = (probe or {}).get("cpu_flags") or cpu_info()  # the probe's record of this machine, else /proc/cpuinfo
    cpu = flags.get("cpu") or "this CPU"
    if not (flags.get("avx2") or flags.get("avx512")):  # the int16 pairing is x86 AVX2 / AVX-512's (or unknown)
        return result(NAME, SKIPPED, f"{full_range} of {products} u8s8 int8 products have 8-bit weights; {cpu} shows "
                      "no AVX2/AVX-512 flags, whose u8s8 kernels are the ones that saturate", **numbers)
    if flags.get("vnni") or flags.get("amx"):
        return result(NAME, PASSED, f"{full_range} of {products} u8s8 int8 products have 8-bit weights: exact on {cpu} "
                      f"({'AMX' if flags.get('amx') else 'VNNI'}); a CPU without VNNI adds their pairs in int16 and "
                      f"saturates, so its figures would differ ({fix})", **numbers)
    return result(NAME, WARNED, f"{full_range} of {products} u8s8 int8 products have 8-bit weights and {cpu} has no "
                  "VNNI/AMX: onnxruntime adds their u8*s8 pairs in int16, which saturates, so the check's figures are "
                  f"this CPU's and a VNNI CPU computes the graph exactly ({fix})", **numbers)


def fix_hint(ctx: RailContext) -> str:
    """The recipe key that gives 7-bit weights: the build's steps with a reduce_range parameter, else the
    onnxruntime.quantization argument."""
    keys = [s.key for s in ctx.recipe_steps if hasattr(getattr(s, "params", None), "reduce_range")]
    if keys:
        return " or ".join(f"{k}.reduce_range=true" for k in keys) + " gives 7-bit weights that cannot saturate"
    return "quantizing with reduce_range=True gives 7-bit weights that cannot saturate"


def run(ctx: RailContext) -> dict[str, Any]:
    if ctx.onnx_path is None:
        return result(NAME, SKIPPED, "no ONNX graph to look at")
    products, full = u8s8_products(ctx.model(), base_dir=ctx.onnx_path.parent)
    return judge(products, full, ctx.int8_probe, fix_hint(ctx))
