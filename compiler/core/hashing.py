"""sha256 of files, texts and qcompile's own source: the one place every hash of a build is computed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from compiler.core.paths import REPO_ROOT


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def onnx_sha256(path: Path) -> str:
    """A graph and its external data (`<name>.data` beside it, when present) hashed together."""
    h = hashlib.sha256()
    for p in (Path(path), Path(path).with_name(Path(path).name + ".data")):
        if p.exists():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_sha256() -> str:
    """sha256 over qcompile's Python sources (compiler/ and targets/), names and bytes, sorted."""
    h = hashlib.sha256()
    for pkg in ("compiler", "targets"):
        for f in sorted((REPO_ROOT / pkg).rglob("*.py")):
            h.update(f.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()
