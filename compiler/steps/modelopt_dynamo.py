"""modelopt-quantized modules through torch's dynamo ONNX exporter: the quantizers traced as ops without
data-dependent branches, and a translation table that writes the same ONNX ops as modelopt's TorchScript
symbolics (int8 QuantizeLinear/DequantizeLinear, trt::TRT_FP8QuantizeLinear/DequantizeLinear,
trt::TRT_FP4DynamicQuantize + two DequantizeLinear, trt::TRT_FP4QDQ).

Fills a gap in modelopt 0.47: its quantizers export only through the TorchScript exporter (their
``torch.autograd.Function.symbolic``s). Under torch.export the CPU fake-quant path branches on tensor
values (``if min_amax < 0`` in tensor_quant._tensor_quant), and its ``tensorrt::quantize_op`` /
``tensorrt::dynamic_block_quantize_op`` custom ops have no ONNX translation. For the duration of a dynamo
export, ``export_mode`` (1) enters modelopt's own ``export_torch_mode`` (amax read with ``detach``, the
weight quantized inside the traced forward), (2) routes each enabled quantizer of the module to ops that
trace cleanly: int8 and fp8 to modelopt's ``tensorrt::quantize_op`` (torch's own
``fake_quantize_per_tensor_affine`` with tensor scales has no fake kernel in torch 2.13), NVFP4
activations to modelopt's ``tensorrt::dynamic_block_quantize_op`` and NVFP4 weights to ``qcompile::fp4_qdq``
(the stand-in for modelopt's "static" TRT_FP4QDQ symbolic, replaced by NVFP4QuantExporter after export),
and (3) hands the exporter the onnxscript translations of those custom ops.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from compiler.numerics.nvfp4 import nvfp4_weight_fake_quant

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
ONNX_FLOAT8E4M3FN = 17  # TensorProto.FLOAT8E4M3FN: the block-scale type of TRT_FP4DynamicQuantize

_LOCK = threading.Lock()
_OPS_DEFINED = False


def _define_ops() -> None:
    """Register qcompile::fp4_qdq once: an NVFP4 weight fake-quant whose ONNX form is trt::TRT_FP4QDQ."""
    global _OPS_DEFINED
    import torch

    with _LOCK:
        if _OPS_DEFINED:
            return
        torch.library.define("qcompile::fp4_qdq", "(Tensor weight, int block_size) -> Tensor")

        @torch.library.impl("qcompile::fp4_qdq", "cpu")
        def _fp4_qdq(weight, block_size):
            return nvfp4_weight_fake_quant(weight, int(block_size))

        @torch.library.register_fake("qcompile::fp4_qdq")
        def _fp4_qdq_fake(weight, block_size):
            return torch.empty_like(weight)

        _OPS_DEFINED = True


def _register_trt_schemas() -> None:
    """ONNX schemas for the TensorRT ops the translations write: torch's graph builder calls every op
    through its schema. Inputs and outputs as modelopt's symbolics write them; types left open."""
    import onnx
    from onnx.defs import OpSchema

    any_tensor = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "uint8", "int8", "float8e4m3fn",
                                            "float4e2m1")]
    P = OpSchema.FormalParameter
    A = OpSchema.Attribute
    specs = {
        "TRT_FP8QuantizeLinear": (["x", "scale"], ["y"], []),
        "TRT_FP8DequantizeLinear": (["x", "scale"], ["y"], []),
        "TRT_FP4DynamicQuantize": (["x", "scale"], ["y", "y_scale"], ["axis", "block_size", "scale_type"]),
        # the one-input form modelopt's exporter reads, or with the calibrated scales (scale_e4m3, global_scale)
        # a calibrated nvfp4 algorithm's torchscript export writes before export_nvfp4_graph takes them out
        # (compiler/steps/nvfp4.py): the schema is process-wide, so it must accept both
        "TRT_FP4QDQ": (["x", "scale_e4m3?", "global_scale?"], ["y"], ["block_size"]),
    }
    for name, (ins, outs, attrs) in specs.items():
        if onnx.defs.has(name, "trt"):
            continue
        onnx.defs.register_schema(OpSchema(
            name, "trt", 1, "TensorRT op written by modelopt's ONNX export (qcompile: dynamo translation)",
            inputs=[P(n.rstrip("?"), f"T{i}", "", param_option=OpSchema.FormalParameterOption.Optional)
                    if n.endswith("?") else P(n, f"T{i}") for i, n in enumerate(ins)],
            outputs=[P(n, f"O{i}") for i, n in enumerate(outs)],
            type_constraints=[(f"T{i}", any_tensor, "") for i in range(len(ins))]
            + [(f"O{i}", any_tensor, "") for i in range(len(outs))],
            attributes=[A(a, OpSchema.AttrType.INT, "") for a in attrs]))


def has_quantizers(module) -> bool:
    """Whether the module holds modelopt TensorQuantizers (without importing modelopt when nothing did)."""
    if "modelopt.torch.quantization" not in sys.modules:
        return False
    from modelopt.torch.quantization.nn import TensorQuantizer

    return any(isinstance(m, TensorQuantizer) for m in module.modules())


def _block_size(q, inputs) -> int:
    size = q.block_sizes.get(-1, None) or q.block_sizes.get(inputs.dim() - 1, None)
    if size is None:
        raise ValueError(f"block quantizer without a last-axis block size: {q.block_sizes}")
    return int(size)


def _export_fake_quantize(q, inputs, eager: Callable):
    """The traced replacement of TensorQuantizer._fake_quantize for export (numerics as modelopt's).
    Real tensors (the exporter prints the module's repr, which reads every quantized weight) take
    modelopt's own eager path: the custom ops' CPU kernels need modelopt's CUDA extension."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    if not (is_fake(inputs) or torch.compiler.is_compiling()):
        return eager(inputs)

    if q._get_bias(inputs) is not None:
        raise NotImplementedError("dynamo export of a quantizer with a bias (asymmetric) is not supported")
    if q.block_sizes is not None and q.block_sizes.get("type", "static") == "dynamic":
        if (tuple(q._num_bits), tuple(q.block_sizes.get("scale_bits") or ())) != ((2, 1), (4, 3)):
            raise NotImplementedError(f"dynamo export supports NVFP4 block quantizers only, not "
                                      f"num_bits={q._num_bits} scale_bits={q.block_sizes.get('scale_bits')}")
        block = _block_size(q, inputs)
        if getattr(q, "_onnx_quantizer_type", "dynamic") == "static":
            _define_ops()
            return torch.ops.qcompile.fp4_qdq(inputs, block)
        return torch.ops.tensorrt.dynamic_block_quantize_op(inputs, block, q._get_amax(inputs), 4, 2, 8, 4)
    amax = q._get_amax(inputs)
    if isinstance(q._num_bits, tuple):
        if tuple(q._num_bits) != (4, 3) or amax.numel() != 1:
            raise NotImplementedError(f"dynamo export supports per-tensor FP8 e4m3 only, not num_bits="
                                      f"{q._num_bits} with amax of shape {tuple(amax.shape)}")
        return torch.ops.tensorrt.quantize_op(inputs, amax, 8, 4, False, False)
    if amax.numel() != 1 and sum(d != 1 for d in amax.shape) != 1:
        raise NotImplementedError(f"dynamo export: amax of shape {tuple(amax.shape)} is neither per-tensor "
                                  f"nor per-channel")
    return torch.ops.tensorrt.quantize_op(inputs, amax, int(q._num_bits), 0, bool(q._unsigned),
                                          bool(q._narrow_range))


def _scalar(op, x):
    """x (a one-element tensor) as a scalar, as per-tensor Q/DQ scales must be."""
    if x.shape is not None and len(x.shape) == 0:
        return x
    import onnx

    return op.Reshape(x, op.Constant(value=onnx.helper.make_tensor("scalar_shape", onnx.TensorProto.INT64,
                                                                     [0], [])))


def _zero_point(unsigned: bool, channels):
    """Zero point 0 (symmetric, as modelopt's export_int8), a scalar or one per channel."""
    import onnx

    dims = [] if channels is None else [int(channels)]
    return onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8 if unsigned else onnx.TensorProto.INT8,
                                   dims, [0] * (1 if channels is None else int(channels)))


def translation_table(opset: int) -> dict[Callable, Callable]:
    """onnxscript translations of the custom ops the quantizers trace to under export_mode, writing the
    ops modelopt's TorchScript symbolics write (modelopt/torch/quantization/export_onnx.py)."""
    import onnxscript
    import torch

    _define_ops()
    _register_trt_schemas()
    op = onnxscript.values.Opset("", opset)
    trt = onnxscript.values.Opset("trt", 1)

    def quantize_op(inputs, amax, num_bits: int = 8, exponent_bits: int = 0, unsigned: bool = False,
                    narrow_range: bool = True):
        if (num_bits, exponent_bits) == (8, 4):
            # export_fp8: scale = amax / 448 in the input's type, TensorRT's FP8 Q/DQ pair
            scale = op.Div(amax, op.CastLike(op.Constant(value_float=FP8_E4M3_MAX), amax))
            scale = op.CastLike(_scalar(op, scale), inputs)
            return trt.TRT_FP8DequantizeLinear(trt.TRT_FP8QuantizeLinear(inputs, scale), scale)
        if exponent_bits != 0 or num_bits != 8 or (narrow_range and not unsigned):
            # export_int8 refuses these too: ONNX int8 Q/DQ has no 4-bit or narrow signed range
            raise NotImplementedError(f"tensorrt::quantize_op with num_bits={num_bits}, exponent_bits="
                                      f"{exponent_bits}, narrow_range={narrow_range}: no ONNX Q/DQ form")
        # export_int8: scale = amax / maxbound (0 -> 1), zero point 0, per tensor or along amax's one axis
        maxbound = (1 << (num_bits - 1 + int(unsigned))) - 1
        dims = [int(d) for d in amax.shape]
        channel_axes = [i for i, d in enumerate(dims) if d != 1]
        scale = op.Div(op.Cast(amax, to=1), op.Constant(value_float=float(maxbound)))
        scale = op.Where(op.Equal(scale, op.Constant(value_float=0.0)), op.Constant(value_float=1.0), scale)
        if channel_axes:
            axis = channel_axes[0] + (len(inputs.shape) - len(dims) if inputs.shape is not None else 0)
            scale = op.Reshape(scale, op.Constant(value_ints=[-1]))
            zero = op.Constant(value=_zero_point(unsigned, dims[channel_axes[0]]))
            return op.DequantizeLinear(op.QuantizeLinear(inputs, scale, zero, axis=axis), scale, zero, axis=axis)
        scale = _scalar(op, scale)
        zero = op.Constant(value=_zero_point(unsigned, None))
        return op.DequantizeLinear(op.QuantizeLinear(inputs, scale, zero), scale, zero)

    def dynamic_block_quantize_op(inputs, block_size: int, amax, num_bits: int, exponent_bits: int,
                                  scale_num_bits: int, scale_exponent_bits: int):
        # export_fp4 "dynamic": per-tensor fp32 scale amax / 6 / 448, dynamic e4m3 block scales
        scale = op.Div(op.Cast(amax, to=1), op.Constant(value_float=FP4_E2M1_MAX * FP8_E4M3_MAX))
        scale = _scalar(op, scale)
        x_f4, s_f8 = trt.TRT_FP4DynamicQuantize(inputs, scale, axis=-1, block_size=block_size,
                                                scale_type=ONNX_FLOAT8E4M3FN, _num_outputs=2)
        block_scale = op.DequantizeLinear(s_f8, scale)
        return op.DequantizeLinear(x_f4, block_scale, axis=-1, block_size=block_size)

    def fp4_qdq(weight, block_size: int):
        # export_fp4 "static": a marker NVFP4QuantExporter replaces with the FP4 weight + two DQ
        return trt.TRT_FP4QDQ(weight, block_size=block_size)

    return {torch.ops.tensorrt.quantize_op.default: quantize_op,
            torch.ops.tensorrt.dynamic_block_quantize_op.default: dynamic_block_quantize_op,
            torch.ops.qcompile.fp4_qdq.default: fp4_qdq}


@contextlib.contextmanager
def export_mode(module, opset: int) -> Iterator[dict[Callable, Callable]]:
    """While active, ``module``'s enabled modelopt quantizers trace cleanly under torch.export; yields the
    custom_translation_table to pass to ``torch.onnx.export(dynamo=True)``. A module without quantizers
    gets an empty table and is left untouched."""
    if not has_quantizers(module):
        yield {}
        return
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils import export_torch_mode

    missing = object()
    patched: list[tuple[Any, Any]] = []
    try:
        for m in module.modules():
            if isinstance(m, TensorQuantizer):
                patched.append((m, m.__dict__.get("_fake_quantize", missing)))
                eager = m._fake_quantize
                m._fake_quantize = types.MethodType(
                    lambda q, x, _eager=eager: _export_fake_quantize(q, x, _eager), m)
        with export_torch_mode():
            yield translation_table(opset)
    finally:
        for m, old in patched:
            if old is missing:
                del m._fake_quantize
            else:
                m._fake_quantize = old
