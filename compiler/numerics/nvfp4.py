"""NVFP4 numerics on the CPU: e2m1 values in blocks of 16 with e4m3 per-block scales and an fp32
global scale, as fake-quant (torch) and as the (values, scales) pair TensorRT's FP4 ops produce.

Library gap this fills: nvidia-modelopt 0.47 only implements NVFP4 dynamic block quantization as a
CUDA extension (`fused_amax_convert`) or a Triton kernel; on a CPU tensor
`modelopt.torch.quantization.tensor_quant._dynamic_block_quantize_impl` asserts "amax must be a CUDA
tensor for dynamic block quantization". The numbers here follow that CUDA kernel exactly
(tensor_quant_mx.cu, compute_scale_with_global + quantize):

    global_scale = global_amax / (6 * 448)
    block_scale  = e4m3(min(block_amax / (6 * global_scale), 448)) * global_scale
    y            = sign(x) * e2m1(|x| / block_scale) * block_scale       (e2m1 saturates at 6)

with round-to-nearest-even onto the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (the same decision
boundaries as modelopt's Triton `fp4_round_magnitude`). A block whose amax is 0, or a missing/zero
global amax, uses scale 1 like the CUDA kernel; a block whose e4m3 scale underflows to 0 dequantizes to 0
(what TensorRT's DequantizeLinear gives for a zero scale).

`install_cpu_fallback()` routes modelopt's dynamic block quantize op here for CPU tensors in the NVFP4
format only; CUDA tensors and every other format still go to modelopt's own kernels.
"""

from __future__ import annotations

import threading
from typing import Tuple

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value (ties to even), saturating at +-6; signed values keep their sign.

    e2m1 is uniform per binade: step 0.5 below 2 (its subnormals 0 and 0.5 included), 1 in [2, 4), 2 from 4,
    i.e. step 2**(max(e, 1) - 2) for |x| = m * 2**e with m in [0.5, 1) (torch.frexp). Dividing by a power of two
    is exact, and torch.round rounds half to even, which is the ties-to-even mantissa rule at every midpoint
    (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). One binade lookup instead of three
    roundings and two selects: the fake-quant runs on every activation and, while distill trains, every
    weight, and this was half of its time (tested equal to the grid's nearest-value rule)."""
    _, exponent = torch.frexp(x)
    step = torch.exp2(torch.clamp(exponent, min=1).to(x.dtype) - 2)
    return torch.clamp(torch.round(x / step) * step, -E2M1_MAX, E2M1_MAX)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float8 e4m3fn value (saturating at 448), returned as float32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def global_scale_from_amax(global_amax) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp32 global scale amax / (6 * 448), valid): valid is False where amax is missing, zero or not finite, and
    the scale is then 1. Tensors, not a Python branch on the amax's value, so that torch.export traces it."""
    if global_amax is None:
        return torch.tensor(1.0), torch.tensor(False)
    g = torch.as_tensor(global_amax, dtype=torch.float32).detach()
    if g.numel() != 1:
        g = g.abs().amax()
    g = g.reshape(())
    valid = torch.isfinite(g) & (g > 0)
    return torch.where(valid, g / (E2M1_MAX * E4M3_MAX), torch.ones_like(g)), valid


def _blocks(x: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, int]:
    """View x (float32) as (..., n_blocks, block_size), zero-padding the last axis to a whole block."""
    pad = (-x.shape[-1]) % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size), pad


def nvfp4_quantize(x: torch.Tensor, global_amax, block_size: int = 16
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize along the last axis. Returns (q, scale_e4m3, global_scale):
    q: e2m1 grid values (float32, shape of x), scale_e4m3: e4m3-representable per-block scales
    (float32, shape x.shape[:-1] + (n_blocks,)), global_scale: fp32 scalar; x ~= q * scale_e4m3 * global_scale."""
    blocks, pad = _blocks(x.float(), block_size)
    gs, valid = global_scale_from_amax(global_amax)
    block_amax = blocks.abs().amax(dim=-1)
    scale8 = to_e4m3(torch.clamp(block_amax / (E2M1_MAX * gs), max=E4M3_MAX))
    scale8 = torch.where(block_amax == 0, torch.ones_like(scale8), scale8)  # zero block: scale 1
    # the CUDA kernel's fallback for an invalid global amax: no scaling at all (gs is then 1 too)
    scale8 = torch.where(valid, scale8, torch.ones_like(scale8))
    unscale = (scale8 * gs).unsqueeze(-1)
    safe = torch.where(unscale > 0, unscale, torch.ones_like(unscale))
    q = round_to_e2m1(blocks / safe)
    q = torch.where(unscale > 0, q, torch.zeros_like(q))  # e4m3 underflow: the block dequantizes to 0
    q = q.reshape(*q.shape[:-2], -1)
    if pad:
        q = q[..., : x.shape[-1]]
    return q, scale8, gs


def nvfp4_dequantize(q: torch.Tensor, scale_e4m3: torch.Tensor, global_scale, block_size: int = 16) -> torch.Tensor:
    """Inverse of nvfp4_quantize (the two DequantizeLinear nodes of the TensorRT graph)."""
    blocks, pad = _blocks(q.float(), block_size)
    y = blocks * (scale_e4m3.float() * torch.as_tensor(global_scale, dtype=torch.float32)).unsqueeze(-1)
    y = y.reshape(*y.shape[:-2], -1)
    return y[..., : q.shape[-1]] if pad else y


def nvfp4_fake_quant(x: torch.Tensor, global_amax, block_size: int = 16) -> torch.Tensor:
    """Quantize-dequantize x along its last axis in NVFP4; same shape and dtype as x."""
    q, s, gs = nvfp4_quantize(x, global_amax, block_size)
    return nvfp4_dequantize(q, s, gs, block_size).to(x.dtype)


def nvfp4_weight_scales(w: torch.Tensor, block_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block e4m3 scales and the global scale as modelopt's NVFP4 ONNX weight export computes them
    (modelopt.onnx.quantization.quant_utils + NVFP4QTensor._cast_per_block_scale_to_fp8): global amax is
    max|w|, a zero block gets scale 1 and block scales are clamped to [2**-9, 448] before the e4m3 cast."""
    wf = w.detach().float()
    amax = wf.abs().amax()
    gs = amax / (E2M1_MAX * E4M3_MAX) if amax > 0 else torch.tensor(1.0)
    blocks, _ = _blocks(wf, block_size)
    per_block = blocks.abs().amax(dim=-1) / (E2M1_MAX * gs)
    per_block = torch.where(per_block == 0, torch.ones_like(per_block), per_block)
    return to_e4m3(per_block.clamp(min=2.0**-9, max=E4M3_MAX)), gs


def nvfp4_weight_fake_quant(w: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """What the exported TensorRT graph computes for a weight: modelopt's export-time scales, e2m1 values."""
    scale8, gs = nvfp4_weight_scales(w, block_size)
    blocks, pad = _blocks(w.detach().float(), block_size)
    unscale = (scale8 * gs).unsqueeze(-1)
    q = round_to_e2m1(blocks / unscale)
    y = (q * unscale).reshape(*blocks.shape[:-2], -1)
    return (y[..., : w.shape[-1]] if pad else y).to(w.dtype)


def nvfp4_static_scales(block_amax: torch.Tensor, global_amax=None, fp8_max: float = E4M3_MAX
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale_e4m3, global_scale) of modelopt's static NVFP4 weight quantizer (per-block amax chosen by a
    calibration: mse, four_over_six, local_hessian), computed as its kernels do
    (kernels/quantization/gemm/fp4_kernel.compute_fp4_scales + tensor_quant._fp8_eager): the block scale
    amax / 6 is fake-quantized to e4m3 against amax_s = global_amax * (448 / fp8_max) / 6, i.e.
    block scale = e4m3((amax / 6) * (448 / amax_s)) * (1 / (448 / amax_s)). fp8_max is 448, or 256 for
    four_over_six (which leaves the e4m3 scales room to pick max 4 instead of 6 per block)."""
    amax = block_amax.detach().float()
    g = amax.amax() if global_amax is None else torch.as_tensor(global_amax, dtype=torch.float32).detach()
    amax_s = (g.float() * (E4M3_MAX / fp8_max) / E2M1_MAX).reshape(())
    safe = torch.where(amax_s <= 1.0 / (1 << 24), torch.ones_like(amax_s), amax_s)
    scale = E4M3_MAX / safe
    s8 = ((amax / E2M1_MAX) * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return s8, 1 / scale


def nvfp4_fake_quant_with_scales(x: torch.Tensor, scale_e4m3: torch.Tensor, global_scale,
                                 block_size: int = 16) -> torch.Tensor:
    """Quantize-dequantize x (last axis in blocks) with given per-block e4m3 scales and global scale, as
    TensorRT's two DequantizeLinear compute it from FP4 values; a zero block scale gives a zero block (the
    static Triton kernel's rule). Same shape and dtype as x."""
    blocks, pad = _blocks(x.float(), block_size)
    unscale = (scale_e4m3.float().reshape(blocks.shape[:-1]) * torch.as_tensor(global_scale, dtype=torch.float32)
               ).unsqueeze(-1)
    safe = torch.where(unscale > 0, unscale, torch.ones_like(unscale))
    q = round_to_e2m1(blocks / safe)
    y = torch.where(unscale > 0, q * unscale, torch.zeros_like(q)).reshape(*blocks.shape[:-2], -1)
    return (y[..., : x.shape[-1]] if pad else y).to(x.dtype)


def nvfp4_static_fake_quant(x: torch.Tensor, block_amax: torch.Tensor, global_amax=None,
                            fp8_max: float = E4M3_MAX) -> torch.Tensor:
    """CPU stand-in for modelopt's Triton `static_blockwise_fp4_fake_quant`: x (..., 16-blocks on the last
    axis, one amax per block) with the scales of nvfp4_static_scales."""
    n_blocks = block_amax.numel()
    block = x.numel() // n_blocks
    s8, gs = nvfp4_static_scales(block_amax.reshape(-1), global_amax, fp8_max)
    flat = x.reshape(n_blocks, block)
    return nvfp4_fake_quant_with_scales(flat, s8, gs, block).reshape(x.shape)


class FixedScaleFP4QDQ(torch.autograd.Function):
    """A weight's NVFP4 quantize-dequantize with scales fixed by a calibration (forward), exported as
    trt::TRT_FP4QDQ(weight, scale_e4m3, global_scale) -- the node modelopt's NVFP4 exporter turns into FP4
    weights + two DequantizeLinear, with the two extra inputs carrying the chosen scales to
    compiler.steps.nvfp4.export_nvfp4_graph (modelopt's exporter alone recomputes max scales from the weight,
    which drops what awq_clip / mse / four_over_six / local_hessian chose). Straight-through backward."""

    @staticmethod
    def forward(ctx, x, scale_e4m3, global_scale, block_size: int = 16):
        return nvfp4_fake_quant_with_scales(x, scale_e4m3, global_scale, int(block_size))

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None

    @staticmethod
    def symbolic(g, x, scale_e4m3, global_scale, block_size: int = 16):
        return g.op("trt::TRT_FP4QDQ", x, scale_e4m3, global_scale, block_size_i=int(block_size))


# --- the patch into modelopt -------------------------------------------------------------------------

_LOCK = threading.Lock()
_ORIGINAL = None


def _is_nvfp4(num_bits: int, exponent_bits: int, scale_num_bits: int, scale_exponent_bits: int) -> bool:
    # modelopt passes formats as total bits + exponent bits: e2m1 = (4, 2), e4m3 scales = (8, 4)
    return (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)


def install_cpu_fallback() -> None:
    """Make modelopt's dynamic block quantization of NVFP4 run on CPU tensors (idempotent).

    modelopt resolves `tensor_quant.dynamic_block_quantize_op` at call time in
    `_dynamic_block_quantize_forward`, so replacing that module attribute reroutes only its eager
    forward; the ONNX symbolic (`DynamicBlockQuantizationFunction.symbolic`, which emits
    trt::TRT_FP4DynamicQuantize / TRT_FP4QDQ) is untouched, so export still produces the TensorRT graph.
    """
    global _ORIGINAL
    from modelopt.torch.quantization import tensor_quant

    with _LOCK:
        if _ORIGINAL is not None:
            return
        original = tensor_quant.dynamic_block_quantize_op

        def dynamic_block_quantize_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                                      scale_exponent_bits):
            if not inputs.is_cuda and _is_nvfp4(num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
                return nvfp4_fake_quant(inputs, amax, int(block_size))
            return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

        tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_op
        _ORIGINAL = original
        _install_static_fallback(tensor_quant)


def _install_static_fallback(tensor_quant) -> None:
    """Static NVFP4 (per-block amax chosen by modelopt's mse / four_over_six / local_hessian calibrations) is a
    Triton kernel only in modelopt 0.47 ("static_blockwise_fp4_fake_quant requires triton"); the
    autograd Function's forward is looked up at call time, so CPU tensors are routed to
    nvfp4_static_fake_quant and everything else to the original forward."""
    fn = tensor_quant.StaticBlockwiseFP4FakeQuantFunction
    original = fn.forward

    def forward(ctx, x, amax, global_amax=None, quantize_block_scales=True, fp8_max_for_normalization=E4M3_MAX,
                out_dtype=None, pass_through_bwd=False):
        if x.is_cuda or not quantize_block_scales:
            return original(ctx, x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization,
                            out_dtype, pass_through_bwd)
        tensor_quant._save_for_backward_if_needed(ctx, pass_through_bwd, x, amax)
        y = nvfp4_static_fake_quant(x, amax, global_amax, float(fp8_max_for_normalization))
        return y.to(out_dtype or x.dtype)

    fn.forward = staticmethod(forward)
