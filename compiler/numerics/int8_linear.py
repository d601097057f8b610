"""An eager int8 x int8 Linear for the CPU that computes exactly what torchao's dynamic int8 Linear computes.

Library gap this fills: torchao 0.18's `Int8DynamicActivationInt8WeightConfig` stores the weights right (int8 per
row, fp32 scales; qcompile keeps torchao's quantization), but its eager CPU linear is slower than the fp32 Linear it
replaces (0.49-0.74x torch fp32 on MiniLM, docs/speed.md): every call quantizes the activation through the generic
`choose_qparams_affine` / `quantize_affine` (a dozen small ops), re-transposes the weight, and on a CPU with
AVX512-VNNI shifts the activation to uint8 and sums the weight's columns again; under torch.compile on a CPU it
falls back to an fp32 product. This module keeps the same numbers with the least work per call: the transposed
int8 weight is stored once, the activation is quantized in four ops, and oneDNN's `aten._int_mm` multiplies
int8 x int8 (it handles the VNNI compensation itself). The output equals torchao's bit for bit (tested), only
aten ops run, so `torch.export` keeps it and the exported program loads without torchao.
"""

from __future__ import annotations

import torch

_EPS = torch.finfo(torch.float32).eps  # torchao's eps for the activation scale (Int8Tensor.from_hp)


class Int8DynamicLinear(torch.nn.Module):
    """y = (q(x) @ Wq^T) * s_x * s_w + b with q(x) = clamp(round(x / s_x), -128, 127) and s_x = amax(|x|) / 127.5
    per row (per token) or per tensor, as torchao's symmetric int8 activation quantization; Wq and s_w are the
    int8 weight and its scales torchao computed."""

    def __init__(self, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 per_token: bool):
        super().__init__()
        if weight_t.dtype != torch.int8 or weight_t.dim() != 2:
            raise ValueError(f"weight_t must be a 2-D int8 tensor (in_features x out_features), got "
                             f"{tuple(weight_t.shape)} {weight_t.dtype}")
        self.in_features, self.out_features = int(weight_t.shape[0]), int(weight_t.shape[1])
        self.per_token = bool(per_token)
        self.register_buffer("weight_t", weight_t.contiguous())
        self.register_buffer("weight_scale", weight_scale.reshape(-1).to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @classmethod
    def from_torchao(cls, linear: torch.nn.Linear) -> "Int8DynamicLinear | None":
        """The lean module for a Linear that torchao quantized with symmetric dynamic int8 activations and int8
        weights (per row or per tensor); None when its weight is any other torchao form (left to torchao)."""
        w = linear.weight
        act = getattr(w, "act_quant_kwargs", None)
        qdata = getattr(w, "qdata", None)
        if act is None or qdata is None or qdata.dtype != torch.int8 or qdata.dim() != 2:
            return None
        if getattr(w, "act_pre_scale", None) is not None or getattr(w, "act_quant_scale", None) is not None:
            return None  # pre-scaled (AWQ / SmoothQuant) or static activations: not this computation
        if "SYMMETRIC" != getattr(getattr(act, "mapping_type", None), "name", None):
            return None
        if getattr(w, "reduce_range", False) or getattr(act, "reduce_range", False):
            return None
        granularity = type(getattr(act, "granularity", None)).__name__
        if granularity not in ("PerRow", "PerTensor"):
            return None
        return cls(qdata.t(), w.scale, linear.bias, per_token=granularity == "PerRow")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        amax = rows.abs().amax(dim=-1, keepdim=True) if self.per_token else rows.abs().amax().reshape(1, 1)
        scale = (amax / 127.5).clamp_min_(_EPS)
        # torchao's order of operations, so the result is the same to the bit: x * (1 / s), round half to even
        q = torch.round(rows * scale.reciprocal()).clamp_(-128, 127).to(torch.int8)
        # int32 * fp32 promotes to fp32: the conversion torchao makes explicitly, without a separate copy
        y = (torch._int_mm(q, self.weight_t) * scale).mul_(self.weight_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation scales per {'token' if self.per_token else 'tensor'}, int8 x int8 (aten._int_mm)")


def use_lean_int8_linears(module: torch.nn.Module) -> int:
    """Swap, in place, every Linear of ``module`` that torchao quantized to symmetric dynamic int8 for an
    Int8DynamicLinear with the same numbers; returns how many it swapped. For the CPU (target=torch lowers with it
    where target.device=cpu): on CUDA torchao's own kernels stay."""
    swapped = 0
    for name, sub in list(module.named_modules()):
        if not isinstance(sub, torch.nn.Linear):
            continue
        lean = Int8DynamicLinear.from_torchao(sub)
        if lean is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, lean)
        swapped += 1
    return swapped
