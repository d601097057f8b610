"""Shared helpers for torch-side quantization with nvidia-modelopt: the mtq config for a format with the
recipe's exclude patterns applied, the calibration forward loop over the recipe's data, and the
quantizer counts a step puts in its report."""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

from compiler.core.errors import BuildError
from compiler.core.formats import FORMATS
from compiler.graph.io import save_onnx
from compiler.graph.qdq_weights import fold_weight_quantizers
from compiler.steps.base import (
    CALIBRATION_METHODS,
    FULL_PRECISION,
    ACTIVATIONS,
    TORCH,
    WEIGHTS,
    Step,
    StepContext,
)
from compiler.steps.torchao_kernels import NoKernel, TorchKernel, apply_kernel, fake_quant_report, torchao_modules

log = logging.getLogger(__name__)

# Layers left in full precision when neither the model config nor the recipe names any: the input
# embeddings (a lookup, nothing to gain), the pooler and task heads (small, accuracy-sensitive).
DEFAULT_EXCLUDE = ["*embeddings*", "*pooler*", "*classifier*", "*head*"]

# modelopt's presets, by the format name a step asks for (resolved lazily: importing modelopt is slow).
PRESETS = {
    "int8": "INT8_DEFAULT_CFG",  # W8A8: weights per output channel, activations per tensor, static amax
    "int8_smoothquant": "INT8_SMOOTHQUANT_CFG",  # the same numerics after SmoothQuant's scale migration
    "int8_weight_only": "INT8_WEIGHT_ONLY_CFG",  # weights int8 per output channel, activations off
    "fp8": "FP8_DEFAULT_CFG",  # e4m3 weights and activations, per-tensor amax
}

# qcompile's calibration names (compiler.steps.base.CALIBRATION_METHODS) -> how modelopt computes the amax.
#   minmax     -> modelopt "max" calibrator (running absolute max over the calibration data)
#   entropy    -> modelopt "histogram" calibrator, amax by KL-divergence (TensorRT's entropy method)
#   percentile -> modelopt "histogram" calibrator, amax at the given percentile of |x| (default 99.99)


def _mtq():
    torchao_modules()  # modelopt imports torchao where installed; first quietly (its CUDA extensions' load errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modelopt warns that transformers 5.x is untested; measured fine
        import modelopt.torch.quantization as mtq
    return mtq


def preset_config(fmt: str) -> Dict[str, Any]:
    """A deep copy of modelopt's preset config for a format (see PRESETS)."""
    if fmt not in PRESETS:
        raise KeyError(f"no modelopt preset for format {fmt!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(getattr(_mtq(), PRESETS[fmt]))


def exclude_patterns(ctx: StepContext) -> List[str]:
    """The recipe's exclude patterns (model.exclude), or DEFAULT_EXCLUDE when it names none."""
    return list(ctx.exclude) or list(DEFAULT_EXCLUDE)


def excluded_modules(module, patterns: Iterable[str]) -> List[str]:
    """Names of the leaf modules with weights (Linear, Conv, Embedding, ...) whose name matches a pattern
    (fnmatch on the dotted module name, e.g. "*pooler*" matches "inner.pooler.dense")."""
    patterns = list(patterns)
    names = []
    for name, sub in module.named_modules():
        if not name or not hasattr(sub, "weight"):
            continue
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            names.append(name)
    return names


def non_linear_quant_modules(module) -> List[str]:
    """Names of modules modelopt would convert that are not Linear layers (LayerNorm, Embedding, Conv...).

    modelopt's presets also enable the input quantizer of every nn.LayerNorm; a Q/DQ pair in front of a
    LayerNorm is neither what ORT's or TensorRT's int8 kernels consume (they fuse Q/DQ into MatMul/Gemm)
    nor free in accuracy, so qcompile quantizes the Linear layers only."""
    import torch
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    names = []
    for name, sub in module.named_modules():
        if name and not isinstance(sub, torch.nn.Linear) and type(sub) in QuantModuleRegistry and not any(
                isinstance(m, torch.nn.Linear) for m in sub.modules()):
            # a converted module holding Linears (an HF attention, which modelopt registers for KV-cache
            # quantization once any PreTrainedModel was quantized in the process): a `<name>.*` entry would turn
            # off the q/k/v Linears inside it too; its own quantizers go off after conversion instead
            # (disable_non_linear_quantizers)
            names.append(name)
    return names


def disable_non_linear_quantizers(module) -> int:
    """Turn off the quantizers modelopt put on modules that are not Linear layers and that build_config could
    not name without their Linears (see non_linear_quant_modules); returns how many were on."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    n = 0
    for _, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            continue
        for child in sub.children():
            if isinstance(child, TensorQuantizer) and child.is_enabled:
                child.disable()
                n += 1
    return n


def build_config(module, fmt_or_cfg, patterns: Iterable[str], algorithm: Any = "__keep__",
                 input_calibrator: Optional[str] = None, linear_only: bool = True,
                 layer_formats: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The mtq config to quantize ``module`` with: a preset (format name) or a given config, plus one
    ``{"quantizer_name": "<module>.*", "enable": False}`` entry per excluded module (and, with
    linear_only, per converted module that is not a Linear), appended last so they win over the preset's
    wildcards (modelopt applies entries in list order).

    We expand the patterns against the module names ourselves rather than pass them to modelopt as
    quantizer wildcards: a recipe pattern names modules ("*pooler*", "inner.pooler.dense"), while modelopt
    matches quantizer names ("inner.pooler.dense.weight_quantizer"), so an exact module name would match
    nothing there.

    layer_formats: module name -> "fp32" (its quantizers off) or another PRESETS format (the preset's
    weight/input quantizer attributes applied to that module's quantizers only), appended after the
    exclusions so a per-layer choice wins."""
    cfg = preset_config(fmt_or_cfg) if isinstance(fmt_or_cfg, str) else copy.deepcopy(fmt_or_cfg)
    entries = list(cfg.get("quant_cfg", []))
    if input_calibrator is not None:
        # an entry with "cfg" replaces every attribute of the quantizers it matches (modelopt's
        # set_quantizer_by_cfg), so the calibrator goes into the preset's own input-quantizer entries
        entries = [dict(e, cfg={**e["cfg"], "calibrator": input_calibrator})
                   if isinstance(e.get("cfg"), dict) and fnmatch.fnmatch("x.input_quantizer", e["quantizer_name"])
                   else e for e in entries]
    off = excluded_modules(module, patterns)
    if linear_only:
        off += [n for n in non_linear_quant_modules(module) if n not in off]
    for name in off:
        entries.append({"quantizer_name": f"{name}.*", "enable": False})
    for name, fmt in sorted((layer_formats or {}).items()):
        entries += layer_entries(name, fmt)
    cfg["quant_cfg"] = entries
    if algorithm != "__keep__":
        cfg["algorithm"] = algorithm
    return cfg


def layer_entries(layer: str, fmt: str) -> List[Dict[str, Any]]:
    """quant_cfg entries that give one module another format: "fp32" disables its quantizers; a PRESETS
    format copies that preset's weight and input quantizer attributes onto the module's own quantizers --
    those of the Linear itself and of a Linear it wraps (the rotate step's RotatedLinear holds its Linear as
    `.linear`, so its quantizers are `<layer>.linear.weight_quantizer`; an entry naming `<layer>.weight_quantizer`
    alone matched nothing there and left a rotated layer in the step's own format)."""
    if fmt == FULL_PRECISION:
        return [{"quantizer_name": f"{layer}.*", "enable": False}]
    out = []
    for e in preset_config(fmt).get("quant_cfg", []):
        name = e.get("quantizer_name", "")
        if "parent_class" in e or not isinstance(e.get("cfg"), dict):
            continue
        for kind in ("weight_quantizer", "input_quantizer"):
            if name == f"*{kind}":
                for quantizer in (f"{layer}.{kind}", f"{layer}.*.{kind}"):
                    out.append({"quantizer_name": quantizer, "cfg": dict(e["cfg"]),
                                "enable": bool(e.get("enable", True))})
    return out


def check_layer_formats(module, layer_formats: Dict[str, str]) -> None:
    """Every layer given another format carries it: its weight quantizer (its own or a wrapped Linear's) has
    the preset's num_bits, or, for "fp32", no enabled quantizer is left under it. A per-layer format that
    matched no quantizer would otherwise go unnoticed, and the repair's map would claim a format the engine
    does not have."""
    for layer, fmt in sorted(layer_formats.items()):
        sub = module.get_submodule(layer)
        if fmt == FULL_PRECISION:
            wrong = [q for n, q in sub.named_modules() if n.endswith("_quantizer") and getattr(q, "is_enabled", False)]
            if wrong:
                raise BuildError(f"layer {layer} was kept in fp32 but {len(wrong)} of its quantizers are still enabled")
            continue
        want = next(e["cfg"].get("num_bits") for e in preset_config(fmt).get("quant_cfg", [])
                    if e.get("quantizer_name") == "*weight_quantizer" and isinstance(e.get("cfg"), dict))
        found = [q for n, q in sub.named_modules() if n.rpartition(".")[2] == "weight_quantizer"]
        if not found or any(tuple(_as_tuple(q.num_bits)) != tuple(_as_tuple(want)) for q in found):
            got = sorted({str(q.num_bits) for q in found}) or ["no weight quantizer"]
            raise BuildError(f"layer {layer} was given format {fmt} (weight num_bits {want}) but carries {got}")


def _as_tuple(bits) -> tuple:
    return tuple(bits) if isinstance(bits, (list, tuple)) else (bits,)


def _torch_feed(feed: Dict[str, Any], device) -> List[Any]:
    import torch

    return [torch.from_numpy(arr).to(device) for arr in feed.values()]


def forward_loop(ctx, limit: Optional[int] = None) -> Callable[[Any], None]:
    """modelopt's forward_loop over the recipe's calibration data (ctx.calibration, a Features whose arrays
    are in the model's positional input order), in batches of ctx.batch_size."""
    if ctx.calibration is None or len(ctx.calibration) == 0:
        raise BuildError("calibration needs data but the build has no calibration samples "
                         "(set data.calibration_samples > 0)")
    batch_size = int(ctx.batch_size)

    def loop(model) -> None:
        import torch

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        seen = 0
        with torch.no_grad():
            for feed in ctx.calibration.batches(batch_size):
                if limit is not None and seen >= limit:
                    break
                model(*_torch_feed(feed, device))
                seen += len(next(iter(feed.values())))

    return loop


# modelopt's entropy search is a pure-Python loop over candidate thresholds, O(bins^2) per quantizer:
# stride 1 over its 2048 bins took ~8 s per quantizer here (5 min for MiniLM). Every 16th bin gives 120
# candidates, each 0.8% of the observed range apart, at ~0.5 s per quantizer.
ENTROPY_STRIDE = 16


def _calibrate_histogram(model, loop: Callable[[Any], None], method: str, percentile: float) -> None:
    """Activation amax from modelopt's HistogramCalibrator by entropy or percentile.

    Fills a gap in modelopt 0.47: its "max" algorithm calls ``compute_amax()`` without a method, which a
    histogram calibrator needs, so histogram calibration has no ``mtq.quantize`` algorithm. We run the
    same sequence as modelopt's max_calibrate (enable stats, forward, load amax) with modelopt's own
    calibrators and only pass the method; weight quantizers keep their max calibrator."""
    import torch
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import (
        enable_stats_collection,
        weight_only_quantize,
    )
    from modelopt.torch.quantization.nn import TensorQuantizer

    model.eval()
    with torch.no_grad():
        enable_stats_collection(model)
        weight_only_quantize(model)
        loop(model)
        for _, q in model.named_modules():
            if not isinstance(q, TensorQuantizer) or q._disabled:
                continue
            cal = getattr(q, "_calibrator", None)
            if cal is not None and not getattr(q, "_dynamic", False):
                if isinstance(cal, HistogramCalibrator):
                    kwargs = {"percentile": percentile} if method == "percentile" else {"stride": ENTROPY_STRIDE}
                    q.load_calib_amax(method, **kwargs)
                else:
                    q.load_calib_amax()
            q.enable_quant()
            q.disable_calib()


def quantize_module(module, quant_cfg: Dict[str, Any], ctx, algorithm: Any = "__keep__",
                    calibration: str = "minmax", percentile: float = 99.99, exclude: Optional[List[str]] = None,
                    layer_formats: Optional[Dict[str, str]] = None):
    """Quantize ``module`` in place with modelopt and return it.

    quant_cfg: an mtq config ({"quant_cfg": [...], "algorithm": ...}) or a PRESETS format name.
    algorithm: overrides quant_cfg["algorithm"] (e.g. {"method": "smoothquant", "alpha": 0.5}).
    calibration: minmax | entropy | percentile for the activation quantizers (see CALIBRATION_METHODS).
    exclude: module-name patterns kept in full precision; default: exclude_patterns(ctx).
    layer_formats: module name -> "fp32" | another PRESETS format, per layer (Step.with_layer_formats).
    Writes the quantizer counts (quantizer_counts) into ctx.report."""
    if calibration not in CALIBRATION_METHODS:
        raise ValueError(f"calibration: unknown method {calibration!r}; use one of {list(CALIBRATION_METHODS)}")
    mtq = _mtq()
    patterns = exclude_patterns(ctx) if exclude is None else list(exclude)
    histogram = calibration in ("entropy", "percentile")
    _check_something_left(module, patterns)
    cfg = build_config(module, quant_cfg, patterns, algorithm, input_calibrator="histogram" if histogram else None,
                       layer_formats=layer_formats)
    needs_data = _needs_activation_data(cfg)
    loop = forward_loop(ctx) if needs_data else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if histogram:
            if cfg.get("algorithm") not in ("max", None):
                raise ValueError(f"calibration: {calibration} works with the max algorithm only, "
                                 f"not {cfg.get('algorithm')!r}")
            cfg["algorithm"] = None  # insert quantizers only; _calibrate_histogram fills their amax
            mtq.quantize(module, cfg, forward_loop=None)
            _calibrate_histogram(module, loop, calibration, percentile)
        else:
            mtq.quantize(module, cfg, forward_loop=loop)
    disable_non_linear_quantizers(module)
    module.eval()
    if layer_formats:
        check_layer_formats(module, layer_formats)
    counts = quantizer_counts(module)
    counts["excluded_patterns"] = patterns
    if layer_formats:
        counts["layer_formats"] = dict(sorted(layer_formats.items()))
    counts["calibration"] = calibration if needs_data else "none (weights only)"
    if needs_data:
        counts["calibration_samples"] = len(ctx.calibration)
    ctx.report.update(counts)
    if counts["quantized_layers"] == 0:
        raise BuildError(f"modelopt inserted no enabled quantizer into {counts['linear_layers']} Linear layers "
                         f"(exclude patterns {patterns}); check model.exclude")
    return module


def _check_something_left(module, patterns: List[str]) -> None:
    """A BuildError naming the patterns when they leave no Linear layer to quantize (modelopt's own
    RuntimeError for this says nothing about the recipe)."""
    import torch

    excluded = set(excluded_modules(module, patterns))
    linear = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    if not [n for n in linear if n not in excluded]:
        raise BuildError(f"exclude patterns {patterns} leave none of the model's {len(linear)} Linear layers "
                         f"to quantize; narrow model.exclude (or the step's exclude)")


def _needs_activation_data(cfg: Dict[str, Any]) -> bool:
    """Whether calibration must forward data: algorithms other than max always read activations; max
    needs them only when input quantizers end up enabled (weight-only max calibrates on the weights)."""
    algo = cfg.get("algorithm")
    method = algo.get("method") if isinstance(algo, dict) else algo
    if method not in (None, "max"):
        return True
    enabled = False
    for e in cfg.get("quant_cfg", []):
        name = e.get("quantizer_name", "")
        if fnmatch.fnmatch("x.input_quantizer", name) and "parent_class" not in e:
            if "enable" in e:
                enabled = bool(e["enable"])
            elif "cfg" in e:  # an attribute entry without "enable" turns the quantizer on
                enabled = True
    return enabled


def quantizer_counts(module) -> Dict[str, Any]:
    """How many Linear layers carry enabled weight / input quantizers, which Linear layers carry none
    (excluded), and how many quantizers are enabled outside Linear layers (0 with linear_only): the
    numbers a step reports and the tests check."""
    import torch

    per_layer = enabled_quantizers(module)
    linear = {n: q for n, q in per_layer.items() if isinstance(module.get_submodule(n), torch.nn.Linear)}
    other = {n: q for n, q in per_layer.items() if n not in linear}
    return {
        "linear_layers": len(linear),
        "quantized_layers": sum(1 for q in linear.values() if q["weight"] or q["input"]),
        "weight_quantizers": sum(int(q["weight"]) for q in linear.values()),
        "input_quantizers": sum(int(q["input"]) for q in linear.values()),
        "other_quantizers": sum(int(q["weight"]) + int(q["input"]) for q in other.values()),
        "excluded_layers": sorted(n for n, q in linear.items() if not (q["weight"] or q["input"])),
    }


def enabled_quantizers(module) -> Dict[str, Dict[str, bool]]:
    """layer name -> {"weight": enabled, "input": enabled} for every layer modelopt converted."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    out = {}
    for name, sub in module.named_modules():
        wq = getattr(sub, "weight_quantizer", None)
        iq = getattr(sub, "input_quantizer", None)
        if isinstance(wq, TensorQuantizer) or isinstance(iq, TensorQuantizer):
            out[name] = {"weight": isinstance(wq, TensorQuantizer) and wq.is_enabled,
                         "input": isinstance(iq, TensorQuantizer) and iq.is_enabled}
    return out


# ---------------------------------------------------------------------------------------------------------
# The shape shared by the modelopt steps (int8, int8_smoothquant, int8_weight_only, fp8): quantize the torch
# module with one preset, then make the exported fake-quant graph deployable. Each step file subclasses
# this with its name, Params and preset; a class without ``name`` is not registered as a step.


# why a calibrated static W8A8 step stays fake-quant on target=torch (int8, int8_static, int8_smoothquant)
CALIBRATED_STATIC_REASON = ("calibrated static int8: torchao 0.18 has Int8StaticActivationInt8WeightConfig (one "
                            "activation scale per layer) but no calibration of it; the step leaves modelopt's "
                            "calibrated fake-quant, which target=torch lowers to int8 x int8 Linears on the CPU "
                            "(compiler/numerics/int8_linear.py; lower.kernels)")


class ModeloptStep(Step):
    """Base of the torch-side modelopt steps. Subclasses set name, Params, summary, FORMAT and may
    override algorithm() / calibration()."""

    runs_on = {"torch": TORCH, "ort": TORCH, "trt": TORCH}
    needs_calibration = True
    trainable_fake_quant = True  # its torch side: modelopt TensorQuantizers (distill trains them)
    quantizes_compute = True
    operands = frozenset({WEIGHTS, ACTIVATIONS})  # W8A8 presets; int8_weight_only declares weights only
    # a layer may be kept out or given another modelopt preset (int8 W8A8 or fp8) in place of the step's own
    layer_format_choices = frozenset(f for f in PRESETS if f in FORMATS)  # the presets that are number formats
    FORMAT = ""  # a PRESETS key

    def algorithm(self) -> Any:
        return "__keep__"  # the preset's

    def calibration(self) -> str:
        return "minmax"

    def percentile(self) -> float:
        return 99.99

    def exclude(self, ctx: StepContext) -> List[str]:
        """model.exclude (or DEFAULT_EXCLUDE) plus the step's own `exclude` patterns."""
        return exclude_patterns(ctx) + self.own_exclude()

    def own_exclude(self) -> List[str]:
        return list(self.params.exclude)

    def layers(self, module, exclude=()) -> List[str]:
        """The Linear layers modelopt quantizes: every nn.Linear outside model.exclude (DEFAULT_EXCLUDE when
        empty) and the step's own exclude patterns."""
        return super().layers(module, list(exclude) or list(DEFAULT_EXCLUDE))

    def torch_kernel(self):
        # the default of a calibrated W8A8 step (int8, int8_smoothquant); int8_weight_only and fp8 declare their own
        return NoKernel(CALIBRATED_STATIC_REASON)

    def apply_torch(self, model, ctx):
        import torch

        torch.manual_seed(ctx.seed)
        kernel = self.torch_kernel()
        if not ctx.target.runs_onnx:  # the torch module is the engine: real kernels where torchao has them
            if isinstance(kernel, TorchKernel) and not set(self.layer_formats.values()) - {FULL_PRECISION}:
                layers = [n for n in self.layers(model, ctx.exclude) if n not in set(self.kept_layers())]
                ctx.report.update(apply_kernel(model, kernel, layers, self.key))
                return model
            if isinstance(kernel, TorchKernel):
                kernel = NoKernel("a repair map gives single layers another format (layer_formats), which only "
                                  "modelopt's per-layer quantizers carry")
        out = quantize_module(model, self.FORMAT, ctx, algorithm=self.algorithm(),
                              calibration=self.calibration(), percentile=self.percentile(),
                              exclude=self.exclude(ctx), layer_formats=self.layer_formats)
        if not ctx.target.runs_onnx and isinstance(kernel, NoKernel):
            ctx.report.update(fake_quant_report(kernel.reason))
        return out

    def after_export(self, onnx_path, out_path, ctx):
        return store_int8_weights(onnx_path, out_path, self.name)


def store_int8_weights(onnx_path, out_path, label: str):
    """After export of an int8 modelopt graph: the weights stored as int8 initializers feeding their DQ
    (compiler/graph/qdq_weights) instead of fp32 weights behind a Q/DQ pair."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=True)
    model, folded = fold_weight_quantizers(model)
    log.info("%s: %d weights stored as int8 initializers", label, folded)
    return save_onnx(model, out_path, "auto")
