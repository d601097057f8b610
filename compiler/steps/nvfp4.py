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
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from compiler.core.errors import BuildError, RecipeError
from compiler.core.formats import number_format
from compiler.graph.constants import fold_constant_subgraphs, promote_constants
from compiler.graph.io import save_onnx
from compiler.numerics.nvfp4 import (
    E2M1_MAX,
    E4M3_MAX,
    FixedScaleFP4QDQ,
    install_cpu_fallback,
    nvfp4_fake_quant_with_scales,
    nvfp4_quantize,
    nvfp4_static_scales,
)
from compiler.steps.base import ACTIVATIONS, TORCH, WEIGHTS, Step, StepContext, StepParams
from compiler.steps.modelopt import DEFAULT_EXCLUDE, _mtq, quantize_module
from compiler.steps.torchao_kernels import NoKernel, fake_quant_report

log = logging.getLogger(__name__)

NVFP4_BLOCK = 16  # fixed by the format (TensorRT's FP4 kernels and modelopt's exporter)


# The weight-rounding calibrations, by the name a recipe gives (`algorithm:`), each modelopt 0.47's own preset:
# its weight quantizer (dynamic or static per-block scales) and its calibration algorithm. The input quantizers
# are the step's (W4A4 dynamic, or off with activations: false) whatever the preset.
#   max            NVFP4_DEFAULT_CFG: block scales from each block's max (today's default)
#   awq_lite       NVFP4_AWQ_LITE_CFG: per-input-channel scales searched on the calibration activations (AWQ),
#                  folded into the weights and a Mul in front of the input quantizer
#   awq_clip       NVFP4_AWQ_CLIP_CFG: the weight's clipping range searched to minimize the layer output error
#   awq_full       NVFP4_AWQ_FULL_CFG: awq_lite then awq_clip
#   mse            NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG: each block's e4m3 scale chosen among all 128 to minimize
#                  the weight's squared error
#   four_over_six  NVFP4_FOUR_OVER_SIX_CFG: each block scaled to max 4 or 6, whichever errs less
#   local_hessian  NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG: the mse sweep weighted by the block's input Hessian
#                  (output error instead of weight error)
#   gptq           NVFP4_DEFAULT_CFG's quantizers with modelopt's GPTQ algorithm (GPTQCalibConfig; it has no
#                  NVFP4 preset): layer by layer, weights rounded column by column with the rounding error
#                  spread over the columns not yet rounded (second-order, from the inputs' Hessian)
# All of them run on the CPU through compiler.numerics.nvfp4.install_cpu_fallback (the dynamic and the static
# block kernels are CUDA / Triton only in modelopt 0.47); fix_weight_scales carries their result into the graph.
ALGORITHMS: Dict[str, Tuple[str, Optional[Dict]]] = {
    "max": ("NVFP4_DEFAULT_CFG", None),
    "awq_lite": ("NVFP4_AWQ_LITE_CFG", None),
    "awq_clip": ("NVFP4_AWQ_CLIP_CFG", None),
    "awq_full": ("NVFP4_AWQ_FULL_CFG", None),
    "mse": ("NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", None),
    "four_over_six": ("NVFP4_FOUR_OVER_SIX_CFG", None),
    "local_hessian": ("NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", None),
    "gptq": ("NVFP4_DEFAULT_CFG", {"method": "gptq"}),
}


@dataclass
class NVFP4Params(StepParams):
    block_size: int = NVFP4_BLOCK
    # quantize the Linear inputs too (W4A4, dynamic per-block scales at run time); false: weights only
    activations: bool = True
    # how the weights' scales are chosen (ALGORITHMS); max keeps the build of before this parameter existed
    algorithm: str = "max"

    def problems(self) -> List[Tuple[str, str, str]]:
        out = []
        if self.block_size != NVFP4_BLOCK:
            out.append(("block_size", f"NVFP4 uses blocks of {NVFP4_BLOCK} values (got {self.block_size})",
                        f"set block_size: {NVFP4_BLOCK}"))
        if self.algorithm not in ALGORITHMS:
            out.append(("algorithm", f"nvfp4 has no calibration algorithm {self.algorithm!r}",
                        f"use one of {list(ALGORITHMS)}"))
        return out


def nvfp4_config(activations: bool = True, algorithm: str = "max", weights: bool = True) -> Dict:
    """modelopt's NVFP4 preset for a calibration algorithm (ALGORITHMS; weights and inputs of every quantizable
    layer), optionally weights only or (weights=False) inputs only."""
    preset, override = ALGORITHMS[algorithm]
    cfg = copy.deepcopy(getattr(_mtq(), preset))
    if override is not None:
        cfg["algorithm"] = copy.deepcopy(override)
    if not activations:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": "*input_quantizer", "enable": False}]
    if not weights:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": "*weight_quantizer", "enable": False}]
    return cfg


FIXED_SCALES_BACKEND = "qcompile_nvfp4_fixed_scales"


def _fixed_scales_entrypoint(inputs, quantizer):
    return FixedScaleFP4QDQ.apply(inputs, quantizer._qc_scale_e4m3, quantizer._qc_global_scale, NVFP4_BLOCK)


def _is_nvfp4_quantizer(q) -> bool:
    """An enabled quantizer of the NVFP4 element format (e2m1: num_bits (2, 1))."""
    bits = getattr(q, "num_bits", None)
    return bool(getattr(q, "is_enabled", False)) and tuple(bits if isinstance(bits, (list, tuple)) else ()) == (2, 1)


def fix_weight_scales(module, keep_float_weights: bool = False,
                      trained_scales: Optional[Dict[str, Tuple]] = None) -> int:
    """Make every enabled NVFP4 weight quantizer's calibrated rounding part of the model, for export.

    modelopt's NVFP4 ONNX path recomputes max scales from the weight (NVFP4QuantExporter.compute_scales) and
    its static per-block quantizer has no ONNX export, so what awq_clip / mse / four_over_six / local_hessian
    chose (and the clipped global amax of awq) would be lost in the graph. For each weight this computes the
    scales the torch fake-quant uses (compiler.numerics.nvfp4, the same numbers as modelopt's kernels), checks
    that they reproduce the calibrated quantizer's output exactly, stores the rounded weight in the Linear and
    replaces the quantizer by a modelopt TensorQuantizer on a registered backend (FixedScaleFP4QDQ) holding
    those scales as buffers: its forward gives the same numbers, its export is trt::TRT_FP4QDQ(weight, scales,
    global scale), which export_nvfp4_graph hands to modelopt's exporter. Returns how many weights.

    keep_float_weights: leave the float weight in the Linear (the fixed-scale quantizer rounds it at every forward
    to the same numbers) for a training step to start from; it rounds them before export (distill.finalize). A
    rounded weight sits on a grid point, half a grid step from any rounding boundary, where straight-through
    training barely moves it: MiniLM, local_hessian + nvfp4_distill's training, 0.9709 -> 0.9780 from the rounded
    weights, -> 0.9829 from the float ones (docs/accuracy.md).

    trained_scales: {layer name: (per-block e4m3 scales, global scale)} a training ran those layers' weights
    under (take_trained_state): they replace what this calibration chose, so the trained weights are rounded as
    the training rounded them."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules import tensor_quantizer as tq
    from modelopt.torch.quantization.utils.numeric_utils import fp8_max_for_normalization

    if not tq.is_registered_quant_backend(FIXED_SCALES_BACKEND):
        tq.register_quant_backend(FIXED_SCALES_BACKEND, _fixed_scales_entrypoint)
    n = 0
    for name, sub in list(module.named_modules()):
        wq = getattr(sub, "weight_quantizer", None)
        weight = getattr(sub, "weight", None)
        if not isinstance(wq, TensorQuantizer) or weight is None:
            continue
        if not _is_nvfp4_quantizer(wq) or getattr(wq, "backend", None) == FIXED_SCALES_BACKEND:
            continue  # a layer given int8 / fp8 by the layer map keeps its own quantizer
        with torch.no_grad():
            w = weight.detach().float()
            if trained_scales and name in trained_scales:
                s8, gs = (torch.as_tensor(t, dtype=torch.float32) for t in trained_scales[name])
                got = nvfp4_fake_quant_with_scales(w, s8, gs, NVFP4_BLOCK)
                _install_fixed_quantizer(sub, weight, got, s8, float(gs), keep_float_weights)
                n += 1
                continue
            want = wq(weight.detach()).float()
            amax = wq.amax
            if amax is not None and amax.numel() > 1:  # static: one amax per block, chosen by the calibration
                s8, gs = nvfp4_static_scales(amax.reshape(-1), getattr(wq, "global_amax", None),
                                             fp8_max_for_normalization(wq))
                s8 = s8.reshape(*w.shape[:-1], -1)
            else:  # dynamic blocks under a (possibly clipped) global amax
                _, s8, gs = nvfp4_quantize(w, amax, NVFP4_BLOCK)
            got = nvfp4_fake_quant_with_scales(w, s8, gs, NVFP4_BLOCK)
            if not torch.equal(got, want):
                diff = float((got - want).abs().max())
                raise BuildError(f"nvfp4: the scales recomputed for {name} do not reproduce its calibrated "
                                 f"fake-quant (max difference {diff:.3g}); cannot export them")
            _install_fixed_quantizer(sub, weight, got, s8, gs, keep_float_weights)
            n += 1
    return n


def _install_fixed_quantizer(sub, weight, rounded, s8, gs, keep_float_weights: bool) -> None:
    """sub's weight quantizer becomes a fixed-scale one holding (s8, gs); the weight becomes `rounded` unless
    keep_float_weights."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    if not keep_float_weights:
        weight.data.copy_(rounded.to(weight.dtype))
    fixed = TensorQuantizer()
    fixed.set_from_attribute_config({"num_bits": (2, 1), "backend": FIXED_SCALES_BACKEND,
                                     "block_sizes": {-1: NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)}})
    fixed.register_buffer("_amax", torch.as_tensor(gs * E2M1_MAX * E4M3_MAX, dtype=torch.float32))
    fixed.register_buffer("_qc_scale_e4m3", s8.float().contiguous())
    fixed.register_buffer("_qc_global_scale", torch.as_tensor(gs, dtype=torch.float32).reshape(()))
    fixed.disable_calib()
    fixed.enable_quant()
    sub.weight_quantizer = fixed


# What train_before_repair carries from a trained NVFP4 Linear to the fp32 model's Linear that takes its weights
# (NVFP4Step.carry_trained_state), as buffers apply_torch takes off before modelopt converts the module: the
# weight's fixed block scales and global scale, and the input quantizer's calibrated amax (its global scale).
TRAINED_BUFFERS = ("qc_trained_scale_e4m3", "qc_trained_global_scale", "qc_trained_input_amax")

# The algorithms whose calibration only chooses the weights' scales: with those carried from the training, the
# step run again on the trained weights quantizes them as the training did. Not the awq ones (they fold
# per-channel scales into the weights, which a second run would fold again) nor gptq (its weights are its rounding).
SCALE_ONLY_ALGORITHMS = ("max", "mse", "four_over_six", "local_hessian")


def take_trained_state(module) -> Dict[str, Dict[str, object]]:
    """Remove the TRAINED_BUFFERS from every submodule: {module name: {buffer name: tensor}}."""
    out: Dict[str, Dict[str, object]] = {}
    for name, sub in module.named_modules():
        got = {b: sub._buffers.pop(b) for b in TRAINED_BUFFERS if b in sub._buffers}
        if got:
            out[name] = got
    return out


def set_trained_input_amax(module, trained: Dict[str, Dict[str, object]]) -> int:
    """The NVFP4 input quantizers of the layers in `trained` get the amax the training ran with (a layer the
    repair map gave another format keeps its own calibration). Returns how many."""
    n = 0
    for name, bufs in trained.items():
        iq = getattr(module.get_submodule(name), "input_quantizer", None)
        if "qc_trained_input_amax" in bufs and _is_nvfp4_quantizer(iq):
            iq.amax = bufs["qc_trained_input_amax"].clone()
            n += 1
    return n


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


def take_carried_scales(model) -> Dict[str, Tuple]:
    """The scales a calibration chose, carried by TRT_FP4QDQ(weight, scale_e4m3, global_scale) nodes
    (compiler.numerics.nvfp4.FixedScaleFP4QDQ): {node output: (per-block e4m3 scales, global scale)}. The two
    extra inputs are removed from the nodes (and their tensors from the graph when nothing else reads them),
    leaving the one-input node modelopt's exporter expects."""
    from onnx import numpy_helper

    graph = model.graph
    qdq = [n for n in graph.node if n.op_type == "TRT_FP4QDQ" and len(n.input) == 3]
    if not qdq:
        return {}
    consts = {n.output[0] for n in graph.node if n.op_type == "Constant"}
    extra = {x for n in qdq for x in n.input[1:] if x in consts}
    if extra:
        promote_constants(model, min_bytes=1 << 62, names=extra)
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out, names = {}, set()
    for node in qdq:
        for i in (1, 2):  # an Identity alias of a deduplicated initializer
            prod = producers.get(node.input[i])
            if prod is not None and prod.op_type == "Identity" and prod.input[0] in inits:
                node.input[i] = prod.input[0]
        missing = [x for x in node.input[1:] if x not in inits]
        if missing:
            raise BuildError(f"nvfp4 export: the calibrated scales of {node.input[0]} are computed in the graph, "
                             f"not stored (first: {missing[0]})")
        s8 = numpy_helper.to_array(inits[node.input[1]]).astype("float32")
        gs = numpy_helper.to_array(inits[node.input[2]]).astype("float32").reshape(())
        out[node.output[0]] = (s8, gs)
        names.update(node.input[1:])
        del node.input[1:]
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name in names and t.name not in used]:
        graph.initializer.remove(t)
    return out


def set_carried_scales(model, carried: Dict[str, Tuple]) -> None:
    """Replace the max scales NVFP4QuantExporter.compute_scales stored on each TRT_FP4QDQ node (attributes
    _sw_f32_per_tensor, _sw_f32_per_block) by the carried ones; compress_weights then casts the weight
    with them (the block scales are e4m3 values already, so its e4m3 cast keeps them; a zero block scale
    becomes 2**-9 there, harmless because the stored weight of that block is zero)."""
    for node in model.graph.node:
        if node.op_type != "TRT_FP4QDQ" or node.output[0] not in carried:
            continue
        s8, gs = carried[node.output[0]]
        for attr in node.attribute:
            if attr.name == "_sw_f32_per_tensor":
                del attr.floats[:]
                attr.floats.extend([float(gs)])
            elif attr.name == "_sw_f32_per_block":
                del attr.floats[:]
                attr.floats.extend(s8.reshape(-1).tolist())
            elif attr.name == "_sw_f32_per_block_shape":
                del attr.ints[:]
                attr.ints.extend(list(s8.shape))


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
    carried = take_carried_scales(model)
    logging.getLogger("modelopt").setLevel(logging.WARNING)
    # NVFP4QuantExporter.process_model's four phases, with the calibrated scales put in after compute_scales
    model = NVFP4QuantExporter.pre_process(model)
    model = NVFP4QuantExporter.compute_scales(model)
    set_carried_scales(model, carried)
    model = NVFP4QuantExporter.compress_weights(model)
    model = NVFP4QuantExporter.post_process(model)
    casts = keep_fp32_activations(model)
    left = sum(n.op_type == "TRT_FP4QDQ" for n in model.graph.node)
    if left:
        raise BuildError(f"nvfp4 export: {left} trt::TRT_FP4QDQ node(s) left after modelopt's post-processing")
    save_onnx(model, out_path, "auto", check=True)
    counts = {"fp4_weights": n_qdq, "fp4_dynamic_activations": n_dyn, "fp16_casts_removed": casts}
    if carried:
        counts["fp4_calibrated_scales"] = len(carried)
    return counts


class NVFP4Step(Step):
    name = "nvfp4"
    Params = NVFP4Params
    # not ort: ONNX Runtime's CPU provider has no FLOAT4E2M1 DequantizeLinear (nor the trt:: ops)
    runs_on = {"torch": TORCH, "trt": TORCH}
    needs_calibration = True
    summary = "modelopt NVFP4 (e2m1, block 16, e4m3 scales) W4A4 on Linear layers; TensorRT NVFP4 ONNX export"
    precision = frozenset({"nvfp4"})
    trainable_fake_quant = True  # its torch side: modelopt TensorQuantizers (distill trains them)
    quantizes_compute = True
    # the fallback formats of mixed NVFP4 engines (compiler/core/formats.py: a sensitive layer kept at fp8 or
    # int8, modelopt presets); min_opset and its reason come from the format too (FLOAT4E2M1 and blocked
    # DequantizeLinear need opset 23)
    layer_format_choices = frozenset(number_format("nvfp4").fallbacks)
    # weights off: only with_operands makes such a copy (the loss-sources table's activation-only row)
    quantize_weights = True

    # max: each block's own max, at every forward; the others' fixed scales are carried (carry_trained_state)
    algorithms_requantized_as_trained = SCALE_ONLY_ALGORITHMS

    def carry_trained_state(self, plain, trained) -> None:
        wq, iq = getattr(trained, "weight_quantizer", None), getattr(trained, "input_quantizer", None)
        if getattr(wq, "backend", None) == FIXED_SCALES_BACKEND:
            plain.register_buffer("qc_trained_scale_e4m3", wq._qc_scale_e4m3.detach().clone())
            plain.register_buffer("qc_trained_global_scale", wq._qc_global_scale.detach().clone())
        if _is_nvfp4_quantizer(iq) and iq.amax is not None:
            plain.register_buffer("qc_trained_input_amax", iq.amax.detach().clone())

    def quantized_operands(self):
        return frozenset({WEIGHTS} if self.quantize_weights else set()) | (
            {ACTIVATIONS} if bool(self.params.activations) else set())

    def with_operands(self, weights: bool, activations: bool):
        """Weights only: activations=False, the step's algorithm. Inputs only: the weights kept fp32 and max
        calibration of the inputs' global scales (the algorithms choose weight scales: with fp32 weights there
        is nothing for them to choose)."""
        if activations and not bool(self.params.activations) or not (weights or activations):
            return None
        out = copy.copy(self)
        out.params = dataclasses.replace(self.params, activations=bool(activations),
                                         algorithm=self.params.algorithm if weights else "max")
        out.quantize_weights = bool(weights)
        return out

    def validate_export(self, export_cfg, target) -> None:
        super().validate_export(export_cfg, target)
        if str(self.params.algorithm) != "max" and str(getattr(export_cfg, "exporter", "")) == "dynamo":
            # the dynamo route (compiler/steps/modelopt_dynamo.py) exports every NVFP4 weight as a one-input
            # fp4_qdq, whose scales modelopt's exporter recomputes by max: the calibrated ones would be lost
            raise RecipeError(f"{self.key}.algorithm", f"{self.params.algorithm} cannot reach the graph through "
                              "export.exporter=dynamo (its NVFP4 weights export with max scales)",
                              f"use export.exporter=torchscript, or {self.key}.algorithm=max")

    def layers(self, module, exclude=()) -> List[str]:
        return super().layers(module, list(exclude) or list(DEFAULT_EXCLUDE))

    def torch_kernel(self) -> NoKernel:
        return NoKernel("nvfp4: torchao 0.18's NVFP4 tensor runs on Blackwell GPUs (sm100) only; there is no CPU "
                        "4-bit float matrix product")

    def apply_torch(self, model, ctx: StepContext):
        install_cpu_fallback()
        algorithm = str(self.params.algorithm)
        trained = take_trained_state(model)  # what a training before a repair ran with (carry_trained_state)
        quantize_module(model, nvfp4_config(bool(self.params.activations), algorithm, self.quantize_weights), ctx,
                        layer_formats=self.layer_formats)
        trained_scales = {n: (b["qc_trained_scale_e4m3"], b["qc_trained_global_scale"])
                          for n, b in trained.items() if "qc_trained_scale_e4m3" in b}
        fixed = (fix_weight_scales(model, keep_float_weights=ctx.training_follows, trained_scales=trained_scales)
                 if algorithm != "max" or trained_scales else 0)
        if trained:  # the layers still NVFP4 quantize as the training ran them, not as this calibration chose
            ctx.report["trained_scales"] = {
                "input_amax": set_trained_input_amax(model, trained),
                "weight_scales": sum(_is_nvfp4_quantizer(getattr(model.get_submodule(n), "weight_quantizer", None))
                                     for n in trained_scales)}
        marked = mark_for_trt_export(model)
        ctx.report.update({"format": "nvfp4", "block_size": NVFP4_BLOCK, "scale_format": "e4m3",
                           "activations": bool(self.params.activations), "trt_export_quantizers": marked})
        if algorithm != "max":  # the default build's report keeps its keys
            ctx.report.update({"algorithm": algorithm, "preset": ALGORITHMS[algorithm][0], "fixed_scale_weights": fixed})
            if ctx.training_follows:
                ctx.report["float_weights_for_training"] = fixed  # rounded by the training step's finalize
        if not ctx.target.runs_onnx:
            ctx.report.update(fake_quant_report(self.torch_kernel().reason))
        return model

    def after_export(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        counts = export_nvfp4_graph(Path(onnx_path), Path(out_path))
        log.info("[nvfp4] TensorRT NVFP4 graph: %s", counts)
        if ctx is not None:
            ctx.report.update(counts)
        return Path(out_path)
