"""The ONNX Runtime target: an InferenceSession with the requested execution providers, checked to
really use them (onnxruntime-gpu without a GPU silently falls back to the CPU)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, List, Optional

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, RecipeError
from compiler.graph.io import needs_external_data
from compiler.runners.sessions import node_placement, ort_session, session_predictor
from targets.base import Engine, Target
from targets.profiles import onnx_inputs, profile_shapes, shape_arg
from targets.trt_hardware import detect_gpu

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")
# providers that compile subgraphs into their own engines: ORT cannot save its optimized graph for them
COMPILING_PROVIDERS = ("TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")

def check_providers(providers: List[str]) -> None:
    """target.providers against this onnxruntime build: a name it does not know is a recipe error; a
    provider it knows but was not built with (CUDA on the CPU-only wheel) cannot run here."""
    import onnxruntime as ort

    if not providers:
        raise RecipeError("target.providers", "empty", "e.g. target.providers=[CPUExecutionProvider]")
    known = ort.get_all_providers()
    for p in providers:
        if p not in known:
            import difflib

            close = difflib.get_close_matches(str(p), known, n=1)
            raise RecipeError("target.providers", f"unknown execution provider {p!r}",
                              f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(known)}")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        gpu = any(p in GPU_PROVIDERS for p in missing)
        fix = ("install onnxruntime-gpu==1.31.1 instead of onnxruntime (pip install 'qcompile[gpu]'; TensorRT EP "
               "also needs tensorrt) on a machine with an NVIDIA GPU, or use target.providers=[CPUExecutionProvider]"
               if gpu else "use target.providers=[CPUExecutionProvider]")
        raise BuildError(f"target.providers: {', '.join(missing)} not available in this onnxruntime "
                         f"{ort.__version__} build (available: {', '.join(available)}) -- {fix}")

def provider_list(providers: List[str], provider_options: Optional[Dict[str, Dict]] = None) -> List:
    """ORT's providers argument: a name, or (name, options) where the recipe gives options for it."""
    opts = provider_options or {}
    return [(p, dict(opts[p])) if opts.get(p) else p for p in providers]

def create_session(model_path: Path, providers: List[str], opt_level: str = "all", threads: Optional[int] = None,
                   optimized_path: Optional[Path] = None, record_placement: bool = False,
                   provider_options: Optional[Dict[str, Dict]] = None, profile_prefix: Optional[str] = None,
                   disabled_optimizers: Optional[List[str]] = None):
    """InferenceSession that fails loudly when the first requested provider is not the one in use."""
    check_providers(list(providers))
    # past 2 GB ORT can save the optimized graph only with its tensors beside it
    external = optimized_path is not None and needs_external_data(Path(model_path))
    try:
        sess = ort_session(model_path, provider_list(list(providers), provider_options), opt_level, threads,
                           optimized_path, record_placement, optimized_external_data=external,
                           profile_prefix=profile_prefix, disabled_optimizers=list(disabled_optimizers or ()))
    except Exception as e:
        raise BuildError(f"onnxruntime cannot load {Path(model_path).name}: {str(e).splitlines()[0]}") from e
    used = sess.get_providers()
    if not used or used[0] != providers[0]:
        raise BuildError(f"target.providers: asked for {providers[0]} but the session runs {used}: "
                         "onnxruntime fell back silently (no GPU, or a provider library failed to load)")
    return sess

class OrtTarget(Target):
    name = "ort"
    needs_onnx = True
    capabilities = TargetCapabilities("ort", runs_onnx=True, ort_session=True, trt_custom_ops=False,
                                      symmetric_int8_only=False, gpu=False, ort_cpu_kernels=True)
    summary = "ONNX Runtime InferenceSession (CPU, or CUDA / TensorRT execution providers)"

    @classmethod
    def capabilities_for(cls, cfg) -> TargetCapabilities:
        providers = list(getattr(cfg, "providers", None) or ["CPUExecutionProvider"])
        return dataclasses.replace(cls.capabilities, ort_cpu_kernels=providers[0] == "CPUExecutionProvider")

    def check_environment(self, recipe) -> None:
        check_providers(list(self.cfg.providers))
        if self.cfg.providers[0] in GPU_PROVIDERS:
            # onnxruntime-gpu lists CUDA/TensorRT as available on any machine, then falls back to the CPU
            # when the session starts: say so now rather than after export
            if detect_gpu() is None:
                raise BuildError(f"target.providers: {self.cfg.providers[0]} needs an NVIDIA GPU and none was found "
                                 "(torch.cuda / nvidia-smi); onnxruntime would silently run on the CPU -- run on a GPU "
                                 "machine or use target.providers=[CPUExecutionProvider]")
        unknown = sorted(set(self.cfg.provider_options) - set(self.cfg.providers))
        if unknown:
            raise RecipeError(f"target.provider_options.{unknown[0]}", "options for a provider not in target.providers",
                              f"add it to target.providers or remove its options ({list(self.cfg.providers)})")

    def provider_options(self, onnx_path: Path, run_dir: Path) -> Dict[str, Dict]:
        """The recipe's target.provider_options over defaults: the TensorRT EP gets the recipe's workspace,
        its batch/seq optimization profile and engine + timing caches in the run directory (so the bench
        session reuses the engines the lower session built)."""
        out: Dict[str, Dict] = {}
        if "TensorrtExecutionProvider" in self.cfg.providers:
            profiles = profile_shapes(onnx_inputs(onnx_path), self.cfg.min_shapes, self.cfg.opt_shapes,
                                      self.cfg.max_shapes)
            cache = str(Path(run_dir) / "ort_trt_cache")
            out["TensorrtExecutionProvider"] = {
                "trt_max_workspace_size": int(self.cfg.workspace_mb) << 20,
                "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                "trt_profile_min_shapes": shape_arg(profiles, "min"),
                "trt_profile_opt_shapes": shape_arg(profiles, "opt"),
                "trt_profile_max_shapes": shape_arg(profiles, "max"),
            }
        for p, opts in (self.cfg.provider_options or {}).items():
            out.setdefault(p, {}).update(dict(opts))
        return out

    def lower(self, model, onnx_path: Optional[Path], run_dir: Path, build_info=None) -> Engine:
        providers = list(self.cfg.providers)
        options = self.provider_options(Path(onnx_path), Path(run_dir))
        compiling = providers[0] in COMPILING_PROVIDERS
        # the saved engine is ORT's graph after EXTENDED optimizations (ALL adds hardware-specific
        # layout transforms that ORT refuses to serialize); serving sessions use the recipe's level.
        # A compiling provider (TensorRT EP) has no graph to save: its engines go to its cache instead.
        optimized = None if compiling else Path(run_dir) / "engine.ort.onnx"
        save_level = "extended" if self.cfg.graph_optimization == "all" else self.cfg.graph_optimization
        sess = create_session(onnx_path, providers, save_level, threads=1, optimized_path=optimized,
                              record_placement=True, provider_options=options,
                              disabled_optimizers=list(self.cfg.disabled_optimizers))
        placement = node_placement(sess)
        used = sess.get_providers()
        del sess
        artifact = Path(onnx_path) if compiling else optimized
        files = [artifact] + ([artifact.with_name(artifact.name + ".data")]
                              if artifact.with_name(artifact.name + ".data").exists() else [])
        info = {"providers": providers, "session_providers": used, "graph_optimization": self.cfg.graph_optimization,
                "disabled_optimizers": list(self.cfg.disabled_optimizers), "placement": placement}
        if options:
            info["provider_options"] = options
        return Engine(target=self.name, path=None if compiling else optimized, handle=Path(onnx_path),
                      input_names=list(model.input_names), output_names=list(model.output_names), files=files,
                      info=info)

    def load(self, run_dir: Path, info, input_names, output_names) -> Engine:
        # lower() serves from model.onnx (engine.ort.onnx is ORT's optimized copy of it, for inspection)
        run_dir = Path(run_dir)
        saved = run_dir / "engine.ort.onnx"
        return Engine(target=self.name, path=saved if saved.is_file() else None, handle=run_dir / "model.onnx",
                      input_names=list(input_names), output_names=list(output_names), info=dict(info))

    def session(self, engine: Engine, threads: Optional[int] = None, profile_prefix: Optional[str] = None):
        return create_session(engine.handle, list(self.cfg.providers), self.cfg.graph_optimization, threads,
                              provider_options=engine.info.get("provider_options"), profile_prefix=profile_prefix,
                              disabled_optimizers=list(self.cfg.disabled_optimizers))

    def predictor(self, engine: Engine, threads: Optional[int] = None, profile_prefix: Optional[str] = None):
        return session_predictor(self.session(engine, threads, profile_prefix), engine.output_names)

    def placement(self, engine: Engine):
        return {"providers": list(self.cfg.providers), "nodes": engine.info.get("placement", {})}
