"""int8_static: static int8 Q/DQ quantization of the exported graph with onnxruntime.quantization, calibrated
on the recipe's calibration data (on target=torch it hands over to the modelopt W8A8 `int8` step)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from compiler.core.errors import BuildError, RecipeError
from compiler.core.hashing import onnx_sha256
from compiler.steps.base import ONNX, TORCH, ModelInfo, Step, StepContext

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("uint8", "int8")
# ops that carry a layer's weights: what "the graph's linear layers are ..." lists
LINEAR_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "FusedMatMul", "Attention",
                   "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm", "MatMulNBits")
# ops that are a quantized linear layer by themselves (QOperator / dynamic formats)
QUANTIZED_LINEAR_OP_TYPES = ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm", "QLinearConv",
                             "ConvInteger", "QAttention", "MatMulNBits")


@dataclass
class Params:
    calibration: str = "minmax"  # minmax | entropy | percentile
    # per-output-channel weight scales. MiniLM (minmax, 64 samples): mean embedding cosine 0.962 per tensor,
    # 0.989 per channel; tiny models 0.9999 either way
    per_channel: bool = True
    # U8S8 by default: signed activations (S8S8) make ORT reject ModernBERT graphs at opset >= 21 and run
    # slower on AVX2 CPUs (FIELD_NOTES). auto = uint8 on ort, int8 (symmetric) on trt, which needs zero point 0
    activation_type: str = "auto"
    weight_type: str = "int8"
    # the exporter writes nn.Linear as MatMul (+Add); other exporters and models emit Gemm: quantize both.
    # Adding Gather stores embedding tables int8 (weight-only: Gathers of activations are left alone); on
    # MiniLM that is 3.9x smaller than fp32 instead of 1.5x, at the same accuracy. Not on target=trt.
    op_types_to_quantize: List[str] = field(default_factory=lambda: ["MatMul", "Gemm"])
    # module-name (or node-name) patterns kept fp32 on top of model.exclude, e.g. "*layer.0.output.dense";
    # model.exclude applies to the linear ops only (its "*embeddings*" is about compute, not table storage)
    exclude: List[str] = field(default_factory=list)
    # histogram bins for entropy / percentile; None: 512 for entropy, 2048 for percentile. ORT's own entropy
    # default (128 bins, 128 quantized bins) leaves one candidate threshold, i.e. MinMax. Entropy's search costs
    # ~bins^2: on 2 cores 2048 bins took ~60 s for a 2-layer model's 32 tensors, 512 bins ~6 s.
    num_bins: Optional[int] = None
    num_quantized_bins: int = 128  # entropy: bins of the quantized distribution
    percentile: float = 99.999
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI that saturate u8*s8 pairs
    # Q/DQ on the MatMul/Gemm outputs too. ORT's QDQ quantizer does that by default, which on MiniLM puts a
    # u8 Q/DQ with range [-3, 196] (the [CLS] token's massive activation) on every FFN output: mean embedding
    # cosine 0.938 with, 0.989 without. ORT (MatMulIntegerToFloat) and TensorRT need Q/DQ on inputs only.
    quantize_outputs: bool = False
    preprocess: bool = True  # onnxruntime's quant_pre_process (shape inference + basic optimizations)

    def problems(self) -> List[Tuple[str, str, str]]:
        """(field, what is wrong, what would work) for each bad value; the step's validate() raises the first
        as a RecipeError naming recipe.steps.int8_static.<field> (a __post_init__ ValueError could only name
        the step)."""
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


def resolved_activation_type(params: Params, target: str) -> str:
    if params.activation_type != "auto":
        return params.activation_type
    return "int8" if target == "trt" else "uint8"


# ---------------------------------------------------------------------------------------------------------------
# graph facts shared with int8_dynamic


def linear_ops_found(model) -> str:
    """'MatMul x16, Gemm x1' for the linear-layer ops of a graph (or all its op types when it has none)."""
    counts = Counter(n.op_type for n in model.graph.node)
    found = {op: counts[op] for op in LINEAR_OP_TYPES if counts.get(op)}
    if found:
        return ", ".join(f"{op} x{c}" for op, c in found.items())
    return "none (its ops: " + ", ".join(sorted(counts)) + ")"


def check_ops_match(model, op_types: List[str], key: str) -> int:
    """Number of nodes that op_types_to_quantize matches; zero is a BuildError, never a silent no-op."""
    n = sum(1 for node in model.graph.node if node.op_type in set(op_types))
    if n == 0:
        raise BuildError(f"{key}: op_types_to_quantize={list(op_types)} matched no node: the graph's linear "
                         f"layers are {linear_ops_found(model)}")
    return n


def quantized_coverage(before, after, op_types: List[str]) -> Dict[str, Any]:
    """How many of the fp32 graph's op_types nodes are quantized in the output: Q/DQ-fed (QDQ format) or
    replaced by a quantized op (QOperator / dynamic format)."""
    targets = set(op_types)
    total = sum(1 for n in before.graph.node if n.op_type in targets)
    producer = {o: n.op_type for n in after.graph.node for o in n.output}
    fp_left = sum(1 for n in after.graph.node if n.op_type in targets
                  and not any(producer.get(i) == "DequantizeLinear" for i in n.input))
    quantized = max(total - fp_left, 0)
    by_type = Counter(n.op_type for n in before.graph.node if n.op_type in targets)
    return {"linear_ops": dict(sorted(by_type.items())), "quantized": quantized, "total": total,
            "fraction": round(quantized / total, 4) if total else 0.0,
            "qdq_nodes": sum(1 for n in after.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")),
            "quantized_op_nodes": sum(1 for n in after.graph.node if n.op_type in QUANTIZED_LINEAR_OP_TYPES)}


def module_name(node_name: str) -> str:
    """The torch module a TorchScript-exported node came from: '/inner/encoder/layer.0/output/dense/MatMul'
    -> 'inner.encoder.layer.0.output.dense', so model.exclude patterns mean the same on both sides."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else node_name


def exclude_nodes(model, patterns: List[str], op_types: Optional[List[str]] = None) -> List[str]:
    """Nodes (of op_types, if given) whose name or module name matches a pattern ('*pooler*',
    '*layer.0.output.dense')."""
    from compiler.core.patterns import matches_any

    if not patterns:
        return []
    return sorted(n.name for n in model.graph.node if n.name and (op_types is None or n.op_type in op_types)
                  and (matches_any(n.name, patterns) or matches_any(module_name(n.name), patterns)))


def activation_gathers(model) -> List[str]:
    """Gather nodes whose data is not an initializer (shape arithmetic, activations): no table to store int8."""
    inits = {i.name for i in model.graph.initializer}
    return sorted(n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] not in inits)


def quantized_gathers(model) -> int:
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "Gather" and producer.get(n.input[0]) == "DequantizeLinear")


def preprocess(onnx_path: Path, out_path: Path, report: Dict[str, Any]) -> Path:
    """onnxruntime's quant_pre_process, retried with the settings that fix known shape-inference failures
    (BERT: 'Incomplete symbolic shape inference' -> auto_merge; ModernBERT rotary -> skip symbolic);
    if every attempt fails the graph is quantized as exported. What happened goes into the report."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = [("default", {}), ("auto_merge", {"auto_merge": True}),
                ("skip_symbolic_shape", {"skip_symbolic_shape": True}),
                ("skip_symbolic_shape+skip_optimization", {"skip_symbolic_shape": True, "skip_optimization": True})]
    failures = []
    for label, kwargs in attempts:
        try:
            # onnxruntime's symbolic shape inference saves sym_shape_infer_temp.onnx (+ data) into the current
            # directory when it gives up: run it from the work directory so nothing lands where the user is
            src, dst = Path(onnx_path).resolve(), Path(out_path).resolve()  # before the chdir below
            with _in_dir(dst.parent):
                _quietly(quant_pre_process, str(src), str(dst), **kwargs)
            report["preprocess"] = label
            if failures:
                report["preprocess_failures"] = failures
            return out_path
        except Exception as e:  # the shape-inference helpers raise bare Exception / AssertionError
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            log.info("quant_pre_process (%s) failed: %s", label, failures[-1])
    report["preprocess"] = "skipped (every attempt failed)"
    report["preprocess_failures"] = failures
    return Path(onnx_path)


@contextlib.contextmanager
def _in_dir(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _quietly(fn, *args, **kwargs):
    """onnxruntime.quantization logs 'please pre-process' warnings through the root logger and prints its
    calibrators' progress to stdout; keep both off the console (the step reports what matters)."""
    import contextlib
    import io

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return fn(*args, **kwargs)
    finally:
        root.setLevel(level)
        if printed.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", printed.getvalue().strip())




# ---------------------------------------------------------------------------------------------------------------
# calibration


class FeaturesReader:
    """onnxruntime CalibrationDataReader over compiler.stages.data.Features, with a progress bar."""

    def __init__(self, features, input_names: List[str], batch_size: int, label: str = "calibration"):
        self._feeds = [{n: np.ascontiguousarray(b[n]) for n in input_names}
                       for b in features.batches(max(int(batch_size), 1))]
        self._label = label
        self.rewind()

    def rewind(self):
        self._i, self._end = 0, len(self._feeds)
        self._progress = None

    def set_range(self, start_index: int, end_index: int):
        self._i, self._end = start_index, min(end_index, len(self._feeds))

    def __len__(self):
        return len(self._feeds)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        from rich.progress import Progress

        if self._progress is None:
            self._progress = Progress(transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=self._end - self._i)
        if self._i >= self._end:
            self._progress.stop()
            return None
        feed = self._feeds[self._i]
        self._i += 1
        self._progress.advance(self._task)
        return feed


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def calibrator_options(params: Params) -> Dict[str, Any]:
    """extra_options for create_calibrator. quantize_static cannot pass num_bins (FIELD_NOTES: its entropy
    silently equals MinMax), which is why this step runs the calibrator itself."""
    if params.calibration == "entropy":
        return {"num_bins": params.bins, "num_quantized_bins": int(params.num_quantized_bins)}
    if params.calibration == "percentile":
        return {"num_bins": params.bins, "percentile": float(params.percentile)}
    return {}


def compute_ranges(onnx_path: Path, features, params: Params, batch_size: int, work_dir: Path,
                   op_types: Optional[List[str]] = None):
    """Calibration: activation ranges (onnxruntime TensorsData) of the op_types_to_quantize tensors."""
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator

    import onnx

    input_names = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    reader = FeaturesReader(features, input_names, batch_size, label=f"calibration ({params.calibration})")
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="calib.") as tmp:
        calibrator = _quietly(create_calibrator, Path(onnx_path), list(op_types or params.op_types_to_quantize),
                              augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                              calibrate_method=_method(params.calibration),
                              extra_options=calibrator_options(params))
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    if not isinstance(ranges, TensorsData):
        raise BuildError(f"onnxruntime calibrator returned {type(ranges).__name__}, not TensorsData")
    return ranges


def calibration_key(graph_sha256: str, features, params: Params, batch_size: int, preprocessed: str,
                    op_types: List[str]) -> Dict:
    """Everything that determines the ranges (StepContext.cache contract: the full inputs, never a prefix)."""
    import onnxruntime

    return {"graph_sha256": graph_sha256, "calibration_sha256": features.sha256(), "samples": len(features),
            "method": params.calibration, "options": calibrator_options(params),
            "op_types": sorted(op_types), "batch_size": int(batch_size),
            "preprocess": preprocessed, "onnxruntime": onnxruntime.__version__}


def ranges_file(onnx_path: Path, features, params: Params, batch_size: int, ctx: StepContext,
                report: Dict[str, Any], op_types: List[str]) -> Path:
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
               "targets; modelopt W8A8 on torch")

    KEY = "recipe.steps.int8_static"

    def validate(self, info: ModelInfo, target: str) -> None:
        p = self.params
        for name, what, fix in p.problems():
            raise RecipeError(f"{self.KEY}.{name}", what, fix)
        if target == "trt" and resolved_activation_type(p, target) == "uint8":
            raise RecipeError(f"{self.KEY}.activation_type", "uint8 activations are not runnable on target=trt "
                              "(TensorRT needs symmetric int8, zero point 0)", "use activation_type=auto or int8")
        if target == "torch":
            self.torch_step()  # builds the modelopt step's Params now: a bad mapping fails before loading

    # -- torch: modelopt W8A8 -----------------------------------------------------------------------------------
    def torch_step(self) -> Step:
        """The modelopt `int8` step (compiler/steps/int8.py) with the matching calibration algorithm."""
        from compiler.steps.base import STEP_REGISTRY, load_all_steps

        load_all_steps()
        if "int8" not in STEP_REGISTRY:
            raise RecipeError(self.KEY, "target=torch needs the modelopt `int8` step, which this install lacks",
                              "use target=ort")
        cls = STEP_REGISTRY["int8"]
        # the modelopt step names calibration methods as this step does (compiler/steps/modelopt.py)
        kwargs: Dict[str, Any] = {"calibration": self.params.calibration}
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        if self.params.exclude and "exclude" in fields:
            kwargs["exclude"] = list(self.params.exclude)
        if self.params.calibration == "percentile" and "percentile" in fields:
            kwargs["percentile"] = float(self.params.percentile)
        try:
            params = cls.Params(**kwargs)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"{self.KEY}.calibration", f"{self.params.calibration!r} has no modelopt "
                              f"equivalent on target=torch ({e})", "use calibration=minmax, or target=ort") from None
        return cls(params)

    def apply_torch(self, model, ctx: StepContext):
        step = self.torch_step()
        out = step.apply_torch(model, ctx)
        ctx.report.setdefault("delegated_to", f"int8 (modelopt W8A8, calibration={step.params.calibration})")
        return out

    def after_export(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        return self.torch_step().after_export(onnx_path, out_path, ctx)

    # -- ONNX: onnxruntime quantize_static ------------------------------------------------------------------
    def apply_onnx(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        p = self.params
        report = ctx.report
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise BuildError(f"{self.KEY}: static int8 needs calibration data and got none; "
                             "set data.calibration_samples > 0")
        op_types = list(dict.fromkeys(p.op_types_to_quantize))
        if ctx.target == "trt" and "Gather" in op_types and len(op_types) > 1:
            # TensorRT's explicit quantization places Q/DQ on compute inputs; an int8 table behind a Gather
            # is not among the patterns it documents
            op_types.remove("Gather")
            report["note"] = "Gather left fp32 on target=trt"
        linear = [t for t in op_types if t != "Gather"] or op_types
        fp32 = onnx.load(str(onnx_path), load_external_data=False)
        check_ops_match(fp32, op_types, self.KEY)

        work_dir = Path(ctx.work_dir or tempfile.mkdtemp(prefix="qcompile."))
        work_dir.mkdir(parents=True, exist_ok=True)
        graph = Path(onnx_path)
        if p.preprocess:
            graph = preprocess(graph, work_dir / f"{Path(out_path).stem}.pre.onnx", report)
        prepared = onnx.load(str(graph), load_external_data=False)
        check_ops_match(prepared, op_types, self.KEY)

        batch_size = int(report.get("batch_size", 8) or 8)  # the data section's, set by the pipeline
        cache_path = ranges_file(graph, ctx.calibration, p, batch_size, ctx, report, op_types)

        act = resolved_activation_type(p, ctx.target)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        extra: Dict[str, Any] = {}
        if not p.quantize_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
        if act == "int8":
            # TensorRT reads int8 Q/DQ only with zero point 0
            extra.update(ActivationSymmetric=True, WeightSymmetric=True)
        excluded = sorted(set(exclude_nodes(prepared, ctx.exclude, linear)) | set(exclude_nodes(prepared, p.exclude)))
        skipped = activation_gathers(prepared) if "Gather" in op_types else []
        _quietly(quantize_static, str(graph), str(out_path), calibration_data_reader=None,
                 quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                 per_channel=bool(p.per_channel), reduce_range=bool(p.reduce_range),
                 activation_type=qtype[act], weight_type=qtype[p.weight_type],
                 nodes_to_exclude=sorted(set(excluded) | set(skipped)),
                 calibrate_method=_method(p.calibration), extra_options=extra,
                 calibration_cache_path=str(cache_path))

        quantized = onnx.load(str(out_path), load_external_data=False)
        coverage = quantized_coverage(prepared, quantized, linear)
        gathers = quantized_gathers(quantized)
        if coverage["quantized"] == 0 and gathers == 0:
            raise BuildError(f"{self.KEY}: quantize_static quantized none of the {coverage['total']} "
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
        if p.calibration != "minmax":
            report["calibration_options"] = calibrator_options(p)
        if ctx.target == "ort":
            _check_loads(out_path, act, ctx.opset)
        return Path(out_path)


def _check_loads(path: Path, activation_type: str, opset: int) -> None:
    """A QDQ graph ORT writes but cannot load (FIELD_NOTES: S8S8 on ModernBERT at opset >= 21) fails here,
    with the fix, instead of as an opaque error at the lower stage."""
    from compiler.runners.sessions import ort_session

    try:
        ort_session(path)
    except Exception as e:
        hint = ""
        if activation_type == "int8":
            hint = (f" -- signed activations at opset {opset} hit an onnxruntime Q/DQ bug: use "
                    "recipe.steps.int8_static.activation_type=uint8 or export.opset=17")
        raise BuildError(f"int8_static: onnxruntime cannot load the quantized graph: "
                         f"{str(e).splitlines()[0][:300]}{hint}") from e
