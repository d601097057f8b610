"""The ONNX-side measurer (int8_static / int8_dynamic on ort and trt): every measurement re-quantizes the fp32 graph
with some layers kept out and runs it with onnxruntime on the ranking rows, so the sensitivity and the search see
the target's own numerics.

A measurement is one quantization (Step.with_layer_formats -> apply_onnx, which keeps the layers' nodes out
through nodes_to_exclude) plus one session run. int8_static's calibration ranges are cached by graph and data
(ranges_file), so only the first quantization calibrates. Sensitivity of a layer: the metric with only that layer
kept out minus the metric with all layers quantized; every layer is measured (no proxy pass: on MiniLM a
measurement costs a few seconds).

target=trt graphs: TensorRT cannot run here, so the same Q/DQ graph (symmetric int8) is measured with the
onnxruntime CPU session. Issue 12 allows the CPU reference runner for trt graphs; onnxruntime on the same Q/DQ
graph is the practical one (onnx.reference takes minutes per MiniLM forward) and computes the same
quantize -> dequantize -> fp32 matmul numerics that TensorRT's explicit quantization specifies.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compiler.core.errors import BuildError
from compiler.core.hashing import onnx_sha256
from compiler.repair.search import split
from compiler.repair.torch_measure import batch_outputs
from compiler.runners.sessions import ort_session
from compiler.steps.ort_quant import LINEAR_OP_TYPES, QUANTIZED_LINEAR_OP_TYPES, node_module, qdq_fed

# apply_steps(fp32 graph, steps, directory to write in) -> the quantized graph's path
ApplySteps = Callable[[Path, list[Any], Path], Path]


def ranking_feeds(data, n: int, batch_size: int, trim: bool = False) -> list[dict[str, np.ndarray]]:
    """The first n evaluation examples in batches, in row order. trim: each batch cut to its longest real token
    (the attention mask), as the torch search runs them: with ranges fixed by calibration (static Q/DQ) the pad
    positions change no real token's output. Dynamic int8 scales each activation tensor from its values, pads
    included, so its probes keep the padding the check runs with."""
    ev = data.evaluation
    n = min(n, len(ev))
    mask = ev.arrays.get("attention_mask")
    feeds = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        batch = {k: np.ascontiguousarray(v[start:stop]) for k, v in ev.arrays.items()}
        if trim and mask is not None and mask.ndim == 2:
            kept = mask[start:stop] != 0
            width = max(1, int((mask.shape[1] - np.argmax(kept[:, ::-1], axis=1))[kept.any(axis=1)].max(initial=1)))
            batch = {k: (np.ascontiguousarray(v[:, :width]) if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v)
                     for k, v in batch.items()}
        feeds.append(batch)
    return feeds


def quantized_scopes(quantized_onnx: Path) -> list[str]:
    """The module scopes (ort_quant.node_module: TorchScript node names or dynamo's name_scopes) of the linear
    ops a quantizing step quantized, in graph order: Q/DQ-fed MatMul / Gemm (QDQ, ort_quant.qdq_fed) or quantized
    ops (QOperator, dynamic). These are the Linear layers the step touched plus activation x activation MatMuls
    (attention scores and context), which static Q/DQ quantizes too and Step.with_layer_formats keeps out by the
    same scope (ort_quant.layer_nodes). Quantized embedding Gathers are left out: the steps keep out linear ops
    only."""
    graph = onnx.load(str(quantized_onnx), load_external_data=False).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    out: list[str] = []
    for n in graph.node:
        qdq = n.op_type in LINEAR_OP_TYPES and qdq_fed(n, producer)
        if n.name and (qdq or n.op_type in QUANTIZED_LINEAR_OP_TYPES) and node_module(n) not in out:
            out.append(node_module(n))
    return out


def weight_counts(module, names: Sequence[str]) -> dict[str, int]:
    """Weights per layer for the size estimate: a Linear's weight; a scope without a Linear (an activation
    MatMul) stores none."""
    counts = {}
    for n in names:
        try:
            sub = module.get_submodule(n)
        except AttributeError:
            sub = None
        counts[n] = int(sub.weight.numel()) if isinstance(sub, torch.nn.Linear) else 0
    return counts


class OnnxMeasurer:
    """The Measurer of ONNX-side quantizing steps (see measurer.py): measure(fallback_layers) -> the measurement
    of the graph quantized with those layers kept out, run by onnxruntime on the ranking feeds. Memoized by layer
    set (the search re-asks k = 0)."""

    def __init__(self, model, reference_module, fp32_onnx: Path, steps: Sequence[Any], apply_steps: ApplySteps,
                 data, rows: int, batch_size: int, work_dir: Path, fallback: str = "fp32", opt_level: str = "all"):
        self.model = model
        self.fp32_onnx = Path(fp32_onnx)
        self.steps = list(steps)
        self.apply_steps = apply_steps
        # static Q/DQ (every quantizing step calibrated) runs unpadded batches; dynamic int8 keeps the padding
        self.trim = all(s.needs_calibration for s in self.steps if s.quantizes_compute)
        self.feeds = ranking_feeds(data, rows, batch_size, trim=self.trim)
        order = list(data.evaluation.arrays)
        self.fp32_inputs = order
        torch_feeds = [[torch.from_numpy(f[k]) for k in order] for f in self.feeds]
        self.reference_module = reference_module
        self.reference_batches = batch_outputs(reference_module, torch_feeds, model.output_names)
        self.unsort = None
        self.work_dir = Path(work_dir)
        self.fallback = fallback
        self.opt_level = opt_level
        self.memo: dict[frozenset, Any] = {}
        self.count = 0
        self.layers: set = set()  # the scopes the steps quantize (start)
        self.score = None
        self.names: list[str] = []
        self.roles: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def steps_for(self, fallback_layers: Iterable[str]) -> list[Any]:
        formats = {n: self.fallback for n in fallback_layers}
        if self.fallback == "fp32" and self.layers and self.layers <= set(formats):
            # every layer kept out: the recipe without its quantizing steps (the steps refuse a graph they
            # quantize nothing of; an int8 embedding table, which no layer map keeps out, goes with them)
            return [s for s in self.steps if not s.quantizes_compute]
        return [s.with_layer_formats(formats) if s.quantizes_compute and formats else s for s in self.steps]

    def start(self, score) -> list[str]:
        """Quantize with no layer kept out and measure it with score(batches) (memoized as the k = 0 point); the
        layers to search over: the scopes the steps quantized (quantized_scopes), in forward order."""
        self.score = score
        scopes: list[str] = []
        self.memo[frozenset()] = score(self.outputs([], scopes.extend))
        self.count += 1
        self.layers = set(scopes)
        roles = dict(self.model.roles.role) if self.model.roles is not None else {}
        self.names = [n for n in roles if n in scopes] + [n for n in scopes if n not in roles]
        if not self.names:
            raise BuildError("repair: the quantized graph has no quantized linear op to keep out")
        # a scope that is not a Linear module: an activation x activation MatMul (no weight operand)
        roles.update({n: "activation_matmul" for n in self.names if n not in roles})
        self.roles = roles
        self.counts = weight_counts(self.model.module, self.names)
        return self.names

    def outputs(self, fallback_layers: Iterable[str], inspect: Callable[[list[str]], Any] | None = None,
                feeds: list[dict[str, np.ndarray]] | None = None, wanted=None) -> list[dict[str, np.ndarray]]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.work_dir, prefix="measure."))
        wanted = list(wanted or self.score.outputs)
        try:
            path = self.apply_steps(self.fp32_onnx, self.steps_for(fallback_layers), tmp)
            if inspect is not None:
                inspect(quantized_scopes(path))
            try:
                # one thread: the sensitivity runs many short sessions on machines whose cores are shared
                sess = ort_session(path, opt_level=self.opt_level, threads=1)
            except Exception as e:
                raise BuildError(f"repair: onnxruntime cannot load the quantized graph it measures: "
                                 f"{str(e).splitlines()[0][:300]}") from e
            names = [i.name for i in sess.get_inputs()]
            out = []
            for f in (self.feeds if feeds is None else feeds):
                res = sess.run(wanted, {n: f[n] for n in names})
                out.append({n: np.asarray(r).astype(np.float64) for n, r in zip(wanted, res)})
            del sess
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def __call__(self, fallback_layers: Iterable[str]):
        key = frozenset(fallback_layers)
        if key not in self.memo:
            self.count += 1
            self.memo[key] = self.score(self.outputs(key))
        return self.memo[key]

    def sensitivity(self, confirm_top: int) -> dict[str, Any]:
        """Every layer measured (confirm_top does not apply): its gain = metric with it alone kept out - metric
        with all quantized. Ordered by gain (larger first), ties in forward order."""
        base = split(self(frozenset()))[0]
        measured = {n: split(self(frozenset([n]))) for n in self.names}
        gains = {n: m - base for n, (m, _) in measured.items()}
        pos = {n: i for i, n in enumerate(self.names)}
        order = sorted(self.names, key=lambda n: (-gains[n], pos[n]))
        return {"base_metric": base, "layers": [
            {"name": n, "role": self.roles.get(n, ""), "proxy_error": None, "gain": round(gains[n], 6),
             **({"values": measured[n][1]} if measured[n][1] else {})} for n in order]}

    def key(self) -> dict[str, Any]:
        return {"measured_on": "onnxruntime", "graph_sha256": onnx_sha256(self.fp32_onnx),
                "opt_level": self.opt_level, "unpadded": self.trim}

    def check_layout(self, chosen: Sequence[str], feeds, wanted) -> tuple[list[dict], list[dict]]:
        """(fp32, the map's) outputs on the check's padded batches (feeds: lists of tensors)."""
        reference = batch_outputs(self.reference_module, feeds, self.model.output_names, wanted)
        arrays = [{k: t.numpy() for k, t in zip(self.fp32_inputs, f)} for f in feeds]
        return reference, self.outputs(chosen, feeds=arrays, wanted=sorted(wanted))

    def finish(self, chosen: Sequence[str]) -> dict[str, Any]:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return {"measurements": self.count,
                "measured_on": f"onnxruntime CPU ({self.opt_level}) on the quantized graph"}
