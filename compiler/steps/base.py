"""What a quantization step is: its parameters, the facts it declares, where it runs, how it is applied."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    ClassVar,
)

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import RecipeError
from compiler.core.formats import FORMATS, FULL_PRECISION, number_format
from compiler.core.patterns import matches_any

STEP_REGISTRY: dict[str, type[Step]] = {}

# Where a step does its work for a given target:
TORCH = "torch"  # on the torch nn.Module, before export
ONNX = "onnx"  # on the exported ONNX graph, after export

# A layer given FULL_PRECISION (or None) through Step.with_layer_formats is kept out of the step; the
# formats themselves (bits, opsets, fallbacks) are declared in compiler/core/formats.py.

# What of a Linear layer a quantizing step quantizes (Step.quantized_operands, Step.with_operands):
WEIGHTS = "weights"
ACTIVATIONS = "activations"  # the layer's input

# How a calibrating step picks activation ranges from its data, for every step (modelopt and onnxruntime
# each map these names to their own calibrators):
#   minmax     -> the largest |x| seen
#   entropy    -> the threshold minimizing the KL divergence of the quantized histogram (TensorRT's method)
#   percentile -> the given percentile of |x|
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


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

    target: TargetCapabilities  # what the target can run: steps ask it, never its name
    model_info: ModelInfo
    calibration: Any = None  # compiler.stages.data.Features for calibration, None if the recipe needs none
    work_dir: Path | None = None  # where a step may write intermediate files
    seed: int = 0
    exclude: list[str] = dataclasses.field(default_factory=list)  # model.exclude: module-name patterns
    opset: int = 17  # the export opset (validation resolved it from the steps' min_opset)
    batch_size: int = 8  # data.batch_size: calibration forwards run in batches of this many samples
    report: dict[str, Any] = dataclasses.field(default_factory=dict)  # the step writes its numbers here
    # compiler.rundir.cache.Cache or None. Contract: cache.get_or_create(kind, key: dict, build(dir: Path) -> None) -> Path
    # returns a directory holding what build() wrote, keyed by the sha256 of kind + key (key must name
    # every input that determines the result); steps that compute reusable calibration data use it.
    cache: Any = None
    # for a step that trains (Step.trains): the fp32 module before any step ran (the teacher), the training
    # sentences (compiler.stages.data.Features of data.train_file or the built-in unlabeled corpus, never the
    # evaluation rows), the held-out evaluation features it reports its fidelity on, the model's task
    # (model.task: a compiler.core.tasks kind name) and the run directory its plots go to
    teacher: Any = None
    train: Any = None
    evaluation: Any = None
    task: str = "embedding"
    run_dir: Path | None = None
    # a later step of the recipe trains this module's weights (Step.trains): a quantizing step then leaves the
    # float weights in its layers (the training's starting point) where it would store them rounded
    training_follows: bool = False


class StepParams:
    """Base of every step's parameter dataclass. Parameters are checked ONE way: ``problems()`` beside the
    fields returns (field, what is wrong, what would work) for each bad value, and Step.validate raises the
    first as a RecipeError naming recipe.steps.<step>.<field> (a __post_init__ ValueError could only name
    the step, and would fire before validation can say which key)."""

    def problems(self) -> list[tuple[str, str, str]]:
        return []


class Step:
    """One recipe step. Subclasses set the class attributes and implement apply_torch / apply_onnx.

    Defining a subclass with a ``name`` registers it under that name. A step declares its facts here, where
    it is defined, and every other module (validation, rails, the TensorRT hardware check, the capability
    table) asks the step instead of reading them from its name:

    - ``precision``: the number formats the step produces (e.g. {"int8"}, {"fp8"}, {"nvfp4"}, {"fp16"}; empty
      for a step that only transforms, like rotate). ``precisions()`` adds the formats given to single layers.
    - ``quantizes_compute``: its output has quantized Linear/MatMul ops (weights or activations), so a graph in
      which none is quantized is an error (the coverage rail).
    - ``min_opset(target)``: the lowest export opset its exported graph needs on that target;
      ``validate_export(export_cfg, target)`` raises when an explicitly set export.opset is below it.
    - ``must_precede_quantizers``: it rewrites weights or activations that a quantizing step then quantizes, so
      it must come before every step with quantizes_compute (validation rejects the other order).
    - ``operands`` / ``quantized_operands()``: what of its layers it quantizes (WEIGHTS, ACTIVATIONS);
      ``with_operands(weights, activations)``: a configured copy quantizing only those (None where it cannot).
    - ``trainable_fake_quant``: its torch-side output is modelopt fake-quant (TensorQuantizers in the module),
      which a training step (distill) can train through a straight-through estimator.
    - ``must_follow_quantizers``: it changes what a quantizing step made, so a step with quantizes_compute and
      trainable_fake_quant, run on the torch side of the target, must come before it (validation checks).
    - ``trains``: it trains the model (reads the teacher and the training text of StepContext); it then also has
      ``train_only(module, ctx)``: the training without rounding the trained weights onto the quantized grid
      (what a repair after training reads, compiler/pipeline.py train_before_repair).
    - ``kept_fp32_report_keys``: the keys of its step report that list what it kept in full precision (the fp16
      rail shows them).
    - ``torch_kernel()``: on target=torch (the module is the engine), the torchao config that runs its format with
      real kernels (compiler/steps/torchao_kernels.TorchKernel), or a NoKernel saying why none exists there (the
      step then runs as modelopt fake-quant); None for a step that quantizes nothing.
    - ``layers(module, exclude)``: the Linear modules it would touch on this model; ``with_layer_formats({name:
      None | "fp32" | "fp8" ...})``: a configured copy that keeps named layers out (None / "fp32") or gives
      them another format from ``layer_format_choices``. This is the hook per-layer mixed precision calls.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = StepParams
    # target name -> TORCH | ONNX: the capability table. A target missing here cannot run the step.
    runs_on: ClassVar[dict[str, str]] = {}
    needs_calibration: ClassVar[bool] = False
    # what the step does, one line, shown by `qcompile capabilities`
    summary: ClassVar[str] = ""
    precision: ClassVar[frozenset[str]] = frozenset()
    quantizes_compute: ClassVar[bool] = False
    must_precede_quantizers: ClassVar[bool] = False
    trainable_fake_quant: ClassVar[bool] = False
    must_follow_quantizers: ClassVar[bool] = False
    trains: ClassVar[bool] = False
    kept_fp32_report_keys: ClassVar[tuple[str, ...]] = ()
    # what of its layers a quantizing step quantizes: WEIGHTS and / or ACTIVATIONS (the Linear inputs)
    operands: ClassVar[frozenset[str]] = frozenset()
    # formats with_layer_formats accepts besides keeping a layer out ("fp32")
    layer_format_choices: ClassVar[frozenset[str]] = frozenset()
    # why the step needs min_opset, for the error when an explicit export.opset is below it
    opset_reason: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            STEP_REGISTRY[cls.name] = cls

    def __init__(self, params: Any):
        self.params = params
        # module name -> format; FULL_PRECISION keeps the layer out of this step (see with_layer_formats)
        self.layer_formats: dict[str, str] = {}

    @property
    def key(self) -> str:
        """The recipe key of this step's parameters, for messages."""
        return f"recipe.steps.{self.name}"

    def stage_for(self, target: str) -> str:
        return self.runs_on[target]

    # -- declared facts ------------------------------------------------------------------------------------
    def precisions(self) -> frozenset[str]:
        """The formats this configured step produces: its precision plus the formats given to single layers."""
        return frozenset(self.precision) | {f for f in self.layer_formats.values() if f != FULL_PRECISION}

    def min_opset(self, target: TargetCapabilities) -> int:
        """The lowest export opset the step's graph needs on this target (0: no requirement): by default what
        its formats need there (compiler/core/formats.py)."""
        return max((number_format(f).min_opset(target) for f in self.precision if f in FORMATS), default=0)

    def validate(self, info: ModelInfo, target: TargetCapabilities) -> None:
        """The parameters' problems(), then (in subclasses) checks that need the model's shape (not its
        weights) and the target. Raise RecipeError naming the key."""
        # a Params class outside StepParams (a plain dataclass) declares no checks
        problems = self.params.problems() if isinstance(self.params, StepParams) else []
        for field_name, what, fix in problems:
            raise RecipeError(f"{self.key}.{field_name}", what, fix)

    def validate_after(self, before: Sequence[Step], target: TargetCapabilities) -> None:
        """Checks against the steps before this one in the recipe (default: none). Raise RecipeError."""

    def validate_with_repair(self, repair_key: str, before: Sequence[Step]) -> None:
        """A step that trains: checks that what it trains survives a repair after it (the steps before it in
        `before`; default: none). Raise RecipeError."""

    def requantizes_as_trained(self) -> bool:
        """A quantizing step: whether running it again on weights a training step moved, given what
        carry_trained_state put on them, reproduces the quantizer the training saw (a repair after training re-runs
        the step on the trained weights: compiler/pipeline.py train_before_repair): its `algorithm` is one of
        algorithms_requantized_as_trained. False where a calibration would fix new scales for the trained weights,
        or change the weights themselves."""
        return getattr(self.params, "algorithm", None) in self.algorithms_requantized_as_trained

    # the values of its `algorithm` parameter for which requantizes_as_trained holds (named by the refusal)
    algorithms_requantized_as_trained: tuple[str, ...] = ()

    def carry_trained_state(self, plain, trained) -> None:
        """Put on `plain` (a Linear of the fp32 model that takes the trained weights) what of `trained` (the same
        Linear after the training, with its quantizers) apply_torch needs to quantize it again as it was trained
        (e.g. calibrated scales, as buffers that apply_torch takes off again). Default: nothing."""

    def validate_export(self, export_cfg, target: TargetCapabilities) -> None:
        """Checks against the export section; by default that its opset is at least min_opset(target)."""
        need = self.min_opset(target)
        if export_cfg.opset is not None and int(export_cfg.opset) < need:
            reason = self.opset_reason or next(
                (f"{number_format(f).opset_reason} need opset >= {need}" for f in sorted(self.precision)
                 if f in FORMATS and number_format(f).min_opset(target) == need and number_format(f).opset_reason), "")
            why = f" ({reason})" if reason else ""
            raise RecipeError("export.opset", f"{export_cfg.opset} is too old for {self.name} on "
                              f"target={target.name}{why}",
                              f"pass export.opset={need} (or higher), or leave export.opset unset (auto)")

    def torch_kernel(self):
        """TorchKernel | NoKernel | None (see the class docstring): declared by each quantizing step."""
        return None

    # -- per-layer hooks -------------------------------------------------------------------------------------
    def layers(self, module, exclude: Sequence[str] = ()) -> list[str]:
        """Names of the Linear modules of ``module`` this step would touch: every nn.Linear not matched by an
        exclude pattern (model.exclude) or by the step's own ``exclude`` parameter, if it has one."""
        import torch

        patterns = list(exclude) + self.own_exclude()
        return [n for n, m in module.named_modules()
                if n and isinstance(m, torch.nn.Linear) and not matches_any(n, patterns)]

    def own_exclude(self) -> list[str]:
        """The step's own exclude patterns (its `exclude` parameter, where it has one)."""
        return []

    def for_target(self, target: TargetCapabilities) -> Step:
        """The step as it runs on ``target``: a step with target-specific parameters (int8_static's
        exclude_on_ort) returns a copy with them resolved, so every later stage reads one set. Called once, at
        validation."""
        return self

    def with_layer_formats(self, formats: Mapping[str, str | None]) -> Step:
        """A copy of this step that keeps the named layers out (None or "fp32") or gives them another format
        (one of layer_format_choices). Names are module names as layers() returns them."""
        out = copy.copy(self)
        out.layer_formats = dict(self.layer_formats)
        for layer, fmt in formats.items():
            fmt = FULL_PRECISION if fmt is None else str(fmt)
            if fmt != FULL_PRECISION and fmt not in self.layer_format_choices:
                ok = sorted({FULL_PRECISION} | set(self.layer_format_choices))
                raise RecipeError(f"{self.key}.layer_formats.{layer}", f"{self.name} cannot give a layer format {fmt!r}",
                                  f"use one of {ok}")
            out.layer_formats[str(layer)] = fmt
        return out

    def quantized_operands(self) -> frozenset[str]:
        """What of its layers this configured step quantizes (WEIGHTS, ACTIVATIONS); empty when it quantizes
        nothing."""
        return frozenset(self.operands) if self.quantizes_compute else frozenset()

    def with_operands(self, weights: bool, activations: bool) -> Step | None:
        """A configured copy that quantizes only the named operands of its layers, the other kept in full
        precision; None where the step cannot (by default it can only do what it already does)."""
        want = {o for o, on in ((WEIGHTS, weights), (ACTIVATIONS, activations)) if on}
        return self if want == set(self.quantized_operands()) else None

    def kept_layers(self) -> list[str]:
        """The layers with_layer_formats kept out of this step (full precision)."""
        return sorted(n for n, f in self.layer_formats.items() if f == FULL_PRECISION)

    # -- applying it ------------------------------------------------------------------------------------------
    def apply_torch(self, model, ctx: StepContext):
        raise NotImplementedError(f"step {self.name} has no torch-side implementation")

    def apply_onnx(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        raise NotImplementedError(f"step {self.name} has no ONNX-side implementation")

    def after_export(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        """For torch-side steps: a graph pass right after export (e.g. lowering TensorRT custom
        Q/DQ ops to standard ones for ORT). Returns the graph to continue with (default: unchanged)."""
        return onnx_path


def step_names() -> list[str]:
    load_all_steps()
    return sorted(STEP_REGISTRY)


def load_all_steps() -> None:
    """Import every module of compiler.steps so each Step subclass registers itself."""
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name not in ("base",):
            importlib.import_module(f"compiler.steps.{mod.name}")
