"""Rail 4: the engine's outputs must change when its inputs do. A traced custom op can be baked into a
Constant at export, so the graph answers the same thing for every input: feed two different inputs
and fail on any float output that comes back bit-identical."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np

from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext, first_line, result

NAME = "input_dependence"
BATCH, SEQ = 2, 16

ONNX_TO_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
                 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def _vocab_size(model, input_name: str) -> Optional[int]:
    """Rows of the embedding table an integer input indexes (Gather(table, input)), if any."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == input_name and n.input[0] in inits:
            return int(inits[n.input[0]].dims[0])
    return None


def feeds_for_graph(model, seeds=(1, 2)) -> List[Dict[str, np.ndarray]]:
    """Two feeds that differ, shaped from the graph's inputs (symbolic dims: batch 2, length 16).
    Token ids stay inside the embedding table; masks stay all ones, token types zeros, so both
    feeds are valid inputs and differ only in content."""
    init_names = {t.name for t in model.graph.initializer}
    feeds = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        feed = {}
        for vi in model.graph.input:
            if vi.name in init_names:
                continue
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.dim_value > 0 else (BATCH if i == 0 else SEQ)
                    for i, d in enumerate(tt.shape.dim)]
            dtype = ONNX_TO_NUMPY.get(tt.elem_type, np.float32)
            lname = vi.name.lower()
            if np.issubdtype(dtype, np.floating):
                feed[vi.name] = rng.standard_normal(dims).astype(dtype)
            elif dtype == np.bool_:
                feed[vi.name] = np.ones(dims, dtype=dtype) if "mask" in lname else rng.integers(0, 2, dims).astype(dtype)
            elif "mask" in lname:
                feed[vi.name] = np.ones(dims, dtype=dtype)
            elif "type" in lname or "segment" in lname or "position" in lname:
                feed[vi.name] = np.zeros(dims, dtype=dtype)
            else:
                high = _vocab_size(model, vi.name) or 100
                feed[vi.name] = rng.integers(1, max(high, 2), size=dims).astype(dtype)
        feeds.append(feed)
    return feeds


def token_feeds(input_names: List[str], vocab: int = 30522) -> List[Dict[str, np.ndarray]]:
    """Two valid tokenized feeds for a qcompile model (input_ids, attention_mask[, token_type_ids])."""
    from compiler.core.feeds import synthetic_feed

    return [synthetic_feed(input_names, BATCH, SEQ, vocab=vocab, seed=s) for s in (1, 2)]


def compare(out_a: Dict[str, np.ndarray], out_b: Dict[str, np.ndarray]) -> Dict:
    """Pure comparison of the outputs for two different feeds."""
    constant, int_same, diffs = [], [], {}
    for name in out_a:
        a, b = np.asarray(out_a[name]), np.asarray(out_b[name])
        same = a.shape == b.shape and np.array_equal(a, b)
        if a.shape == b.shape and a.size and np.issubdtype(a.dtype, np.number):
            diffs[name] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        if same:
            (constant if np.issubdtype(a.dtype, np.floating) else int_same).append(name)
    numbers = dict(outputs=len(out_a), constant_outputs=constant, max_abs_change=diffs)
    if constant:
        return result(NAME, FAILED, f"output(s) {', '.join(constant)} are bit-identical for two different inputs: "
                      "an op was baked into a Constant at export (a traced custom op, or data-dependent control "
                      "flow) -- make it traceable, or export it as a real op", **numbers)
    if int_same:
        return result(NAME, WARNED, f"integer output(s) {', '.join(int_same)} unchanged for two different inputs",
                      **numbers)
    return result(NAME, PASSED, f"all {len(out_a)} outputs change with the input "
                  f"(smallest max change {min(diffs.values()) if diffs else 0:.3g})", **numbers)


def check_predict(predict: Callable, feeds: List[Dict[str, np.ndarray]]) -> Dict:
    return compare(predict(feeds[0]), predict(feeds[1]))


TOKEN_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}


def _c_input_flow():
    """Engineer C's graph check (compiler/graph/input_flow.py) when it exists: the rail uses its
    check and its runner (ORT, or the reference runner for TensorRT/FP4 graphs ORT cannot run), so
    the pipeline and the doctor judge a graph the same way."""
    try:
        from compiler.graph import input_flow
    except ImportError:
        return None
    return input_flow if hasattr(input_flow, "check_input_flow") else None


def ort_predict(onnx_path) -> Callable:
    flow = _c_input_flow()
    if flow is not None and hasattr(flow, "predictor"):
        return flow.predictor(onnx_path)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def predict(feed):
        return dict(zip(names, sess.run(names, feed)))

    return predict


def _via_input_flow(flow, ctx: RailContext) -> Optional[Dict]:
    """C's check_input_flow on a token-input graph: it raises BuildError on a baked output. None when
    it could not run (e.g. its token feeds assume a vocabulary of >= 1000 rows): the rail's own
    feeds take over."""
    from compiler.core.errors import BuildError

    try:
        numbers = flow.check_input_flow(ctx.onnx_path, ctx.input_names or None, predict=ctx.predict)
    except BuildError as e:
        return result(NAME, FAILED, f"{e.message} -- make the op traceable, or export it as a real op",
                      checked_by="compiler.graph.input_flow")
    except Exception:
        return None
    return result(NAME, PASSED, f"all {numbers.get('outputs')} outputs change with the input (smallest max change "
                  f"{float(numbers.get('min_max_abs_change', 0.0)):.3g}; {numbers.get('runner', 'engine')})",
                  checked_by="compiler.graph.input_flow", **numbers)


def run(ctx: RailContext) -> Dict:
    if not getattr(ctx.config, "input_dependence", True):
        return result(NAME, SKIPPED, "doctor.input_dependence=false")
    try:
        if ctx.onnx_path is None:
            if ctx.predict is None:
                return result(NAME, SKIPPED, "nothing to run")
            return check_predict(ctx.predict, token_feeds(ctx.input_names))  # torch target: the module itself
        model = ctx.model()
        init = {t.name for t in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in init]
        flow = _c_input_flow()
        if flow is not None and set(inputs) <= TOKEN_INPUTS:
            judged = _via_input_flow(flow, ctx)
            if judged is not None:
                return judged
        predict = ctx.predict or ort_predict(ctx.onnx_path)
        return check_predict(predict, feeds_for_graph(model))  # any other graph: feeds shaped from its inputs
    except Exception as e:  # a graph no runner here can execute (TensorRT plan without a GPU) is not this rail's fault
        return result(NAME, SKIPPED, f"could not run the graph on two inputs: {first_line(e)}")
