"""The one place an onnxruntime InferenceSession is built, and where "which runner executes this ONNX"
(onnxruntime CPU, or the onnx.reference runner for TensorRT / FP4 graphs) is decided."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from compiler.core.errors import RecipeError
from compiler.runners.reference import reference_predictor

Feed = dict[str, np.ndarray]
CPU = "CPUExecutionProvider"
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
ORT_DOMAINS = ("", "ai.onnx", "com.microsoft")  # what the onnxruntime CPU provider has kernels for


def session_options(opt_level: str = "all", threads: int | None = None, optimized_path: Path | None = None,
                    record_placement: bool = False, optimized_external_data: bool = False,
                    profile_prefix: str | None = None):
    """SessionOptions: quiet log, the optimization level by its recipe name, pinned threads (no spinning:
    the machines are shared), optionally ORT's optimized graph saved, the node placement recorded and
    the profiler on (its JSON goes to profile_prefix*.json at end_profiling(), which also stops it)."""
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise RecipeError("target.graph_optimization", f"unknown level {opt_level!r}", f"use one of {list(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    # never spinning, pinned or not: an idle worker thread that spins burns a core another build (a sweep's
    # other job) or the session's own next op needs; the check's sessions run on onnxruntime's default threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        if optimized_external_data:
            # ORT writes the optimized graph as one proto unless told where its tensors go: past 2 GB that fails
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        Path(optimized_path).name + ".data")
    if record_placement:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return so


def ort_session(model: str | Path | bytes, providers: Sequence = (CPU,), opt_level: str = "all",
                threads: int | None = None, optimized_path: Path | None = None,
                record_placement: bool = False, optimized_external_data: bool = False,
                profile_prefix: str | None = None, disabled_optimizers: Sequence[str] = ()):
    """An InferenceSession on a path or serialized model bytes; errors propagate unchanged (callers word
    them for their own context). optimized_external_data: the saved optimized graph keeps its tensors in
    <optimized_path>.data (needed past protobuf's 2 GB). profile_prefix: onnxruntime's profiler on.
    disabled_optimizers: onnxruntime graph transformers left out by name (target.disabled_optimizers)."""
    import onnxruntime as ort

    so = session_options(opt_level, threads, optimized_path, record_placement, optimized_external_data,
                         profile_prefix)
    src = model if isinstance(model, bytes) else str(model)
    if disabled_optimizers:
        return ort.InferenceSession(src, sess_options=so, providers=list(providers),
                                    disabled_optimizers=list(disabled_optimizers))
    return ort.InferenceSession(src, sess_options=so, providers=list(providers))


def load_error(model: str | Path | bytes, opt_level: str = "disable") -> str:
    """'' when onnxruntime's CPU provider builds a session on the graph, else the first line of its error."""
    try:
        ort_session(model, opt_level=opt_level)
    except Exception as e:
        text = str(e).strip()
        return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)[:300]
    return ""


def node_placement(sess) -> dict[str, dict[str, int]]:
    """provider -> op type -> node count, from ORT's graph assignment record
    (a session made with record_placement=True)."""
    out: dict[str, dict[str, int]] = {}
    try:
        info = sess.get_provider_graph_assignment_info()
    except Exception:  # older ORT: no record
        return out
    for sub in info:
        ep = getattr(sub, "ep_name", None) or str(sub)
        for node in getattr(sub, "get_nodes", list)():
            op = getattr(node, "op_type", "?")
            out.setdefault(ep, {})
            out[ep][op] = out[ep].get(op, 0) + 1
    return out


def session_predictor(sess, output_names: list[str] | None = None) -> Callable[[Feed], Feed]:
    """feed -> {output: float32 array} over a session; feed entries the graph does not take are dropped."""
    inputs = [i.name for i in sess.get_inputs()]
    names = list(output_names or [o.name for o in sess.get_outputs()])

    def predict(feed: Feed) -> Feed:
        outs = sess.run(names, {k: np.ascontiguousarray(feed[k]) for k in inputs if k in feed})
        return {n: (np.asarray(o, dtype=np.float32) if np.asarray(o).dtype.kind == "f" else np.asarray(o))
                for n, o in zip(names, outs)}

    # the bench's op profile (compiler/stages/bench/op_profile.py) ends a profiled session's profiling through this
    predict.end_profiling = sess.end_profiling
    return predict


# -- which runner executes a graph on the CPU ---------------------------------------------------------

def needs_reference_runner(model) -> bool:
    """Graphs ONNX Runtime's CPU provider cannot run: custom-domain ops (TensorRT's trt::), FLOAT4E2M1
    tensors (FP4 DequantizeLinear / Cast have no CPU kernel in onnxruntime)."""
    from onnx import TensorProto

    if any(n.domain not in ORT_DOMAINS for n in model.graph.node):
        return True
    fp4 = getattr(TensorProto, "FLOAT4E2M1", None)
    return fp4 is not None and any(t.data_type == fp4 for t in model.graph.initializer)


def cpu_runner_kind(model) -> str:
    """'reference' or 'ort': the CPU runner that can execute this graph."""
    return "reference" if needs_reference_runner(model) else "ort"


def cpu_predictor(onnx_path: Path, model=None, kind: str | None = None, threads: int | None = 1,
                  opt_level: str = "all") -> Callable[[Feed], Feed]:
    """A feed -> outputs callable for the graph on the CPU: onnxruntime for standard graphs, the
    onnx.reference runner (compiler.runners.reference) for what onnxruntime cannot run."""
    import onnx

    if kind is None:
        model = model if model is not None else onnx.load(str(onnx_path), load_external_data=False)
        kind = cpu_runner_kind(model)
    if kind == "reference":
        return reference_predictor(onnx_path)
    return session_predictor(ort_session(onnx_path, opt_level=opt_level, threads=threads))
