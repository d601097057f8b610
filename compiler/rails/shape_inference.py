"""Rail 7: shape inference that fails on a model (ModernBERT's rotary embeddings once did) is
reported and worked around, never a crash: strict inference first, then the permissive pass that
keeps what it could infer."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from compiler.rails import PASSED, SKIPPED, WARNED, RailContext, first_line, result

NAME = "shape_inference"
APPLIES_TO = "targets that run an ONNX graph"


def applies_to(caps) -> bool:
    return caps.runs_onnx


def infer(model) -> Tuple[Optional[object], str, str]:
    """(inferred model or None, strict error or '', permissive error or ''). Strict mode raises on
    the first node it cannot type or shape; the permissive pass skips such nodes and keeps going.
    The graph comes without its external data: inference needs dims and types, not weights."""
    import onnx

    strict_error = permissive_error = ""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True), "", ""
    except Exception as e:
        strict_error = first_line(e)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    except Exception as e:  # the permissive pass itself can fail on a malformed graph
        permissive_error = first_line(e)
        inferred = None
    return inferred, strict_error, permissive_error


def coverage(model, inferred) -> Tuple[int, int]:
    """(intermediate tensors with a known shape, intermediate tensors) after inference."""
    if inferred is None:
        return 0, 0
    outputs = {o for n in model.graph.node for o in n.output if o}
    outputs -= {o.name for o in model.graph.output}
    known = {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.HasField("shape")}
    return len(outputs & known), len(outputs)


def judge(strict_error: str, permissive_error: str, known: int, total: int) -> Dict:
    numbers = dict(strict_error=strict_error or None, tensors_with_shape=known, tensors=total)
    if not strict_error:
        return result(NAME, PASSED, f"strict shape inference passed ({known}/{total} intermediate shapes)", **numbers)
    if permissive_error:
        return result(NAME, WARNED, f"shape inference failed ({strict_error}); the permissive pass failed too "
                      f"({permissive_error}): the build continues without inferred shapes", **numbers)
    return result(NAME, WARNED, f"strict shape inference failed: {strict_error}; worked around with the permissive "
                  f"pass ({known}/{total} intermediate shapes inferred), the build continues", **numbers)


def run(ctx: RailContext) -> Dict:
    if ctx.onnx_path is None:
        return result(NAME, SKIPPED, "no ONNX graph (torch target)")
    model = ctx.model()
    try:
        inferred, strict_error, permissive_error = infer(model)
    except Exception as e:  # never a crash: whatever onnx throws is the rail's finding
        return result(NAME, WARNED, f"shape inference crashed: {first_line(e)}; the build continues")
    known, total = coverage(model, inferred)
    return judge(strict_error, permissive_error, known, total)
