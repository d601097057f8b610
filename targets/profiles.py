"""Optimization profiles: the recipe's batch / seq ranges (target.min_shapes / opt_shapes / max_shapes) over
an ONNX graph's inputs, for TensorRT engines and ONNX Runtime's TensorRT execution provider alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compiler.core.errors import BuildError, RecipeError

AXES = ("batch", "seq")
WHICH = ("min", "opt", "max")


def validate_shape_ranges(cfg) -> None:
    """target.min_shapes / opt_shapes / max_shapes: keys batch and seq, 1 <= min <= opt <= max."""
    ranges = {w: dict(getattr(cfg, f"{w}_shapes")) for w in WHICH}
    for w, shapes in ranges.items():
        for axis, value in shapes.items():
            if axis not in AXES:
                raise RecipeError(f"target.{w}_shapes.{axis}", "unknown axis", "the profile axes are batch and seq")
            if int(value) < 1:
                raise RecipeError(f"target.{w}_shapes.{axis}", f"must be >= 1, got {value}",
                                  f"set target.{w}_shapes.{axis} to a positive size")
        for axis in AXES:
            if axis not in shapes:
                raise RecipeError(f"target.{w}_shapes", f"missing {axis}", f"add target.{w}_shapes.{axis}=<size>")
    for axis in AXES:
        lo, mid, hi = (int(ranges[w][axis]) for w in WHICH)
        if not lo <= mid <= hi:
            raise RecipeError(f"target.opt_shapes.{axis}",
                              f"min {lo} <= opt {mid} <= max {hi} does not hold",
                              f"choose target.min_shapes.{axis} <= target.opt_shapes.{axis} "
                              f"<= target.max_shapes.{axis}")
    if int(cfg.workspace_mb) < 1:
        raise RecipeError("target.workspace_mb", f"must be >= 1, got {cfg.workspace_mb}",
                          "e.g. target.workspace_mb=4096")
    frac = float(cfg.min_quantized_layer_fraction)
    if not 0.0 <= frac <= 1.0:
        raise RecipeError("target.min_quantized_layer_fraction", f"must be in [0, 1], got {frac}",
                          "e.g. 0.5 (fail when fewer than half the matmul layers run quantized), 0 to only warn")


def onnx_inputs(onnx_path: Path) -> list[tuple[str, list[Any]]]:
    """(name, dims) of the graph's real inputs; a dim is an int, a dim_param name or None."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims: list[Any] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out.append((vi.name, dims))
    return out


def _axis_of(index: int, dim: Any) -> str | None:
    if isinstance(dim, str):
        low = dim.lower()
        for axis in AXES:
            if axis in low:
                return axis
    # exporters that name dims s0, s1 / unk__3: batch first, then sequence (the export wrapper's order)
    return AXES[index] if index < len(AXES) else None


def profile_shapes(inputs: Sequence[tuple[str, Sequence[Any]]], min_shapes: Mapping[str, int],
                   opt_shapes: Mapping[str, int], max_shapes: Mapping[str, int]) -> dict[str, dict[str, list[int]]]:
    """One optimization profile for every input: {input: {min: [..], opt: [..], max: [..]}}; fixed dims
    stay as they are, dynamic ones take the recipe's batch / seq range."""
    src = {"min": min_shapes, "opt": opt_shapes, "max": max_shapes}
    out: dict[str, dict[str, list[int]]] = {}
    for name, dims in inputs:
        shapes: dict[str, list[int]] = {w: [] for w in WHICH}
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                for w in WHICH:
                    shapes[w].append(d)
                continue
            axis = _axis_of(i, d)
            if axis is None:
                raise BuildError(f"input {name}: dynamic dimension {i} ({d!r}) is neither batch nor seq; the "
                                 "TensorRT optimization profile covers those two axes only (export with fixed "
                                 "sizes for the others)")
            for w in WHICH:
                shapes[w].append(int(src[w][axis]))
        out[name] = shapes
    return out


def shape_arg(profiles: Mapping[str, Mapping[str, Sequence[int]]], which: str) -> str:
    """trtexec's shape syntax: input_ids:1x1,attention_mask:1x1 (also ORT's TensorRT EP profile syntax)."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shapes[which])}" for name, shapes in profiles.items())
