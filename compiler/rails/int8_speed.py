"""Rail 8: int8 compute on a CPU where the int8 probe (compiler/stages/bench/probe.py) measured int8 matrix
products no faster than fp32 -- the build will be smaller, not faster; say so before anyone benchmarks."""

from __future__ import annotations

from typing import Any

from compiler.graph.quantized import computes_in_int8, is_int8_compute
from compiler.rails import PASSED, SKIPPED, WARNED, RailContext, iter_nodes, result

NAME = "int8_speed"
APPLIES_TO = "targets that run on the CPU (the int8 probe measures CPU matrix products)"
NO_SPEEDUP_BELOW = 1.15  # int8 within this factor of fp32 counts as "no faster"
EIGHT_BIT = {2, 3}  # onnx.TensorProto UINT8, INT8


def applies_to(caps) -> bool:
    return not caps.gpu


def graph_int8_compute(model) -> int:
    """MatMul/Gemm nodes that compute in int8: int8 ops, or a float MatMul/Gemm whose two operands both
    come from an 8-bit integer DequantizeLinear (QDQ W8A8, which ORT fuses into int8 kernels)."""
    nodes = list(iter_nodes(model.graph))
    producer = {o: n for n in nodes for o in n.output}
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)})

    def int8_dq(name: str) -> bool:
        n = producer.get(name)
        while n is not None and n.op_type in ("Transpose", "Reshape", "Identity"):
            n = producer.get(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return False
        if len(n.input) > 2 and n.input[2]:
            zp = producer.get(n.input[2])
            dtype = types.get(n.input[2]) or (zp is not None and zp.op_type == "Constant" and zp.attribute[0].t.data_type)
            return dtype in EIGHT_BIT
        q = producer.get(n.input[0])  # no zero point: the quantized input's type (int8 by default)
        return types.get(n.input[0], 3 if q is not None and q.op_type == "QuantizeLinear" else 0) in EIGHT_BIT

    count = 0
    for n in nodes:
        if is_int8_compute(n.op_type) or n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2 and int8_dq(n.input[0]) and int8_dq(n.input[1]):
            count += 1
    return count


def module_int8_compute(module) -> int:
    """torch modules that compute in int8: torch.ao (dynamic) quantized Linear, or a modelopt quantized
    layer whose input and weight quantizers are both enabled at 8 bits."""
    return sum(1 for m in module.modules() if computes_in_int8(m))


def judge(int8_layers: int, probe: dict[str, Any] | None) -> dict[str, Any]:
    if not int8_layers:
        return result(NAME, PASSED, "no int8 compute in this build (nothing expects an int8 speed-up)", int8_layers=0)
    if not probe or "int8_gemm_vs_fp32" not in probe:
        why = (probe or {}).get("skipped", "no int8 probe result")
        return result(NAME, SKIPPED, f"{int8_layers} int8 layers; {why}", int8_layers=int8_layers)
    ratio = float(probe["int8_gemm_vs_fp32"])
    flags = probe.get("cpu_flags") or {}
    have = [f for f in ("vnni", "amx", "avx512", "avx2") if flags.get(f)]
    numbers = {"int8_layers": int8_layers, "int8_gemm_vs_fp32": round(ratio, 3), "cpu": flags.get("cpu"),
                   "cpu_flags": have}
    missing = [f.upper() for f in ("vnni", "amx") if not flags.get(f)]
    flag_text = ", ".join([f.upper() for f in have] + ([f"no {'/'.join(missing)}"] if missing else []))
    where = f"{probe.get('runtime', '?')} on {flags.get('cpu') or 'this CPU'}: {flag_text or 'flags unknown'}"
    if ratio < NO_SPEEDUP_BELOW:
        return result(NAME, WARNED, f"int8 on this CPU: {ratio:.2f}x fp32 for matrix products ({where}); expect "
                      "size and memory gains, not speed -- a CPU with VNNI/AMX or a GPU runs int8 faster", **numbers)
    return result(NAME, PASSED, f"int8 on this CPU: {ratio:.2f}x fp32 for matrix products ({where})", **numbers)


def run(ctx: RailContext) -> dict[str, Any]:
    if ctx.module is not None:
        layers = module_int8_compute(ctx.module)
    elif ctx.onnx_path is not None:
        layers = graph_int8_compute(ctx.model())
    else:
        return result(NAME, SKIPPED, "no graph or module to look at")
    return judge(layers, ctx.int8_probe)
