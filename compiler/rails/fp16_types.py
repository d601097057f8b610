"""Rail 5: an fp16 graph must type-check and load. fp16 conversion breaks around rotary embeddings
(Cast/Mul type unification); the fp16 step keeps the offending subgraph in fp32, and this rail says
what it kept and proves the result loads in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from compiler.rails import (
    FAILED,
    PASSED,
    SKIPPED,
    WARNED,
    RailContext,
    first_line,
    iter_nodes,
    result,
)
from compiler.runners.sessions import load_error

NAME = "fp16_types"
APPLIES_TO = "every target (type errors fail where an ONNX Runtime session must load the graph, warn elsewhere)"


def applies_to(caps) -> bool:
    return True


FLOAT16 = 10


def has_fp16(model) -> bool:
    g = model.graph
    if any(t.data_type == FLOAT16 for t in g.initializer):
        return True
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == FLOAT16:
            return True
    for n in iter_nodes(g):
        for a in n.attribute:
            if a.name == "to" and a.i == FLOAT16:
                return True
            if a.name == "value" and a.t.data_type == FLOAT16:
                return True
    return False


def blocked_from_steps(steps: Iterable[Any], reports: dict[str, Any]) -> dict[str, Any]:
    """What the recipe's steps kept in full precision: for each step (compiler.steps.base.Step), the keys of
    its step report that it declares in kept_fp32_report_keys (e.g. the fp16 step's blocked nodes)."""
    out: dict[str, Any] = {}
    for step in steps:
        rep = (reports or {}).get(step.name) or {}
        for k in step.kept_fp32_report_keys:
            if k in rep:
                out[k] = rep[k]
    return out


def type_errors(model) -> list[str]:
    """Type-unification errors onnx's strict type inference finds (e.g. Mul of float16 and float)."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    except Exception as e:
        msg = first_line(e)
        # other strict-inference failures (shapes) are rail 7's business
        return [msg] if "type" in msg.lower() else []
    return []


def ort_loads(onnx_path) -> str:
    """'' when ONNX Runtime's CPU provider builds a session on the graph, else its error."""
    return load_error(onnx_path, opt_level="disable")


def judge(fp16: bool, blocked: dict[str, Any], errors: list[str], load_error: str, strict: bool) -> dict:
    """strict: type errors fail (the graph must load in ONNX Runtime); else they warn (TensorRT's parser
    types the graph itself)."""
    n_blocked = sum(len(v) if isinstance(v, (list, tuple, dict)) else int(bool(v)) for v in blocked.values())
    numbers = dict(fp16=fp16, kept_fp32=blocked, kept_fp32_count=n_blocked)
    if not fp16:
        return result(NAME, SKIPPED, "no float16 tensors in the graph", **numbers)
    kept = f"; kept in fp32 by the fp16 step: {n_blocked} ({', '.join(sorted(blocked))})" if blocked else ""
    if load_error:
        return result(NAME, FAILED, f"the fp16 graph does not load in ONNX Runtime: {load_error}{kept} -- keep the "
                      "offending subgraph in fp32 (the fp16 step's block list)", **numbers)
    if errors:
        status = FAILED if strict else WARNED
        return result(NAME, status, f"type errors in the fp16 graph: {errors[0]}{kept}", **numbers)
    return result(NAME, PASSED, f"fp16 graph type-checks and loads{kept}", **numbers)


def run(ctx: RailContext) -> dict:
    if ctx.onnx_path is None:
        if ctx.module is not None:
            dtypes = {str(p.dtype) for p in ctx.module.parameters()}
            fp16 = "torch.float16" in dtypes
            return result(NAME, PASSED if fp16 else SKIPPED, f"torch module parameter dtypes: {sorted(dtypes)}",
                          fp16=fp16, kept_fp32=blocked_from_steps(ctx.recipe_steps, ctx.steps))
        return result(NAME, SKIPPED, "no graph")
    model = ctx.model()
    fp16 = has_fp16(model)
    if not fp16:
        return judge(False, blocked_from_steps(ctx.recipe_steps, ctx.steps), [], "", ctx.target.ort_session)
    # TensorRT custom ops (trt::) do not load in ORT's CPU provider: only an ORT-session target must load there
    load_error = ort_loads(ctx.onnx_path) if ctx.target.ort_session else ""
    errors = type_errors(model)  # needs no weights: the structure-only graph is enough
    return judge(True, blocked_from_steps(ctx.recipe_steps, ctx.steps), errors, load_error, ctx.target.ort_session)
