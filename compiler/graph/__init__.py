"""ONNX graph passes run after export: standard-op lowering, weight folding, constant fix-ups.

The two entry points the pipeline's export stage calls on every exported graph live here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from compiler.core.schema import CONSTANT_PROMOTE_BYTES
from compiler.graph.constants import fix_constants
from compiler.graph.input_flow import check_input_flow as _input_flow


def fix_exported(onnx_path: Path, work_dir: Path, export_cfg, report: Dict[str, Any]) -> Path:
    """Constant fix-ups right after export (compiler.graph.constants): constant subgraphs evaluated into
    initializers, Constants >= export.constant_promote_bytes promoted to initializers."""
    out, counts = fix_constants(Path(onnx_path), Path(work_dir) / "export_constants.onnx",
                                int(getattr(export_cfg, "constant_promote_bytes", CONSTANT_PROMOTE_BYTES)),
                                str(getattr(export_cfg, "external_data", "auto")))
    report.setdefault("export", {}).update(counts)
    return out


def check_input_flow(onnx_path: Path, input_names: List[str], report: Dict[str, Any]) -> None:
    """BuildError when the graph's outputs do not depend on its inputs (compiler.graph.input_flow)."""
    report.setdefault("export", {})["input_flow"] = _input_flow(Path(onnx_path), input_names)
