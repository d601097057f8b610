"""Step `rotate`: an exact Hadamard rotation of every quantizable Linear's input space, so a following
quantization step sees activations and weights with their outliers spread over a block of channels.

For a Linear y = x W^T + b and the normalized (block-diagonal) Hadamard H (orthogonal, symmetric):
    y = (x H)(W H)^T + b
W H is fused into the weight once, here; x H runs online as an OnlineHadamard module in front of the
Linear (a live MatMul in the exported graph), except for the attention-output projection when the block
fits inside a head: there the value projection's output is rotated instead (fused, exact, no MatMul).
A quantization step after this one quantizes the Linear inside, whose input quantizer then sees x H and whose weight quantizer sees W H.
modelopt's own `rotate` quantizer option is not used: it needs the CUDA-only fast_hadamard_transform and
exports as a baked Constant (see compiler/numerics/hadamard.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, RecipeError
from compiler.core.patterns import matches_any
from compiler.numerics.hadamard import (
    SUPPORTED_BLOCKS,
    OnlineHadamard,
    block_for,
    hadamard_matrix,
    is_power_of_two,
)
from compiler.steps.base import TORCH, ModelInfo, Step, StepContext, StepParams
from compiler.steps.modelopt import DEFAULT_EXCLUDE, exclude_patterns

METHODS = ("hadamard",)


@dataclass
class RotateParams(StepParams):
    method: str = "hadamard"  # the only method: normalized (block-diagonal) Sylvester Hadamard
    # Hadamard block: a dimension that block_size divides gets block-diagonal copies of H_block_size;
    # a power-of-two dimension smaller than block_size gets one Sylvester block of its own size.
    block_size: int = 128
    # which Linear layers get their input rotated (fnmatch patterns over module names, after the model's
    # exclude patterns): ["*"] = every quantizable Linear; e.g. ["*output.dense"] = only the inputs that
    # do not come straight from a LayerNorm in BERT (attention output and FFN down projections)
    layers: list[str] = field(default_factory=lambda: ["*"])
    # fuse the attention-output projection's rotation into the value projection (no MatMul at run time)
    # where the Hadamard block fits inside one attention head; otherwise it runs online like the others
    fuse_attention: bool = True

    def problems(self) -> list[tuple[str, str, str]]:
        out = []
        if self.method not in METHODS:
            out.append(("method", f"unknown rotation {self.method!r}", f"use one of {list(METHODS)}"))
        if not is_power_of_two(int(self.block_size)) or self.block_size not in SUPPORTED_BLOCKS:
            what = (f"{self.block_size} is not a power of two in {SUPPORTED_BLOCKS[0]}..{SUPPORTED_BLOCKS[-1]} "
                    "(Sylvester construction)")
            out.append(("block_size", what, "use e.g. 16 or 128"))
        return out


def working_blocks(dims: dict[str, int]) -> list[int]:
    """Block sizes that rotate every one of these dimensions exactly."""
    ok = []
    for b in SUPPORTED_BLOCKS:
        try:
            for d in dims.values():
                block_for(d, b)
        except ValueError:
            continue
        ok.append(b)
    return ok


class RotatedLinear(torch.nn.Module):
    """linear(x @ H) with linear.weight already W @ H: equal to the original Linear on x."""

    def __init__(self, rotation: OnlineHadamard, linear: torch.nn.Linear):
        super().__init__()
        self.rotation = rotation
        self.linear = linear

    @property
    def in_features(self):
        return self.linear.in_features

    @property
    def out_features(self):
        return self.linear.out_features

    @property
    def weight(self):  # model code reads e.g. `dense.weight.dtype`
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, x):
        return self.linear(self.rotation(x))


def _value_output_pairs(module):
    """(value rows of the projection that produces V, attention-output Linear, head_dim, qualified name of
    the output Linear) per attention block, for the architectures whose layout is known: BERT
    (self.value -> output.dense) and ModernBERT (the V third of Wqkv -> Wo)."""
    pairs = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        sa, out = getattr(sub, "self", None), getattr(sub, "output", None)
        if (isinstance(getattr(sa, "value", None), torch.nn.Linear) and hasattr(sa, "attention_head_size")
                and isinstance(getattr(out, "dense", None), torch.nn.Linear)):
            pairs.append((sa.value, slice(None), out.dense, int(sa.attention_head_size), f"{prefix}output.dense"))
        elif isinstance(getattr(sub, "Wqkv", None), torch.nn.Linear) and isinstance(getattr(sub, "Wo", None),
                                                                                        torch.nn.Linear):
            d = sub.Wo.in_features
            pairs.append((sub.Wqkv, slice(2 * d, 3 * d), sub.Wo, int(sub.head_dim), f"{prefix}Wo"))
    return pairs


def fuse_attention_rotations(module, block_size: int, names: list[str]) -> list[str]:
    """For each attention output Linear in `names` whose Hadamard block fits in a head (block divides
    head_dim): rotate the value projection's output rows by R (block-diagonal, inside each head) and the
    output Linear's input by R. Attention mixes tokens, never channels within a head, so the context
    arrives already rotated: ctx R (W_o R)^T = ctx W_o^T, exactly, with no MatMul at run time.
    Returns the fused output Linears' names."""
    fused = []
    for value, rows, out, head_dim, out_name in _value_output_pairs(module):
        if out_name not in names:
            continue
        d = out.in_features
        b = block_for(d, block_size)
        if head_dim % b:
            continue  # the block would mix heads: stays an online rotation
        r = torch.from_numpy(hadamard_matrix(d, b))
        with torch.no_grad():
            w = value.weight[rows]
            value.weight[rows] = (r @ w.double()).to(w.dtype)
            if value.bias is not None:
                value.bias[rows] = (r @ value.bias[rows].double()).to(value.bias.dtype)
            out.weight.copy_((out.weight.double() @ r).to(out.weight.dtype))
        fused.append(out_name)
    return fused


def rotate_linears(module, block_size: int, exclude: list[str], layers: list[str] | None = None,
                   fuse_attention: bool = False) -> dict[str, object]:
    """Rotate the input side of every nn.Linear whose name matches a `layers` pattern (default: all) and no
    exclude pattern, in place: fused into the value projection where fuse_attention allows, online
    (RotatedLinear) elsewhere. Returns what was done (layers, blocks per input dimension)."""
    layers = list(layers or ["*"])
    targets = []
    for name, sub in module.named_modules():
        if (isinstance(sub, torch.nn.Linear) and any(fnmatch.fnmatch(name, p) for p in layers)
                and not any(fnmatch.fnmatch(name, p) for p in exclude)):
            targets.append((name, sub))
    if not targets:
        raise BuildError(f"rotate: no Linear layer matches recipe.steps.rotate.layers={layers} outside the "
                         f"exclude patterns {exclude}")
    blocks: dict[int, int] = {}
    fused = fuse_attention_rotations(module, block_size, [n for n, _ in targets]) if fuse_attention else []
    for name, lin in targets:
        d = lin.in_features
        if name in fused:
            blocks[d] = block_for(d, block_size)
            continue
        try:
            b = block_for(d, block_size)
        except ValueError as e:
            raise BuildError(f"rotate: layer {name} has input dimension {d}: {e} "
                             f"(block sizes that work for it: {[x for x in SUPPORTED_BLOCKS if d % x == 0]})") from e
        blocks[d] = b
        with torch.no_grad():
            h = torch.from_numpy(hadamard_matrix(d, block_size))
            lin.weight.copy_((lin.weight.double() @ h).to(lin.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, RotatedLinear(OnlineHadamard(d, block_size, dtype=lin.weight.dtype), lin))
    return {"rotated_layers": len(targets), "online_rotations": len(targets) - len(fused),
            "fused_rotations": len(fused),
            "blocks": {str(d): b for d, b in sorted(blocks.items())}, "layers": [n for n, _ in targets]}


class RotateStep(Step):
    name = "rotate"
    Params = RotateParams
    runs_on = {"torch": TORCH, "ort": TORCH, "trt": TORCH}
    needs_calibration = False
    summary = "Hadamard rotation of Linear inputs (W@H fused into weights, x@H as a live MatMul), exact in fp32"
    # produces no number format; it changes the weights and activations a quantizing step then quantizes
    must_precede_quantizers = True

    def layers(self, module, exclude=()) -> list[str]:
        """The Linear layers it would rotate: those matching `layers`, outside the exclude patterns."""
        patterns = list(exclude) or list(DEFAULT_EXCLUDE)
        return [n for n in super().layers(module, patterns) if matches_any(n, self.params.layers)]

    def validate(self, info: ModelInfo, target: TargetCapabilities) -> None:
        super().validate(info, target)
        dims = {k: v for k, v in (("hidden_size", info.hidden_size), ("intermediate_size", info.intermediate_size))
                if v}
        bs = int(self.params.block_size)
        for key, d in dims.items():
            try:
                block_for(d, bs)
            except ValueError:
                ok = working_blocks(dims)
                what = ", ".join(f"{k}={v}" for k, v in dims.items())
                raise RecipeError("recipe.steps.rotate.block_size",
                                  f"block_size {bs} cannot rotate {info.name}'s {key} {d} (a Hadamard block must "
                                  f"divide it, or be at least a power-of-two dimension)",
                                  f"use block_size in {ok} ({what})" if ok else
                                  f"no power-of-two block rotates {what}; remove the rotate step") from None

    def apply_torch(self, model, ctx: StepContext):
        # a layer kept out by with_layer_formats is not rotated: its exact module name joins the exclusions
        done = rotate_linears(model, int(self.params.block_size), exclude_patterns(ctx) + self.kept_layers(),
                              list(self.params.layers), bool(self.params.fuse_attention))
        ctx.report.update({"method": self.params.method, "block_size": int(self.params.block_size),
                           **{k: v for k, v in done.items() if k != "layers"}})
        return model
