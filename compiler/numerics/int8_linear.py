"""Eager int8 x int8 Linears for the CPU: Int8DynamicLinear computes exactly what torchao's dynamic int8 Linear
computes; Int8StaticLinear runs a modelopt calibrated W8A8 fake-quant Linear in int8 (below).

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


class _Int8Linear(torch.nn.Module):
    """What both int8 Linears hold: the int8 weight transposed once (in_features x out_features, what aten._int_mm
    takes) and the fp32 bias."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight_t.dtype != torch.int8 or weight_t.dim() != 2:
            raise ValueError(f"weight_t must be a 2-D int8 tensor (in_features x out_features), got "
                             f"{tuple(weight_t.shape)} {weight_t.dtype}")
        self.in_features, self.out_features = int(weight_t.shape[0]), int(weight_t.shape[1])
        self.register_buffer("weight_t", weight_t.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8DynamicLinear(_Int8Linear):
    """y = (q(x) @ Wq^T) * s_x * s_w + b with q(x) = clamp(round(x / s_x), -128, 127) and s_x = amax(|x|) / 127.5
    per row (per token) or per tensor, as torchao's symmetric int8 activation quantization; Wq and s_w are the
    int8 weight and its scales torchao computed."""

    def __init__(self, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 per_token: bool):
        super().__init__(weight_t, bias)
        self.per_token = bool(per_token)
        self.register_buffer("weight_scale", weight_scale.reshape(-1).to(torch.float32).contiguous())

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
        return self._finish(y, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation scales per {'token' if self.per_token else 'tensor'}, int8 x int8 (aten._int_mm)")


class Int8StaticLinear(_Int8Linear):
    """A modelopt W8A8 fake-quant Linear (calibrated static int8: int8, int8_static, int8_smoothquant on
    target=torch) run in int8: y = (q(x * p) @ Wq^T) / (s_x * s_w) + b, with q(v) = clamp(round(v * s_x), lo, 127),
    s_x = 127 / amax_x from modelopt's calibration, p its SmoothQuant pre-scale (where it has one), and Wq, s_w the
    weight rounded as modelopt's weight quantizer rounds it (per output channel or per tensor). The fake-quant
    computes sum((qx / s_x) * (qw / s_w)) in fp32; this the same sum in int32, scaled once: equal up to fp32
    rounding (tested).

    Library gap: torchao 0.18's static int8 config has no calibration, and modelopt's quantizers run
    quantize-dequantize around an fp32 product (no int8 kernel on the CPU) that torch.export cannot trace."""

    def __init__(self, weight_t: torch.Tensor, weight_inv_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor, input_min: int, pre_scale: torch.Tensor | None = None):
        super().__init__(weight_t, bias)
        self.input_min = int(input_min)
        # s_x as modelopt computes it (fp32 127 / amax), so the activations round exactly as its fake-quant rounds them
        self.register_buffer("input_scale", input_scale.detach().to(torch.float32).reshape(()).clone())
        # 1 / (s_x * s_w) per output channel: the int32 accumulator's one multiply back to real units
        self.register_buffer("output_scale", (weight_inv_scale.reshape(-1).to(torch.float32) / self.input_scale)
                             .contiguous())
        self.register_buffer("pre_scale", None if pre_scale is None else pre_scale.detach().reshape(-1)
                             .to(torch.float32).clone())

    @classmethod
    def from_modelopt(cls, linear: torch.nn.Module) -> "Int8StaticLinear | None":
        """The int8 module for a modelopt QuantLinear whose input and weight quantizers are both on, 8-bit
        integer, static (calibrated amax), per tensor for the input and per output channel or per tensor for the
        weight, and whose output quantizer is off; None for any other quantizer setup (left as it is)."""
        iq, wq = getattr(linear, "input_quantizer", None), getattr(linear, "weight_quantizer", None)
        oq = getattr(linear, "output_quantizer", None)
        if iq is None or wq is None or not isinstance(getattr(linear, "weight", None), torch.Tensor):
            return None
        if oq is not None and getattr(oq, "is_enabled", False):
            return None
        for q in (iq, wq):  # modelopt's plain integer path (TensorQuantizer.forward -> _fake_quantize), nothing else
            if not (getattr(q, "is_enabled", False) and getattr(q, "fake_quant", False) and q.num_bits == 8
                    and getattr(q, "_if_quant", False) and not getattr(q, "_if_calib", True)
                    and not getattr(q, "unsigned", False) and not getattr(q, "block_sizes", None)
                    and not getattr(q, "_dynamic", False) and getattr(q, "amax", None) is not None
                    and getattr(q, "backend", None) is None and getattr(q, "bias_calibrator", None) is None
                    and not getattr(q, "is_mx_format", False) and not getattr(q, "rotate_is_enabled", False)
                    and not getattr(q, "rotate_back_is_enabled", False)):
                return None
        weight = linear.weight.detach().float()
        w_amax, x_amax = wq.amax.detach().float(), iq.amax.detach().float()
        if x_amax.numel() != 1 or float(x_amax) <= 2.0 ** -24 or w_amax.numel() not in (1, weight.shape[0]):
            return None
        if w_amax.numel() > 1 and (wq.axis not in (0, (0,)) or float(w_amax.min()) <= 2.0 ** -24):
            return None
        low = -127 if getattr(wq, "narrow_range", False) else -128
        bound = torch.tensor(127.0)
        w_scale = bound / w_amax.reshape(-1, 1)  # modelopt's _tensor_quant: fp32 max_bound / amax
        weight_q = torch.clamp((weight * w_scale).round_(), low, 127).to(torch.int8)
        pre = getattr(iq, "pre_quant_scale", None)
        return cls(weight_q.t(), 1.0 / w_scale.reshape(-1).expand(weight.shape[0]), linear.bias,
                   bound / x_amax.reshape(()), -127 if getattr(iq, "narrow_range", False) else -128, pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.pre_scale is not None:
            rows = rows * self.pre_scale
        q = torch.round(rows * self.input_scale).clamp_(self.input_min, 127).to(torch.int8)
        return self._finish(torch._int_mm(q, self.weight_t) * self.output_scale, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, static activation scale "
                f"{float(self.input_scale):.6g}{', SmoothQuant pre-scale' if self.pre_scale is not None else ''}, "
                "int8 x int8 (aten._int_mm)")


def use_lean_int8_linears(module: torch.nn.Module) -> int:
    """Swap, in place, every Linear of ``module`` that torchao quantized to symmetric dynamic int8 for an
    Int8DynamicLinear, and every modelopt W8A8 static fake-quant Linear for an Int8StaticLinear, each with the same
    numbers; returns how many it swapped. For the CPU (target=torch lowers with it where target.device=cpu): on
    CUDA torchao's kernels and modelopt's stay."""
    return replace_linears(module, lambda sub: Int8DynamicLinear.from_torchao(sub) or Int8StaticLinear.from_modelopt(sub))


def replace_linears(module: torch.nn.Module, make) -> int:
    """Swap, in place, every Linear of ``module`` for make(linear) where that is not None; returns how many."""
    swapped = 0
    for name, sub in list(module.named_modules()):
        if not isinstance(sub, torch.nn.Linear):
            continue
        lean = make(sub)
        if lean is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, lean)
        swapped += 1
    return swapped
