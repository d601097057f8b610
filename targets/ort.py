"""The ONNX Runtime target: an InferenceSession with the requested execution providers, checked to
really use them (onnxruntime-gpu without a GPU silently falls back to the CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from compiler.errors import BuildError, RecipeError
from targets.base import Engine, Target

log = logging.getLogger(__name__)

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def session_options(opt_level: str = "all", threads: Optional[int] = None, optimized_path: Optional[Path] = None,
                    record_placement: bool = False):
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise RecipeError("target.graph_optimization", f"unknown level {opt_level!r}", f"use one of {list(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if record_placement:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return so


def create_session(model_path: Path, providers: List[str], opt_level: str = "all", threads: Optional[int] = None,
                   optimized_path: Optional[Path] = None, record_placement: bool = False):
    """InferenceSession that fails loudly when the first requested provider is not the one in use."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise BuildError(f"target.providers: {missing} not available in onnxruntime {ort.__version__} "
                         f"(available: {available}); install onnxruntime-gpu for CUDA/TensorRT providers")
    so = session_options(opt_level, threads, optimized_path, record_placement)
    try:
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=list(providers))
    except Exception as e:
        raise BuildError(f"onnxruntime cannot load {Path(model_path).name}: {str(e).splitlines()[0]}") from e
    used = sess.get_providers()
    if not used or used[0] != providers[0]:
        raise BuildError(f"target.providers: asked for {providers[0]} but the session runs {used}: "
                         "onnxruntime fell back silently (no GPU, or a provider library failed to load)")
    return sess


def node_placement(sess) -> Dict[str, Dict[str, int]]:
    """provider -> op type -> node count, from ORT's graph assignment record."""
    out: Dict[str, Dict[str, int]] = {}
    try:
        info = sess.get_provider_graph_assignment_info()
    except Exception:  # older ORT: no record
        return out
    for sub in info:
        ep = getattr(sub, "ep_name", None) or str(sub)
        for node in getattr(sub, "get_nodes", lambda: [])():
            op = getattr(node, "op_type", "?")
            out.setdefault(ep, {})
            out[ep][op] = out[ep].get(op, 0) + 1
    return out


class OrtTarget(Target):
    name = "ort"
    needs_onnx = True
    summary = "ONNX Runtime InferenceSession (CPU, or CUDA / TensorRT execution providers)"

    def lower(self, model, onnx_path: Optional[Path], run_dir: Path) -> Engine:
        optimized = Path(run_dir) / "engine.ort.onnx"
        # the saved engine is ORT's graph after EXTENDED optimizations (ALL adds hardware-specific
        # layout transforms that ORT refuses to serialize); serving sessions use the recipe's level
        save_level = "extended" if self.cfg.graph_optimization == "all" else self.cfg.graph_optimization
        sess = create_session(onnx_path, list(self.cfg.providers), save_level, threads=1, optimized_path=optimized,
                              record_placement=True)
        placement = node_placement(sess)
        del sess
        files = [optimized] + ([optimized.with_name(optimized.name + ".data")]
                               if optimized.with_name(optimized.name + ".data").exists() else [])
        return Engine(target=self.name, path=optimized, handle=Path(onnx_path), input_names=list(model.input_names),
                      output_names=list(model.output_names), files=files,
                      info={"providers": list(self.cfg.providers), "graph_optimization": self.cfg.graph_optimization,
                            "placement": placement})

    def session(self, engine: Engine, threads: Optional[int] = None):
        return create_session(engine.handle, list(self.cfg.providers), self.cfg.graph_optimization, threads)

    def predictor(self, engine: Engine, threads: Optional[int] = None):
        sess = self.session(engine, threads)
        names = engine.output_names

        def predict(feed):
            outs = sess.run(names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
            return {n: np.asarray(o, dtype=np.float32) for n, o in zip(names, outs)}

        return predict

    def placement(self, engine: Engine):
        return {"providers": list(self.cfg.providers), "nodes": engine.info.get("placement", {})}


def _json(o):
    return json.dumps(o, sort_keys=True)
