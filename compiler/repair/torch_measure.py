"""The torch-side measurer: the recipe's torch steps applied twice to copies of the fp32 model, once as written (A)
and once with every quantized layer given the fallback format (B, through Step.with_layer_formats); a measured
map is A with those layers' modules swapped in from B (modules.MixedModel), one forward of the ranking rows.
That is the target's numerics for target=torch, and the graph the trt / ort targets export from the same
fake-quant modules (ORT equals torch fake-quant to < 1e-4 on these graphs: compiler/steps tests).

Speed: each variant's weight quantizers are folded into the weights once (modelopt's fold_weight), the ranking
rows run length-sorted without their padding, and unchanged transformer blocks' outputs are reused (BlockCache).
Sensitivity of a layer: the budgeted metric with only that layer at the fallback minus the metric with all
layers quantized. A cheap first pass (each layer's output error against its fallback module on the same input)
orders the layers; the top `confirm_top` are measured (default 64: every layer of a MiniLM-size model).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from compiler.core.errors import BuildError
from compiler.repair.modules import (
    BLOCK_CACHE_BYTES,
    MixedModel,
    _get,
    _has,
    _is_quantized,
    _params,
    fold_weights,
    proxy_errors,
)
from compiler.repair.search import Measure, memoized, split


def _outputs(module, feeds: Sequence[Sequence[Any]], index: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(*f)[index].detach().double().cpu().numpy() for f in feeds], axis=0)


def batch_outputs(module, feeds, output_names: Sequence[str], wanted=None) -> list[dict[str, np.ndarray]]:
    """Per batch, {output name: array} of the wanted outputs (all when None), as float64."""
    out = []
    with torch.no_grad():
        for f in feeds:
            res = module(*f)
            out.append({n: t.detach().double().cpu().numpy() for n, t in zip(output_names, res)
                        if wanted is None or n in wanted})
    return out


def _ranking_feeds(data, n: int, batch_size: int):
    """The first n evaluation samples as torch batches, sorted by length and cut to the longest real token of
    each batch. Padding past every row's attention mask changes no real token's output (masked keys get zero
    attention weight; quantizers scale per token / block or per tensor with calibrated ranges), so a probe
    skips the pad positions (MiniLM's built-in sentences: 17 real tokens of 128 on average)."""

    ev = data.evaluation
    n = min(n, len(ev))
    arrays = {k: np.ascontiguousarray(v[:n]) for k, v in ev.arrays.items()}
    mask = arrays.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        rows = _ranking_order(data, n)
        arrays = {k: v[rows] for k, v in arrays.items()}
        lengths = _real_lengths(arrays["attention_mask"])
    feeds = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        batch = {k: v[start:stop] for k, v in arrays.items()}
        if mask is not None and mask.ndim == 2:
            width = max(1, int(lengths[start:stop].max()))
            batch = {k: (v[:, :width] if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}
        feeds.append([torch.from_numpy(np.ascontiguousarray(v)) for v in batch.values()])
    return feeds


def _ranking_order(data, n: int) -> np.ndarray:
    """The row order _ranking_feeds runs the first n evaluation samples in (longest first; as loaded without an
    attention mask)."""
    mask = data.evaluation.arrays.get("attention_mask")
    n = min(n, len(data.evaluation))
    if mask is None or mask.ndim != 2:
        return np.arange(n)
    return np.argsort(-_real_lengths(np.asarray(mask[:n])), kind="stable")


def _real_lengths(mask: np.ndarray) -> np.ndarray:
    """Per row, one past the last position the attention mask keeps (0 for an all-masked row)."""
    kept = mask != 0
    last = mask.shape[1] - np.argmax(kept[:, ::-1], axis=1)
    return np.where(kept.any(axis=1), last, 0)



def torch_measure(mixed: MixedModel, feeds, score: Callable[[list[dict[str, np.ndarray]]], Any],
                  output_names: Sequence[str], wanted=None) -> Measure:
    """measure(set) on torch fake-quant: the mixed model with that set of layers from B, one forward (the
    blocks before the first changed one read from mixed.blocks when it caches), scored by score(batches)."""
    def measure(fallback_layers):
        model = mixed.use(fallback_layers)
        outs = []
        try:
            with torch.no_grad():
                for i, f in enumerate(feeds):
                    if mixed.blocks is not None:
                        mixed.blocks.batch = i
                    res = model(*f)
                    outs.append({n: t.detach().double().cpu().numpy() for n, t in zip(output_names, res)
                                 if wanted is None or n in wanted})
        finally:
            if mixed.blocks is not None:
                mixed.blocks.batch = None
        return score(outs)

    return measure


def _b_of(mixed: MixedModel):
    """A module tree whose layers are B's: the fallback modules swapped into a shallow view for proxy_errors."""

    class _View:
        def get_submodule(self, name):
            return mixed.fallback[name]

    return _View()


def measure_sensitivity(mixed: MixedModel, names: Sequence[str], roles: dict[str, str], feeds, measure: Measure,
                        confirm_top: int) -> dict[str, Any]:
    """Per-layer sensitivity: the measured single-layer metric of the top confirm_top layers by the proxy error
    (the first pass, one forward with every layer's fallback module run beside it); when confirm_top covers every
    layer (the default on MiniLM-size models) all are measured and the proxy pass is skipped (proxy_error None).
    Layers ordered by measured gain, then the unmeasured ones by proxy. With gate conditions each measured layer
    keeps their values too."""
    base = split(measure(frozenset()))[0]
    if confirm_top >= len(names):
        proxy: dict[str, float | None] = {n: None for n in names}
        by_proxy = list(names)
    else:
        proxy = dict(proxy_errors(mixed.use([]), _b_of(mixed), names, feeds))
        by_proxy = sorted(names, key=lambda n: (-proxy[n], n))
    measured = {n: split(measure(frozenset([n]))) for n in by_proxy[:confirm_top]}
    gains = {n: m - base for n, (m, _) in measured.items()}
    position = {n: i for i, n in enumerate(by_proxy)}
    ranked = sorted(gains, key=lambda n: (-gains[n], position[n]))
    order = ranked + [n for n in by_proxy if n not in gains]
    mixed.use([])
    return {"base_metric": base, "layers": [
        {"name": n, "role": roles.get(n, ""), "proxy_error": None if proxy[n] is None else round(proxy[n], 6),
         "gain": round(gains[n], 6) if n in gains else None, "metric": measured[n][0] if n in measured else None,
         **({"values": measured[n][1]} if n in measured and measured[n][1] else {})} for n in order]}


class TorchMeasurer:
    """The Measurer of torch-side quantizing steps (see measurer.py for the interface)."""

    measured_on = "torch fake-quant, folded weights, length-sorted batches without padding"

    def __init__(self, model, steps: Sequence[Any], fallback: str, apply_steps: Callable[[Any, list[Any]], Any],
                 data, rows: int, batch_size: int, reference_module=None):
        # reference_module: the fp32 module, when model holds other (trained) weights: the outputs are compared with
        # it, and the fallback layers keep its weights (weights trained against 4-bit rounding are worse in fp8:
        # measured on MiniLM, all 36 distilled layers in FP8 0.985 embedding cosine)
        self.model = model
        self.reference_module = model.module if reference_module is None else reference_module
        self.fallback_from = "model" if reference_module is None else "fp32 reference"
        a = apply_steps(copy.deepcopy(model.module), list(steps))
        order = model.roles.role if model.roles is not None else {}
        self.names = [n for n in order if _has(a, n) and _is_quantized(_get(a, n))]
        if not self.names:
            raise BuildError("repair: no quantized layer found to fall back")
        if fallback == "fp32":  # every layer kept out is the recipe without its quantizing steps
            fallback_steps = [s for s in steps if not s.quantizes_compute]
        else:
            fallback_steps = [s.with_layer_formats({n: fallback for n in self.names}) if s.quantizes_compute else s
                              for s in steps]
        b = apply_steps(copy.deepcopy(self.reference_module), fallback_steps)
        # weights per layer, before folding (it leaves the weights' shapes alone anyway)
        self.counts = {n: _params(_get(a, n)) for n in self.names}
        self.roles = dict(order)
        fold_weights(a)
        fold_weights(b)
        self.feeds = _ranking_feeds(data, rows, batch_size)
        # the feeds run length-sorted; outputs go back to row order (pairs and gold labels are by row)
        self.unsort = np.argsort(_ranking_order(data, rows), kind="stable")
        self.reference_batches = batch_outputs(self.reference_module, self.feeds, model.output_names)
        self.mixed = MixedModel(a, b, self.names, cache_bytes=BLOCK_CACHE_BYTES)
        self.measure: Measure | None = None

    def start(self, score) -> list[str]:
        """Measure with score(batches) from now on; the layers to search over."""
        self.measure = memoized(torch_measure(self.mixed, self.feeds, score, self.model.output_names,
                                              set(score.outputs)))
        return self.names

    def __call__(self, fallback_layers):
        return self.measure(fallback_layers)

    def sensitivity(self, confirm_top: int) -> dict[str, Any]:
        return measure_sensitivity(self.mixed, self.names, self.roles, self.feeds, self.measure, confirm_top)

    def key(self) -> dict[str, Any]:
        return {"measure": self.measured_on, "fallback_weights": self.fallback_from}

    def check_layout(self, chosen: Sequence[str], feeds, wanted) -> tuple[list[dict], list[dict]]:
        """(fp32, the map's) outputs on the check's padded batches (feeds: lists of tensors), no block cache."""
        reference = batch_outputs(self.reference_module, feeds, self.model.output_names, wanted)
        self.mixed.blocks.batch = None
        return reference, batch_outputs(self.mixed.use(chosen), feeds, self.model.output_names, wanted)

    def finish(self, chosen: Sequence[str]) -> dict[str, Any]:
        self.mixed.use(chosen)
        return {"forwards": len(self.measure.memo), "ranking_tokens": int(sum(f[0].numel() for f in self.feeds)),
                "block_cache": {"hits": self.mixed.blocks.hits, "misses": self.mixed.blocks.misses}}
