"""Module surgery for the torch-side repair: which layers a quantized module quantizes, a model whose layers are
swapped between the recipe's format (A) and the fallback (B) per measurement (MixedModel), the reuse of unchanged
transformer blocks' outputs between measurements (BlockCache), folded weight quantizers, and the cheap per-layer
proxy error.

Why a swap equals quantizing with the mixed map: modelopt calibrates every quantizer on the unquantized forward
(calibration mode disables quantization), so a layer's ranges do not depend on the other layers' formats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from compiler.graph.quantized import torchao_weight
from compiler.steps.modelopt import _mtq

# block outputs kept for reuse between probes (BlockCache): MiniLM, 128 unpadded sentences, ~40 MB per map
BLOCK_CACHE_BYTES = 512 << 20


def _get(module, name: str):
    return module.get_submodule(name)


def _set(module, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


def _is_quantized(sub) -> bool:
    """Whether a layer module (possibly wrapped, e.g. by a rotation) has an enabled quantizer, is torch's dynamic
    int8 Linear, or holds a torchao quantized weight (int8_dynamic / int8_weight_only on torch: no modelopt
    quantizer)."""
    for m in sub.modules():
        if isinstance(m, DynamicInt8Linear) or torchao_weight(m) is not None:
            return True
        for attr in ("weight_quantizer", "input_quantizer"):
            q = getattr(m, attr, None)
            if q is not None and bool(getattr(q, "is_enabled", False)):
                return True
    return False


def _params(sub) -> int:
    # torch's dynamic int8 Linear keeps its weight packed: weight() unpacks it
    return int(sum(m.weight.numel() if isinstance(m, torch.nn.Linear) else m.weight().numel()
                   for m in sub.modules() if isinstance(m, (torch.nn.Linear, DynamicInt8Linear))))


def proxy_errors(a, b, names: Sequence[str], feeds) -> dict[str, float]:
    """Cheap pass: for each layer, the relative output error of A's module against B's module on the same
    input (the input A's own forward gives it), from one forward over the feeds."""
    err: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}
    hooks = []
    for n in names:
        other = _get(b, n)

        def hook(mod, inp, out, n=n, other=other):
            with torch.no_grad():
                ref = other(*inp)
            err[n][0] += float(((out - ref).double() ** 2).sum())
            err[n][1] += float((ref.double() ** 2).sum())
        hooks.append(_get(a, n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for f in feeds:
                a(*f)
    finally:
        for h in hooks:
            h.remove()
    return {n: math.sqrt(e / max(d, 1e-30)) for n, (e, d) in err.items()}


class MixedModel:
    """A (all layers in the recipe's format) with any set of layers swapped in from B (the fallback)."""

    def __init__(self, a, b, names: Sequence[str], cache_bytes: int = 0):
        self.model = a
        self.primary = {n: _get(a, n) for n in names}
        self.fallback = {n: _get(b, n) for n in names}
        self.current: set = set()
        self.blocks = BlockCache(a, names, cache_bytes) if cache_bytes > 0 else None

    def use(self, fallback_layers) -> Any:
        want = set(fallback_layers)
        for n in self.current - want:
            _set(self.model, n, self.primary[n])
        for n in want - self.current:
            _set(self.model, n, self.fallback[n])
        self.current = want
        if self.blocks is not None:
            self.blocks.current = frozenset(want)
        return self.model


class BlockCache:
    """Reuses a transformer block's output when nothing it depends on changed: the batch and the formats of the
    layers in it and in the blocks before it (layers outside every block count for every block, to be safe).
    A probe that changes a layer in block j then recomputes blocks j.. only (about half a forward on average).

    The blocks are the children of the ModuleList holding the most quantized layers (BERT encoder.layer,
    DistilBERT transformer.layer, ModernBERT layers); each block's forward is wrapped on the instance, so module
    paths (and MixedModel's swaps inside a block) stay as they are. Caching is on only while `batch` is set
    (torch_measure sets it), least recently used outputs are dropped past max_bytes."""

    def __init__(self, model, names: Sequence[str], max_bytes: int):
        lists = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        best, best_n = None, 1
        for prefix, ml in lists:
            n = sum(any(x.startswith(f"{prefix}.{i}.") for x in names) for i in range(len(ml)))
            if n > best_n:
                best, best_n = (prefix, ml), n
        self.index: dict[str, int] = {}
        self.max_bytes, self.bytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self.cache: dict[Any, Any] = {}
        self.batch: int | None = None
        self.current: frozenset = frozenset()
        if best is None:
            return
        prefix, ml = best
        for i, block in enumerate(ml):
            self.index.update({x: i for x in names if x.startswith(f"{prefix}.{i}.")})
            block.forward = self._wrap(i, block.forward)

    def _key(self, i: int):
        return self.batch, i, frozenset(n for n in self.current if self.index.get(n, -1) <= i)

    def _wrap(self, i: int, forward):
        def cached(*args, **kwargs):
            if self.batch is None:
                return forward(*args, **kwargs)
            key = self._key(i)
            if key in self.cache:
                self.hits += 1
                out = self.cache.pop(key)
                self.cache[key] = out  # most recently used last
                return out
            self.misses += 1
            out = forward(*args, **kwargs)
            parts = out if isinstance(out, (tuple, list)) else (out,)
            if all(isinstance(t, torch.Tensor) or t is None for t in parts):
                self.cache[key] = out
                self.bytes += sum(t.nbytes for t in parts if t is not None)
                while self.bytes > self.max_bytes and self.cache:
                    old = self.cache.pop(next(iter(self.cache)))
                    self.bytes -= sum(t.nbytes for t in (old if isinstance(old, (tuple, list)) else (old,))
                                      if t is not None)
            return out

        return cached


def fold_weights(module) -> None:
    """Bake every fake-quant weight quantizer into its weight (modelopt's mtq.fold_weight): a probe's forward
    then runs the activation quantizers only. Same numbers: the folded weight is what the weight quantizer
    returned on every forward (tests/repair/test_search.py checks equality)."""
    _mtq().fold_weight(module)


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False
