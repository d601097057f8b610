"""A Polygraphy runner that executes an ONNX graph with `onnx.reference.ReferenceEvaluator`, including
the TensorRT custom ops (domain `trt`) that nvidia-modelopt's FP8 / NVFP4 export emits, so the exact
graph TensorRT would get can be checked on a machine without TensorRT or a GPU.

Library gaps this fills: ONNX Runtime has no kernels for the `trt::` ops and none for FLOAT4E2M1
DequantizeLinear on the CPU; Polygraphy's PluginRefRunner knows neither these ops nor the standard
ones. ReferenceEvaluator runs every standard op (FP4 / FP8 DequantizeLinear with blocks included)
exactly; the classes below add the TensorRT ops with the numerics documented by modelopt's exporters
(modelopt/torch/quantization/export_onnx.py) and compiler.numerics.nvfp4.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import ml_dtypes
import numpy as np
from onnx.reference.op_run import OpRun
from polygraphy.backend.base import BaseRunner

from compiler.core.errors import BuildError

Feed = Dict[str, np.ndarray]


def _torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32)))


def _as_fp8_bits(q: np.ndarray) -> np.ndarray:
    """TRT_FP8QuantizeLinear's output is typed uint8 in the exported graph: the e4m3fn bit pattern."""
    if q.dtype == ml_dtypes.float8_e4m3fn:
        return q
    return np.asarray(q).astype(np.uint8).view(ml_dtypes.float8_e4m3fn)


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the op's name in the graph)
    """(x, global_scale) -> (x_f4: FLOAT4E2M1, per-block scale: FLOAT8E4M3FN), blocks along `axis`.
    block_scale = e4m3(block_amax / 6 / global_scale); x_f4 = e2m1(x / (block_scale * global_scale))."""

    op_domain = "trt"

    def _run(self, x, scale, axis=-1, block_size=16, scale_type=None, **_):
        # why: numerics.nvfp4 imports torch, needed only for TensorRT FP4 ops (doctor and predict start without it)
        from compiler.numerics.nvfp4 import E2M1_MAX, E4M3_MAX, nvfp4_quantize

        axis = -1 if axis is None else int(axis)
        xt = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
        gs = float(np.asarray(scale, dtype=np.float32).reshape(-1)[0])
        # nvfp4_quantize takes the global amax; the graph carries global_scale = amax / (6 * 448)
        q, s8, _ = nvfp4_quantize(_torch(xt), gs * E2M1_MAX * E4M3_MAX, int(block_size or 16))
        q = np.moveaxis(q.numpy(), -1, axis).astype(ml_dtypes.float4_e2m1fn)
        s8 = np.moveaxis(s8.numpy(), -1, axis).astype(ml_dtypes.float8_e4m3fn)
        return q, s8


class TRT_FP4QDQ(OpRun):  # noqa: N801
    """The weight placeholder of modelopt's NVFP4 export before its post-processing replaces it with two
    DequantizeLinear nodes: fake-quant with the scales that post-processing computes."""

    op_domain = "trt"

    def _run(self, w, block_size=16, **_):
        from compiler.numerics.nvfp4 import nvfp4_weight_fake_quant  # why: torch, as above

        w = np.asarray(w)
        return (nvfp4_weight_fake_quant(_torch(w), int(block_size or 16)).numpy().astype(w.dtype),)


class TRT_FP8QuantizeLinear(OpRun):  # noqa: N801
    """(x, scale) -> e4m3fn(x / scale), saturating, as the uint8 bit pattern the exported graph declares."""

    op_domain = "trt"

    def _run(self, x, scale, **_):
        y = np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32)
        y = np.clip(y, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
        return (y.view(np.uint8),)


class TRT_FP8DequantizeLinear(OpRun):  # noqa: N801
    """(q: e4m3fn bits, scale) -> q * scale in the scale's dtype."""

    op_domain = "trt"

    def _run(self, q, scale, **_):
        scale = np.asarray(scale)
        y = _as_fp8_bits(q).astype(np.float32) * scale.astype(np.float32)
        return (y.astype(scale.dtype),)


TRT_OPS = [TRT_FP4DynamicQuantize, TRT_FP4QDQ, TRT_FP8QuantizeLinear, TRT_FP8DequantizeLinear]
TRT_OP_TYPES = {cls.__name__ for cls in TRT_OPS}


def _legacy_qdq_ops():
    """onnx.reference implements QuantizeLinear / DequantizeLinear from opset 19 on only; opset 10/13 graphs
    (ORT's quantize_static at opset 17) get the newest kernels, whose semantics are a superset of 13's
    (per-tensor or per-axis, uint8 default; blocks and float8 only when the graph asks for them)."""
    from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_25
    from onnx.reference.ops.op_quantize_linear import QuantizeLinear_25

    dq = type("DequantizeLinear", (DequantizeLinear_25,), {"op_domain": ""})
    q = type("QuantizeLinear", (QuantizeLinear_25,), {"op_domain": ""})
    return [dq, q]


def _load(onnx_path_or_model):
    import onnx

    if isinstance(onnx_path_or_model, (str, Path)):
        return onnx.load(str(onnx_path_or_model), load_external_data=True)
    return onnx_path_or_model


def make_evaluator(onnx_path_or_model):
    """ReferenceEvaluator over the graph with the TensorRT ops registered."""
    from onnx.reference import ReferenceEvaluator

    model = _load(onnx_path_or_model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    ops = TRT_OPS + (_legacy_qdq_ops() if opset < 19 else [])
    return ReferenceEvaluator(model, new_ops=ops)


def unsupported_ops(onnx_path_or_model) -> List[str]:
    """Custom-domain ops in the graph that this runner has no implementation for."""
    model = _load(onnx_path_or_model)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                   if n.domain not in ("", "ai.onnx") and not (n.domain == "trt" and n.op_type in TRT_OP_TYPES)})


class _Predictor:
    """feed -> {output name: array}, float outputs as float32; extra feed entries are ignored."""

    def __init__(self, onnx_path_or_model):
        model = _load(onnx_path_or_model)
        missing = unsupported_ops(model)
        if missing:
            raise BuildError(f"the reference runner has no implementation of {', '.join(missing)}")
        init = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in init]
        self.output_names = [o.name for o in model.graph.output]
        self._graph_inputs = model.graph
        self._sess = make_evaluator(model)

    def __call__(self, feed: Feed) -> Dict[str, np.ndarray]:
        feed = {n: np.asarray(feed[n]) for n in self.input_names}
        outs = self._sess.run(None, feed)
        result = OrderedDict()
        for name, value in zip(self.output_names, outs):
            value = np.asarray(value)
            if value.dtype.kind == "f" or value.dtype in (ml_dtypes.bfloat16,):
                value = value.astype(np.float32)
            result[name] = value
        return result


def reference_predictor(onnx_path: Union[str, Path]) -> Callable[[Feed], Dict[str, np.ndarray]]:
    """A feed -> outputs callable over the graph (what a target's predictor returns)."""
    return _Predictor(onnx_path)


class ReferenceRunner(BaseRunner):
    """Polygraphy runner over ReferenceEvaluator + the TensorRT custom ops; usable in Comparator.run."""

    def __init__(self, onnx_path: Union[str, Path], name: Optional[str] = None):
        super().__init__(name=name, prefix="onnx-reference-runner")
        self._onnx_path = onnx_path
        self._predict: Optional[_Predictor] = None

    def activate_impl(self):
        self._predict = _Predictor(self._onnx_path)

    def get_input_metadata_impl(self):
        from polygraphy.backend.onnx.util import get_input_metadata

        return get_input_metadata(self._predict._graph_inputs)

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        out = self._predict(feed_dict)
        self.inference_time = time.perf_counter() - start
        return out

    def deactivate_impl(self):
        self._predict = None
