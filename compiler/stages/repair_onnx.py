"""Repair for steps that quantize the exported ONNX graph (int8_static / int8_dynamic on ort and trt): every
measurement re-quantizes the fp32 graph with some layers kept out and runs it with onnxruntime on the ranking
subset, so the sensitivity and the search see the target's own numerics.

A measurement is one quantization (Step.with_layer_formats -> apply_onnx, which keeps the layers' nodes out
through nodes_to_exclude) plus one session run. int8_static's calibration ranges are cached by graph and data
(ranges_file), so only the first quantization calibrates. Sensitivity of a layer: the metric with only that layer
kept out minus the metric with all layers quantized; every layer is measured (no proxy pass: on MiniLM a
measurement costs a few seconds), the search (compiler.stages.repair.search) then takes layers in that order.

target=trt graphs: TensorRT cannot run here, so the same Q/DQ graph (symmetric int8) is measured with the
onnxruntime CPU session. Issue 12 allows the CPU reference runner for trt graphs; onnxruntime on the same Q/DQ
graph is the practical one (onnx.reference takes minutes per MiniLM forward) and computes the same
quantize -> dequantize -> fp32 matmul numerics that TensorRT's explicit quantization specifies.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compiler.core.errors import BuildError
from compiler.stages.repair import RepairResult, _outputs, search, sensitivity_key, sensitivity_unless_met
from compiler.stages.repair_metric import ranking_rows, repair_metric

# apply_steps(fp32 graph, steps, directory to write in) -> the quantized graph's path
ApplySteps = Callable[[Path, list[Any], Path], Path]


class OnnxMeasurer:
    """measure(fallback_layers) -> the metric of the graph quantized with those layers kept out, run by
    onnxruntime on the ranking feeds. Measurements are memoized by layer set (the search re-asks k = 0)."""

    def __init__(self, fp32_onnx: Path, steps: Sequence[Any], apply_steps: ApplySteps, feeds: list[dict[str, np.ndarray]],
                 reference: np.ndarray, metric_fn, output_name: str, work_dir: Path, fallback: str = "fp32",
                 opt_level: str = "all"):
        self.fp32_onnx = Path(fp32_onnx)
        self.steps = list(steps)
        self.apply_steps = apply_steps
        self.feeds = feeds
        self.reference = reference
        self.metric_fn = metric_fn
        self.output_name = output_name
        self.work_dir = Path(work_dir)
        self.fallback = fallback
        self.opt_level = opt_level
        self.memo: dict[frozenset, float] = {}
        self.count = 0
        self.layers: set = set()  # the scopes the steps quantize (measure_base)

    def steps_for(self, fallback_layers: Iterable[str]) -> list[Any]:
        formats = {n: self.fallback for n in fallback_layers}
        if self.fallback == "fp32" and self.layers and self.layers <= set(formats):
            # every layer kept out: the recipe without its quantizing steps (the steps refuse a graph they
            # quantize nothing of; an int8 embedding table, which no layer map keeps out, goes with them)
            return [s for s in self.steps if not s.quantizes_compute]
        return [s.with_layer_formats(formats) if s.quantizes_compute and formats else s for s in self.steps]

    def measure_base(self) -> list[str]:
        """Quantize with no layer kept out, measure it (memoized as the k = 0 point) and return the scopes the
        steps quantized (quantized_scopes)."""
        scopes: list[str] = []
        self.memo[frozenset()] = float(self.metric_fn(self.reference, self.outputs([], scopes.extend)))
        self.count += 1
        self.layers = set(scopes)
        return scopes

    def outputs(self, fallback_layers: Iterable[str], inspect: Callable[[list[str]], Any] | None = None) -> np.ndarray:
        from compiler.runners.sessions import ort_session

        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.work_dir, prefix="measure."))
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
            out = [sess.run([self.output_name], {n: f[n] for n in names})[0] for f in self.feeds]
            del sess
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return np.concatenate(out, axis=0).astype(np.float64)

    def __call__(self, fallback_layers: Iterable[str]) -> float:
        key = frozenset(fallback_layers)
        if key not in self.memo:
            self.count += 1
            self.memo[key] = float(self.metric_fn(self.reference, self.outputs(key)))
        return self.memo[key]


def measure_sensitivity(measure: Callable[[Iterable[str]], float], names: Sequence[str],
                        roles: dict[str, str]) -> dict[str, Any]:
    """Every layer measured: its gain = metric with it alone kept out - metric with all quantized. Ordered by
    gain (larger first), ties in forward order."""
    base = measure([])
    gains = {n: measure([n]) - base for n in names}
    pos = {n: i for i, n in enumerate(names)}
    order = sorted(names, key=lambda n: (-gains[n], pos[n]))
    return {"base_metric": base, "layers": [
        {"name": n, "role": roles.get(n, ""), "proxy_error": None, "gain": round(gains[n], 6)} for n in order]}


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
    import onnx

    from compiler.steps.ort_quant import LINEAR_OP_TYPES, QUANTIZED_LINEAR_OP_TYPES, node_module, qdq_fed

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
    import torch

    counts = {}
    for n in names:
        try:
            sub = module.get_submodule(n)
        except AttributeError:
            sub = None
        counts[n] = int(sub.weight.numel()) if isinstance(sub, torch.nn.Linear) else 0
    return counts


def run_onnx_repair(model, reference_module, spec, data, fp32_onnx: Path, apply_steps: ApplySteps, work_dir: Path,
                    cache=None, primary_format: str = "") -> RepairResult:
    """The repair search for a build whose quantizing steps run on the ONNX graph. model: the LoadedModel the
    graph was exported from (its roles, task, weights hash); reference_module: the fp32 torch module (the check
    stage's reference). Unmet budgets are the caller's to raise."""
    from compiler.core.hashing import onnx_sha256

    rep = spec.repair
    steps = list(spec.onnx_steps)
    t0 = time.perf_counter()
    batch = int(spec.data.batch_size)
    labels = getattr(data, "evaluation_labels", None)
    rows = ranking_rows(int(rep.ranking_samples), len(data.evaluation), labels)
    # static Q/DQ (every quantizing step calibrated) runs unpadded batches; dynamic int8 keeps the padding
    trim = all(s.needs_calibration for s in steps if s.quantizes_compute)
    feeds = ranking_feeds(data, rows, batch, trim=trim)
    output_index = 0 if model.task == "classification" else 1
    reference = _outputs(reference_module, ranking_torch_feeds(feeds, list(data.evaluation.arrays)), output_index)
    # the budgeted metric (compiler/stages/repair_metric.py): the task metric against the ranking rows' gold
    # labels, or the fidelity metric against the fp32 outputs
    chosen_metric = repair_metric(rep, spec.gate, model.task, labels, reference)
    metric_name, budget = chosen_metric.name, chosen_metric.budget

    def metric_fn(_reference, outputs):
        return chosen_metric.fn(outputs)

    # an ORT target's own optimization level; a trt graph's stand-in session runs at ORT's default
    opt_level = spec.target.graph_optimization if spec.capabilities and spec.capabilities.ort_session else "all"
    measure = OnnxMeasurer(fp32_onnx, steps, apply_steps, feeds, reference, metric_fn,
                           model.output_names[output_index], Path(work_dir) / "repair", rep.fallback, opt_level)
    # the recipe as written, once: which scopes it quantized are the layers to search over (and its metric, k=0)
    scopes = measure.measure_base()
    roles = dict(model.roles.role) if model.roles is not None else {}
    names = [n for n in roles if n in scopes] + [n for n in scopes if n not in roles]
    if not names:
        raise BuildError("repair: the quantized graph has no quantized linear op to keep out")
    # a scope that is not a Linear module: an activation x activation MatMul (no weight operand)
    roles.update({n: "activation_matmul" for n in names if n not in roles})
    allowed = math.floor(float(rep.max_fallback_fraction) * len(names) + 1e-9)
    counts = weight_counts(model.module, names)
    t1 = time.perf_counter()

    key = {**sensitivity_key(model, spec, data, names), "measured_on": "onnxruntime",
           "graph_sha256": onnx_sha256(fp32_onnx), "opt_level": opt_level, "metric": metric_name,
           "ranking_rows": rows, "unpadded": trim,
           "labels": getattr(data, "files_sha256", {}).get("evaluation") if labels is not None else None}
    sensitivity = sensitivity_unless_met(measure, names, roles, chosen_metric.reference, budget, cache, key,
                                         lambda: measure_sensitivity(measure, names, roles))
    t2 = time.perf_counter()
    result = search(measure, sensitivity, metric_name, budget, rep.fallback, allowed, primary_format, counts,
                    reference=chosen_metric.reference)
    result.fraction = float(rep.max_fallback_fraction)
    result.seconds = {"prepare": round(t1 - t0, 2), "sensitivity": round(t2 - t1, 2),
                      "search": round(time.perf_counter() - t2, 2), "measurements": measure.count,
                      "measured_on": f"onnxruntime CPU ({opt_level}) on the quantized graph"}
    shutil.rmtree(Path(work_dir) / "repair", ignore_errors=True)
    return result


def ranking_torch_feeds(feeds: list[dict[str, np.ndarray]], order: list[str]):
    """The same batches as torch tensors, positional in the evaluation arrays' order (how the torch module and
    repair._outputs take them)."""
    import torch

    return [[torch.from_numpy(f[k]) for k in order] for f in feeds]
