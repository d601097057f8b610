"""What a TensorRT build needs from the machine: the precisions a recipe asks for, the GPU and TensorRT
found, and whether they fit -- pure functions over (recipe steps, compute capability, TensorRT version)
plus the two probes that read the real machine."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from compiler.core.errors import RecipeError
from compiler.core.formats import FULL_PRECISION, narrowest_first
from compiler.steps.base import STEP_REGISTRY, load_all_steps

log = logging.getLogger(__name__)


# TensorRT >= 10: the named-tensor I/O, build_serialized_network and strongly typed networks this target
# uses; TensorRT 11 keeps them (it dropped the implicit-quantization calibrators and precision flags,
# which qcompile never sets).
MIN_TENSORRT = "10.0"


@dataclass(frozen=True)
class Requirement:
    min_capability: Tuple[int, int]
    min_tensorrt: str
    architecture: str  # the first GPU generation that has it, for people


# From the TensorRT support matrix: FP8 tensor cores start at Ada/Hopper (8.9), FP4 at Blackwell (10.0);
# NVFP4 engines from explicit-quantization ONNX need TensorRT 10.11 or newer.
REQUIREMENTS: Dict[str, Requirement] = {
    "nvfp4": Requirement((10, 0), "10.11", "Blackwell"),
    "fp8": Requirement((8, 9), "10.0", "Ada / Hopper"),
}


@dataclass(frozen=True)
class GpuInfo:
    name: str
    capability: Tuple[int, int]
    source: str = ""  # which probe found it (torch, nvidia-smi, a test)

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


def parse_version(text: Optional[str]) -> Tuple[int, ...]:
    """'10.11.0.33' -> (10, 11, 0, 33); leading numeric parts only ('11.0.0a1' -> (11, 0, 0))."""
    if not text:
        return ()
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(out)


def _version_lt(a: str, b: str) -> bool:
    return parse_version(a) < parse_version(b)


def normalize_build_engine(value: Any) -> str:
    """target.build_engine: auto | require | false. A YAML/CLI boolean arrives as 'False'/'True' in the
    str field: false means false, true means require (the user wants an engine)."""
    text = str(value).strip().lower()
    aliases = {"false": "false", "no": "false", "off": "false", "0": "false", "never": "false",
               "true": "require", "yes": "require", "on": "require", "1": "require", "require": "require",
               "auto": "auto"}
    if text not in aliases:
        raise RecipeError("target.build_engine", f"bad value {value!r}",
                          "use auto (build where TensorRT and a GPU are present), require, or false")
    return aliases[text]


def recipe_precisions(steps: Union[Iterable[Any], Mapping[str, Any], None]) -> List[str]:
    """The formats a recipe's steps produce, as each step declares them (compiler.steps.base.Step.precision /
    precisions()), narrowest first: the registered formats (compiler/core/formats.py), then any other by name. ['fp32']
    when nothing is quantized. ``steps``: Step objects, or a recipe's steps mapping (name -> parameters),
    whose names are looked up in the step registry (an unknown name is validation's to report)."""
    found = set()
    if isinstance(steps, Mapping):
        load_all_steps()
        for name in steps:
            cls = STEP_REGISTRY.get(str(name))
            if cls is not None:
                found |= set(cls.precision)
    else:
        for step in steps or []:
            found |= set(step.precisions())
    known = narrowest_first(found)
    return known + sorted(found - set(known)) or [FULL_PRECISION]


def best_supported(capability: Tuple[int, int], trt_version: Optional[str]) -> str:
    """The narrowest recipe family the found GPU and TensorRT can build, for 'what would work'."""
    for precision, rec in REQUIREMENTS.items():  # ordered narrowest first
        if tuple(capability) >= rec.min_capability and not _version_lt(trt_version or "0", rec.min_tensorrt):
            return precision
    return "int8"


def hardware_problem(recipe_name: str, precisions: Iterable[str], gpu: Optional[GpuInfo],
                     trt_version: Optional[str]) -> Optional[Tuple[str, str]]:
    """(message, fix) when the recipe's formats cannot be built on this GPU / TensorRT, else None.
    Without a GPU or TensorRT there is nothing to check here: no engine is built at all (see
    engine_decision)."""
    if gpu is None or trt_version is None:
        return None
    if _version_lt(trt_version, MIN_TENSORRT):
        return (f"target=trt needs TensorRT >= {MIN_TENSORRT}; found TensorRT {trt_version}",
                f"pip install 'tensorrt>={MIN_TENSORRT}', or target.build_engine=false")
    for precision in precisions:
        rec = REQUIREMENTS.get(precision)
        if rec is None:
            continue
        low_cc = tuple(gpu.capability) < rec.min_capability
        low_trt = _version_lt(trt_version, rec.min_tensorrt)
        if not (low_cc or low_trt):
            continue
        need = (f"compute capability {rec.min_capability[0]}.{rec.min_capability[1]}+ ({rec.architecture}) "
                f"and TensorRT >= {rec.min_tensorrt}")
        message = (f"recipe={recipe_name} builds {precision} layers, which need {need}; "
                   f"found {gpu.describe()} with TensorRT {trt_version}")
        fixes = []
        if low_cc:
            alt = best_supported(gpu.capability, trt_version)
            fixes.append(f"use recipe={alt} (runs on this GPU)")
        if low_trt and not low_cc:
            fixes.append(f"upgrade to tensorrt>={rec.min_tensorrt}")
        fixes.append("or target.build_engine=false to write the TensorRT-ready ONNX and the build command only")
        return message, ", ".join(fixes)
    return None


def engine_decision(build_engine: str, gpu: Optional[GpuInfo], trt_version: Optional[str],
                    trt_error: str = "") -> Tuple[bool, str]:
    """(build?, why not). build_engine is normalized (auto | require | false)."""
    if build_engine == "false":
        return False, "target.build_engine=false"
    missing = []
    if trt_version is None:
        missing.append("the tensorrt Python package" + (f" ({trt_error})" if trt_error else ""))
    if gpu is None:
        missing.append("an NVIDIA GPU")
    if missing:
        return False, "needs " + " and ".join(missing)
    return True, ""


def detect_gpu() -> Optional[GpuInfo]:
    """The first CUDA device: from torch when it has CUDA, else from nvidia-smi (needs no Python CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            return GpuInfo(torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0)), "torch")
    except Exception as e:  # a broken CUDA torch must not stop a CPU build
        log.debug("torch CUDA probe failed: %s", e)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except Exception as e:
        log.debug("nvidia-smi failed: %s", e)
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return parse_nvidia_smi(out.stdout)


def parse_nvidia_smi(text: str) -> Optional[GpuInfo]:
    """First line of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`."""
    line = text.strip().splitlines()[0]
    name, _, cap = line.rpartition(",")
    parts = parse_version(cap.strip())
    if len(parts) < 2:
        return None
    return GpuInfo(name.strip(), (parts[0], parts[1]), "nvidia-smi")


def detect_tensorrt() -> Tuple[Optional[str], str]:
    """(version, why not): TensorRT is imported lazily, and any import failure (missing wheel, the
    placeholder libs package that could not download, a missing libnvinfer) means 'not available'."""
    try:
        import tensorrt as trt  # noqa: F401
    except ModuleNotFoundError as e:
        return None, "not installed" if e.name and e.name.split(".")[0] == "tensorrt" else f"{e}"
    except Exception as e:  # OSError from a missing libnvinfer, the placeholder libs package, ...
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return str(getattr(trt, "__version__", "0")), ""
