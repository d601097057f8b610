"""int8_static: static int8 Q/DQ quantization of the exported graph with onnxruntime.quantization, calibrated
on the recipe's calibration data (on target=torch it hands over to the modelopt W8A8 `int8` step)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, RecipeError
from compiler.core.hashing import onnx_sha256
from compiler.graph.io import needs_external_data
from compiler.graph.qdq_ort import activation_products, float_consumers_read_float, fuse_matmul_bias
from compiler.runners.sessions import ort_session
from compiler.steps.base import (
    ACTIVATIONS,
    CALIBRATION_METHODS,
    ONNX,
    TORCH,
    WEIGHTS,
    ModelInfo,
    Step,
    StepContext,
    StepParams,
)
from compiler.steps.modelopt import (
    CALIBRATED_STATIC_REASON,
    exclude_patterns,
    quantize_module,
    store_int8_weights,
)
from compiler.steps.ort_quant import (
    FeaturesReader,
    activation_gathers,
    check_ops_match,
    exclude_nodes,
    layer_nodes,
    linear_ops_found,
    ort_calibration_method,
    preprocess,
    quantized_coverage,
    quantized_gathers,
    quietly,
)
from compiler.steps.torchao_kernels import NoKernel, fake_quant_report

log = logging.getLogger(__name__)

QUANT_TYPES = ("uint8", "int8")


@dataclass
class Params(StepParams):
    calibration: str = "minmax"  # minmax | entropy | percentile
    # per-output-channel weight scales. MiniLM (minmax, 64 calibration / 128 evaluation sentences, mean
    # embedding cosine; recipes/recipe/int8_static.yaml): 0.916 per tensor -> 0.938 per channel with Q/DQ on
    # the MatMul outputs, 0.989 per channel without them; tiny models 0.9999 either way
    per_channel: bool = True
    # U8S8 by default: signed activations (S8S8) make ORT reject ModernBERT graphs at opset >= 21 and run
    # slower on AVX2 CPUs (FIELD_NOTES). auto = uint8 on ort, int8 (symmetric) on trt, which needs zero point 0
    activation_type: str = "auto"
    weight_type: str = "int8"
    # the exporter writes nn.Linear as MatMul (+Add); other exporters and models emit Gemm: quantize both.
    # Adding Gather stores embedding tables int8 (weight-only: Gathers of activations are left alone); on
    # MiniLM that is 3.9x smaller than fp32 instead of 1.5x, at the same accuracy. Not on target=trt.
    op_types_to_quantize: list[str] = field(default_factory=lambda: ["MatMul", "Gemm"])
    # module-name (or node-name) patterns kept fp32 on top of model.exclude, e.g. "*layer.0.output.dense";
    # model.exclude applies to the linear ops only (its "*embeddings*" is about compute, not table storage)
    exclude: list[str] = field(default_factory=list)
    # target=ort: the patterns kept fp32 there instead of `exclude` (None: `exclude` on every target). Where
    # onnxruntime runs the graph its passes keep the residual path float (keep_float_path), which holds accuracy
    # without the exclude a TensorRT graph or modelopt's W8A8 need; a layer kept fp32 there is an fp32 MatMul
    # in an int8 graph (MiniLM's ffn_down[0]: 8% of the batch-1 time, docs/speed.md)
    exclude_on_ort: list[str] | None = None
    # histogram bins for entropy / percentile; None: 512 for entropy, 2048 for percentile. ORT's own entropy
    # default (128 bins, 128 quantized bins) leaves one candidate threshold, i.e. MinMax. Entropy's search costs
    # ~bins^2: on 2 cores 2048 bins took ~60 s for a 2-layer model's 32 tensors, 512 bins ~6 s.
    num_bins: int | None = None
    num_quantized_bins: int = 128  # entropy: bins of the quantized distribution
    percentile: float = 99.999
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI that saturate u8*s8 pairs
    # Q/DQ on the MatMul/Gemm outputs too. ORT's QDQ quantizer does that by default, which on MiniLM puts a
    # u8 Q/DQ with range [-3, 196] (the [CLS] token's massive activation) on every FFN output: mean embedding
    # cosine 0.938 with, 0.989 without. ORT (MatMulIntegerToFloat) and TensorRT need Q/DQ on inputs only.
    quantize_outputs: bool = False
    preprocess: bool = True  # onnxruntime's quant_pre_process (shape inference + basic optimizations)
    # The next three apply where onnxruntime runs the graph (target=ort); a TensorRT graph keeps ORT's
    # quantizer output. Measured on MiniLM (docs/speed.md, "int8_static on ORT"; /work/notes/int8speed.md),
    # one thread, same run, thread CPU time, ratio to ORT fp32, load 8-10 on 2 cores:
    #   quantizer output as before                                 1.30-1.45x   cosine 0.9906
    #   + float ops read the float tensor (keep_float_path)        (alone: same speed)  0.9943
    #   + attention products fp32 (quantize_activation_products)   (alone: +5%)  0.9945
    #   + bias Add fused into MatMulIntegerToFloat (fuse_bias)     1.52-1.67x (int8_dynamic 1.51-1.71x)
    # Q/DQ on the attention products (query x key, probabilities x value) costs more than their int8 kernels
    # save at seq 128: each needs a QuantizeLinear per operand, the softmax scale Mul no longer fuses
    # (FusedMatMul) and one of the two requantizes (QLinearMatMul).
    quantize_activation_products: bool = False
    # float consumers of a quantized tensor (residual Adds, SkipLayerNormalization, Shape) read the float
    # tensor, not its Q/DQ copy (compiler/graph/qdq_ort.py: float_consumers_read_float)
    keep_float_path: bool = True
    # MatMul + bias Add -> one MatMulIntegerToFloat with its bias (onnxruntime's contrib op; fuse_matmul_bias)
    fuse_bias: bool = True

    def problems(self) -> list[tuple[str, str, str]]:
        """(field, what is wrong, what would work) for each bad value (compiler.steps.base.StepParams)."""
        out = []
        if self.calibration not in CALIBRATION_METHODS:
            out.append(("calibration", f"unknown method {self.calibration!r}", f"use one of {', '.join(CALIBRATION_METHODS)}"))
        if self.activation_type not in QUANT_TYPES + ("auto",):
            out.append(("activation_type", f"bad value {self.activation_type!r}", "use auto, uint8 or int8"))
        if self.weight_type not in QUANT_TYPES:
            out.append(("weight_type", f"bad value {self.weight_type!r}", "use int8 or uint8"))
        if not self.op_types_to_quantize:
            out.append(("op_types_to_quantize", "is empty", "use e.g. [MatMul, Gemm]"))
        if self.num_bins is not None and not self.num_quantized_bins <= self.num_bins:
            out.append(("num_bins", f"{self.num_bins} is below num_quantized_bins ({self.num_quantized_bins})",
                        "use e.g. 512 or 2048, or null for the method's default"))
        if self.num_quantized_bins < 2:
            out.append(("num_quantized_bins", f"{self.num_quantized_bins} is below 2", "use e.g. 128"))
        if not 0.0 < self.percentile <= 100.0:
            out.append(("percentile", f"{self.percentile} is not in (0, 100]", "use e.g. 99.999"))
        return out

    @property
    def bins(self) -> int:
        if self.num_bins is not None:
            return int(self.num_bins)
        return 512 if self.calibration == "entropy" else 2048


def resolved_activation_type(params: Params, target: TargetCapabilities) -> str:
    if params.activation_type != "auto":
        return params.activation_type
    return "int8" if target.symmetric_int8_only else "uint8"


# ---------------------------------------------------------------------------------------------------------------
# calibration


def calibrator_options(params: Params) -> dict[str, Any]:
    """extra_options for create_calibrator. quantize_static cannot pass num_bins (FIELD_NOTES: its entropy
    silently equals MinMax), which is why this step runs the calibrator itself."""
    if params.calibration == "entropy":
        return {"num_bins": params.bins, "num_quantized_bins": int(params.num_quantized_bins)}
    if params.calibration == "percentile":
        return {"num_bins": params.bins, "percentile": float(params.percentile)}
    return {}


def compute_ranges(onnx_path: Path, features, params: Params, batch_size: int, work_dir: Path,
                   op_types: list[str] | None = None):
    """Calibration: activation ranges (onnxruntime TensorsData) of the op_types_to_quantize tensors."""
    import onnx
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator

    input_names = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    reader = FeaturesReader(features, input_names, batch_size, label=f"calibration ({params.calibration})")
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="calib.") as tmp:
        calibrator = quietly(create_calibrator, Path(onnx_path), list(op_types or params.op_types_to_quantize),
                              augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                              calibrate_method=ort_calibration_method(params.calibration),
                              use_external_data_format=needs_external_data(Path(onnx_path)),
                              extra_options=calibrator_options(params))
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    if not isinstance(ranges, TensorsData):
        raise BuildError(f"onnxruntime calibrator returned {type(ranges).__name__}, not TensorsData")
    return ranges


def calibration_key(graph_sha256: str, features, params: Params, batch_size: int, preprocessed: str,
                    op_types: list[str]) -> dict:
    """Everything that determines the ranges (StepContext.cache contract: the full inputs, never a prefix)."""
    import onnxruntime

    return {"graph_sha256": graph_sha256, "calibration_sha256": features.sha256(), "samples": len(features),
            "method": params.calibration, "options": calibrator_options(params),
            "op_types": sorted(op_types), "batch_size": int(batch_size),
            "preprocess": preprocessed, "onnxruntime": onnxruntime.__version__}


def ranges_file(onnx_path: Path, features, params: Params, batch_size: int, ctx: StepContext,
                report: dict[str, Any], op_types: list[str]) -> Path:
    """A calibration-cache JSON (onnxruntime save_tensors_data format) for onnx_path, from ctx.cache when
    one is configured, else computed into the work directory."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    work_dir = Path(ctx.work_dir or tempfile.mkdtemp(prefix="qcompile."))
    work_dir.mkdir(parents=True, exist_ok=True)

    def build(dest: Path) -> None:
        report["calibration_cache"] = "miss"
        ranges = compute_ranges(onnx_path, features, params, batch_size, work_dir, op_types)
        save_tensors_data(ranges, Path(dest) / "ranges.json")

    if ctx.cache is not None:
        report["calibration_cache"] = "hit"
        key = calibration_key(onnx_sha256(onnx_path), features, params, batch_size, report.get("preprocess", ""),
                              op_types)
        return Path(ctx.cache.get_or_create("ort_calibration", key, build)) / "ranges.json"
    dest = Path(tempfile.mkdtemp(dir=work_dir, prefix="ranges."))
    build(dest)
    report.pop("calibration_cache", None)
    return dest / "ranges.json"


# ---------------------------------------------------------------------------------------------------------------
# the step


class Int8StaticStep(Step):
    name = "int8_static"
    Params = Params
    runs_on = {"ort": ONNX, "trt": ONNX, "torch": TORCH}
    needs_calibration = True
    summary = ("static int8: onnxruntime quantize_static Q/DQ (MatMul+Gemm, minmax/entropy/percentile) on ONNX "
               "targets; modelopt W8A8 on torch, run as int8 x int8 products (CPU)")

    precision = frozenset({"int8"})
    quantizes_compute = True
    operands = frozenset({WEIGHTS, ACTIVATIONS})

    def own_exclude(self) -> list[str]:
        return list(self.params.exclude)

    def for_target(self, target: TargetCapabilities) -> Int8StaticStep:
        """On an onnxruntime session target, exclude_on_ort (where set) replaces exclude."""
        if not target.ort_session or self.params.exclude_on_ort is None:
            return self
        out = copy.copy(self)
        out.params = dataclasses.replace(self.params, exclude=list(self.params.exclude_on_ort))
        return out

    def validate(self, info: ModelInfo, target: TargetCapabilities) -> None:
        super().validate(info, target)
        if target.symmetric_int8_only and resolved_activation_type(self.params, target) == "uint8":
            raise RecipeError(f"{self.key}.activation_type", f"uint8 activations are not runnable on "
                              f"target={target.name} (its explicit quantization needs symmetric int8, zero point 0)",
                              "use activation_type=auto or int8")

    # -- torch: modelopt W8A8 (the same numerics as the `int8` step, calibration methods named alike) --------
    def apply_torch(self, model, ctx: StepContext):
        import torch

        p = self.params
        torch.manual_seed(ctx.seed)
        out = quantize_module(model, "int8", ctx, calibration=p.calibration,
                              percentile=float(p.percentile) if p.calibration == "percentile" else 99.99,
                              exclude=exclude_patterns(ctx) + list(p.exclude),
                              layer_formats=self.layer_formats)
        # the report names the numerics as before: the `int8` step's (modelopt W8A8, INT8_DEFAULT_CFG)
        ctx.report.setdefault("delegated_to", f"int8 (modelopt W8A8, calibration={p.calibration})")
        if not ctx.target.runs_onnx:
            ctx.report.update(fake_quant_report(self.torch_kernel().reason))
        return out

    def torch_kernel(self) -> NoKernel:
        return NoKernel(CALIBRATED_STATIC_REASON)

    def after_export(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        return store_int8_weights(onnx_path, out_path, self.name)

    # -- ONNX: onnxruntime quantize_static ------------------------------------------------------------------
    def apply_onnx(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        p = self.params
        report = ctx.report
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise BuildError(f"{self.key}: static int8 needs calibration data and got none; "
                             "set data.calibration_samples > 0")
        op_types = list(dict.fromkeys(p.op_types_to_quantize))
        if ctx.target.symmetric_int8_only and "Gather" in op_types and len(op_types) > 1:
            # TensorRT-style explicit quantization places Q/DQ on compute inputs; an int8 table behind a
            # Gather is not among the patterns it documents
            op_types.remove("Gather")
            report["note"] = f"Gather left fp32 on target={ctx.target.name}"
        linear = [t for t in op_types if t != "Gather"] or op_types
        fp32 = onnx.load(str(onnx_path), load_external_data=False)
        check_ops_match(fp32, op_types, self.key)

        work_dir = Path(ctx.work_dir or tempfile.mkdtemp(prefix="qcompile."))
        work_dir.mkdir(parents=True, exist_ok=True)
        graph = Path(onnx_path)
        if p.preprocess:
            graph = preprocess(graph, work_dir / f"{Path(out_path).stem}.pre.onnx", report, ctx.cache)
        prepared = onnx.load(str(graph), load_external_data=False)
        check_ops_match(prepared, op_types, self.key)

        batch_size = int(ctx.batch_size)
        cache_path = ranges_file(graph, ctx.calibration, p, batch_size, ctx, report, op_types)

        act = resolved_activation_type(p, ctx.target)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        extra: dict[str, Any] = {}
        if not p.quantize_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
        if act == "int8":
            # TensorRT reads int8 Q/DQ only with zero point 0
            extra.update(ActivationSymmetric=True, WeightSymmetric=True)
        excluded = sorted(set(exclude_nodes(prepared, ctx.exclude, linear)) | set(exclude_nodes(prepared, p.exclude))
                          | set(layer_nodes(prepared, self.kept_layers(), linear)))
        skipped = activation_gathers(prepared) if "Gather" in op_types else []
        ort_graph = bool(ctx.target.ort_session)
        products = [] if p.quantize_activation_products or not ort_graph else activation_products(prepared)
        skipped = sorted(set(skipped) | set(products))
        quietly(quantize_static, str(graph), str(out_path), calibration_data_reader=None,
                 quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                 per_channel=bool(p.per_channel), reduce_range=bool(p.reduce_range),
                 activation_type=qtype[act], weight_type=qtype[p.weight_type],
                 nodes_to_exclude=sorted(set(excluded) | set(skipped)),
                 calibrate_method=ort_calibration_method(p.calibration), extra_options=extra,
                 calibration_cache_path=str(cache_path), use_external_data_format=needs_external_data(graph))

        quantized = onnx.load(str(out_path), load_external_data=False)
        # MatMulIntegerToFloat is a CPU kernel of onnxruntime's: under the CUDA / TensorRT EP the bias stays an Add
        fuse_bias = bool(p.fuse_bias) and ctx.target.ort_cpu_kernels
        if ort_graph and (p.keep_float_path or fuse_bias):
            passes = _ort_passes(out_path, p.keep_float_path, fuse_bias)
            if p.fuse_bias and not fuse_bias:
                passes["fuse_bias_skipped"] = ("the session's first provider is not CPUExecutionProvider; "
                                               "MatMulIntegerToFloat has no kernel there")
            report["ort_graph_passes"] = passes
            quantized = onnx.load(str(out_path), load_external_data=False)
        if products:
            report["activation_products_fp32"] = len(products)
        coverage = quantized_coverage(prepared, quantized, linear)
        gathers = quantized_gathers(quantized)
        if coverage["quantized"] == 0 and gathers == 0:
            raise BuildError(f"{self.key}: quantize_static quantized none of the {coverage['total']} "
                             f"{'/'.join(op_types)} nodes (excluded: {len(excluded)}); the graph's "
                             f"linear layers are {linear_ops_found(prepared)}")
        if "Gather" in op_types:
            report["embedding_gathers_quantized"] = gathers
        report.update({"calibration": p.calibration, "calibration_samples": len(ctx.calibration),
                       "calibration_batch_size": batch_size, "format": "QDQ",
                       "activation_type": act, "weight_type": p.weight_type, "per_channel": bool(p.per_channel),
                       "op_types_to_quantize": op_types, "excluded_nodes": len(excluded),
                       **coverage})
        if excluded and len(excluded) <= 40:
            report["excluded_node_names"] = excluded
        if ort_graph and p.exclude_on_ort is not None:
            report["exclude_from"] = "exclude_on_ort"  # the target=ort patterns replaced `exclude`
        if p.calibration != "minmax":
            report["calibration_options"] = calibrator_options(p)
        if ctx.target.ort_session:
            _check_loads(out_path, act, ctx.opset)
        return Path(out_path)


def _ort_passes(path: Path, keep_float_path: bool, fuse_bias: bool) -> dict[str, Any]:
    """The graph passes of compiler/graph/qdq_ort.py on the quantized graph at path, in place."""
    import onnx

    from compiler.graph.io import save_onnx

    model = onnx.load(str(path))
    done: dict[str, Any] = {}
    if keep_float_path:
        done["float_inputs_rewired"] = float_consumers_read_float(model)
    if fuse_bias:
        done["matmuls_fused_with_bias"] = fuse_matmul_bias(model)
    # a graph that kept its tensors in a .data file keeps them there (as quantize_static wrote it), whatever its size
    save_onnx(model, Path(path), "always" if needs_external_data(Path(path)) else "never")
    return done


def _check_loads(path: Path, activation_type: str, opset: int) -> None:
    """A QDQ graph ORT writes but cannot load (FIELD_NOTES: S8S8 on ModernBERT at opset >= 21) fails here,
    with the fix, instead of as an opaque error at the lower stage."""
    try:
        ort_session(path)
    except Exception as e:
        hint = ""
        if activation_type == "int8":
            hint = (f" -- signed activations at opset {opset} hit an onnxruntime Q/DQ bug: use "
                    "recipe.steps.int8_static.activation_type=uint8 or export.opset=17")
        raise BuildError(f"int8_static: onnxruntime cannot load the quantized graph: "
                         f"{str(e).splitlines()[0][:300]}{hint}") from e
