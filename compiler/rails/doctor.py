"""Guard rails ("doctor"): run the rails of this package after export and after lowering in every
build, and on any ONNX file for `qcompile doctor`; a failed rail stops a build with a BuildError.

The doctor lives beside its rails, below targets in the layers: it is given the target's declared
TargetCapabilities (the build's spec.capabilities, or targets.capabilities_of(name) at the command line)
and never looks a target up by name itself."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, RecipeError
from compiler.core.schema import CONSTANT_PROMOTE_BYTES, DoctorConfig
from compiler.rails import (
    FAILED,
    RAIL_NAMES,
    SKIPPED,
    WARNED,
    RailContext,
    applies,
    coverage,
    first_line,
    fp16_types,
    input_dependence,
    int8_saturation,
    int8_speed,
    memcpy,
    not_applicable,
    provider_fallback,
    result,
    shape_inference,
    size,
    trt_explicit_quant,
)
from compiler.runners.sessions import node_placement, ort_session

log = logging.getLogger("qcompile")

RAILS = {"shape_inference": shape_inference, "size": size, "fp16_types": fp16_types, "coverage": coverage,
         "memcpy": memcpy, "provider_fallback": provider_fallback, "input_dependence": input_dependence,
         "trt_explicit_quant": trt_explicit_quant,
         "int8_speed": int8_speed, "int8_saturation": int8_saturation}
EXPORT_RAILS = ("shape_inference", "size")  # the ones that judge the freshly exported graph


def default_config():
    return DoctorConfig()


def _config(spec):
    cfg = getattr(spec, "doctor", None)
    return cfg if cfg is not None else default_config()


def _constant_limit(cfg, export_cfg=None) -> int:
    if getattr(cfg, "max_constant_bytes", None):
        return int(cfg.max_constant_bytes)
    return int(getattr(export_cfg, "constant_promote_bytes", None) or CONSTANT_PROMOTE_BYTES)


def run_rails(ctx: RailContext, names=RAIL_NAMES) -> List[Dict[str, Any]]:
    """Every rail in order, each only where its declaration (`applies_to`) covers the target; a rail that
    throws is reported as failed with its error, never a crash."""
    out = []
    for name in names:
        rail = RAILS[name]
        if not applies(rail, ctx.target):
            out.append(not_applicable(rail, ctx.target))
            continue
        try:
            out.append(rail.run(ctx))
        except Exception as e:
            out.append(result(name, FAILED, f"the rail itself failed: {type(e).__name__}: {first_line(e)}"))
    return out


def render_table(results: List[Dict[str, Any]]) -> str:
    lines = ["| rail | status | details |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rail']} | {r['status']} | {str(r.get('message', '')).replace('|', '/')} |")
    return "\n".join(lines)


def failures(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in results if r["status"] == FAILED]


def failure_message(results: List[Dict[str, Any]]) -> str:
    return "; ".join(f"guard rail {r['rail']} failed: {r['message']}" for r in failures(results))


# -- ONNX Runtime probe: the optimized graph and node placement for the requested providers -----------

def probe_ort(onnx_path: Path, providers: List[str], work_dir: Path) -> Dict[str, Any]:
    """ORT's view of a graph for `providers`: optimized_path (its optimized graph), placement
    (provider -> op -> count), provider_error (provider missing or silently replaced), probe_error
    (no session at all). The session is made the way the ort target makes its own (EXTENDED level, so
    the optimized graph can be saved; placement recorded)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        msg = (f"{missing} not available in onnxruntime {ort.__version__} (available: {available})")
        return {"provider_error": msg, "probe_error": msg}
    optimized = Path(work_dir) / (Path(onnx_path).stem + ".optimized.onnx")
    try:
        sess = ort_session(onnx_path, providers, "extended", threads=1, optimized_path=optimized,
                           record_placement=True)
    except Exception as e:
        return {"probe_error": f"onnxruntime cannot load {Path(onnx_path).name}: {first_line(e)}"}
    out: Dict[str, Any] = {"optimized_path": optimized, "placement": node_placement(sess)}
    used = sess.get_providers()
    if not used or used[0] != providers[0]:
        out["provider_error"] = f"asked for {providers[0]} but the session runs {used} (silent fallback)"
    return out


# -- in a build ---------------------------------------------------------------------------------------

def _quantized(spec) -> Optional[bool]:
    cfg = _config(spec)
    if cfg.quantized is not None:
        return bool(cfg.quantized)
    return coverage.recipe_quantizes(getattr(spec, "steps", []))


def after_export(onnx_path: Path, spec, report: Dict[str, Any]) -> Path:
    """Right after export (and after the pipeline's constant fix-ups, compiler.graph.fix_exported): the
    rails that judge the exported graph itself (shape inference, size). Their results join the report's
    rail table; a failure here stops the build before quantization."""
    cfg = _config(spec)
    if not cfg.enabled:
        return onnx_path
    ctx = RailContext(target=spec.capabilities, config=cfg, onnx_path=Path(onnx_path),
                      exporter=spec.export.exporter, constant_limit=_constant_limit(cfg, spec.export))
    results = run_rails(ctx, EXPORT_RAILS)
    for r in results:
        r["stage"] = "export"
        if r["status"] in (WARNED, FAILED):
            log.warning("[doctor] %s %s after export: %s", r["rail"], r["status"], r["message"])
    report["doctor_export"] = results
    if failures(results):
        _write_doctor_md(report, results)
        raise BuildError(failure_message(results))
    return onnx_path


def after_lower(engine, onnx_path, target, spec, report) -> List[Dict[str, Any]]:
    """After lowering: every rail on the final graph and the engine. Returns the rail table for the
    report; raises BuildError naming the rail(s) when one fails (DOCTOR.md keeps the table)."""
    cfg = _config(spec)
    if not cfg.enabled:
        return [result("doctor", SKIPPED, "doctor.enabled=false: no guard rail ran")]
    caps = target.capabilities
    ctx = RailContext(target=caps, config=cfg, onnx_path=Path(onnx_path) if onnx_path else None,
                      providers=list(getattr(spec.target, "providers", None) or ["CPUExecutionProvider"]),
                      exporter=spec.export.exporter, quantized=_quantized(spec), steps=report.get("steps", {}),
                      recipe_steps=list(spec.steps),
                      input_names=list(engine.input_names), constant_limit=_constant_limit(cfg, spec.export),
                      int8_probe=report.get("int8_probe"))
    if not caps.runs_onnx:  # the torch module itself is the engine
        ctx.module = engine.module if engine.module is not None else engine.handle
        ctx.providers = [str(getattr(spec.target, "device", "cpu"))]
    if caps.ort_session and engine.path is not None and Path(engine.path).exists():
        ctx.optimized_path = Path(engine.path)  # the ort target saved ORT's optimized graph
        ctx.placement = engine.info.get("placement")
    try:
        ctx.predict = target.predictor(engine, threads=1)
    except Exception as e:  # e.g. a TensorRT plan on a machine without a GPU: the rail falls back to ORT
        log.info("[doctor] engine predictor unavailable (%s); input dependence runs the ONNX graph", first_line(e))
    results = run_rails(ctx)
    # an export-stage rail that warned keeps its own row (the final graph may have been rewritten since)
    for r in report.get("doctor_export", []):
        if r["status"] in (WARNED, FAILED):
            results.append({**r, "rail": f"{r['rail']} (export)"})
    for r in results:
        if r["status"] in (WARNED, FAILED):
            log.warning("[doctor] %s %s: %s", r["rail"], r["status"], r["message"])
    if failures(results):
        report["doctor"] = results
        _write_doctor_md(report, results)
        raise BuildError(failure_message(results))
    return results


def _write_doctor_md(report: Dict[str, Any], results: List[Dict[str, Any]]) -> None:
    run_dir = report.get("build", {}).get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        (Path(run_dir) / "DOCTOR.md").write_text("# qcompile doctor\n\n" + render_table(results) + "\n")


# -- on any ONNX file: `qcompile doctor path/to/model.onnx target=ort|trt` ----------------------------

def doctor_file(onnx_path: Path, target: TargetCapabilities, config=None, providers: Optional[List[str]] = None,
                quantized: Optional[bool] = None) -> List[Dict[str, Any]]:
    """Every rail that applies to `target` (its declared capabilities) on an ONNX file from anywhere.
    ORT's optimized graph and placement come from a session on `providers` (default: the CPU) where the
    target runs an ONNX Runtime session."""
    import onnx

    cfg = config or default_config()
    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
        if not model.ir_version or not model.graph.node:  # protobuf parses an empty file as an empty ModelProto
            raise ValueError("no ir_version or no graph nodes: empty or not an ONNX model")
    except Exception as e:
        # the file is the caller's argument (`qcompile doctor <file>`), not something a build produced: a bad
        # argument (exit 2), not a failed build
        raise RecipeError("path", f"{onnx_path} is not a readable ONNX model ({first_line(e)})",
                          "give an ONNX file (a serialized onnx.ModelProto) or a run directory") from None
    providers = list(providers or ["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="qcompile-doctor-") as tmp:
        ctx = RailContext(target=target, config=cfg, onnx_path=onnx_path, providers=providers,
                          quantized=quantized if quantized is not None else cfg.quantized,
                          constant_limit=_constant_limit(cfg))
        if target.ort_session:
            for k, v in probe_ort(onnx_path, providers, Path(tmp)).items():
                setattr(ctx, k, v)
        results = run_rails(ctx)
    return results
