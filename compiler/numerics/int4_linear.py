"""Int4DequantLinear: a modelopt int4 block-wise weight-only fake-quant Linear (int4_weight_only on target=torch)
stored as packed 4-bit codes and per-block scales, dequantized at every call, with the fake-quant's numbers.

Library gap this fills: modelopt's int4 fake-quant branches on its tensors' values, so torch.export cannot trace it
and a target=torch run kept only a state dict that `qcompile predict` cannot load; torchao 0.18 has no CPU kernel for
these symmetric calibrated blocks (its x86 int4 tensor is a prototype with asymmetric blocks). torch's own CPU int4
product, `aten._weight_int4pack_mm_for_cpu`, takes these blocks (codes + 8, zero 0) but measured on the 2-core Xeon
(MiniLM FFN shape 128 x 384 x 1536, one thread): exact in fp32 and 143x slower than the fp32 Linear; in bf16 2.1x
slower and bf16 numbers. So this module dequantizes with aten ops (two nibbles per byte, one divide per weight, the
fp32 product), which torch.export keeps: the program is 4-bit sized, loads without modelopt and computes what the
fake-quant computes (checked bit for bit when the module is made).
"""

from __future__ import annotations

import torch

from compiler.numerics.int8_linear import replace_linears


class Int4DequantLinear(torch.nn.Module):
    """y = (x * p) @ W^T + b, W[n, k] = (c[n, k] - 8) / s[n, k // B]: c the 4-bit code (two per byte), s modelopt's
    per-block scale (7 / amax of the block), p its AWQ pre-scale where it has one."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, block: int, bias: torch.Tensor | None,
                 pre_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = int(packed.shape[0]), int(packed.shape[1]) * 2
        self.block = int(block)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", scale.to(torch.float32).reshape(self.out_features, -1, 1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.register_buffer("pre_scale", None if pre_scale is None else pre_scale.detach().reshape(-1)
                             .to(torch.float32).clone())

    def dequantized_weight(self) -> torch.Tensor:
        codes = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(self.out_features, -1, self.block)
        return ((codes.to(torch.float32) - 8.0) / self.scale).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale
        return torch.nn.functional.linear(x, self.dequantized_weight(), self.bias)

    @classmethod
    def from_modelopt(cls, linear: torch.nn.Module) -> "Int4DequantLinear | None":
        """The module for a modelopt QuantLinear with a static int4 block weight quantizer and no activation
        quantization; None for any other setup, or where the stored codes would not give back the fake-quant's
        weight bit for bit (left as it is)."""
        wq, iq = getattr(linear, "weight_quantizer", None), getattr(linear, "input_quantizer", None)
        oq = getattr(linear, "output_quantizer", None)
        weight = getattr(linear, "weight", None)
        if wq is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        if any(getattr(q, "is_enabled", False) for q in (iq, oq) if q is not None):
            return None
        blocks = getattr(wq, "block_sizes", None) or {}
        block = blocks.get(-1) or blocks.get(1)
        if not (getattr(wq, "is_enabled", False) and wq.num_bits == 4 and block and blocks.get("type") == "static"
                and getattr(wq, "amax", None) is not None and not getattr(wq, "unsigned", False)
                and getattr(wq, "backend", None) is None):
            return None
        n, k = weight.shape
        if k % int(block) or int(block) % 2 or wq.amax.numel() != n * k // int(block):
            return None
        with torch.no_grad():
            want = wq(weight.detach()).float()  # the fake-quant's weight
            # modelopt's scale, max_bound / amax, tensor by tensor (a Python 7.0 / amax multiplies by the reciprocal,
            # one ulp off in places)
            scale = (torch.tensor(7.0) / wq.amax.detach().float()).reshape(n, -1, 1)
            codes = torch.round(want.reshape(n, -1, int(block)) * scale).clamp_(-8, 7)
            u = (codes + 8).to(torch.uint8).reshape(n, k // 2, 2)
            packed = u[..., 0] | (u[..., 1] << 4)
        pre = getattr(iq, "pre_quant_scale", None) if iq is not None else None
        lean = cls(packed, scale, int(block), linear.bias, pre)
        if not torch.equal(lean.dequantized_weight(), want):
            return None
        return lean

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 codes in blocks of "
                f"{self.block}{', AWQ pre-scale' if self.pre_scale is not None else ''}, dequantized per call")


def use_int4_dequant_linears(module: torch.nn.Module) -> int:
    """Swap, in place, every modelopt int4 block weight-only fake-quant Linear of ``module`` for an
    Int4DequantLinear with the same numbers; returns how many."""
    return replace_linears(module, Int4DequantLinear.from_modelopt)
