"""Guard rails ("doctor"): automatic checks after export and after lowering (placeholder wiring;
the rails themselves live in compiler/rails/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List


def after_export(onnx_path: Path, spec, report: Dict[str, Any]) -> Path:
    return onnx_path


def after_lower(engine, onnx_path, target, spec, report) -> List[Dict[str, Any]]:
    return []
