"""Input-flow check of a graph or engine: two different inputs must give different outputs; if they do
not, something that should have read the input was evaluated at export time and baked into a Constant
(e.g. a CUDA-only custom op such as fast_hadamard_transform traced eagerly). The one check behind both
the export stage (raises) and the input_dependence guard rail (reports)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from compiler.core.errors import BuildError
from compiler.core.feeds import synthetic_feed
from compiler.runners.sessions import cpu_predictor, cpu_runner_kind, needs_reference_runner

__all__ = ["MESSAGE", "check_input_flow", "compare", "feeds_for_graph", "needs_reference_runner", "probe",
           "token_feeds"]

MESSAGE = "output does not depend on input: an op was baked into a Constant during export"
BATCH, SEQ = 2, 16
RUNNER_LABEL = {"ort": "onnxruntime", "reference": "reference"}

ONNX_TO_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
                 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
Feed = dict[str, np.ndarray]


def graph_vocab(model, input_name: str) -> int | None:
    """Rows of the embedding table an integer input indexes (Gather(table, input)), if any."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == input_name and n.input[0] in inits:
            return int(inits[n.input[0]].dims[0])
    return None


def feeds_for_graph(model, seeds=(1, 2)) -> list[Feed]:
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
                high = graph_vocab(model, vi.name) or 100
                feed[vi.name] = rng.integers(1, max(high, 2), size=dims).astype(dtype)
        feeds.append(feed)
    return feeds


def token_feeds(input_names: list[str], vocab: int = 30522) -> list[Feed]:
    """Two valid tokenized feeds for a qcompile model without a graph (the torch target's module)."""
    return [synthetic_feed(input_names, BATCH, SEQ, vocab=vocab, seed=s) for s in (1, 2)]


def compare(out_a: Feed, out_b: Feed) -> dict[str, object]:
    """Pure comparison of the outputs for two different feeds: float outputs that came back bit-identical
    (constant_outputs), integer ones (unchanged_int_outputs), and each output's largest change."""
    constant, int_same, diffs = [], [], {}
    for name in out_a:
        a, b = np.asarray(out_a[name]), np.asarray(out_b[name])
        same = a.shape == b.shape and np.array_equal(a, b)
        if a.shape == b.shape and a.size and np.issubdtype(a.dtype, np.number):
            diffs[name] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
        if same:
            (constant if np.issubdtype(a.dtype, np.floating) else int_same).append(name)
    return {"outputs": len(out_a), "constant_outputs": constant, "unchanged_int_outputs": int_same,
            "max_abs_change": diffs, "min_max_abs_change": min(diffs.values()) if diffs else 0.0}


def probe(onnx_path: Path | None = None, predict: Callable[[Feed], Feed] | None = None,
          input_names: list[str] | None = None) -> tuple[dict[str, object], str]:
    """Run two different feeds and compare: (compare()'s numbers, the runner that ran them). With a
    graph the feeds are shaped from its inputs and, unless an engine's `predict` is given, the CPU
    runner that can execute it runs them (compiler.runners.sessions); without a graph, `predict` gets
    token feeds for `input_names`."""
    if onnx_path is None:
        if predict is None:
            raise ValueError("input flow: neither a graph nor a predictor")
        feed_a, feed_b = token_feeds(list(input_names or []))
        runner = "engine"
    else:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        feed_a, feed_b = feeds_for_graph(model)
        if predict is None:
            kind = cpu_runner_kind(model)
            predict, runner = cpu_predictor(Path(onnx_path), kind=kind), RUNNER_LABEL[kind]
        else:
            runner = "engine"
    return compare(predict(feed_a), predict(feed_b)), runner


def check_input_flow(onnx_path: Path, input_names: list[str] | None = None,
                     predict: Callable | None = None) -> dict[str, object]:
    """Raise BuildError when any float output is identical for two different inputs; else return the
    numbers (runner used, smallest max change over outputs)."""
    numbers, runner = probe(onnx_path, predict, input_names)
    same = numbers["constant_outputs"]
    if same:
        raise BuildError(f"{MESSAGE} (output(s) {', '.join(same)} identical for two different inputs; "
                         f"checked with {runner} on {Path(onnx_path).name})")
    return {"runner": runner, "outputs": numbers["outputs"], "min_max_abs_change": numbers["min_max_abs_change"]}
