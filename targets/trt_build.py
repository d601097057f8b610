"""The TensorRT engine build of the trt target: the engine itself (TensorRT's Python API, imported lazily),
the equivalent trtexec / qcompile commands written into build_engine.sh, the timing cache (one copy per
run, the shared one locked), and the build of a finished run directory on a GPU machine."""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.core.errors import BuildError
from compiler.core.schema import TargetConfig
from targets.profiles import onnx_inputs, profile_shapes, shape_arg, validate_shape_ranges
from targets.trt_layers import graph_quantization, quantization_verdict, summarize_layers

log = logging.getLogger(__name__)

PLAN = "engine.plan"
LAYERS = "engine.layers.json"
TIMING_CACHE = "timing.cache"
SCRIPT = "build_engine.sh"


def trtexec_args(onnx_name: str, profiles, workspace_mb: int, timing_cache: str, plan: str = PLAN,
                 layers: str = LAYERS) -> list[str]:
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


def qcompile_args(overrides: Sequence[str] | None, model_name: str, recipe_name: str) -> list[str]:
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



@dataclass
class BuildResult:
    plan: Path
    timing_cache: Path
    timing_cache_loaded: bool
    inspector_json: str
    build_s: float
    tensorrt: str
    device_memory_bytes: int | None
    warnings: list[str] = field(default_factory=list)


def _lock(path: Path):
    """Polygraphy's lock on a file (an exclusive lock on path + ".lock"): the one its timing-cache loaders take."""
    from polygraphy.util import LockFile

    return LockFile(str(path))


def run_timing_cache(shared: Path | None, run_cache: Path) -> Path:
    """This run's own timing cache: a copy of the configured (shared) cache taken under its lock, so a
    parallel job that is merging into the shared file is never read half-written. Returns run_cache."""
    run_cache = Path(run_cache)
    if shared is not None and Path(shared).exists() and Path(shared).resolve() != run_cache.resolve():
        with _lock(Path(shared)):
            run_cache.write_bytes(Path(shared).read_bytes())
    return run_cache


def _publish_timing_cache(config, shared: Path) -> None:
    """Merge this build's tactics into the shared cache under its lock (what Polygraphy's
    EngineBytesFromNetwork(save_timing_cache=...) does for the one file it saves; the run keeps its own copy)."""
    shared.parent.mkdir(parents=True, exist_ok=True)
    cache = config.get_timing_cache()
    with _lock(shared):
        if shared.exists():
            previous = config.create_timing_cache(shared.read_bytes())
            if previous is not None and not cache.combine(previous, ignore_mismatch=True):
                log.warning("timing cache %s could not be merged (another TensorRT or GPU): overwritten", shared)
        shared.write_bytes(bytes(cache.serialize()))


def _tensorrt():
    """TensorRT through Polygraphy's lazy import; a missing package is a BuildError that says what to install."""
    from polygraphy import mod

    lazy = mod.lazy_import("tensorrt")
    if not lazy.is_importable():
        raise BuildError("building a TensorRT engine needs the tensorrt package (not importable) -- "
                         "pip install 'qcompile[gpu]' on a machine with an NVIDIA GPU")
    return lazy


def _polygraphy_errors(text: str) -> list[str]:
    """The [E] lines Polygraphy logged (TensorRT's parser and builder errors), without colour codes."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [ln.split("[E]", 1)[1].strip() for ln in clean.splitlines() if "[E]" in ln and ln.split("[E]", 1)[1].strip()]


def build_engine(onnx_path: Path, profiles: Mapping[str, Mapping[str, Sequence[int]]], workspace_mb: int,
                 plan_path: Path, timing_cache_out: Path, timing_cache_in: Path | None = None,
                 shared_timing_cache: Path | None = None) -> BuildResult:
    """ONNX -> strongly typed network -> engine plan through Polygraphy's loaders (NetworkFromOnnxPath,
    CreateConfig, EngineFromNetwork, SaveEngine): one optimization profile over every input, a workspace
    pool limit, the timing cache (loaded from timing_cache_in, saved to timing_cache_out, merged into
    shared_timing_cache under its lock) and detailed profiling verbosity for the inspector. No precision
    builder flags: the Q/DQ nodes and tensor types of the graph decide every layer's precision."""
    import contextlib
    import io

    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    trt = _tensorrt()
    version = str(trt.__version__)
    # TensorRT 11 builds every network strongly typed; the flag exists in 10.x and 11.x (tests/targets/trt_api)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    loaded = timing_cache_in is not None and Path(timing_cache_in).exists()
    logged = io.StringIO()
    try:
        # the parser's and builder's errors are read from Polygraphy's log: at least ERROR must reach it,
        # whatever severity another part of the process left on the shared logger
        with contextlib.redirect_stdout(logged), G_LOGGER.verbosity(G_LOGGER.ERROR):
            # parse_from_file (inside NetworkFromOnnxPath): the parser then finds model.onnx.data
            builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)()
            net_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
            missing = [n for n in net_inputs if n not in profiles]
            if missing:  # Polygraphy would fill them with a fixed default shape: say so instead
                raise BuildError(f"TensorRT network inputs {missing} have no optimization profile (profiles cover "
                                 f"{sorted(profiles)})")
            profile = Profile()
            for name in net_inputs:
                s = profiles[name]
                profile.add(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
            config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache_in) if loaded else None,
                                  memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_mb) << 20},
                                  profiling_verbosity=trt.ProfilingVerbosity.DETAILED)(builder, network)
            t0 = time.perf_counter()
            engine = EngineFromNetwork((builder, network, parser), config=config,
                                       save_timing_cache=str(timing_cache_out))()
            build_s = time.perf_counter() - t0
            SaveEngine(engine, str(plan_path))()
    except PolygraphyException as e:
        errors = _polygraphy_errors(logged.getvalue()) or [str(e).strip().splitlines()[0] if str(e).strip() else
                                                          "no detail"]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        what = "'s ONNX parser rejected" if "parse" in str(e).lower() else " could not build"
        raise BuildError(f"TensorRT {version}{what} {Path(onnx_path).name}: {errors[0]}{more}") from None
    finally:
        if logged.getvalue():
            log.debug("polygraphy: %s", logged.getvalue()[-4000:])
    if shared_timing_cache is not None:
        _publish_timing_cache(config, Path(shared_timing_cache))
    info_json = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    # device_memory_size was renamed device_memory_size_v2 (10.x) and the old name removed in 11
    mem = getattr(engine, "device_memory_size_v2", None)
    if mem is None:
        mem = getattr(engine, "device_memory_size", None)
    warnings = [ln for ln in logged.getvalue().splitlines() if "[W]" in ln][-20:]
    return BuildResult(plan=Path(plan_path), timing_cache=Path(timing_cache_out), timing_cache_loaded=loaded,
                       inspector_json=info_json, build_s=build_s, tensorrt=version,
                       device_memory_bytes=int(mem) if mem is not None else None, warnings=warnings)


def gpu_memory_info() -> tuple[int, int] | None:
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



def build_run_dir(run_dir: Path) -> dict[str, Any]:
    """Build engine.plan for a run directory from its model.onnx and recipe.yaml's target section."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    raw = OmegaConf.load(run_dir / "recipe.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TargetConfig), raw.get("target") or {}))
    validate_shape_ranges(cfg)
    onnx_path = run_dir / "model.onnx"
    profiles = profile_shapes(onnx_inputs(onnx_path), cfg.min_shapes, cfg.opt_shapes, cfg.max_shapes)
    shared = Path(cfg.timing_cache).expanduser() if cfg.timing_cache else None
    run_cache = run_timing_cache(shared, run_dir / TIMING_CACHE)
    result = build_engine(onnx_path, profiles, int(cfg.workspace_mb), run_dir / PLAN, run_cache, run_cache,
                          shared_timing_cache=shared)
    summary = summarize_layers(result.inspector_json)
    (run_dir / LAYERS).write_text(json.dumps({"summary": {k: v for k, v in summary.items() if k != "per_layer"},
                                              "layers": summary["per_layer"],
                                              "inspector": json.loads(result.inspector_json)}, indent=1))
    level, verdict = quantization_verdict(summary, graph_quantization(onnx_path)["qdq_nodes"] > 0,
                                          float(cfg.min_quantized_layer_fraction))
    return {"plan": str(result.plan), "build_s": result.build_s, "tensorrt": result.tensorrt,
            "precision": level, "message": verdict}
