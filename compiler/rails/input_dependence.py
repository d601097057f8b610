"""Rail 4: the engine's outputs must change when its inputs do. A traced custom op can be baked into a
Constant at export, so the graph answers the same thing for every input: feed two different inputs
and fail on any float output that comes back bit-identical (the check is compiler.graph.input_flow's)."""

from __future__ import annotations

from compiler.graph.input_flow import compare as compare_outputs
from compiler.graph.input_flow import feeds_for_graph, probe, token_feeds
from compiler.rails import FAILED, PASSED, SKIPPED, WARNED, RailContext, first_line, result

__all__ = ["NAME", "applies_to", "compare", "feeds_for_graph", "run", "token_feeds"]

NAME = "input_dependence"
APPLIES_TO = "every target (the engine, or the CPU runner of its graph, on two different inputs)"
CHECKED_BY = "compiler.graph.input_flow"


def applies_to(caps) -> bool:
    return True


def judge(numbers: dict, runner: str) -> dict:
    """The rail's verdict over input_flow.compare()'s numbers."""
    constant, int_same = numbers["constant_outputs"], numbers["unchanged_int_outputs"]
    keep = {"outputs": numbers["outputs"], "constant_outputs": constant, "max_abs_change": numbers["max_abs_change"],
            "runner": runner, "checked_by": CHECKED_BY}
    if constant:
        return result(NAME, FAILED, f"output(s) {', '.join(constant)} are bit-identical for two different inputs: "
                      "an op was baked into a Constant at export (a traced custom op, or data-dependent control "
                      "flow) -- make it traceable, or export it as a real op", **keep)
    if int_same:
        return result(NAME, WARNED, f"integer output(s) {', '.join(int_same)} unchanged for two different inputs",
                      **keep)
    return result(NAME, PASSED, f"all {numbers['outputs']} outputs change with the input (smallest max change "
                  f"{numbers['min_max_abs_change']:.3g}; {runner})", **keep)


def compare(out_a, out_b) -> dict:
    """Pure: the rail's verdict on the outputs for two different feeds."""
    return judge(compare_outputs(out_a, out_b), "given")


def run(ctx: RailContext) -> dict:
    if not getattr(ctx.config, "input_dependence", True):
        return result(NAME, SKIPPED, "doctor.input_dependence=false")
    if ctx.onnx_path is None and ctx.predict is None:
        return result(NAME, SKIPPED, "nothing to run")
    try:
        numbers, runner = probe(ctx.onnx_path, ctx.predict, ctx.input_names)
    except Exception as e:  # a graph no runner here can execute (TensorRT plan without a GPU) is not this rail's fault
        return result(NAME, SKIPPED, f"could not run the graph on two inputs: {first_line(e)}")
    return judge(numbers, runner)
