"""Reading and writing ONNX files: protobuf's 2 GB limit, external data beside the graph, sizes and op counts."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from compiler.core.errors import BuildError

PROTOBUF_LIMIT = 2 * 1024**3


def save_onnx(model, out_path: Path, external_data: str = "auto", check: bool = True) -> Path:
    """Save an ONNX model, with its tensors in out_path.data when it would pass protobuf's 2 GB limit
    (or when asked). Deterministic: same graph -> same bytes."""
    import onnx

    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    for stale in (out_path, out_path.with_name(data_name)):
        if stale.exists():
            stale.unlink()
    size = model.ByteSize()
    use_external = external_data == "always" or (external_data == "auto" and size >= PROTOBUF_LIMIT - 64 * 1024**2)
    if use_external:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(out_path))
    if check:
        try:
            onnx.checker.check_model(str(out_path))
        except Exception as e:
            raise BuildError(f"onnx.checker rejected {out_path.name}: {str(e).splitlines()[0]}") from e
    return out_path


def onnx_files(path: Path) -> List[Path]:
    """The model file and its external-data file, if any."""
    path = Path(path)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files


def onnx_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in onnx_files(path))


def op_histogram(path: Path) -> Dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: Dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if not node.domain or node.domain == "ai.onnx" else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
