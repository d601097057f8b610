"""Where a 4-bit build's loss comes from (check.loss_sources): the fidelity loss of the build's steps run with only
their weights quantized, only their activations, both (the build), and with only one layer role's layers quantized
(attention_qkv, attention_output, ffn_up, ffn_down; every other layer kept out through Step.with_layer_formats).
It tells which method can help: better weight rounding recovers at most the weight-only loss.

A build is 4-bit when a quantizing step produces a format narrower than 8 bits (Step.precisions(), the bits in
compiler/core/formats.py: nvfp4, int4); no other build runs this. Loss = 1 - the repair's fidelity metric for the
model's task (compiler/repair/metric.py fidelity_metric: mean embedding cosine to fp32 for embedders, label
agreement for classifiers) on the check's rows. Each row is one quantization of the fp32 model and one forward of
the check's own batches, on the side where the 4-bit steps run: torch fake-quant (folded weights, as the repair's
torch measurer: torch_measure.py) or the quantized exported graph in onnxruntime (onnx_measure.OnnxMeasurer), so its
"both" row is the build's own number. The table is content-addressed in the cache (compiler/rundir/cache.py), like
the repair's sensitivity: a second build with the same inputs reads it without a forward."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from compiler.core.hashing import onnx_sha256
from compiler.core.report_types import loss_text
from compiler.core.formats import FORMATS, FULL_PRECISION, number_format
from compiler.core.tasks import task_kind
from compiler.graph.roles import BLOCK_ROLES
from compiler.repair.metric import fidelity_metric, primary_rows
from compiler.repair.modules import fold_weights
from compiler.repair.onnx_measure import OnnxMeasurer
from compiler.repair.torch_measure import batch_outputs
from compiler.steps.base import ACTIVATIONS, ONNX, TORCH, WEIGHTS, StepContext

log = logging.getLogger("qcompile")

WEIGHTS_ONLY, ACTIVATIONS_ONLY, BOTH = "weights_only", "activations_only", "both"
OPERAND_ROWS = (WEIGHTS_ONLY, ACTIVATIONS_ONLY, BOTH)
CACHE_KIND = "loss_sources"

Context = Callable[[Path], StepContext]


def narrow_steps(steps) -> list:
    """The quantizing steps that produce a format narrower than 8 bits (their declared precisions())."""
    return [s for s in steps if s.quantizes_compute
            and any(f in FORMATS and number_format(f).bits < 8 for f in s.precisions())]


def applies(spec) -> bool:
    """Whether a build gets the table: the check runs, check.loss_sources is on, and a step is 4-bit."""
    return bool(spec.check.enabled and spec.check.loss_sources and narrow_steps(spec.steps))


def side_of(spec) -> str | None:
    """Where the table is measured: the side (TORCH | ONNX) of the 4-bit steps, when every quantizing step runs
    there (None otherwise: one measurement quantizes one side, as the repair's search does)."""
    quant = [s for s in spec.steps if s.quantizes_compute]
    sides = {s.stage_for(spec.target.name) for s in quant}
    return sides.pop() if len(sides) == 1 else None


def operand_steps(steps, weights: bool, activations: bool) -> tuple[list | None, str]:
    """The steps with every quantizing step quantizing only the named operands (Step.with_operands); a step that
    quantizes none of them leaves the row. (None, why) when no quantizing step is left or one cannot split."""
    want = {o for o, on in ((WEIGHTS, weights), (ACTIVATIONS, activations)) if on}
    out, left = [], 0
    for s in steps:
        if not s.quantizes_compute:
            out.append(s)
            continue
        if not want & s.quantized_operands():
            continue
        v = s.with_operands(weights, activations)
        if v is None:
            return None, f"{s.name} cannot quantize its {' and '.join(sorted(want))} alone"
        out.append(v)
        left += 1
    if not left:
        return None, "weights only" if not weights else "activations only"
    return out, ""


def role_steps(steps, keep: set, quantized: dict[str, list[str]]) -> list:
    """The steps with every layer they quantize but `keep` kept out (Step.with_layer_formats, fp32)."""
    return [s.with_layer_formats({n: FULL_PRECISION for n in quantized[s.name] if n not in keep})
            if s.quantizes_compute else s for s in steps]


def reading(rows: dict[str, dict], roles: dict[str, dict], algorithm: str | None) -> str:
    """One or two sentences reading the table for the user, from its numbers."""
    both = rows[BOTH]["loss"]
    w, a = rows[WEIGHTS_ONLY]["loss"], rows[ACTIVATIONS_ONLY]["loss"]
    if both is None or both <= 1e-9:
        return f"The 4-bit build loses nothing measurable on these rows (loss {both or 0.0:.2g})."
    rounding = f"weight rounding (now algorithm={algorithm})" if algorithm else "weight rounding"
    if a is None:
        first = (f"Weights carry all of the loss ({loss_text(both)}; activations stay in full precision): better "
                 f"{rounding} or distillation is what helps.")
    elif w is None:
        first = f"Activations carry all of the loss ({loss_text(both)}): distillation or wider activations is what helps."
    elif a >= 1.5 * w:
        first = (f"Activations carry most of the loss (activations alone {loss_text(a)}, weights alone {loss_text(w)}, both "
                 f"{loss_text(both)}): {rounding} can recover at most {loss_text(w)}; distillation or keeping activations wider "
                 "is what helps.")
    elif w >= 1.5 * a:
        first = (f"Weights carry most of the loss (weights alone {loss_text(w)}, activations alone {loss_text(a)}, both "
                 f"{loss_text(both)}): better {rounding} can recover up to {loss_text(w)}; activations cost {loss_text(a)}.")
    else:
        first = (f"Weights and activations share the loss (weights alone {loss_text(w)}, activations alone {loss_text(a)}, both "
                 f"{loss_text(both)}): {rounding} can recover at most {loss_text(w)}; the rest needs distillation or wider "
                 "activations.")
    measured = sorted(((r["loss"], name, r["layers"]) for name, r in roles.items() if r["loss"] is not None),
                      reverse=True)
    if not measured:
        return first
    loss, name, n = measured[0]
    nxt = f"; next {measured[1][1]} {loss_text(measured[1][0])}" if len(measured) > 1 else ""
    return f"{first} By role, {name} costs most ({loss_text(loss)} with only its {n} layers quantized{nxt})."


def check_batches(data, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The check's own batches: every evaluation row, padded, in row order (compiler/pipeline.py's check stage).
    The table runs these, not the repair's length-sorted unpadded ones: other batch shapes change the float
    rounding a little, and under 4-bit rounding a few values then land in another bin (MiniLM nvfp4: mean
    embedding cosine 8.7e-6 off the check's), so its "both" row would not be the build's own number."""
    return list(data.evaluation.batches(batch_size))


class _TorchRows:
    """The primary output's rows of the steps applied to a copy of the fp32 module (folded weights, as the
    repair's torch measurer does: torch_measure.py), on the check's batches."""

    measured_on = "torch fake-quant (folded weights) on the check's batches"

    def __init__(self, model, data, batch_size: int, apply: Callable[[Any, list], Any]):
        self.model, self.apply = model, apply
        self.feeds = [[torch.from_numpy(np.ascontiguousarray(v)) for v in b.values()]
                      for b in check_batches(data, batch_size)]
        self.primary = model.output_names[task_kind(model.task).primary_index]
        self.forwards = 0
        self.reference = self._rows(model.module)

    def _rows(self, module) -> np.ndarray:
        self.forwards += 1
        out = batch_outputs(module, self.feeds, self.model.output_names, {self.primary})
        return primary_rows(out, self.primary, None)

    def __call__(self, steps) -> np.ndarray:
        module = self.apply(copy.deepcopy(self.model.module), list(steps))
        fold_weights(module)
        return self._rows(module)


class _OnnxRows:
    """The primary output's rows of the steps applied to the fp32 exported graph, run by onnxruntime on the
    check's batches (the repair's OnnxMeasurer, its steps set per row)."""

    def __init__(self, model, reference_module, exported: Path, steps, apply_onnx, data, batch_size: int,
                 work_dir: Path, opt_level: str):
        # ranking rows 0: the measurer's own ranking feeds go unused, outputs() gets the check's batches
        self.measurer = OnnxMeasurer(model, reference_module, exported, steps, apply_onnx, data, 0, batch_size,
                                     work_dir, "fp32", opt_level)
        self.feeds = check_batches(data, batch_size)
        self.primary = model.output_names[task_kind(model.task).primary_index]
        order = list(data.evaluation.arrays)
        torch_feeds = [[torch.from_numpy(np.ascontiguousarray(f[k])) for k in order] for f in self.feeds]
        self.reference = primary_rows(batch_outputs(reference_module, torch_feeds, model.output_names,
                                                    {self.primary}), self.primary, None)
        self.measured_on = f"onnxruntime CPU ({opt_level}) on the quantized exported graph, the check's batches"
        self.forwards = 1

    def __call__(self, steps) -> np.ndarray:
        self.measurer.steps = list(steps)
        self.forwards += 1
        out = self.measurer.outputs([], feeds=self.feeds, wanted=[self.primary])
        return primary_rows(out, self.primary, None)


def loss_sources_key(model, spec, data, side: str, exported: Path | None = None) -> dict[str, Any]:
    """Everything the table depends on: weights, data, the steps (with their per-layer map), target, seed, and
    where it is measured (torch fake-quant, or the fp32 graph the ONNX-side steps quantize)."""
    steps = OmegaConf.to_container(spec.raw.recipe.get("steps"), resolve=True) if spec.raw is not None else {}
    return {"weights": model.weights_sha256, "task": model.task,
            "calibration": data.calibration.sha256() if data.calibration is not None else None,
            "evaluation": data.evaluation.sha256(), "rows": len(data.evaluation), "steps": steps,
            "layer_formats": {s.name: dict(sorted(s.layer_formats.items())) for s in spec.steps},
            "target": spec.target.name, "side": side, "seed": int(spec.seed), "exclude": list(spec.model.exclude),
            "batch_size": int(spec.data.batch_size),
            "roles": dict(model.roles.role) if model.roles is not None else {},
            "measured_on": _TorchRows.measured_on if side == TORCH else {
                "graph_sha256": onnx_sha256(exported), "graph_optimization": str(spec.target.graph_optimization)}}


def measure_table(spec, model, data, work_dir: Path, context: Context, exported: Path | None = None
                  ) -> dict[str, Any]:
    """The table, measured: one quantization and one forward per distinct row (plus the fp32 reference)."""
    side = side_of(spec)
    # a training step (distill) is left out: it would train once per row, and it needs the teacher and the
    # training text; the rows are then the post-training quantization's, and the reading says so
    side_steps = [s for s in spec.steps if s.stage_for(spec.target.name) == side and not s.trains]
    trained = [s.name for s in spec.steps if s.trains]
    batch = int(spec.data.batch_size)
    if side == TORCH:
        def apply(module, steps):
            for step in steps:
                module = step.apply_torch(module, context(work_dir))
            return module

        rows_of: Any = _TorchRows(model, data, batch, apply)
    else:
        def apply_onnx(onnx_path, steps, out_dir):
            for i, step in enumerate(steps):
                onnx_path = step.apply_onnx(onnx_path, out_dir / f"{i:02d}_{step.name}.onnx", context(out_dir))
            return onnx_path

        opt_level = spec.target.graph_optimization if spec.capabilities and spec.capabilities.ort_session else "all"
        rows_of = _OnnxRows(model, model.module, exported, side_steps, apply_onnx, data, batch,
                            Path(work_dir) / "loss_sources", opt_level)
    name, fn = fidelity_metric(model.task)
    exclude = context(work_dir).exclude
    quantized = {s.name: [n for n in s.layers(model.module, exclude) if n not in set(s.kept_layers())]
                 for s in side_steps if s.quantizes_compute}
    every = {n for names in quantized.values() for n in names}
    memo: dict[tuple, dict[str, Any]] = {}

    def row(steps, layers: int) -> dict[str, Any]:
        # a row whose steps are the build's own (int4 weight-only: weights_only == both) is measured once
        sig = tuple((s.name, repr(s.params), tuple(sorted(s.layer_formats.items())),
                     tuple(sorted(s.quantized_operands()))) for s in steps)
        if sig not in memo:
            value = float(fn(rows_of.reference, rows_of(steps)))
            memo[sig] = {"metric": value, "loss": 1.0 - value}
        return {**memo[sig], "layers": layers, "not_applicable": None}

    def absent(why: str) -> dict[str, Any]:
        return {"metric": None, "loss": None, "layers": 0, "not_applicable": why}

    operands: dict[str, dict[str, Any]] = {BOTH: row(side_steps, len(every))}
    for key, (w, a) in ((WEIGHTS_ONLY, (True, False)), (ACTIVATIONS_ONLY, (False, True))):
        steps, why = operand_steps(side_steps, w, a)
        operands[key] = row(steps, len(every)) if steps is not None else absent(why)
    roles_of = model.roles.role if model.roles is not None else {}
    roles: dict[str, dict[str, Any]] = {}
    for role in BLOCK_ROLES:
        keep = {n for n in every if roles_of.get(n) == role}
        roles[role] = row(role_steps(side_steps, keep, quantized), len(keep)) if keep else absent(
            f"no {role} layer is quantized")
    algorithm = next((str(s.params.algorithm) for s in narrow_steps(side_steps)
                      if getattr(s.params, "algorithm", None) is not None), None)
    return {"metric": name, "rows": len(data.evaluation), "measured_on": rows_of.measured_on,
            "algorithm": algorithm, "operands": {k: operands[k] for k in OPERAND_ROWS}, "roles": roles,
            "reading": reading(operands, roles, algorithm) + (
                f" Measured before {', '.join(trained)}: the rows quantize without the training, the check measures"
                " the trained model." if trained else ""), "forwards": rows_of.forwards}


def run_loss_sources(spec, model, data, work_dir: Path, context: Context, cache=None,
                     exported: Path | None = None) -> dict[str, Any]:
    """report.json's loss_sources section for a build that applies(): the table (measure_table), read from the
    cache when the same inputs measured it before (forwards 0, cached true). model: the fp32 LoadedModel;
    exported: the fp32 graph when the 4-bit steps are ONNX-side."""
    side = side_of(spec)
    if side is None or (side == ONNX and exported is None):
        return {"skipped": "the recipe quantizes both the torch model and the ONNX graph: one measurement "
                "quantizes one side"}
    t0 = time.perf_counter()
    if cache is None:
        table, cached = measure_table(spec, model, data, work_dir, context, exported), False
    else:
        built = []

        def build(d: Path) -> None:
            built.append(measure_table(spec, model, data, work_dir, context, exported))
            (d / "loss_sources.json").write_text(json.dumps(built[0], indent=1, sort_keys=True) + "\n")

        entry = cache.get_or_create(CACHE_KIND, loss_sources_key(model, spec, data, side, exported), build)
        table = json.loads((entry / "loss_sources.json").read_text())
        cached = not built
    if cached:
        table["forwards"] = 0
    log.info("loss sources: %s", table["reading"])
    return {**table, "cached": cached, "seconds": round(time.perf_counter() - t0, 2)}
