"""The interface every runtime target implements: lower, load, run, bench, placement report."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Union

import numpy as np

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError
from compiler.runners.callable import CallableRunner

TARGET_REGISTRY: Dict[str, type["Target"]] = {}
TARGET_MODULES = ("torch", "ort", "trt")

Feed = Dict[str, np.ndarray]
Predict = Callable[[Feed], Dict[str, np.ndarray]]


@dataclass
class Engine:
    """A lowered artifact plus what is needed to run it."""

    target: str
    path: Optional[Path]  # the target artifact in the run directory (None: nothing written)
    handle: Any = None  # torch module, ORT model path, TRT plan bytes, ...
    input_names: List[str] = field(default_factory=list)
    output_names: List[str] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)  # goes into report.json under "lower"
    files: List[Path] = field(default_factory=list)  # every file of the artifact (for size and hashes)
    # target=torch: the lowered nn.Module, whose layers the rails inspect, when the handle that runs is its exported
    # graph (None: the handle is the module, or there is no module)
    module: Any = None


@dataclass(frozen=True)
class BuildInfo:
    """What a target may know about the build that lowers into it, passed in by the pipeline (targets never
    read recipe.yaml back or ask Hydra): names for messages and the command that redoes the build."""

    model_name: str = ""
    recipe_name: str = "<recipe>"
    overrides: Optional[List[str]] = None  # the command line's overrides (None: not run from the command line)


class Target:
    name: ClassVar[str] = ""
    needs_onnx: ClassVar[bool] = True
    capabilities: ClassVar[TargetCapabilities]
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            TARGET_REGISTRY[cls.name] = cls

    def __init__(self, cfg):
        self.cfg = cfg  # the `target` section

    @classmethod
    def capabilities_for(cls, cfg) -> TargetCapabilities:
        """The capabilities of this target as the recipe's `target` section configures it (validation hands
        these to the steps); the declared ones unless a setting changes what the engine can run."""
        return cls.capabilities

    def check_environment(self, recipe) -> None:
        """Checks of the machine this build runs on (GPU, libraries), before any model loads."""

    def lower(self, model, onnx_path: Optional[Path], run_dir: Path, build_info: Optional[BuildInfo] = None) -> Engine:
        raise NotImplementedError

    def load(self, run_dir: Path, info: dict[str, Any], input_names: list[str], output_names: list[str]) -> Engine:
        """The engine of a finished run directory, from its artifacts and the report's "lower" section (info),
        for `qcompile predict`: the same engine the check stage ran."""
        raise BuildError(f"target={self.name} cannot load a finished run's engine")

    def predictor(self, engine: Engine, threads: Optional[int] = None, profile_prefix: Optional[str] = None) -> Predict:
        """A callable feed -> outputs (float32 numpy), used by the check's task metrics and bench. profile_prefix:
        where an engine that runs as an onnxruntime session writes its profile (its predictor then has
        end_profiling); other engines ignore it (the bench profiles a torch module with torch.profiler)."""
        raise NotImplementedError

    def runner(self, engine: Engine, threads: Optional[int] = None):
        """A Polygraphy runner over the engine, for Comparator."""
        return CallableRunner(self.predictor(engine, threads), engine.input_names, engine.output_names,
                              name=f"qcompile-{self.name}")

    def placement(self, engine: Engine) -> Dict[str, Any]:
        """Which device / provider ran which part of the engine."""
        return {}


def _load_all() -> None:
    for mod in TARGET_MODULES:
        importlib.import_module(f"targets.{mod}")


def get_target(name: str):
    _load_all()
    return TARGET_REGISTRY[name]


def capabilities_of(target: Union[str, TargetCapabilities]) -> TargetCapabilities:
    """A target's declared capabilities, from its name (the target's class) or as given."""
    return target if isinstance(target, TargetCapabilities) else get_target(str(target)).capabilities


def target_names() -> List[str]:
    _load_all()
    return sorted(TARGET_REGISTRY)
