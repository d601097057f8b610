"""Quantization steps, one per module; each registers itself by defining a Step subclass."""

from compiler.steps.base import (
    ONNX,
    STEP_REGISTRY,
    TORCH,
    Step,
    StepContext,
    load_all_steps,
    step_names,
)

__all__ = ["STEP_REGISTRY", "ONNX", "TORCH", "Step", "StepContext", "load_all_steps", "step_names"]
