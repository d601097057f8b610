"""What a quantization step is: its parameters, where it runs for each target, how it is applied."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

STEP_REGISTRY: Dict[str, type["Step"]] = {}

# Where a step does its work for a given target:
TORCH = "torch"  # on the torch nn.Module, before export
ONNX = "onnx"  # on the exported ONNX graph, after export


@dataclass
class ModelInfo:
    """What validation knows about a model without loading its weights (read from its config)."""

    name: str
    architecture: str  # "bert", "modernbert", ...
    hidden_size: int
    intermediate_size: int
    num_heads: int
    max_positions: int


@dataclass
class StepContext:
    """Everything a step may read besides its input artifact. Steps never read global state."""

    target: str
    model_info: ModelInfo
    calibration: Any = None  # compiler.stages.data.Features for calibration, None if the recipe needs none
    work_dir: Optional[Path] = None  # where a step may write intermediate files
    seed: int = 0
    exclude: List[str] = dataclasses.field(default_factory=list)
    opset: int = 17
    report: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the step writes its numbers here
    # compiler.stages.cache.Cache or None. Contract: cache.get_or_create(kind, key: dict, build(dir: Path) -> None) -> Path
    # returns a directory holding what build() wrote, keyed by the sha256 of kind + key (key must name
    # every input that determines the result); steps that compute reusable calibration data use it.
    cache: Any = None


class Step:
    """One recipe step. Subclasses set the class attributes and implement apply_torch / apply_onnx.

    Defining a subclass with a ``name`` registers it under that name.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    # target name -> TORCH | ONNX: the capability table. A target missing here cannot run the step.
    runs_on: ClassVar[Dict[str, str]] = {}
    needs_calibration: ClassVar[bool] = False
    # what the step does, one line, shown by `qcompile capabilities`
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            STEP_REGISTRY[cls.name] = cls

    def __init__(self, params: Any):
        self.params = params

    def stage_for(self, target: str) -> str:
        return self.runs_on[target]

    def validate(self, info: ModelInfo, target: str) -> None:
        """Checks that need the model's shape (not its weights). Raise RecipeError naming the key."""

    def apply_torch(self, model, ctx: StepContext):
        raise NotImplementedError(f"step {self.name} has no torch-side implementation")

    def apply_onnx(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        raise NotImplementedError(f"step {self.name} has no ONNX-side implementation")

    def after_export(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        """For torch-side steps: a graph pass right after export (e.g. lowering TensorRT custom
        Q/DQ ops to standard ones for ORT). Returns the graph to continue with (default: unchanged)."""
        return onnx_path


def step_names() -> List[str]:
    load_all_steps()
    return sorted(STEP_REGISTRY)


def load_all_steps() -> None:
    """Import every module of compiler.steps so each Step subclass registers itself."""
    import importlib
    import pkgutil

    import compiler.steps as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base",):
            importlib.import_module(f"compiler.steps.{mod.name}")
