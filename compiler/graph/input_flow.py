"""Input-flow check of an exported graph: two different inputs must give different outputs; if they do
not, something that should have read the input was evaluated at export time and baked into a Constant
(e.g. a CUDA-only custom op such as fast_hadamard_transform traced eagerly)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from compiler.core.errors import BuildError

MESSAGE = "output does not depend on input: an op was baked into a Constant during export"


def needs_reference_runner(model) -> bool:
    """Graphs ONNX Runtime's CPU provider cannot run: TensorRT custom ops, FLOAT4E2M1 tensors."""
    from onnx import TensorProto

    if any(n.domain not in ("", "ai.onnx", "com.microsoft") for n in model.graph.node):
        return True
    fp4 = getattr(TensorProto, "FLOAT4E2M1", None)
    return fp4 is not None and any(t.data_type == fp4 for t in model.graph.initializer)


def predictor(onnx_path: Path, model=None) -> Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]:
    """ORT for standard graphs, compiler.runners.reference for TensorRT-flavoured ones."""
    import onnx

    model = model if model is not None else onnx.load(str(onnx_path), load_external_data=False)
    if needs_reference_runner(model):
        from compiler.runners.reference import reference_predictor

        return reference_predictor(onnx_path)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    names = [o.name for o in sess.get_outputs()]
    return lambda feed: dict(zip(names, sess.run(names, {k: feed[k] for k in inputs})))


def two_feeds(input_names: List[str], vocab: int, batch: int = 2, seq: int = 16) -> List[Dict[str, np.ndarray]]:
    """Two valid token feeds that differ in their token ids (same mask and token types)."""
    from compiler.core.feeds import synthetic_feed

    a = synthetic_feed(input_names, batch, seq, vocab=vocab, seed=1)
    b = synthetic_feed(input_names, batch, seq, vocab=vocab, seed=2)
    return [a, b]


def _vocab(model, default: int = 30522) -> int:
    """Rows of the table the token ids index (Gather(initializer, input_ids)), to keep ids in range."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == "input_ids" and n.input[0] in inits:
            return int(inits[n.input[0]].dims[0])
    return default


def constant_outputs(out_a: Dict[str, np.ndarray], out_b: Dict[str, np.ndarray]) -> List[str]:
    """Float outputs that came back bit-identical for the two feeds."""
    same = []
    for name, a in out_a.items():
        a, b = np.asarray(a), np.asarray(out_b[name])
        if a.dtype.kind == "f" and a.shape == b.shape and np.array_equal(a, b):
            same.append(name)
    return same


def check_input_flow(onnx_path: Path, input_names: Optional[List[str]] = None,
                     predict: Optional[Callable] = None) -> Dict[str, object]:
    """Raise BuildError when any float output is identical for two different inputs; else return the
    numbers (runner used, smallest max change over outputs)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}
    names = input_names or [i.name for i in model.graph.input if i.name not in init]
    runner = "reference" if needs_reference_runner(model) else "onnxruntime"
    predict = predict or predictor(onnx_path, model)
    feed_a, feed_b = two_feeds(names, _vocab(model))
    out_a, out_b = predict(feed_a), predict(feed_b)
    same = constant_outputs(out_a, out_b)
    if same:
        raise BuildError(f"{MESSAGE} (output(s) {', '.join(same)} identical for two different inputs; "
                         f"checked with {runner} on {Path(onnx_path).name})")
    change = {n: float(np.max(np.abs(np.asarray(out_a[n], np.float64) - np.asarray(out_b[n], np.float64))))
              for n in out_a if np.asarray(out_a[n]).dtype.kind == "f"}
    return {"runner": runner, "outputs": len(out_a), "min_max_abs_change": min(change.values()) if change else 0.0}
