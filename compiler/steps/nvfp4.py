"""Step `nvfp4`: modelopt NVFP4 (e2m1 values, blocks of 16 with e4m3 scales, fp32 global scale) on the
Linear layers' weights and inputs, calibrated on the recipe's data; exported as the TensorRT-ready graph
of modelopt's NVFP4 ONNX path (weights as FLOAT4E2M1 initializers + two DequantizeLinear, activations
through trt::TRT_FP4DynamicQuantize + two DequantizeLinear).

On the CPU, modelopt's fake-quant forward is CUDA-only; compiler.numerics.nvfp4 supplies the same
numerics for CPU tensors (install_cpu_fallback). ONNX Runtime's CPU provider cannot run FLOAT4E2M1
DequantizeLinear, so the step runs for target=torch (fake-quant module) and target=trt (the graph,
checked on the CPU with compiler.runners.reference), not target=ort.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from compiler.core.errors import BuildError
from compiler.core.formats import number_format
from compiler.graph.constants import fold_constant_subgraphs, promote_constants
from compiler.graph.io import save_onnx
from compiler.numerics.nvfp4 import install_cpu_fallback
from compiler.steps.base import TORCH, Step, StepContext, StepParams
from compiler.steps.modelopt import DEFAULT_EXCLUDE, _mtq, quantize_module

log = logging.getLogger(__name__)

NVFP4_BLOCK = 16  # fixed by the format (TensorRT's FP4 kernels and modelopt's exporter)


@dataclass
class NVFP4Params(StepParams):
    block_size: int = NVFP4_BLOCK
    # quantize the Linear inputs too (W4A4, dynamic per-block scales at run time); false: weights only
    activations: bool = True

    def problems(self) -> List[Tuple[str, str, str]]:
        if self.block_size != NVFP4_BLOCK:
            return [("block_size", f"NVFP4 uses blocks of {NVFP4_BLOCK} values (got {self.block_size})",
                     f"set block_size: {NVFP4_BLOCK}")]
        return []


def nvfp4_config(activations: bool = True) -> Dict:
    """modelopt's NVFP4_DEFAULT_CFG (weights and inputs of every quantizable layer), optionally weights only."""
    cfg = copy.deepcopy(_mtq().NVFP4_DEFAULT_CFG)
    if not activations:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": "*input_quantizer", "enable": False}]
    return cfg


def mark_for_trt_export(module) -> int:
    """What modelopt's configure_linear_module_onnx_quantizers does for the duration of its own export,
    made permanent because qcompile's export stage (not modelopt) runs torch.onnx.export: block-quantized
    weights export as trt::TRT_FP4QDQ (replaced by NVFP4QuantExporter), activations as
    trt::TRT_FP4DynamicQuantize. The attribute only affects the ONNX symbolic, not the torch forward."""
    n = 0
    for _, sub in module.named_modules():
        for attr, kind in (("input_quantizer", "dynamic"), ("output_quantizer", "dynamic"),
                           ("weight_quantizer", "static")):
            q = getattr(sub, attr, None)
            if q is not None and getattr(q, "block_sizes", None):
                q._onnx_quantizer_type = kind
                n += int(bool(getattr(q, "is_enabled", False)))
    return n


def resolve_fp4_weights(model) -> int:
    """Make every TRT_FP4QDQ read an initializer, as NVFP4QuantExporter asserts: an Identity alias of a
    (deduplicated) initializer is bypassed, a Constant is promoted; constant subgraphs were folded by the
    export stage (compiler.graph.constants) already. Returns how many inputs were changed."""
    graph = model.graph
    if not any(n.op_type == "TRT_FP4QDQ" for n in graph.node):
        return 0
    fold_constant_subgraphs(model)  # rebuilds graph.node: collect the nodes after it
    qdq = [n for n in graph.node if n.op_type == "TRT_FP4QDQ"]
    inits = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    changed, promote = 0, set()
    for node in qdq:
        src = node.input[0]
        prod = producers.get(src)
        if src in inits or prod is None:
            continue
        if prod.op_type == "Identity" and prod.input[0] in inits:
            node.input[0] = prod.input[0]
            changed += 1
        elif prod.op_type == "Constant":
            promote.add(src)
            changed += 1
    if promote:
        promote_constants(model, min_bytes=1 << 62, names=promote)
    inits = {t.name for t in graph.initializer}
    missing = [n.input[0] for n in graph.node if n.op_type == "TRT_FP4QDQ" and n.input[0] not in inits]
    if missing:
        raise BuildError(f"nvfp4 export: {len(missing)} quantized weight(s) are computed in the graph, not stored "
                         f"(first: {missing[0]}); modelopt's NVFP4 exporter needs them as initializers")
    return changed


def keep_fp32_activations(model) -> int:
    """modelopt's NVFP4 post-processing casts both inputs of every FP4 MatMul to fp16/bf16 because it
    assumes an fp16/bf16 graph (_get_precision_dtype defaults to Half); qcompile exports fp32 graphs, where
    those Casts leave a MatMul output in fp16 next to fp32 bias Adds (an invalid graph). Remove exactly
    those Casts (Cast to FLOAT16 named <input>_f16 in front of a MatMul) so the MatMul runs in the graph's
    precision; the FP4 DequantizeLinear outputs are fp32 already (fp32 scales)."""
    from onnx import TensorProto

    graph = model.graph
    consumers: Dict[str, list] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    drop = []
    for n in graph.node:
        if n.op_type != "Cast" or not n.output[0].endswith("_f16"):
            continue
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        users = consumers.get(n.output[0], [])
        if to == TensorProto.FLOAT16 and users and all(u.op_type == "MatMul" for u in users):
            for u in users:
                for i, x in enumerate(u.input):
                    if x == n.output[0]:
                        u.input[i] = n.input[0]
            drop.append(n)
    for n in drop:
        graph.node.remove(n)
    return len(drop)


def export_nvfp4_graph(onnx_path: Path, out_path: Path) -> Dict[str, int]:
    """modelopt's NVFP4 ONNX post-processing (NVFP4QuantExporter: FP4 weights + e4m3 block scales + two
    DequantizeLinear per weight) on an exported graph, written to out_path."""
    import onnx

    _mtq()  # modelopt's import-time warnings silenced once
    from modelopt.onnx.export import NVFP4QuantExporter

    model = onnx.load(str(onnx_path), load_external_data=True)
    n_qdq = sum(n.op_type == "TRT_FP4QDQ" for n in model.graph.node)
    n_dyn = sum(n.op_type == "TRT_FP4DynamicQuantize" for n in model.graph.node)
    if n_qdq == 0:
        raise BuildError("nvfp4 export: the exported graph has no trt::TRT_FP4QDQ weight node "
                         "(the quantizers were not marked for TensorRT export)")
    resolve_fp4_weights(model)
    logging.getLogger("modelopt").setLevel(logging.WARNING)
    model = NVFP4QuantExporter.process_model(model)
    casts = keep_fp32_activations(model)
    left = sum(n.op_type == "TRT_FP4QDQ" for n in model.graph.node)
    if left:
        raise BuildError(f"nvfp4 export: {left} trt::TRT_FP4QDQ node(s) left after modelopt's post-processing")
    save_onnx(model, out_path, "auto", check=True)
    return {"fp4_weights": n_qdq, "fp4_dynamic_activations": n_dyn, "fp16_casts_removed": casts}


class NVFP4Step(Step):
    name = "nvfp4"
    Params = NVFP4Params
    # not ort: ONNX Runtime's CPU provider has no FLOAT4E2M1 DequantizeLinear (nor the trt:: ops)
    runs_on = {"torch": TORCH, "trt": TORCH}
    needs_calibration = True
    summary = "modelopt NVFP4 (e2m1, block 16, e4m3 scales) W4A4 on Linear layers; TensorRT NVFP4 ONNX export"
    precision = frozenset({"nvfp4"})
    quantizes_compute = True
    # the fallback formats of mixed NVFP4 engines (compiler/core/formats.py: a sensitive layer kept at fp8 or
    # int8, modelopt presets); min_opset and its reason come from the format too (FLOAT4E2M1 and blocked
    # DequantizeLinear need opset 23)
    layer_format_choices = frozenset(number_format("nvfp4").fallbacks)

    def layers(self, module, exclude=()) -> List[str]:
        return super().layers(module, list(exclude) or list(DEFAULT_EXCLUDE))

    def apply_torch(self, model, ctx: StepContext):
        install_cpu_fallback()
        quantize_module(model, nvfp4_config(bool(self.params.activations)), ctx, layer_formats=self.layer_formats)
        marked = mark_for_trt_export(model)
        ctx.report.update({"format": "nvfp4", "block_size": NVFP4_BLOCK, "scale_format": "e4m3",
                           "activations": bool(self.params.activations), "trt_export_quantizers": marked})
        return model

    def after_export(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        counts = export_nvfp4_graph(Path(onnx_path), Path(out_path))
        log.info("[nvfp4] TensorRT NVFP4 graph: %s", counts)
        if ctx is not None:
            ctx.report.update(counts)
        return Path(out_path)
