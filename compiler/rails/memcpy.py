"""Rail 1: host<->device copies that ONNX Runtime inserts into the optimized graph (MemcpyToHost /
MemcpyFromHost) and nodes it places on the CPU under a GPU provider; too many means the exporter
produced a graph that ping-pongs between devices (a dynamo export once got 56 and ran 8x slower)."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Dict, Optional

from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext, iter_nodes, not_applicable, result

NAME = "memcpy"
MEMCPY_OPS = ("MemcpyToHost", "MemcpyFromHost")
CPU = "CPUExecutionProvider"
APPLIES_TO = "targets that run an ONNX Runtime session (TensorRT builds the whole graph on the GPU)"


def applies_to(caps) -> bool:
    return caps.ort_session


def count_memcpy(model) -> Dict[str, int]:
    """Memcpy nodes of an ORT-optimized graph by op type. ORT writes them in the ONNX domain; a graph
    written by other tools may carry them under com.microsoft, so the domain is not checked."""
    counts = Counter(n.op_type for n in iter_nodes(model.graph) if n.op_type in MEMCPY_OPS)
    return {op: counts.get(op, 0) for op in MEMCPY_OPS}


def cpu_placed(placement: Optional[Dict[str, Dict[str, int]]], primary: str) -> Dict[str, int]:
    """Nodes ORT put on the CPU while another provider was asked for first: op type -> count.
    (ORT keeps shape arithmetic on the CPU on purpose; each such island costs copies.)"""
    if not placement or primary == CPU:
        return {}
    return dict(sorted(placement.get(CPU, {}).items(), key=lambda kv: -kv[1]))


def judge(memcpy: Dict[str, int], cpu_nodes: Dict[str, int], max_memcpy: int, exporter: str,
          primary: str) -> Dict:
    total = sum(memcpy.values())
    n_cpu = sum(cpu_nodes.values())
    numbers = dict(memcpy_nodes=total, memcpy_to_host=memcpy.get("MemcpyToHost", 0),
                   memcpy_from_host=memcpy.get("MemcpyFromHost", 0), cpu_placed_nodes=n_cpu,
                   max_memcpy=max_memcpy, provider=primary)
    where = f"ONNX Runtime's optimized graph for {primary}"
    cpu_note = ""
    if n_cpu:
        top = ", ".join(f"{op} x{n}" for op, n in list(cpu_nodes.items())[:5])
        cpu_note = f"; {n_cpu} nodes placed on the CPU ({top})"
    if total > max_memcpy:
        fix = ("re-export with export.exporter=torchscript (torch.onnx.export dynamo=False), which keeps "
               "shape arithmetic out of the device graph") if exporter != "torchscript" else (
               "the TorchScript exporter already made this graph: find what feeds the CPU-placed nodes")
        return result(NAME, FAILED, f"{total} Memcpy nodes in {where} (more than doctor.max_memcpy={max_memcpy}); "
                      f"exporter: {exporter}{cpu_note} -- {fix}", **numbers)
    if total:
        return result(NAME, WARNED, f"{total} Memcpy nodes in {where} (allowed up to {max_memcpy}); "
                      f"exporter: {exporter}{cpu_note}", **numbers)
    return result(NAME, PASSED, f"no Memcpy nodes in {where}{cpu_note}", **numbers)


def run(ctx: RailContext) -> Dict:
    if not applies_to(ctx.target):
        return not_applicable(sys.modules[__name__], ctx.target)
    if ctx.optimized_path is None:
        return result(NAME, SKIPPED, f"no optimized graph: {ctx.probe_error or 'ONNX Runtime could not load the model'}")
    import onnx

    optimized = onnx.load(str(ctx.optimized_path), load_external_data=False)
    primary = ctx.providers[0] if ctx.providers else CPU
    return judge(count_memcpy(optimized), cpu_placed(ctx.placement, primary), int(ctx.config.max_memcpy),
                 ctx.exporter, primary)
