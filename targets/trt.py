"""The TensorRT target: the TensorRT-ready explicit-quantization ONNX built into a strongly typed engine plan
where TensorRT and a GPU are present, with its per-layer precision report; without them, the same ONNX
checked on the CPU and the exact command that builds the engine on a GPU machine written beside it."""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from compiler.core.errors import BuildError, RecipeError
from compiler.core.capabilities import TargetCapabilities
from targets.base import Engine, Target
from targets.trt_hardware import (detect_gpu, detect_tensorrt, engine_decision, hardware_problem,
                                  normalize_build_engine, recipe_precisions)

log = logging.getLogger(__name__)

PLAN = "engine.plan"
LAYERS = "engine.layers.json"
TIMING_CACHE = "timing.cache"
SCRIPT = "build_engine.sh"
AXES = ("batch", "seq")
CPU_RUNNERS = ("reference", "ort")
WHICH = ("min", "opt", "max")

# -------------------------------------------------------------------------------------------------
# Network options derived from the recipe (pure functions)
# -------------------------------------------------------------------------------------------------


def validate_shape_ranges(cfg) -> None:
    """target.min_shapes / opt_shapes / max_shapes: keys batch and seq, 1 <= min <= opt <= max."""
    ranges = {w: dict(getattr(cfg, f"{w}_shapes")) for w in WHICH}
    for w, shapes in ranges.items():
        for axis, value in shapes.items():
            if axis not in AXES:
                raise RecipeError(f"target.{w}_shapes.{axis}", "unknown axis", "the profile axes are batch and seq")
            if int(value) < 1:
                raise RecipeError(f"target.{w}_shapes.{axis}", f"must be >= 1, got {value}",
                                  f"set target.{w}_shapes.{axis} to a positive size")
        for axis in AXES:
            if axis not in shapes:
                raise RecipeError(f"target.{w}_shapes", f"missing {axis}", f"add target.{w}_shapes.{axis}=<size>")
    for axis in AXES:
        lo, mid, hi = (int(ranges[w][axis]) for w in WHICH)
        if not lo <= mid <= hi:
            raise RecipeError(f"target.opt_shapes.{axis}",
                              f"min {lo} <= opt {mid} <= max {hi} does not hold",
                              f"choose target.min_shapes.{axis} <= target.opt_shapes.{axis} "
                              f"<= target.max_shapes.{axis}")
    if int(cfg.workspace_mb) < 1:
        raise RecipeError("target.workspace_mb", f"must be >= 1, got {cfg.workspace_mb}",
                          "e.g. target.workspace_mb=4096")
    frac = float(cfg.min_quantized_layer_fraction)
    if not 0.0 <= frac <= 1.0:
        raise RecipeError("target.min_quantized_layer_fraction", f"must be in [0, 1], got {frac}",
                          "e.g. 0.5 (fail when fewer than half the matmul layers run quantized), 0 to only warn")


def onnx_inputs(onnx_path: Path) -> List[Tuple[str, List[Any]]]:
    """(name, dims) of the graph's real inputs; a dim is an int, a dim_param name or None."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims: List[Any] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out.append((vi.name, dims))
    return out


def _axis_of(index: int, dim: Any) -> Optional[str]:
    if isinstance(dim, str):
        low = dim.lower()
        for axis in AXES:
            if axis in low:
                return axis
    # exporters that name dims s0, s1 / unk__3: batch first, then sequence (the export wrapper's order)
    return AXES[index] if index < len(AXES) else None


def profile_shapes(inputs: Sequence[Tuple[str, Sequence[Any]]], min_shapes: Mapping[str, int],
                   opt_shapes: Mapping[str, int], max_shapes: Mapping[str, int]) -> Dict[str, Dict[str, List[int]]]:
    """One optimization profile for every input: {input: {min: [..], opt: [..], max: [..]}}; fixed dims
    stay as they are, dynamic ones take the recipe's batch / seq range."""
    src = {"min": min_shapes, "opt": opt_shapes, "max": max_shapes}
    out: Dict[str, Dict[str, List[int]]] = {}
    for name, dims in inputs:
        shapes: Dict[str, List[int]] = {w: [] for w in WHICH}
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                for w in WHICH:
                    shapes[w].append(d)
                continue
            axis = _axis_of(i, d)
            if axis is None:
                raise BuildError(f"input {name}: dynamic dimension {i} ({d!r}) is neither batch nor seq; the "
                                 "TensorRT optimization profile covers those two axes only (export with fixed "
                                 "sizes for the others)")
            for w in WHICH:
                shapes[w].append(int(src[w][axis]))
        out[name] = shapes
    return out


def shape_arg(profiles: Mapping[str, Mapping[str, Sequence[int]]], which: str) -> str:
    """trtexec's shape syntax: input_ids:1x1,attention_mask:1x1 (also ORT's TensorRT EP profile syntax)."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shapes[which])}" for name, shapes in profiles.items())


def trtexec_args(onnx_name: str, profiles, workspace_mb: int, timing_cache: str, plan: str = PLAN,
                 layers: str = LAYERS) -> List[str]:
    """The trtexec equivalent of build_engine(): same network flag, profiles, pool limit, cache."""
    args = ["trtexec", f"--onnx={onnx_name}",
            # TensorRT 11 builds every network strongly typed and ignores the flag; 10.x needs it
            "--stronglyTyped"]
    if profiles:
        args += [f"--minShapes={shape_arg(profiles, 'min')}", f"--optShapes={shape_arg(profiles, 'opt')}",
                 f"--maxShapes={shape_arg(profiles, 'max')}"]
    args += [f"--memPoolSize=workspace:{int(workspace_mb)}M", f"--timingCacheFile={timing_cache}",
             "--profilingVerbosity=detailed", f"--exportLayerInfo={layers}", f"--saveEngine={plan}"]
    return args


def qcompile_args(overrides: Optional[Sequence[str]], model_name: str, recipe_name: str) -> List[str]:
    """The qcompile command that redoes this build with the engine required (on a GPU machine)."""
    if overrides is None:
        overrides = [f"model={model_name}", f"recipe={recipe_name}", "target=trt"]
    kept = [o for o in overrides if not re.match(r"^[+~]*target\.build_engine=", o)]
    if not any(re.match(r"^target=", o) for o in kept):
        kept.append("target=trt")
    return ["qcompile", *kept, "target.build_engine=require"]


def render_build_script(trtexec: Sequence[str], qcompile: Sequence[str], reason: str) -> str:
    trt_lines = " \\\n    ".join(shlex.quote(a) for a in trtexec)
    why = (f"qcompile did not build the engine here: {reason}." if reason
           else "qcompile built engine.plan with these settings.")
    return f"""#!/usr/bin/env bash
# Builds this run's TensorRT engine (engine.plan) from the TensorRT-ready ONNX, on a machine with an NVIDIA
# GPU and TensorRT >= 10. {why}
# Same settings as qcompile's own build: strongly typed network, the recipe's batch/seq optimization
# profile on every input, the workspace limit, and the timing cache (reused: rebuilds pick the same tactics).
set -euo pipefail
cd "$(dirname "$0")"

if command -v trtexec >/dev/null 2>&1; then
  # trtexec ships with TensorRT's tar/deb packages and NGC containers (not with the pip wheel)
  {trt_lines}
else
  # the same build through TensorRT's Python API (pip install 'qcompile[gpu]')
  python -m targets.trt build .
fi

# The whole build again (export, quantize, engine, check against fp32, bench) with the engine required:
#   {shlex.join(qcompile)}
"""


# -------------------------------------------------------------------------------------------------
# The engine inspector's per-layer report (pure functions over its JSON)
# -------------------------------------------------------------------------------------------------

# Ordered: narrow formats before the wide names they contain (FLOAT8 before FLOAT, UINT8 before INT8).
_DTYPE_RULES = [
    (("FP4", "FLOAT4", "E2M1"), "fp4"),
    (("FP8", "FLOAT8", "E4M3", "E5M2"), "fp8"),
    (("INT4",), "int4"),
    (("UINT8",), "index"),
    (("INT8",), "int8"),
    (("BFLOAT16", "BF16"), "bf16"),
    (("FP16", "HALF"), "fp16"),
    (("FP32", "FLOAT"), "fp32"),
    (("INT32", "INT64", "INT16", "BOOL", "UINT"), "index"),
]
QUANTIZED_LAYER_PRECISIONS = ("fp4", "int4", "fp8", "int8")
FLOAT_LAYER_PRECISIONS = ("bf16", "fp16", "fp32")
_GEMM = re.compile(r"matrixmultiply|matmul|gemm|convolution|fullyconnected|\bconv", re.I)
_QDQ = re.compile(r"quantize", re.I)
_DATA = re.compile(r"^(reformat|shuffle|noop|constant|shape|slice|concatenation|gather|identity|cast|"
                   r"resize|padding|fill|scatter|assertion)", re.I)


def dtype_class(text: Optional[str]) -> Optional[str]:
    """Map an inspector format/datatype string ('Row major linear FP32', 'Channel major INT8 format ...',
    'Half', TensorRT 11's separate 'Datatype') to fp4 | int4 | fp8 | int8 | bf16 | fp16 | fp32 | index."""
    if not text:
        return None
    upper = str(text).upper()
    for keys, cls in _DTYPE_RULES:
        if any(k in upper for k in keys):
            return cls
    return None


def tensor_precision(tensor: Mapping[str, Any]) -> Optional[str]:
    # TensorRT <= 10: "Format/Datatype"; TensorRT 11 split it into "Datatype" and "Format"
    if "Format/Datatype" in tensor:
        return dtype_class(tensor["Format/Datatype"])
    return dtype_class(" ".join(str(tensor[k]) for k in ("Datatype", "Format") if tensor.get(k)))


def _pick(classes: Sequence[Optional[str]]) -> Optional[str]:
    present = [c for c in classes if c]
    for p in QUANTIZED_LAYER_PRECISIONS + FLOAT_LAYER_PRECISIONS:
        if p in present:
            return p
    return "index" if present else None


def classify_layer(layer: Any) -> Dict[str, Any]:
    """One inspector layer -> {name, type, kind: gemm | qdq | data | fused | other, precision}.
    A layer's precision is the narrowest format among its inputs and weights (a fused int8 GEMM reads
    int8 and writes fp16/fp32); its outputs decide only when the inputs say nothing."""
    if not isinstance(layer, Mapping):  # ProfilingVerbosity.LAYER_NAMES_ONLY: just a name
        return {"name": str(layer), "type": "?", "kind": "other", "precision": "unknown"}
    name = str(layer.get("Name", "?"))
    ltype = str(layer.get("ParameterType") or layer.get("LayerType") or "?")
    subtype = str(layer.get("LayerType", ""))
    ins = [tensor_precision(t) for t in layer.get("Inputs") or [] if isinstance(t, Mapping)]
    outs = [tensor_precision(t) for t in layer.get("Outputs") or [] if isinstance(t, Mapping)]
    weights = [dtype_class(layer[k].get("Type")) for k in ("Weights",) if isinstance(layer.get(k), Mapping)]
    precision = _pick(ins + weights) or _pick(outs) or "unknown"
    if precision == "index" and _pick(outs) not in (None, "index"):
        precision = _pick(outs)  # e.g. an embedding Gather: int64 ids in, floats out
    text = f"{ltype} {subtype}"
    if subtype.lower() == "myelin" or name.startswith("{ForeignNode"):
        kind = "fused"  # a Myelin foreign node: many ONNX nodes, its inner precisions not listed
    elif _QDQ.search(text) or (_QDQ.search(name) and not _GEMM.search(text)):
        kind = "qdq"
    elif _GEMM.search(text) or _GEMM.search(name):
        kind = "gemm"
    elif _DATA.match(ltype) or _DATA.match(subtype):
        kind = "data"
    else:
        kind = "other"
    return {"name": name, "type": ltype, "kind": kind, "precision": precision}


def summarize_layers(engine_info: Any) -> Dict[str, Any]:
    """The engine inspector's get_engine_information(LayerInformationFormat.JSON) -> which layers run in
    which precision, and the fraction that run quantized. The fraction's basis is the matmul/conv layers
    when the engine names any (these are what quantization is for), else every compute layer."""
    data = json.loads(engine_info) if isinstance(engine_info, (str, bytes)) else engine_info
    raw = data.get("Layers", []) if isinstance(data, Mapping) else list(data or [])
    layers = [classify_layer(layer) for layer in raw]
    detailed = any(isinstance(layer, Mapping) for layer in raw)

    def hist(items):
        out: Dict[str, int] = {}
        for it in items:
            out[it["precision"]] = out.get(it["precision"], 0) + 1
        return dict(sorted(out.items()))

    gemm = [l for l in layers if l["kind"] == "gemm" and l["precision"] not in ("unknown", "index")]
    compute = [l for l in layers if l["kind"] in ("gemm", "other") and l["precision"] not in ("unknown", "index")]
    basis_name, basis = ("matmul/conv layers", gemm) if gemm else ("compute layers", compute)
    quantized = [l for l in basis if l["precision"] in QUANTIZED_LAYER_PRECISIONS]
    fraction = (len(quantized) / len(basis)) if basis else None
    return {
        "layers": len(layers),
        "detailed": detailed,
        "by_precision": hist(layers),
        "by_kind": {k: sum(1 for l in layers if l["kind"] == k) for k in ("gemm", "qdq", "data", "fused", "other")},
        "gemm_by_precision": hist(gemm),
        "fraction_basis": basis_name,
        "basis_layers": len(basis),
        "quantized_layers": len(quantized),
        "quantized_layer_fraction": fraction,
        "high_precision_layers": [l["name"] for l in basis if l["precision"] in FLOAT_LAYER_PRECISIONS][:20],
        "per_layer": layers,
    }


def quantization_verdict(summary: Mapping[str, Any], graph_quantized: bool, min_fraction: float
                         ) -> Tuple[str, str]:
    """('ok' | 'warn' | 'fail', message). Fail when target.min_quantized_layer_fraction asks for more
    quantized layers than the engine has; warn when a quantized recipe left most layers in fp16/fp32 --
    the usual cause of "INT8 is slower than FP16" in TensorRT (Q/DQ placed where TensorRT cannot fuse it)."""
    frac = summary.get("quantized_layer_fraction")
    basis = summary.get("fraction_basis", "layers")
    if frac is None:
        why = ("the engine was built without detailed profiling verbosity" if not summary.get("detailed")
               else "its layers are fused Myelin nodes whose inner precisions the inspector does not list")
        msg = f"per-layer precision unknown: {why}"
        if min_fraction > 0:
            return "fail", (f"target.min_quantized_layer_fraction={min_fraction} cannot be checked: {msg} -- "
                            "set target.min_quantized_layer_fraction=0 to build anyway")
        return ("warn" if graph_quantized else "ok"), msg
    n_q, n = summary.get("quantized_layers", 0), summary.get("basis_layers", 0)
    high = {k: v for k, v in summary.get("gemm_by_precision" if basis.startswith("matmul") else "by_precision",
                                         {}).items() if k in FLOAT_LAYER_PRECISIONS}
    high_s = ", ".join(f"{v} in {k}" for k, v in high.items()) or "none"
    state = f"{n_q} of {n} {basis} run quantized ({frac:.0%}); high precision: {high_s}"
    if min_fraction > 0 and frac < min_fraction:
        return "fail", (f"{state}: below target.min_quantized_layer_fraction={min_fraction} -- check the "
                        f"Q/DQ placement (engine.layers.json lists every layer's precision), or lower the threshold")
    if graph_quantized and frac < 0.5:
        return "warn", (f"quantized recipe, but {state}: TensorRT kept most of them in high precision, so "
                        "expect this engine to be no faster than fp16 (see engine.layers.json)")
    if not graph_quantized:
        return "ok", f"{state} (the graph has no Q/DQ nodes)"
    return "ok", state


def graph_quantization(onnx_path: Path) -> Dict[str, Any]:
    """Q/DQ nodes in the TensorRT-ready graph, by op type, and its custom-domain ops."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    qdq: Dict[str, int] = {}
    custom = set()
    for node in model.graph.node:
        if "quantize" in node.op_type.lower() or node.op_type.startswith("TRT_FP4"):
            qdq[node.op_type] = qdq.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            custom.add(f"{node.domain}::{node.op_type}")
    return {"qdq_nodes": int(sum(qdq.values())), "qdq_ops": dict(sorted(qdq.items())), "custom_ops": sorted(custom)}


# -------------------------------------------------------------------------------------------------
# The engine build (TensorRT's Python API, imported lazily)
# -------------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    plan: Path
    timing_cache: Path
    timing_cache_loaded: bool
    inspector_json: str
    build_s: float
    tensorrt: str
    device_memory_bytes: Optional[int]
    warnings: List[str] = field(default_factory=list)


def _trt_logger(trt):
    class _Logger(trt.ILogger):
        """Keeps TensorRT's errors for the BuildError message; warnings go to qcompile's log."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: List[str] = []
            self.warnings: List[str] = []

        def log(self, severity, msg):  # noexcept in TensorRT: never raise here
            try:
                if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                    self.errors.append(str(msg))
                elif severity == trt.Logger.WARNING:
                    self.warnings.append(str(msg))
            except Exception:
                pass

    return _Logger()


def _load_timing_cache(config, path: Optional[Path]) -> Tuple[Any, bool]:
    blob = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache, bool(blob)
    # a cache from another TensorRT version or GPU: start a fresh one rather than fail the build
    log.warning("timing cache %s does not match this TensorRT/GPU; building with a fresh cache", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache, False


def build_engine(onnx_path: Path, profiles: Mapping[str, Mapping[str, Sequence[int]]], workspace_mb: int,
                 plan_path: Path, timing_cache_out: Path, timing_cache_in: Optional[Path] = None) -> BuildResult:
    """ONNX -> strongly typed network -> serialized engine plan, with one optimization profile over every
    input, a workspace pool limit, a reused timing cache and detailed profiling verbosity (for the
    inspector). No precision builder flags: the Q/DQ nodes and tensor types of the graph decide every
    layer's precision (TensorRT 11 has no such flags; in 10.x they are ignored for strongly typed networks)."""
    try:
        import tensorrt as trt
    except Exception as e:
        raise BuildError(f"building a TensorRT engine needs the tensorrt package ({type(e).__name__}: {e}) -- "
                         "pip install 'qcompile[gpu]' on a machine with an NVIDIA GPU") from None
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 11: always strongly typed (flag deprecated, may go away)
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    trt.init_libnvinfer_plugins(logger, "")
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)): the parser then finds model.onnx.data for external weights
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors or ["no detail"]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BuildError(f"TensorRT {trt.__version__}'s ONNX parser rejected {Path(onnx_path).name}: "
                         f"{errors[0]}{more}")
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    missing = [t.name for t in net_inputs if t.name not in profiles]
    if missing:
        raise BuildError(f"TensorRT network inputs {missing} have no optimization profile (profiles cover "
                         f"{sorted(profiles)})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for t in net_inputs:
        s = profiles[t.name]
        profile.set_shape(t.name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT rejected the optimization profile {dict(profiles)}: "
                         f"{'; '.join(logger.errors[-3:]) or 'no detail'}")
    _cache, loaded = _load_timing_cache(config, timing_cache_in)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise BuildError(f"TensorRT {trt.__version__} could not build the engine: "
                         f"{'; '.join(logger.errors[-3:]) or 'no error logged'}")
    plan_bytes = bytes(plan)
    Path(plan_path).write_bytes(plan_bytes)
    Path(timing_cache_out).write_bytes(bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise BuildError(f"TensorRT cannot load the plan it just built: {'; '.join(logger.errors[-3:])}")
    inspector = engine.create_engine_inspector()
    info_json = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    # device_memory_size was renamed device_memory_size_v2 (10.x) and the old name removed in 11
    mem = getattr(engine, "device_memory_size_v2", None)
    if mem is None:
        mem = getattr(engine, "device_memory_size", None)
    return BuildResult(plan=Path(plan_path), timing_cache=Path(timing_cache_out), timing_cache_loaded=loaded,
                       inspector_json=info_json, build_s=build_s, tensorrt=str(trt.__version__),
                       device_memory_bytes=int(mem) if mem is not None else None,
                       warnings=list(logger.warnings[-20:]))


def gpu_memory_info() -> Optional[Tuple[int, int]]:
    """(free, total) bytes on the current CUDA device: torch if it has CUDA, else cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return int(free), int(total)
    except Exception:
        pass
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            import importlib

            cudart = importlib.import_module(mod)
            err, free, total = cudart.cudaMemGetInfo()
            if int(err) == 0:
                return int(free), int(total)
        except Exception:
            continue
    return None


# -------------------------------------------------------------------------------------------------
# The target
# -------------------------------------------------------------------------------------------------


def _onnx_files(onnx_path: Path) -> List[Path]:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return [onnx_path] + ([data] if data.exists() else [])


def _cli_overrides() -> Optional[List[str]]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not inside a Hydra run (tests, the library API)
        return None


def _recipe_name(run_dir: Path) -> str:
    try:
        from omegaconf import OmegaConf

        return str(OmegaConf.load(run_dir / "recipe.yaml").recipe.name)
    except Exception:
        return "<recipe>"


class TrtTarget(Target):
    name = "trt"
    needs_onnx = True
    capabilities = TargetCapabilities("trt", runs_onnx=True, ort_session=False, trt_custom_ops=True,
                                      symmetric_int8_only=True, gpu=True)
    summary = ("TensorRT engine plan from the explicit-quantization ONNX (strongly typed); without a GPU, "
               "the ONNX checked with the reference evaluator and the engine build command written")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._runners: Dict[str, Any] = {}

    # -- before anything is built ---------------------------------------------------------------
    def check_environment(self, recipe) -> None:
        mode = normalize_build_engine(self.cfg.build_engine)
        validate_shape_ranges(self.cfg)
        if self.cfg.cpu_runner not in CPU_RUNNERS:
            raise RecipeError("target.cpu_runner", f"bad value {self.cfg.cpu_runner!r}",
                              "use reference (exact, runs TensorRT custom ops) or ort (onnxruntime CPU, faster)")
        if mode == "false":
            return
        gpu = detect_gpu()
        trt_version, trt_error = detect_tensorrt()
        name = str(recipe.get("name", "custom")) if recipe is not None else "custom"
        steps = recipe.get("steps") if recipe is not None else None
        problem = hardware_problem(name, recipe_precisions(steps), gpu, trt_version)
        if problem:
            raise RecipeError("target=trt", problem[0], problem[1])
        build, reason = engine_decision(mode, gpu, trt_version, trt_error)
        if not build and mode == "require":
            raise BuildError(f"target.build_engine=require, but the TensorRT engine cannot be built here: {reason} "
                             "-- run on a machine with an NVIDIA GPU after pip install 'qcompile[gpu]', or use "
                             "target.build_engine=auto to get the TensorRT-ready ONNX, its CPU check and "
                             f"{SCRIPT} (the command that builds the engine)")

    # -- lower ------------------------------------------------------------------------------------
    def lower(self, model, onnx_path: Optional[Path], run_dir: Path) -> Engine:
        if onnx_path is None:
            raise BuildError("target=trt needs the exported ONNX graph")
        run_dir, onnx_path = Path(run_dir), Path(onnx_path)
        mode = normalize_build_engine(self.cfg.build_engine)
        profiles = profile_shapes(onnx_inputs(onnx_path), self.cfg.min_shapes, self.cfg.opt_shapes,
                                  self.cfg.max_shapes)
        graph = graph_quantization(onnx_path)
        cache_in = Path(self.cfg.timing_cache).expanduser() if self.cfg.timing_cache else None
        cache_arg = str(cache_in.resolve()) if cache_in is not None else TIMING_CACHE
        gpu = detect_gpu()
        trt_version, trt_error = detect_tensorrt()
        build, reason = engine_decision(mode, gpu, trt_version, trt_error)

        script = run_dir / SCRIPT
        script.write_text(render_build_script(
            trtexec_args(onnx_path.name, profiles, int(self.cfg.workspace_mb), cache_arg),
            qcompile_args(_cli_overrides(), model.name, _recipe_name(run_dir)), "" if build else reason))
        script.chmod(0o755)
        info: Dict[str, Any] = {
            "engine_built": False, "build_engine": mode, "build_script": SCRIPT,
            "profile": {w: shape_arg(profiles, w) for w in WHICH},
            "workspace_mb": int(self.cfg.workspace_mb), "graph": graph, "notes": [],
            "gpu": gpu.describe() if gpu else None, "tensorrt": trt_version,
        }
        input_names, output_names = list(model.input_names), list(model.output_names)

        if not build:
            if mode == "require":  # validation said yes, the machine changed since: still an error
                raise BuildError(f"target.build_engine=require, but the TensorRT engine cannot be built: {reason}")
            why_no_runner = ""
            try:
                runner, label = self._cpu_runner_kind(onnx_path, graph)
            except BuildError as e:  # fatal only if check or bench asks for a runner (see predictor)
                runner, label, why_no_runner = "none", f"nothing ({e.message})", e.message
            msg = (f"TensorRT engine NOT built ({reason}): model.onnx (the TensorRT-ready graph) is checked on the "
                   f"CPU with {label}; {SCRIPT} in the run directory builds engine.plan on a GPU machine")
            log.warning(msg)
            info.update({"engine_not_built": reason, "runner": label, "cpu_runner": runner,
                         "bench_note": (f"bench latency is {label} on the CPU, not TensorRT: it says nothing about "
                                        "the engine's speed (bench.iterations=3 or bench.enabled=false keeps it short; "
                                        "target.cpu_runner=ort is faster for graphs without custom ops)")})
            info["notes"].append(msg)
            return Engine(target=self.name, path=onnx_path,
                          handle={"kind": runner, "onnx": onnx_path, "why": why_no_runner}, input_names=input_names,
                          output_names=output_names, info=info, files=_onnx_files(onnx_path))

        plan = run_dir / PLAN
        result = build_engine(onnx_path, profiles, int(self.cfg.workspace_mb), plan, run_dir / TIMING_CACHE, cache_in)
        if cache_in is not None:  # the configured cache learns this build's tactics too
            cache_in.parent.mkdir(parents=True, exist_ok=True)
            cache_in.write_bytes(result.timing_cache.read_bytes())
        summary = summarize_layers(result.inspector_json)
        (run_dir / LAYERS).write_text(json.dumps({"summary": {k: v for k, v in summary.items() if k != "per_layer"},
                                                  "layers": summary["per_layer"],
                                                  "inspector": json.loads(result.inspector_json)}, indent=1))
        level, verdict = quantization_verdict(summary, graph["qdq_nodes"] > 0,
                                              float(self.cfg.min_quantized_layer_fraction))
        info.update({
            "engine_built": True, "runner": "TensorRT (polygraphy TrtRunner)", "tensorrt": result.tensorrt,
            "build_s": round(result.build_s, 3), "plan_bytes": plan.stat().st_size,
            "device_memory_mb": (None if result.device_memory_bytes is None
                                 else result.device_memory_bytes / 2**20),
            "timing_cache": {"path": str(result.timing_cache.name), "loaded_from": str(cache_in) if cache_in else None,
                             "reused": result.timing_cache_loaded, "bytes": result.timing_cache.stat().st_size},
            "layers": {k: v for k, v in summary.items() if k not in ("per_layer",)},
            "layers_file": LAYERS, "quantization_check": {"status": level, "message": verdict},
        })
        if level == "fail":
            raise BuildError(f"TensorRT engine precision: {verdict}")
        if level == "warn":
            log.warning("TensorRT engine precision: %s", verdict)
            info["notes"].append(verdict)
        log.info("TensorRT engine built in %.1fs: %s", result.build_s, verdict)
        return Engine(target=self.name, path=plan, handle={"kind": "tensorrt", "plan": plan, "profiles": profiles},
                      input_names=input_names, output_names=output_names, info=info, files=[plan])

    def _cpu_runner_kind(self, onnx_path: Path, graph: Mapping[str, Any]) -> Tuple[str, str]:
        """The reference evaluator (exact, runs TensorRT's custom ops; slower: the MiniLM fp32 check took
        193 s against 68 s with onnxruntime on a loaded 2-core machine), or onnxruntime CPU when the recipe
        asks (target.cpu_runner=ort) or the reference runner is missing -- for plain ONNX graphs only."""
        if self.cfg.cpu_runner == "ort":
            if graph.get("custom_ops"):
                raise BuildError(f"target.cpu_runner=ort: onnxruntime cannot run the TensorRT custom ops "
                                 f"{graph['custom_ops']} of this graph -- use target.cpu_runner=reference")
            return "ort", "onnxruntime CPU (target.cpu_runner=ort)"
        try:
            from compiler.runners.reference import unsupported_ops

            missing = unsupported_ops(onnx_path)
            if missing:
                raise BuildError(f"the ONNX reference runner cannot run {', '.join(missing)}: the TensorRT-ready "
                                 "graph cannot be checked on the CPU -- set check.enabled=false bench.enabled=false to "
                                 f"only write model.onnx and {SCRIPT}")
            return "reference", "the ONNX reference evaluator (onnx.reference + TensorRT custom ops)"
        except ImportError as e:
            if graph.get("custom_ops"):
                raise BuildError(f"checking the TensorRT-ready graph on the CPU needs compiler.runners.reference "
                                 f"({e}); the graph has custom ops {graph['custom_ops']} that onnxruntime cannot run")
            return "ort", f"onnxruntime CPU (fallback: compiler.runners.reference unavailable: {e})"

    # -- run --------------------------------------------------------------------------------------
    def predictor(self, engine: Engine, threads: Optional[int] = None):
        handle = engine.handle
        names = engine.output_names
        if handle["kind"] == "tensorrt":
            runner = self._trt_runner(engine)
            lo = {n: s["min"] for n, s in handle["profiles"].items()}
            hi = {n: s["max"] for n, s in handle["profiles"].items()}

            def predict(feed):
                for n, v in feed.items():
                    if n in hi and any(not l <= d <= h for d, l, h in zip(v.shape, lo[n], hi[n])):
                        raise BuildError(f"input {n} shape {tuple(v.shape)} is outside the engine's optimization "
                                         f"profile {lo[n]}..{hi[n]}: widen target.min_shapes / target.max_shapes")
                out = runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
                return {n: np.asarray(out[n], dtype=np.float32) for n in names}

            return predict
        if handle["kind"] == "none":
            raise BuildError(f"no engine and no CPU runner for the TensorRT-ready graph: {handle['why']}")
        if handle["kind"] == "reference":
            from compiler.runners.reference import reference_predictor

            return reference_predictor(handle["onnx"])
        from targets.ort import create_session

        sess = create_session(handle["onnx"], ["CPUExecutionProvider"], "basic", threads)

        def predict_ort(feed):
            outs = sess.run(names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
            return {n: np.asarray(o, dtype=np.float32) for n, o in zip(names, outs)}

        return predict_ort

    def runner(self, engine: Engine, threads: Optional[int] = None):
        from compiler.runners.callable import CallableRunner

        label = {"tensorrt": "tensorrt-TrtRunner", "reference": "onnx-reference-evaluator"}.get(
            engine.handle["kind"], "onnxruntime-cpu")
        return CallableRunner(self.predictor(engine, threads), engine.input_names, engine.output_names, name=label)

    def _trt_runner(self, engine: Engine):
        """One activated Polygraphy TrtRunner per plan (check and bench share it); the GPU memory its engine
        and context take is measured around the activation and recorded in the report."""
        key = str(engine.handle["plan"])
        if key in self._runners:
            return self._runners[key]
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        before = gpu_memory_info()
        runner = TrtRunner(EngineFromBytes(Path(key).read_bytes()), name="qcompile-trt")
        runner.activate()
        after = gpu_memory_info()
        mem: Dict[str, Any] = {"method": "cudaMemGetInfo around TrtRunner activation"}
        if before and after:
            mem.update({"engine_and_context_mb": (before[0] - after[0]) / 2**20, "device_total_mb": after[1] / 2**20})
        engine.info["gpu_memory"] = mem  # the same dict is report.json's "lower" section
        self._runners[key] = runner
        return runner

    def placement(self, engine: Engine):
        if engine.handle["kind"] == "tensorrt":
            return {"device": engine.info.get("gpu"), "runtime": f"TensorRT {engine.info.get('tensorrt')}"}
        return {"device": "cpu", "runtime": engine.info.get("runner"), "engine_built": False}


# -------------------------------------------------------------------------------------------------
# `python -m targets.trt build <run_dir>`: the engine of a finished CPU run, built on a GPU machine
# -------------------------------------------------------------------------------------------------


def build_run_dir(run_dir: Path) -> Dict[str, Any]:
    """Build engine.plan for a run directory from its model.onnx and recipe.yaml's target section."""
    from omegaconf import OmegaConf

    from compiler.core.schema import TargetConfig

    run_dir = Path(run_dir)
    raw = OmegaConf.load(run_dir / "recipe.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TargetConfig), raw.get("target") or {}))
    validate_shape_ranges(cfg)
    onnx_path = run_dir / "model.onnx"
    profiles = profile_shapes(onnx_inputs(onnx_path), cfg.min_shapes, cfg.opt_shapes, cfg.max_shapes)
    cache_in = Path(cfg.timing_cache).expanduser() if cfg.timing_cache else run_dir / TIMING_CACHE
    result = build_engine(onnx_path, profiles, int(cfg.workspace_mb), run_dir / PLAN, run_dir / TIMING_CACHE,
                          cache_in)
    summary = summarize_layers(result.inspector_json)
    (run_dir / LAYERS).write_text(json.dumps({"summary": {k: v for k, v in summary.items() if k != "per_layer"},
                                              "layers": summary["per_layer"],
                                              "inspector": json.loads(result.inspector_json)}, indent=1))
    level, verdict = quantization_verdict(summary, graph_quantization(onnx_path)["qdq_nodes"] > 0,
                                          float(cfg.min_quantized_layer_fraction))
    return {"plan": str(result.plan), "build_s": result.build_s, "tensorrt": result.tensorrt,
            "precision": level, "message": verdict}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "build":
        print("usage: python -m targets.trt build <run_dir>", file=sys.stderr)
        return 2
    try:
        out = build_run_dir(Path(argv[1]))
    except (BuildError, RecipeError) as e:
        print(f"qcompile: {e.kind}: {e.message}", file=sys.stderr)
        return e.exit_code
    print(f"engine: {out['plan']} (TensorRT {out['tensorrt']}, {out['build_s']:.1f}s); precision: {out['message']}")
    return 1 if out["precision"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
