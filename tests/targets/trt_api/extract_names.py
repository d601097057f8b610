"""Writes the names (classes, enum values, methods, properties) TensorRT's Python bindings export, read from
the compiled module's strings, so tests can check the target's TensorRT calls without TensorRT installed.

    pip download --no-deps -d /tmp/trtb tensorrt-cu11-bindings==10.13.0.35 tensorrt-cu13-bindings==11.4.0.106
    python tests/targets/trt_api/extract_names.py /tmp/trtb/tensorrt_cu11_bindings-10.13.0.35-*.whl
    python tests/targets/trt_api/extract_names.py /tmp/trtb/tensorrt_cu13_bindings-11.4.0.106-*.whl

pybind11 registers every name as a NUL-terminated C string in the module's read-only data; the identifier-
shaped strings are a superset of the exported names (some C symbol names come along), which is what an
"is this name there" check needs. The linker merges a string that is the tail of another ("serialize" is
stored inside "deserialize"), so a name is exported only if it is a listed name or the tail of one
(tests/targets/test_trt_api.py). The package's __init__.py adds module-level names (__version__, volume)."""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

IDENT = re.compile(rb"(?<![A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]{1,63})(?=\x00)")
WHEEL = re.compile(r"tensorrt_cu\d+_bindings-(?P<version>[\d.]+)-")


def names_from_module(data: bytes) -> set:
    return {m.group(1).decode() for m in IDENT.finditer(data)}


def names_from_init(source: str) -> set:
    """Top-level functions, classes and assignments of the package's __init__.py."""
    import ast

    out = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return out


def extract(wheel: Path, out_dir: Path) -> Path:
    version = WHEEL.search(wheel.name)
    if not version:
        raise SystemExit(f"{wheel.name}: not a tensorrt-cuNN-bindings wheel")
    with zipfile.ZipFile(wheel) as z:
        so = [n for n in z.namelist() if n.endswith(".so") and Path(n).name.startswith("tensorrt")]
        if len(so) != 1:
            raise SystemExit(f"{wheel.name}: expected one tensorrt*.so, found {so}")
        names = names_from_module(z.read(so[0]))
        init = [n for n in z.namelist() if n.endswith("_bindings/__init__.py")]
        if init:
            names |= names_from_init(z.read(init[0]).decode())
        names = sorted(names)
    out = out_dir / f"tensorrt-{version.group('version')}.txt"
    header = f"# names in {wheel.name}:{so[0]} (tests/targets/trt_api/extract_names.py)\n"
    out.write_text(header + "\n".join(names) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for arg in sys.argv[1:]:
        print(extract(Path(arg), Path(__file__).parent))
