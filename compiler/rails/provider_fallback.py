"""Rail 2: nodes that ONNX Runtime assigned to another execution provider than the one asked for.
onnxruntime-gpu falls back to the CPU with only a log line; a quantized op on the CPU under a CUDA
session once ran dynamic int8 there and lost half its accuracy."""

from __future__ import annotations

import sys
from typing import Dict, List, Optional

from compiler.graph.quantized import is_quantized_node
from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext, not_applicable, result
from compiler.runners.sessions import node_placement

NAME = "provider_fallback"
CPU = "CPUExecutionProvider"
APPLIES_TO = ("targets that run an ONNX Runtime session, and the torch module itself (its parameters' device); "
              "TensorRT reports which layers run quantized in its own layer report")


def applies_to(caps) -> bool:
    return caps.ort_session or not caps.runs_onnx
HEAVY_OPS = {"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "Attention",
             "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "Softmax"}


def is_quantized_op(op_type: str) -> bool:
    """Ops that carry the quantized arithmetic: on the wrong provider they change numbers, not only speed."""
    return is_quantized_node(op_type)


def placement_from_session(sess) -> Dict[str, Dict[str, int]]:
    """provider -> op type -> node count, from a session created with record_placement=True
    (compiler.runners.sessions)."""
    return node_placement(sess)


def judge(placement: Dict[str, Dict[str, int]], providers: List[str]) -> Dict:
    """Pure function over the assignment record: which nodes left the first requested provider."""
    primary = providers[0] if providers else CPU
    total = sum(sum(ops.values()) for ops in placement.values())
    on_primary = sum(placement.get(primary, {}).values())
    numbers = dict(provider=primary, nodes=total, nodes_on_provider=on_primary,
                   by_provider={ep: sum(ops.values()) for ep, ops in placement.items()})
    if total == 0:
        return result(NAME, SKIPPED, "ONNX Runtime recorded no node assignment", **numbers)
    if on_primary == 0:
        return result(NAME, FAILED, f"no node runs on {primary}: every node went to "
                      f"{', '.join(sorted(placement))} -- the provider did not load (no GPU, or a missing "
                      f"library); install it or change target.providers", **numbers)
    quant_fallback: Dict[str, int] = {}
    heavy_fallback: Dict[str, int] = {}
    other = 0
    for ep, ops in placement.items():
        if ep == primary:
            continue
        for op, n in ops.items():
            if is_quantized_op(op) and ep == CPU:
                quant_fallback[f"{op}@{ep}"] = quant_fallback.get(f"{op}@{ep}", 0) + n
            elif is_quantized_op(op) or op in HEAVY_OPS:
                heavy_fallback[f"{op}@{ep}"] = heavy_fallback.get(f"{op}@{ep}", 0) + n
            else:
                other += n
    numbers.update(quantized_fallback=sum(quant_fallback.values()), compute_fallback=sum(heavy_fallback.values()),
                   other_fallback=other)

    def listing(d: Dict[str, int]) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:6])

    if quant_fallback:
        return result(NAME, FAILED, f"{sum(quant_fallback.values())} quantized nodes fell back to the CPU under "
                      f"{primary} ({listing(quant_fallback)}): their arithmetic is not what {primary} would run -- "
                      "use a quantization format this provider implements (QDQ for TensorRT/CUDA), or "
                      "target.providers=[CPUExecutionProvider]", **numbers)
    if heavy_fallback:
        return result(NAME, WARNED, f"{sum(heavy_fallback.values())} compute nodes run outside {primary} "
                      f"({listing(heavy_fallback)})", **numbers)
    extra = f"; {other} shape/glue nodes on other providers" if other else ""
    return result(NAME, PASSED, f"all {on_primary} nodes on {primary}{extra}", **numbers)


def run(ctx: RailContext) -> Dict:
    if not applies_to(ctx.target):
        return not_applicable(sys.modules[__name__], ctx.target)
    if not ctx.target.runs_onnx:
        return _torch(ctx)
    if ctx.provider_error:
        return result(NAME, FAILED, f"{ctx.provider_error} -- install the provider (onnxruntime-gpu on a GPU machine) "
                      "or change target.providers", provider=ctx.providers[0] if ctx.providers else CPU)
    if ctx.placement is None:
        return result(NAME, SKIPPED, f"no assignment record: {ctx.probe_error or 'ONNX Runtime could not load the model'}")
    return judge(ctx.placement, ctx.providers)


def _torch(ctx: RailContext) -> Dict:
    """torch target: every parameter on the device the recipe asked for."""
    if ctx.module is None:
        return result(NAME, SKIPPED, "no torch module")
    want: Optional[str] = ctx.providers[0] if ctx.providers else "cpu"
    devices: Dict[str, int] = {}
    for p in ctx.module.parameters():
        devices[p.device.type] = devices.get(p.device.type, 0) + 1
    off = {d: n for d, n in devices.items() if d != want}
    if off:
        return result(NAME, FAILED, f"{sum(off.values())} parameters not on {want}: {off}", by_device=devices)
    return result(NAME, PASSED, f"all {sum(devices.values())} parameters on {want}", by_device=devices)
