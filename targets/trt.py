"""The TensorRT target: the TensorRT-ready explicit-quantization ONNX built into a strongly typed engine plan
where TensorRT and a GPU are present, with its per-layer precision report; without them, the same ONNX
checked on the CPU and the exact command that builds the engine on a GPU machine written beside it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, RecipeError
from compiler.runners.callable import CallableRunner
from compiler.runners.reference import reference_predictor, unsupported_ops
from compiler.runners.sessions import cpu_runner_kind, ort_session, session_predictor
from targets.base import BuildInfo, Engine, Target
from targets.profiles import WHICH, onnx_inputs, profile_shapes, shape_arg, validate_shape_ranges
from targets.trt_build import (
    LAYERS,
    PLAN,
    SCRIPT,
    TIMING_CACHE,
    build_engine,
    build_run_dir,
    gpu_memory_info,
    qcompile_args,
    render_build_script,
    run_timing_cache,
    trtexec_args,
)
from targets.trt_hardware import (
    detect_gpu,
    detect_tensorrt,
    engine_decision,
    hardware_problem,
    normalize_build_engine,
    recipe_precisions,
)
from targets.trt_layers import graph_quantization, quantization_verdict, summarize_layers

log = logging.getLogger(__name__)

CPU_RUNNERS = ("reference", "ort")


def _onnx_files(onnx_path: Path) -> List[Path]:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return [onnx_path] + ([data] if data.exists() else [])


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
        self._memory: Dict[str, Dict[str, Any]] = {}  # plan -> GPU memory measured when its runner started

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
    def lower(self, model, onnx_path: Optional[Path], run_dir: Path, build_info: Optional[BuildInfo] = None) -> Engine:
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
        info_of = build_info or BuildInfo(model_name=model.name)
        build, reason = engine_decision(mode, gpu, trt_version, trt_error)

        script = run_dir / SCRIPT
        script.write_text(render_build_script(
            trtexec_args(onnx_path.name, profiles, int(self.cfg.workspace_mb), cache_arg),
            qcompile_args(info_of.overrides, info_of.model_name or model.name, info_of.recipe_name),
            "" if build else reason))
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
        # this run builds from its own copy of the configured cache (read under its lock) and merges what it
        # learned back under the same lock: parallel sweep jobs never rewrite one file at once
        run_cache = run_timing_cache(cache_in, run_dir / TIMING_CACHE)
        result = build_engine(onnx_path, profiles, int(self.cfg.workspace_mb), plan, run_cache, run_cache,
                              shared_timing_cache=cache_in)
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

    def load(self, run_dir: Path, info, input_names, output_names) -> Engine:
        """The plan when lower() built one, else the CPU runner the check used on model.onnx."""
        run_dir = Path(run_dir)
        onnx_path = run_dir / "model.onnx"
        if info.get("engine_built"):
            profiles = profile_shapes(onnx_inputs(onnx_path), self.cfg.min_shapes, self.cfg.opt_shapes,
                                      self.cfg.max_shapes)
            handle: dict[str, Any] = {"kind": "tensorrt", "plan": run_dir / PLAN, "profiles": profiles}
            path = run_dir / PLAN
        else:
            handle = {"kind": info.get("cpu_runner", "reference"), "onnx": onnx_path,
                      "why": info.get("engine_not_built", "")}
            path = onnx_path
        return Engine(target=self.name, path=path, handle=handle, input_names=list(input_names),
                      output_names=list(output_names), info=dict(info))

    def _cpu_runner_kind(self, onnx_path: Path, graph: Mapping[str, Any]) -> Tuple[str, str]:
        """The reference evaluator (exact, runs TensorRT's custom ops; slower: the MiniLM fp32 check took
        193 s against 68 s with onnxruntime on a loaded 2-core machine), or onnxruntime CPU when the recipe
        asks (target.cpu_runner=ort) or the reference runner is missing -- for plain ONNX graphs only."""
        if self.cfg.cpu_runner == "ort":
            import onnx

            if graph.get("custom_ops"):
                raise BuildError(f"target.cpu_runner=ort: onnxruntime cannot run the TensorRT custom ops "
                                 f"{graph['custom_ops']} of this graph -- use target.cpu_runner=reference")
            if cpu_runner_kind(onnx.load(str(onnx_path), load_external_data=False)) != "ort":
                raise BuildError("target.cpu_runner=ort: onnxruntime has no CPU kernels for this graph's FLOAT4E2M1 "
                                 "tensors -- use target.cpu_runner=reference")
            return "ort", "onnxruntime CPU (target.cpu_runner=ort)"

        missing = unsupported_ops(onnx_path)
        if missing:
            raise BuildError(f"the ONNX reference runner cannot run {', '.join(missing)}: the TensorRT-ready "
                             "graph cannot be checked on the CPU -- set check.enabled=false bench.enabled=false to "
                             f"only write model.onnx and {SCRIPT}")
        return "reference", "the ONNX reference evaluator (onnx.reference + TensorRT custom ops)"

    # -- run --------------------------------------------------------------------------------------
    def predictor(self, engine: Engine, threads: Optional[int] = None, profile_prefix: Optional[str] = None):
        handle = engine.handle
        names = engine.output_names
        if handle["kind"] == "tensorrt":
            runner = self._trt_runner(engine)
            lo = {n: s["min"] for n, s in handle["profiles"].items()}
            hi = {n: s["max"] for n, s in handle["profiles"].items()}

            def predict(feed):
                for n, v in feed.items():
                    if n in hi and any(not low <= d <= high for d, low, high in zip(v.shape, lo[n], hi[n])):
                        raise BuildError(f"input {n} shape {tuple(v.shape)} is outside the engine's optimization "
                                         f"profile {lo[n]}..{hi[n]}: widen target.min_shapes / target.max_shapes")
                out = runner.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
                return {n: np.asarray(out[n], dtype=np.float32) for n in names}

            return predict
        if handle["kind"] == "none":
            raise BuildError(f"no engine and no CPU runner for the TensorRT-ready graph: {handle['why']}")
        if handle["kind"] == "reference":
            return reference_predictor(handle["onnx"])
        return session_predictor(ort_session(handle["onnx"], opt_level="basic", threads=threads,
                                             profile_prefix=profile_prefix), names)

    def runner(self, engine: Engine, threads: Optional[int] = None):
        label = {"tensorrt": "tensorrt-TrtRunner", "reference": "onnx-reference-evaluator"}.get(
            engine.handle["kind"], "onnxruntime-cpu")
        return CallableRunner(self.predictor(engine, threads), engine.input_names, engine.output_names, name=label)

    def _trt_runner(self, engine: Engine):
        """One activated Polygraphy TrtRunner per plan (check and bench share it); the GPU memory its engine
        and context take is measured around the activation and kept for placement() (the engine's info
        is what lower reported, and stays so)."""
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
        self._memory[key] = mem
        self._runners[key] = runner
        return runner

    def placement(self, engine: Engine):
        if engine.handle["kind"] == "tensorrt":
            out = {"device": engine.info.get("gpu"), "runtime": f"TensorRT {engine.info.get('tensorrt')}"}
            if str(engine.handle["plan"]) in self._memory:
                out["gpu_memory"] = self._memory[str(engine.handle["plan"])]
            return out
        return {"device": "cpu", "runtime": engine.info.get("runner"), "engine_built": False}


# `python -m targets.trt build <run_dir>` (what build_engine.sh runs without trtexec): targets.trt_build.build_run_dir


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

