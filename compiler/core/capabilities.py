"""What a runtime target can do, as data: steps, rails and validation ask this record, never the target's name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetCapabilities:
    """Declared by each target class (targets/<runtime>.py, `Target.capabilities`) and handed to steps
    (StepContext) and rails (RailContext) so that nothing outside targets/ compares target names."""

    name: str  # for messages only; never branch on it
    runs_onnx: bool  # the engine is built from the exported ONNX graph (False: the torch module runs itself)
    ort_session: bool  # the engine is an ONNX Runtime session (its optimized graph and node placement exist)
    trt_custom_ops: bool  # executes TensorRT's trt:: ops (TRT_FP8QuantizeLinear, TRT_FP4QDQ) natively
    symmetric_int8_only: bool  # int8 Q/DQ must be signed with zero point 0 (explicit quantization rules)
    gpu: bool  # needs an NVIDIA GPU to build or run its engine
    # the ONNX Runtime session's first provider is the CPU one, so onnxruntime's CPU-only contrib ops (the
    # MatMulIntegerToFloat int8_static's fuse_bias writes) run where the rest of the graph runs; under the CUDA
    # or TensorRT EP they would be placed on the CPU (Memcpy at each, and the provider_fallback rail fails)
    ort_cpu_kernels: bool = False
