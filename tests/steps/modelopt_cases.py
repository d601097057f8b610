"""Shared machinery of the modelopt step tests (int8, int8_smoothquant, int8_weight_only, fp8): quantize a
tiny model with a step, export it the way the pipeline does, run the graph in ONNX Runtime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch

from compiler.core.schema import ExportConfig
from compiler.stages.export import export_onnx
from compiler.steps.base import STEP_REGISTRY, StepContext, load_all_steps


def caps(target: str):
    """The declared capabilities of a target (what a StepContext carries), by its name."""
    from targets.base import get_target

    return get_target(target).capabilities


def make_step(name: str, **params):
    load_all_steps()
    cls = STEP_REGISTRY[name]
    return cls(cls.Params(**params))


def context(model, data, target: str = "ort", opset: int = 17, exclude=None, work_dir=None) -> StepContext:
    from tests.conftest import model_cfg  # noqa: F401  (only to fail loudly if run outside the test tree)

    return StepContext(target=caps(target), model_info=model.info, calibration=data.calibration if data is not None else None, work_dir=work_dir,
                       exclude=list(exclude if exclude is not None else _model_exclude(model)), opset=opset)


def _model_exclude(model) -> list[str]:
    from tests.conftest import model_exclude

    return model_exclude(model)


def quantize(step, model, data, **ctx_kw) -> tuple[torch.nn.Module, StepContext]:
    ctx = context(model, data, **ctx_kw)
    module = step.apply_torch(copy.deepcopy(model.module), ctx)
    return module, ctx


def torch_outputs(module, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in module(*[torch.from_numpy(v) for v in feed.values()])]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||: the error of a relative to the reference b."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def export(step, module, model, tmp_path: Path, target: str = "ort", opset: int = 17, data=None) -> Path:
    """Export as the pipeline does (legacy exporter) and run the step's after_export hook."""
    raw = export_onnx(module, model.input_names, model.output_names, tmp_path / "export.onnx",
                      ExportConfig(opset=opset))
    ctx = StepContext(target=caps(target), model_info=model.info, calibration=None, work_dir=tmp_path, opset=opset)
    return Path(step.after_export(raw, tmp_path / "after_export.onnx", ctx))


def ort_outputs(path: Path, feed, optimize: bool = False) -> list[np.ndarray]:
    """optimize=False runs the graph as written (the Q/DQ reference semantics); True is what target=ort
    runs (graph_optimization=all: ORT fuses Q/DQ + MatMul into integer kernels)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def weight_dq_initializer_types(path: Path) -> dict[str, int]:
    """Element types of the initializers that feed a DequantizeLinear directly (stored quantized weights)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            name = onnx.TensorProto.DataType.Name(inits[node.input[0]])
            counts[name] = counts.get(name, 0) + 1
    return counts


def eval_feed(data, n: int = 16):
    return next(data.evaluation.batches(n))
