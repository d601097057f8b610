"""Real quantized kernels for target=torch through torchao: the torchao config a step declares is applied to the
step's Linear layers with torchao's quantize_, which swaps each weight for a torchao tensor subclass whose linear
runs int8 kernels (aten._int_mm for int8 x int8, an int8 weight read by the fp32 product for weight-only).

A step declares what lowers it (Step.torch_kernel): a TorchKernel naming the torchao config, or a NoKernel saying
why torchao has none for its format here; the step then runs as modelopt fake-quant, and both its report and the
target's "lower.kernels" section say so."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from compiler.core.errors import BuildError
from compiler.graph.quantized import is_int4_dequant_linear, is_lean_int8_linear


# what a step's report says in its "kernels" key (and report.json's lower.kernels.mode for the whole module)
REAL = "real"  # torchao tensor subclasses: the quantized format is stored and run by integer kernels
FAKE_QUANT = "fake_quant"  # modelopt quantize-dequantize around fp32 products: the format's numerics, fp32 speed


@dataclass(frozen=True)
class TorchKernel:
    """A torchao config (its class name in torchao.quantization, and keyword arguments) that runs a step's format
    with real kernels on target=torch, and what the kernel computes in words (for the report)."""

    config: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    compute: str = ""  # e.g. "int8 x int8 -> int32 (aten._int_mm), per-token dynamic activation scales"


@dataclass(frozen=True)
class NoKernel:
    """No torchao kernel runs the step's format on this target: the step stays modelopt fake-quant, for this reason."""

    reason: str


def torchao_modules():
    """torchao's quantization package, imported quietly: on a machine without CUDA its wheel logs that its CUDA
    extensions (_C_mxfp8, _C_cutlass_90a) cannot load (the CPU paths used here are Python/aten and need neither),
    and torch logs a deprecation of how torchao 0.18 registers an enum with torch.compile."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as taoq
            from torchao.utils import TorchAOBaseTensor
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return taoq, TorchAOBaseTensor


def make_config(kernel: TorchKernel):
    """The torchao config object a TorchKernel names; granularity names ("per_row", "per_tensor") become torchao's
    granularity objects."""
    taoq, _ = torchao_modules()
    kwargs = dict(kernel.kwargs)
    grans = {"per_row": taoq.PerRow, "per_tensor": taoq.PerTensor}
    if isinstance(kwargs.get("granularity"), str):
        kwargs["granularity"] = grans[kwargs["granularity"]]()
    return getattr(taoq, kernel.config)(**kwargs)


def apply_kernel(module, kernel: TorchKernel, layers: list[str], label: str) -> dict[str, Any]:
    """Quantize the named Linear layers of ``module`` in place with the kernel's torchao config; returns what the
    step reports: backend, kernels=real, the layer counts. A BuildError when torchao converted none of them."""
    import torch

    taoq, base = torchao_modules()
    chosen = set(layers)
    if not chosen:
        raise BuildError(f"{label}: no nn.Linear left to quantize (model.exclude and the step's exclude patterns "
                         "match all of them)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        taoq.quantize_(module, make_config(kernel), filter_fn=lambda m, name: name in chosen and isinstance(m, torch.nn.Linear))
    linears = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    done = sorted(n for n in linears if isinstance(module.get_submodule(n).weight, base))
    if not done:
        raise BuildError(f"{label}: torchao {kernel.config} converted none of the {len(chosen)} chosen Linear layers "
                         "(it skips weights whose shape its kernel cannot take)")
    out: dict[str, Any] = {"backend": f"torchao {kernel.config}", "kernels": REAL, "quantized": len(done),
                           "total": len(linears), "fraction": round(len(done) / len(linears), 4),
                           "excluded": sorted(set(linears) - set(done))}
    if kernel.compute:
        out["compute"] = kernel.compute
    return out


def fake_quant_report(reason: str) -> dict[str, Any]:
    """The keys a step that stays modelopt fake-quant on target=torch adds to its report."""
    return {"kernels": FAKE_QUANT, "kernels_reason": reason}


def module_kernels(module) -> dict[str, Any]:
    """What runs the Linear layers of a lowered torch module, counted from the module itself: layers whose weight is
    a torchao tensor subclass or that target=torch lowered to its CPU int8 Linear (real kernels) and layers with an
    enabled modelopt quantizer (fake-quant)."""
    import torch

    real = fake = 0
    base = None
    try:
        _, base = torchao_modules()
    except ImportError:  # torchao absent: nothing can be a torchao tensor
        pass
    for _, m in module.named_modules():
        if is_lean_int8_linear(m):  # target=torch's CPU int8 Linear (torchao's or modelopt's int8 numbers)
            real += 1
            continue
        if is_int4_dequant_linear(m):  # int4 codes dequantized around an fp32 product: no int4 kernel
            fake += 1
            continue
        if not isinstance(m, torch.nn.Linear):
            continue
        if base is not None and isinstance(m.weight, base):
            real += 1
        elif any(getattr(getattr(m, q, None), "is_enabled", False) for q in ("weight_quantizer", "input_quantizer")):
            fake += 1
    mode = "none" if not (real or fake) else (REAL if not fake else FAKE_QUANT if not real else "mixed")
    return {"mode": mode, "real_layers": real, "fake_quant_layers": fake}
