"""The CPU's int8-relevant facts from /proc/cpuinfo: its model and the instruction flags that decide how int8
matrix products run (the int8 probe records them; the int8 rails read them)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# /proc/cpuinfo flags that decide whether int8 beats fp32: VNNI (AVX-512 or AVX) fuses the int8 dot
# product into one instruction; AMX adds int8 tiles; without them int8 needs vpmaddubsw+vpmaddwd+vpaddd
CPU_FLAGS = {"avx2": ("avx2",), "fma": ("fma",), "avx512": ("avx512f",),
             "vnni": ("avx512_vnni", "avx_vnni", "avx512vnni"), "amx": ("amx_int8", "amx_tile")}


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model and the int8-relevant flags, from /proc/cpuinfo (or the text given, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    out: dict[str, Any] = {"cpu": model, "cpu_count": os.cpu_count()}
    out.update({name: any(f in flags for f in names) for name, names in CPU_FLAGS.items()})
    return out
