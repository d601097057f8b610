"""The manifest of a run: what went in (weights, data, recipe hashes), which tools and hardware built
it, and the sha256 of every artifact it wrote."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Tuple

from compiler.core.hashing import file_sha256, source_sha256
from targets.trt_hardware import detect_gpu

TRACKED_PACKAGES = ("qcompile", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "transformers", "polygraphy",
                    "nvidia-modelopt", "torchao", "hydra-core", "omegaconf", "numpy", "tensorrt", "onnxscript")
MANIFEST = "manifest.json"
# not artifacts: the run's own records (written after or around the manifest), Hydra's job log, the
# BUILDING marker of explicitly named run dirs, and what `qcompile rebuild` adds (rebuild.json)
# records of what was measured (timings, search probes), not build products: a rebuild need not reproduce them
NOT_ARTIFACTS = {MANIFEST, "REPORT.md", "report.json", "qcompile.log", "FAILED.md", "BUILDING", "rebuild.json",
                 "sensitivity.json", "sensitivity.png"}


# pip's `tensorrt` is a meta package over tensorrt-cuXX-bindings; some installs have only the latter
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings", "tensorrt-cu11-bindings")


def package_versions() -> Dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        for dist in (TENSORRT_DISTRIBUTIONS if name == "tensorrt" else (name,)):
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    # an editable install keeps its version number while its code changes: the source's hash tells
    # verify / rebuild (and the cache keys) that the code that built a run is not the code here
    out["qcompile_source_sha256"] = source_sha256()
    return out


def hardware() -> Dict[str, Any]:
    info: Dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["cuda"] = torch.version.cuda  # a TensorRT engine is tied to GPU, CUDA and TensorRT versions
    except Exception:
        pass
    if "gpu" not in info:  # a CPU torch next to TensorRT / onnxruntime-gpu: ask nvidia-smi
        try:
            gpu = detect_gpu()
            if gpu is not None:
                info["gpu"], info["gpu_capability"] = gpu.name, ".".join(map(str, gpu.capability))
        except Exception:
            pass
    return info




def artifact_hashes(run_dir: Path) -> Dict[str, str]:
    """sha256 of every file the build wrote, by path relative to the run directory (sorted)."""
    out = {}
    for f in sorted(Path(run_dir).rglob("*")):
        rel = f.relative_to(run_dir).as_posix()
        if (f.is_file() and rel not in NOT_ARTIFACTS and not rel.startswith(".hydra/") and "/cache/" not in rel
                and not ("/" not in rel and rel.endswith(".log"))):
            out[rel] = file_sha256(f)
    return out


def write_manifest(run_dir: Path, inputs: Dict[str, Any], seed: int, extra: Dict[str, Any] | None = None) -> Path:
    manifest = {
        "qcompile_manifest": 1,
        "inputs": inputs,
        "seed": seed,
        "versions": package_versions(),
        "hardware": hardware(),
        "artifacts": artifact_hashes(run_dir),
    }
    if extra:
        manifest.update(extra)
    path = Path(run_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(run_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(run_dir) / MANIFEST).read_text())


def check_artifacts(run_dir: Path, manifest: Dict[str, Any] | None = None) -> Tuple[Dict[str, str], List[str]]:
    """Every artifact manifest.json lists, re-hashed: (name -> "ok" | "modified" | "missing", sorted names of
    the files it does not list). What `qcompile verify` reports and what `qcompile predict` refuses to load."""
    run_dir = Path(run_dir)
    recorded = (read_manifest(run_dir) if manifest is None else manifest).get("artifacts", {})
    status = {}
    for name, sha in sorted(recorded.items()):
        f = run_dir / name
        status[name] = "missing" if not f.is_file() else ("ok" if file_sha256(f) == sha else "modified")
    return status, sorted(set(artifact_hashes(run_dir)) - set(recorded))
