"""The machine's int8 capability, measured: an int8 and an fp32 matrix product of the model's own shapes,
timed interleaved on the target's runtime, plus the CPU's int8-relevant instruction flags."""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.core.cpu import CPU_FLAGS, cpu_info  # noqa: F401  (re-exported: the probe's CPU facts)

log = logging.getLogger("qcompile")

PROBE_RUNTIMES = ("ort", "torch")


def gemm_shape(model_info, batch: int, seq: int) -> tuple[int, int, int]:
    """(M, K, N) of the model's largest linear layer at the bench shape: the FFN up-projection."""
    return int(batch) * int(seq), int(model_info.hidden_size), int(model_info.intermediate_size)


def _interleave(fns: dict[str, Callable[[], Any]], rounds: int, iters: int) -> dict[str, float]:
    """Median CPU seconds per call of each function, timed round-robin so machine load hits all alike.
    CPU time of this thread, not wall time: both kernels run single-threaded on the calling thread, and on
    shared cores a wall clock charges a long call more preemption than a short one (measured here under
    load 7: wall said int8 12x fp32, thread CPU time 2.3x)."""
    for fn in fns.values():  # warm-up: kernels picked, buffers allocated
        for _ in range(2):
            fn()
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(iters):
                t0 = time.thread_time()
                fn()
                times[k].append(time.thread_time() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _ort_matmul_pair(m: int, k: int, n: int, threads: int):
    """ONNX Runtime: MatMulInteger (uint8 activations x int8 weights, what quantize_dynamic / QDQ U8S8
    run) and fp32 MatMul, each with a constant weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w8 = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    w32 = rng.standard_normal((k, n)).astype(np.float32)

    def session(node, a_type, weight):
        g = helper.make_graph([node], "probe", [helper.make_tensor_value_info("a", a_type, [m, k])],
                              [helper.make_tensor_value_info("y", node_out_type[node.op_type], [m, n])],
                              [numpy_helper.from_array(weight, "w")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    node_out_type = {"MatMulInteger": TensorProto.INT32, "MatMul": TensorProto.FLOAT}
    s8 = session(helper.make_node("MatMulInteger", ["a", "w"], ["y"]), TensorProto.UINT8, w8)
    s32 = session(helper.make_node("MatMul", ["a", "w"], ["y"]), TensorProto.FLOAT, w32)
    a8 = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    a32 = rng.standard_normal((m, k)).astype(np.float32)
    return (lambda: s8.run(None, {"a": a8}), lambda: s32.run(None, {"a": a32}),
            "onnxruntime MatMulInteger u8s8 vs MatMul fp32")


def _torch_matmul_pair(m: int, k: int, n: int, threads: int):
    """torch: the dynamic int8 nn.Linear kernel (fbgemm / x86, what int8_dynamic runs) vs fp32 nn.Linear."""
    import warnings

    import torch

    torch.set_num_threads(int(threads))
    lin = torch.nn.Linear(k, n, bias=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice; it still ships these kernels
        from torch.ao.quantization import quantize_dynamic

        engines = torch.backends.quantized.supported_engines
        torch.backends.quantized.engine = next(e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines)
        q = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(m, k)

    def run(module):
        def f():
            with torch.inference_mode():
                module(x)
        return f

    return run(q), run(lin), f"torch dynamic int8 Linear ({torch.backends.quantized.engine}) vs fp32 Linear"


def measure(runtime: str, m: int, k: int, n: int, threads: int = 1, rounds: int = 7, iters: int = 5) -> dict[str, Any]:
    """Time the int8 and fp32 products of shape (m,k)x(k,n) on `runtime` (ort | torch)."""
    pair = {"ort": _ort_matmul_pair, "torch": _torch_matmul_pair}[runtime]
    int8, fp32, what = pair(m, k, n, threads)
    t = _interleave({"int8": int8, "fp32": fp32}, rounds, iters)
    ops = 2.0 * m * k * n
    return {"runtime": runtime, "what": what, "shape_mkn": [m, k, n], "threads": int(threads),
            "int8_gops": ops / t["int8"] / 1e9, "fp32_gflops": ops / t["fp32"] / 1e9,
            "int8_gemm_vs_fp32": t["fp32"] / t["int8"], "clock": "thread CPU time", "rounds": rounds,
            "iterations": iters}


def probe_key(runtime: str, shape: tuple[int, int, int], threads: int) -> dict[str, Any]:
    """What a probe result depends on: the machine (CPU model, flags, cores), runtime, shape, threads."""
    return {"machine": cpu_info(), "platform": platform.machine(), "runtime": runtime, "shape_mkn": list(shape),
            "threads": int(threads)}


def int8_probe(runtime: str, shape: tuple[int, int, int], threads: int = 1, cache=None) -> dict[str, Any]:
    """The probe's result with the CPU flags; cached per machine (CPU, flags, shape, runtime, tool versions)
    when a cache is given, so a sweep probes once. Raises ValueError for a runtime it cannot probe."""
    import json

    if runtime not in PROBE_RUNTIMES:
        raise ValueError(f"no int8 probe for runtime {runtime!r} (only {PROBE_RUNTIMES})")
    m, k, n = shape

    def run() -> dict[str, Any]:
        return {**measure(runtime, m, k, n, threads), "cpu_flags": cpu_info(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}

    if cache is None:
        return {**run(), "cached": False}

    def build(d: Path) -> None:
        (d / "probe.json").write_text(json.dumps(run(), indent=2, sort_keys=True))

    entry = cache.get_or_create("probe", probe_key(runtime, shape, threads), build)
    return {**json.loads((entry / "probe.json").read_text()), "cached": True}


def probe_for_build(spec, target_capabilities, cache=None) -> dict[str, Any] | None:
    """The build's probe on its own runtime, or None with the reason logged where it does not apply (a GPU
    target: this probe measures the CPU)."""
    if target_capabilities.gpu:
        return {"skipped": f"target {target_capabilities.name} runs on a GPU; the probe measures CPU matrix products"}
    providers = list(getattr(spec.target, "providers", None) or ["CPUExecutionProvider"])
    if target_capabilities.ort_session and providers[0] != "CPUExecutionProvider":
        return {"skipped": f"{providers[0]} is not the CPU; the probe measures CPU matrix products"}
    if str(getattr(spec.target, "device", "cpu")) != "cpu":
        return {"skipped": "target.device is not the CPU; the probe measures CPU matrix products"}
    runtime = "ort" if target_capabilities.ort_session else "torch"
    shape = gemm_shape(spec.model_info, int(spec.bench.batch_size), int(spec.bench.seq_len))
    try:
        return int8_probe(runtime, shape, int(spec.bench.threads) or 1, cache)
    except Exception as e:  # noqa: BLE001 -- the probe informs; it never fails a build
        log.warning("int8 probe failed: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"[:300]}


FLOP_OPS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "FusedMatMul", "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat", "QGemm"}


def graph_flops(onnx_path: Path, batch: int, seq: int) -> dict[str, Any]:
    """Multiply-add FLOPs (2 per MAC) of every matrix product in the graph at batch x seq, counted from
    its shapes: the inputs are fixed to that shape and onnxruntime's symbolic shape inference resolves
    the rest (onnx's own inference loses the attention reshapes). Elementwise ops are left out: the
    products are ~99% of a transformer's FLOPs."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(onnx_path), load_external_data=False)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for d, v in zip(dims, (batch, seq)):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    # onnxruntime's symbolic inference saves sym_shape_infer_temp.onnx (+ external data) into the current
    # directory when it cannot finish (e.g. TensorRT's FP4/FP8 custom ops) and then raises: run it in a
    # scratch directory so a build never litters the user's working directory
    with tempfile.TemporaryDirectory(prefix="qcompile-flops-") as scratch, contextlib.chdir(scratch):
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    total, counted, unknown = 0, 0, 0
    for node in inferred.graph.node:
        if node.op_type not in FLOP_OPS:
            continue
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not y or None in a or None in y:
            unknown += 1
            continue
        k = a[-1] if not (node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)) else a[-2]
        total += 2 * int(np.prod(y)) * int(k)
        counted += 1
    return {"gflop": total / 1e9, "matmuls_counted": counted, "matmuls_unknown_shape": unknown,
            "batch": int(batch), "seq": int(seq)}
