"""Rail 3: how many MatMul/Gemm/Conv a quantized recipe really quantized. `op_types_to_quantize`
that matches nothing (MatMul vs Gemm) writes a valid, unquantized graph: zero is an error."""

from __future__ import annotations

from collections.abc import Iterable

from compiler.graph.quantized import FLOAT_COMPUTE_OPS, is_quantized_compute, is_quantized_module
from compiler.graph.quantized import is_dequantize as _is_dequantize_op
from compiler.rails import FAILED, PASSED, SKIPPED, RailContext, iter_nodes, result

NAME = "coverage"
APPLIES_TO = "every target (the ONNX graph, or the torch module)"


def applies_to(caps) -> bool:
    return True


# ops a dequantized tensor may pass through on its way into a MatMul (weights are often transposed)
PASS_THROUGH = {"Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten", "Expand"}


def is_dequantize(node) -> bool:
    """DequantizeLinear in any domain, and TensorRT's TRT_*DequantizeLinear custom ops."""
    return _is_dequantize_op(node.op_type)


def is_quantize_op(node) -> bool:
    return "Quantize" in node.op_type or is_quantized_compute(node.op_type)


def coverage_counts(model) -> dict[str, object]:
    """Counts over a graph: compute ops (MatMul/Gemm/Conv, float or quantized) and how many of them
    are quantized ops or have their weight operand fed by a DequantizeLinear (through transposes,
    reshapes, casts)."""
    nodes = list(iter_nodes(model.graph))
    producer = {out: n for n in nodes for out in n.output}

    def fed_by_dq(name: str, depth: int = 0) -> bool:
        n = producer.get(name)
        if n is None or depth > 4:
            return False
        if is_dequantize(n):
            return True
        return n.op_type in PASS_THROUGH and bool(n.input) and fed_by_dq(n.input[0], depth + 1)

    inits = {t.name: len(t.dims) for t in model.graph.initializer}

    def from_weight(name: str, depth: int = 0) -> bool:
        """Whether a tensor is a stored weight (an initializer or Constant of rank >= 2), possibly
        dequantized, transposed or reshaped on its way."""
        if inits.get(name, 0) >= 2:
            return True
        n = producer.get(name)
        if n is None or depth > 5:
            return False
        if n.op_type == "Constant":
            return True
        return (is_dequantize(n) or n.op_type in PASS_THROUGH) and bool(n.input) and from_weight(n.input[0], depth + 1)

    by_op: dict[str, dict[str, int]] = {}
    total = covered = weights = weights_covered = 0
    for n in nodes:
        if is_quantized_compute(n.op_type):
            ok = True
        elif n.op_type in FLOAT_COMPUTE_OPS:
            # the second operand (the weight of MatMul/Gemm/Conv) decides: a DQ on the activation alone
            # is only the previous op's quantized output passing by, and leaves this op in float
            ok = len(n.input) > 1 and fed_by_dq(n.input[1])
        else:
            continue
        is_weight_op = any(from_weight(i) for i in n.input[1:] if i)
        weights += int(is_weight_op)
        weights_covered += int(is_weight_op and ok)
        total += 1
        covered += int(ok)
        slot = by_op.setdefault(n.op_type, {"total": 0, "quantized": 0})
        slot["total"] += 1
        slot["quantized"] += int(ok)
    q_nodes = sum(1 for n in nodes if is_quantize_op(n))
    return {"compute_ops": total, "quantized_ops": covered, "fraction": (covered / total) if total else 0.0,
            "by_op": by_op, "quantization_nodes": q_nodes, "weight_ops": weights,
            "weight_ops_quantized": weights_covered}


def module_counts(module) -> dict[str, object]:
    """The same counts for the torch target: linear/conv layers and how many carry an enabled
    modelopt quantizer or are torch quantized modules."""
    import torch

    total = covered = 0
    by_op: dict[str, dict[str, int]] = {}
    for _, m in module.named_modules():
        cls = type(m)
        linear_like = isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) or cls.__name__ in (
            "Conv1D", "Linear", "QuantLinear", "LinearPackedParams") and hasattr(m, "weight")
        ok = is_quantized_module(m)
        if not (linear_like or ok):
            continue
        total += 1
        covered += int(ok)
        slot = by_op.setdefault(cls.__name__, {"total": 0, "quantized": 0})
        slot["total"] += 1
        slot["quantized"] += int(ok)
    return {"compute_ops": total, "quantized_ops": covered, "fraction": (covered / total) if total else 0.0,
            "by_op": by_op, "quantization_nodes": covered, "weight_ops": total, "weight_ops_quantized": covered,
            "unit": "Linear/Conv layers"}


def recipe_quantizes(steps: Iterable) -> bool:
    """Whether a recipe's steps (compiler.steps.base.Step objects) quantize: each declares quantizes_compute."""
    return any(step.quantizes_compute for step in steps)


def judge(counts: dict[str, object], quantized: bool | None, min_fraction: float = 0.0) -> dict:
    total, covered, frac = counts["compute_ops"], counts["quantized_ops"], counts["fraction"]
    by_op = counts["by_op"]
    unit = counts.get("unit", "MatMul/Gemm/Conv")
    if quantized is None:  # a file from elsewhere: quantized if it has any quantization node
        quantized = counts["quantization_nodes"] > 0
    numbers = dict(compute_ops=total, quantized_ops=covered, fraction=round(float(frac), 4), by_op=by_op,
                   quantized_recipe=bool(quantized), weight_ops=counts.get("weight_ops", 0),
                   weight_ops_quantized=counts.get("weight_ops_quantized", 0))
    kinds = ", ".join(f"{op} {v['quantized']}/{v['total']}" for op, v in sorted(by_op.items())) or "none"
    if counts.get("weight_ops"):
        kinds = f"with weights {counts['weight_ops_quantized']}/{counts['weight_ops']}; " + kinds
    if total == 0:
        return result(NAME, SKIPPED if not quantized else FAILED,
                      f"no {unit} in the graph" + (" to quantize" if quantized else ""), **numbers)
    if not quantized:
        return result(NAME, PASSED, f"not a quantized recipe: {covered}/{total} {unit} quantized ({kinds})",
                      **numbers)
    if covered == 0:
        return result(NAME, FAILED, f"0 of {total} {unit} are quantized ({kinds}): the quantizer matched "
                      "nothing -- quantize every op type the graph has (op_types_to_quantize: MatMul and Gemm), "
                      "and check the exclude patterns", **numbers)
    if frac < min_fraction:
        return result(NAME, FAILED, f"{covered}/{total} {unit} quantized ({frac:.1%}), below "
                      f"doctor.min_quantized_fraction={min_fraction} ({kinds})", **numbers)
    return result(NAME, PASSED, f"{covered}/{total} {unit} quantized ({frac:.1%}; {kinds})", **numbers)


def run(ctx: RailContext) -> dict:
    min_fraction = float(getattr(ctx.config, "min_quantized_fraction", 0.0) or 0.0)
    if ctx.onnx_path is not None:
        counts = coverage_counts(ctx.model())
    elif ctx.module is not None:
        counts = module_counts(ctx.module)
    else:
        return result(NAME, SKIPPED, "no graph and no module to count")
    return judge(counts, ctx.quantized, min_fraction)
