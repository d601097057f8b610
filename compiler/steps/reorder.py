"""Step `reorder`: sorts the channels of the residual stream (and of each FFN's hidden layer) by their calibrated
magnitude, so that each block of 16 channels a following NVFP4 step scales together holds channels of like size.

Why: NVFP4 gives each 16 consecutive input channels one e4m3 scale, set by the block's largest value. A trained
encoder's channels differ in size (MiniLM: the largest residual channel's RMS is 3-17x the median, per LayerNorm);
in the original order a block's small channels share the scale of its large one and lose most of their 4-bit levels.
Sorted, every block's scale fits its channels. Measured on MiniLM (docs/accuracy.md): small, because the per-16
scales already isolate most of it -- NVFP4 alone 0.9654 -> 0.9665 mean embedding cosine; after the distillation of
nvfp4_distill the worst sentence gains about 0.005 and the mean 0.0003-0.0006 (two seeds).

Exact in fp32, folded into the weights: a permutation commutes with LayerNorm (mean and variance do not depend on
the channel order; its weight and bias are permuted with it), so one order P of the hidden channels is applied to
every writer of the residual stream (embedding tables' columns, the attention-output and FFN-down projections'
rows and biases), to every LayerNorm on it, and to every reader (the q/k/v and FFN-up projections' input columns).
The only op it adds is one Gather that puts the encoder's last hidden state back in the original order (a forward
hook on the last LayerNorm), so every output and head is unchanged. Each FFN's hidden channels get their own order
(up-projection rows, down-projection columns; for a gated FFN both halves of the up-projection), with no Gather.
Which Linear reads or writes the stream comes from the layer roles (compiler/graph/roles.py), not from names, and
the step checks the permuted fp32 model against the original on a calibration batch: an architecture whose stream
has a reader or writer the roles miss fails the build here, naming the difference, instead of quietly changing it.

No library does this here: modelopt 0.47 and onnxruntime have no channel-reordering pass (the idea is RPTQ's and
Atom's, in their own LLM research code); the Hadamard rotation (step rotate) does the opposite, spreading a large channel over its
block, and measured no better than nothing for NVFP4 on MiniLM (docs/accuracy.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compiler.core.errors import BuildError
from compiler.graph.roles import find_roles
from compiler.steps.base import TORCH, Step, StepContext, StepParams

# readers and writers of the residual stream, by layer role (compiler/graph/roles.py)
READER_ROLES = ("attention_qkv", "ffn_up")
WRITER_ROLES = ("attention_output", "ffn_down", "other")  # other: e.g. ELECTRA's embedding projection
# module attributes: the residual order, and the module whose output is put back in the original order (a step
# reading per-block hidden states puts them back with these)
ORDER_ATTR = "qc_residual_order"
RESTORED_AT_ATTR = "qc_residual_order_restored_at"
EXACT_RTOL = 1e-4  # fp32 reorder vs original: summation order only (measured ~2e-7 on MiniLM)


@dataclass
class ReorderParams(StepParams):
    # also order each FFN's hidden channels (MiniLM NVFP4 alone: 0.96648 without, 0.96614 with: noise; the
    # nvfp4_distill measurements had it on)
    ffn: bool = True


def in_original_order(module, hidden: torch.Tensor, name: str) -> torch.Tensor:
    """The output of ``module``'s submodule ``name`` (a block) in the original channel order: unchanged without
    reorder, or where the block holds the module that restores the order (the last block of a BERT)."""
    order = getattr(module, ORDER_ATTR, None)
    restored_at = getattr(module, RESTORED_AT_ATTR, "")
    if order is None or hidden.shape[-1] != order.numel() or restored_at.startswith(f"{name}."):
        return hidden
    return hidden[..., torch.argsort(order)]


class RestoreOrder:
    """Forward hook: the module's output back in the original channel order (a Gather in the exported graph).
    A class, not a closure, so a module carrying it still pickles and deep-copies."""

    def __init__(self, inverse: torch.Tensor):
        self.inverse = inverse

    def __call__(self, module, inputs, output):
        return output[..., self.inverse]


def _feed(features, n: int):
    """The first n calibration rows as positional tensors (the model's input order)."""
    return [torch.from_numpy(v[:n]) for v in features.arrays.values()]


def channel_rms(model, features, batch_size: int, norms: list[str], ffn_down: list[str]):
    """Per-channel RMS over the calibration tokens (padding left out) of every LayerNorm output on the stream
    (mean over them) and of every FFN-down input; also the LayerNorms in forward order."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    order: list[str] = []
    mask_box: dict[str, torch.Tensor | None] = {}

    def record(name, x):
        m = mask_box.get("mask")
        x = x.detach()
        x = x[m] if m is not None and x.dim() == 3 and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + x.double().pow(2).sum(0)
        count[name] = count.get(name, 0) + x.shape[0]

    def out_hook(name):
        def hook(mod, inp, out):
            if name not in order:
                order.append(name)
            record(name, out)
        return hook

    def in_hook(name):
        def hook(mod, inp):
            record(name, inp[0])
        return hook

    handles = [model.get_submodule(n).register_forward_hook(out_hook(n)) for n in norms]
    handles += [model.get_submodule(n).register_forward_pre_hook(in_hook(n)) for n in ffn_down]
    try:
        with torch.no_grad():
            for feed in features.batches(batch_size):
                mask = feed.get("attention_mask")
                mask_box["mask"] = torch.from_numpy(mask).bool() if mask is not None else None
                model(*[torch.from_numpy(v) for v in feed.values()])
    finally:
        for h in handles:
            h.remove()
    rms = {n: (sums[n] / max(count[n], 1)).sqrt() for n in sums}
    return rms, order


def _permute_rows(lin: torch.nn.Linear, p: torch.Tensor) -> None:
    lin.weight.copy_(lin.weight[p])
    if lin.bias is not None:
        lin.bias.copy_(lin.bias[p])


def reorder_channels(model, features, batch_size: int, hidden: int, ffn: bool) -> dict:
    """Apply the orders in place (see the module docstring); returns what was done. Raises BuildError when the
    reordered fp32 model is not the original."""
    feed = _feed(features, min(len(features), 4))
    roles = find_roles(model, feed)
    linears = {n: model.get_submodule(n) for n in roles.role}
    readers = [n for r in READER_ROLES for n in roles.names(r) if linears[n].in_features == hidden]
    writers = [n for r in WRITER_ROLES for n in roles.names(r) if linears[n].out_features == hidden]
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
             and tuple(m.normalized_shape) == (hidden,)]
    tables = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and m.embedding_dim == hidden]
    if not readers or not writers or not norms:
        raise BuildError(f"reorder: found no residual stream of width {hidden} (readers {len(readers)}, writers "
                         f"{len(writers)}, LayerNorms {len(norms)}); remove the reorder step for this model")
    ups, downs = roles.names("ffn_up"), roles.names("ffn_down")
    pairs = list(zip(ups, downs)) if ffn and len(ups) == len(downs) else []
    rms, order = channel_rms(model, features, batch_size, norms, [d for _, d in pairs])
    with torch.no_grad():
        reference = [o.clone() for o in model(*feed)]
    # descending: the largest channels share the first blocks; stable, so equal scores keep their order
    score = torch.stack([rms[n] for n in norms if n in rms]).mean(0)
    p = torch.argsort(score, descending=True, stable=True)
    with torch.no_grad():
        for n in tables:
            t = model.get_submodule(n)
            t.weight.copy_(t.weight[:, p])
        for n in norms:
            ln = model.get_submodule(n)
            if ln.weight is not None:
                ln.weight.copy_(ln.weight[p])
            if ln.bias is not None:
                ln.bias.copy_(ln.bias[p])
        for n in writers:
            _permute_rows(linears[n], p)
        for n in readers:
            linears[n].weight.copy_(linears[n].weight[:, p])
        ffn_done = 0
        for up, down in pairs:
            u, d = linears[up], linears[down]
            q = torch.argsort(rms[down], descending=True, stable=True)
            width = d.in_features
            if u.out_features == width:
                _permute_rows(u, q)
            elif u.out_features == 2 * width:  # gated FFN: act(x W_in) * (x W_gate), both halves in one Linear
                _permute_rows(u, torch.cat([q, q + width]))
            else:
                continue
            d.weight.copy_(d.weight[:, q])
            ffn_done += 1
    model.get_submodule(order[-1]).register_forward_hook(RestoreOrder(torch.argsort(p)))
    setattr(model, ORDER_ATTR, p)
    setattr(model, RESTORED_AT_ATTR, order[-1])
    with torch.no_grad():
        after = model(*feed)
    worst = max(float(((a - r).abs().max() / r.abs().max().clamp_min(1e-12))) for a, r in zip(after, reference))
    if not worst <= EXACT_RTOL:
        raise BuildError(f"reorder: the reordered fp32 model differs from the original by {worst:.3g} (relative; "
                         f"exact would be below {EXACT_RTOL}): this architecture has a reader or writer of its "
                         "residual stream that the layer roles do not show; remove the reorder step for this model")
    top = score[p]
    return {"hidden_channels": hidden, "layernorms": len(norms), "embedding_tables": len(tables),
            "stream_readers": len(readers), "stream_writers": len(writers), "ffn_reordered": ffn_done,
            "restore_order_after": order[-1], "largest_channel_rms_over_median": round(float(top[0] / top.median()), 2),
            "max_relative_difference_fp32": worst}


class ReorderStep(Step):
    name = "reorder"
    Params = ReorderParams
    runs_on = {"torch": TORCH, "ort": TORCH, "trt": TORCH}
    needs_calibration = True
    summary = ("sorts residual-stream and FFN channels by calibrated size so NVFP4 blocks hold like channels "
               "(exact, folded into weights)")
    # produces no number format; it reorders the weights and activations a quantizing step then quantizes
    must_precede_quantizers = True

    def apply_torch(self, model, ctx: StepContext):
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise BuildError("reorder: needs calibration data (set data.calibration_samples > 0)")
        done = reorder_channels(model, ctx.calibration, int(ctx.batch_size), int(ctx.model_info.hidden_size),
                                bool(self.params.ffn))
        ctx.report.update(done)
        return model
