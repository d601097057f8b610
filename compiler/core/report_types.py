"""report.json as types: one dataclass per section, the one place its keys are named. The pipeline writes through
Report (compiler/stages/report.py), readers (sweep summaries, search objectives) read through it, and
docs/report.schema.json is generated from these classes (`python -m compiler.core.report_types`).

SCHEMA_VERSION goes up on any change an old reader would misread: a key renamed, moved or retyped. Adding an
optional key is compatible and keeps the version."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from compiler.core.status import Status
from compiler.core.typed_json import Section, TypedJSONError, document_schema

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "report.schema.json"


class BaselineKind(str, Enum):
    """What a build's speed ratio compares against (bench.baseline_kind)."""

    FP32_SAME_RUN = "fp32_same_run"  # the same model's fp32 engine on the same target, timed round-robin in this run
    SELF = "self"  # the build is the fp32 engine itself: its ratio is 1 by definition, nothing else was timed
    NONE = "none"  # no baseline was timed (bench.baseline=none, a GPU target on a machine without one)

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(kw_only=True)
class BuildId(Section):
    """Which build this is."""

    model: str
    recipe: str
    target: str
    run_dir: str


@dataclass(kw_only=True)
class ModelInfo(Section):
    """The loaded model. OPEN: where it came from (path, package, config) is the loader's to say."""

    OPEN = True
    name: str
    architecture: str
    hidden_size: Optional[int]
    parameters: int
    weights_sha256: str
    layer_roles: Optional[Dict[str, int]] = None  # Linear layers per role the dataflow found


@dataclass(kw_only=True)
class TrainData(Section):
    """The training text of a step that trains (distill): data.train_file or the built-in unlabeled corpus."""

    file: str
    sha256: str
    sentences: int  # after the evaluation rows were taken out
    dropped_evaluation_rows: int  # sentences of the file that are evaluation rows (never trained on)


@dataclass(kw_only=True)
class DataInfo(Section):
    """The calibration and evaluation data."""

    calibration_samples: int
    evaluation_samples: int
    seq_len: int
    files: Dict[str, str]
    evaluation_task: Optional[str]  # the gold labels' task; null: plain text
    train: Optional[TrainData] = None  # only when a step trains


@dataclass(kw_only=True)
class OutputStats(Section):
    """Polygraphy's comparison of one output, target vs fp32."""

    iterations: int
    tolerance_passed: bool
    cosine_mean: Optional[float] = None  # not for a classifier's logits
    cosine_min: Optional[float] = None
    max_absdiff: Optional[float] = None
    mean_absdiff: Optional[float] = None
    median_absdiff: Optional[float] = None
    max_reldiff: Optional[float] = None
    mean_reldiff: Optional[float] = None


@dataclass(kw_only=True)
class Fidelity(Section):
    """Agreement with fp32 on the evaluation data: embeddings (cosine, retrieval top-1) or a classifier's logits."""

    embedding_cosine_mean: Optional[float] = None
    embedding_cosine_min: Optional[float] = None
    top1_agreement: Optional[float] = None
    label_agreement: Optional[float] = None
    kl_target_reference_mean: Optional[float] = None
    max_abs_logit_diff: Optional[float] = None

    def loss(self) -> Optional[float]:
        """1 - mean embedding cosine, or for a classifier 1 - label agreement (the share of labels that changed)."""
        if self.embedding_cosine_mean is not None:
            return 1.0 - self.embedding_cosine_mean
        if self.label_agreement is not None:
            return 1.0 - self.label_agreement
        return None


@dataclass(kw_only=True)
class TaskMetric(Section):
    """One task metric on fp32 and target; drop = fp32 - target with its paired-bootstrap 95% interval."""

    fp32: float
    target: float
    drop: float
    drop_ci95: List[float]


@dataclass(kw_only=True)
class TaskResult(Section):
    """Task metrics against gold labels; `metric` is the gated (or default) one."""

    task: str
    examples: int
    metric: str
    max_task_drop: Optional[float]
    metrics: Dict[str, TaskMetric]

    @property
    def drop(self) -> float:
        return self.metrics[self.metric].drop


@dataclass(kw_only=True)
class CheckResult(Section):
    """The check stage: target vs fp32 on the evaluation data, and the gate."""

    samples: int
    per_output: Dict[str, OutputStats]
    fidelity: Fidelity
    gate_failures: List[str]
    passed: bool
    task: Optional[TaskResult] = None


@dataclass(kw_only=True)
class DataShapes(Section):
    """bench.shapes=data: passes over the evaluation sentences at their own lengths."""

    skipped: Optional[str] = None
    shapes: Optional[str] = None
    sentences: Optional[int] = None
    batches: Optional[int] = None
    sort_by_length: Optional[bool] = None
    tokens_mean: Optional[float] = None
    tokens_max: Optional[int] = None
    rounds: Optional[int] = None
    latency_ms_p50: Optional[float] = None
    pass_ms_median: Optional[float] = None
    sentences_per_s: Optional[float] = None
    speedup_vs_fp32: Optional[float] = None
    speedup_vs_fp32_spread: Optional[List[float]] = None
    speedup_vs_fp32_rounds: Optional[List[float]] = None
    speedup_clock: Optional[str] = None
    fp32_pass_ms_median: Optional[float] = None


@dataclass(kw_only=True)
class BenchResult(Section):
    """The bench stage (compiler/stages/bench/). speedup_vs_fp32 is the same-run ratio over the fp32 engine
    (baseline_kind fp32_same_run); an fp32 build (baseline_kind self) has none and is 1 by definition."""

    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_mean: float
    ms_per_sample: float
    samples_per_s: float
    iterations: int
    shapes: str
    batch_size: int
    seq_len: int
    threads: int
    rounds: int
    cpu_ms_p50: float
    peak_rss_mb: float
    peak_rss_increase_mb: float
    artifact_bytes: int
    artifact_mb: float
    baseline: str  # in words, for people
    baseline_kind: Optional[BaselineKind] = None  # the fact; absent only in reports written before it existed
    speedup_vs_fp32: Optional[float] = None
    speedup_vs_fp32_spread: Optional[List[float]] = None
    speedup_vs_fp32_rounds: Optional[List[float]] = None
    speedup_clock: Optional[str] = None
    fp32_latency_ms_p50: Optional[float] = None
    fp32_cpu_ms_p50: Optional[float] = None
    flops: Optional[Dict[str, Any]] = None  # graph FLOPs (compiler/stages/bench/probe.py), or {"error": ...}
    fp32_peak_gflops: Optional[float] = None
    fraction_of_fp32_peak: Optional[float] = None
    fp32_fraction_of_fp32_peak: Optional[float] = None
    data_shapes: Optional[DataShapes] = None
    # where the time goes by op type, the fp32 engine's beside it, and the int8 bound (bench.profile;
    # compiler/stages/bench/op_profile.py BenchProfile.to_dict: build / fp32 OpTable, bound Int8Bound, or skipped)
    profile: Optional[Dict[str, Any]] = None
    # throughput by batch and threads (bench.scaling, opt-in; compiler/stages/bench/scaling.py ScalingReport.to_dict)
    scaling: Optional[Dict[str, Any]] = None

    @property
    def is_fp32_self(self) -> bool:
        return self.baseline_kind is BaselineKind.SELF

    def speed_ratio(self) -> Optional[float]:
        """The same-run speed over fp32: measured, 1 for the fp32 build itself, None where nothing was timed."""
        if self.speedup_vs_fp32 is not None:
            return self.speedup_vs_fp32
        return 1.0 if self.is_fp32_self else None


@dataclass(kw_only=True)
class RailResult(Section):
    """One guard rail's outcome. OPEN: each rail adds its own counts (compiler/rails/)."""

    OPEN = True
    rail: str
    status: Status
    message: str = ""


@dataclass(kw_only=True)
class OnnxInfo(Section):
    """The graph the build wrote (model.onnx)."""

    path: str
    bytes: int
    ops: Dict[str, int]
    opset: int
    exporter: str


@dataclass(kw_only=True)
class TransformerFusionInfo(Section):
    """export.transformer_fusion: onnxruntime's transformer optimizer on the graph (compiler/graph/transformer_fusion.py)."""

    mode: str  # "bert"
    order: str  # export.transformer_fusion_order as set
    applied_to: str  # "fp32 export" | "quantized graph" (a recipe without ONNX-side steps: always the export)
    model_type: str  # the optimizer's model_type
    num_heads: int  # from the model's config
    hidden_size: int
    off: List[str]  # fused op types left out (export.transformer_fusion_off)
    fused: Dict[str, int]  # fused nodes it wrote, per op type (Attention, BiasGelu, ...)
    nodes_before: int
    nodes_after: int
    seconds: float  # the optimizer's time (a cached result keeps the first build's)


@dataclass(kw_only=True)
class RepairProbe(Section):
    """One point of the repair search's path (compiler/repair/result.py Probe.as_dict)."""

    OPEN = True  # a probe carries the measurer's own counts next to these
    fallback_layers: int
    metric: float
    drop: float
    weight_bytes: Optional[int] = None


@dataclass(kw_only=True)
class RepairSection(Section):
    """The repair (compiler/repair/): a searched map has its budgeted metric, the budget under its recipe key
    (max_task_drop or max_fidelity_drop, the other absent), where the budget came from (budget_source, and
    budget_note: one sentence for people), the gate conditions the map also met and which constraint decided it,
    the path; a replayed map (recipe.repair.layers given) only replayed, fallback_layers and layers."""

    fallback_layers: int
    layers: Dict[str, str]  # layer -> the format it was given
    replayed: Optional[bool] = None
    metric: Optional[str] = None
    metric_kind: Optional[str] = None  # "task" | "fidelity"
    reference: Optional[float] = None
    max_task_drop: Optional[float] = None
    max_fidelity_drop: Optional[float] = None
    budget_source: Optional[str] = None  # e.g. "recipe.gate.min_embedding_cosine=0.9"
    budget_note: Optional[str] = None
    conditions: Optional[List[Dict[str, Any]]] = None  # {name, min, source} per gate threshold
    decided_by: Optional[List[str]] = None
    fallback: Optional[str] = None
    met: Optional[bool] = None
    quantized_layers: Optional[int] = None
    max_fallback_layers: Optional[int] = None
    strategy: Optional[str] = None
    search: Optional[List[RepairProbe]] = None
    measurements: Optional[int] = None
    seconds: Optional[Dict[str, Any]] = None
    files: Optional[Dict[str, str]] = None

    @property
    def budget(self) -> Optional[float]:
        """The budget, under whichever key set it."""
        return self.max_task_drop if self.max_task_drop is not None else self.max_fidelity_drop


class KernelMode(str, Enum):
    """What runs the quantized Linear layers of a target=torch engine (lower.kernels.mode)."""

    REAL = "real"  # torchao's int8 weights: the format is stored and multiplied by integer kernels
    FAKE_QUANT = "fake_quant"  # modelopt quantize-dequantize around fp32 products: the numerics, not the speed
    MIXED = "mixed"  # some layers each way (steps with and without a torchao kernel in one recipe)
    NONE = "none"  # no quantized Linear layer (fp32, fp16, rotate only)

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(kw_only=True)
class Kernels(Section):
    """target=torch: counted on the lowered module; reasons: per step that stayed fake-quant, why (its declared
    NoKernel, compiler/steps/torchao_kernels.py)."""

    mode: KernelMode
    real_layers: int
    fake_quant_layers: int
    reasons: Optional[Dict[str, str]] = None
    # of real_layers, how many run as target=torch's CPU int8 Linear (torchao's int8 weights, the same numbers with
    # less work per call: compiler/numerics/int8_linear.py); the rest run torchao's own linear
    cpu_int8_linear: Optional[int] = None
    # of fake_quant_layers, how many modelopt int4 weight-only layers target=torch stored as 4-bit codes dequantized
    # per call (the fake-quant's numbers in a form torch.export keeps: compiler/numerics/int4_linear.py)
    int4_dequant_linear: Optional[int] = None


@dataclass(kw_only=True)
class LowerInfo(Section):
    """The target's lowering info. OPEN: each target (targets/*.py) adds its own keys; the torch target's kernels
    and artifact are typed here."""

    OPEN = True
    kernels: Optional[Kernels] = None
    # target=torch: "exported_program" (engine.pt2, torch.export: `qcompile predict` loads it) or "state_dict"
    # (engine.pt, where torch.export cannot trace the module: only a rebuild runs it)
    artifact: Optional[str] = None
    compiled: Optional[bool] = None  # target=torch: torch.compile ran over the program (target.compile)


@dataclass(kw_only=True)
class LossRow(Section):
    """One row of the loss-sources table: the fidelity metric with only what the row names quantized, and its
    loss (1 - metric); both null with not_applicable saying why (an int4 weight-only build's activations)."""

    metric: Optional[float]
    loss: Optional[float]
    layers: int  # quantized layers in the row
    not_applicable: Optional[str] = None


def loss_text(v: float) -> str:
    """A loss for people: 4 decimals, or 3 significant digits below 0.001 (a tiny model's 4-bit loss)."""
    return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"


@dataclass(kw_only=True)
class LossSources(Section):
    """Where a 4-bit build's loss comes from (check.loss_sources; compiler/repair/loss_sources.py): operands rows
    weights_only / activations_only / both, roles rows attention_qkv / attention_output / ffn_up / ffn_down (only
    that role's layers quantized), and one reading of them for people. skipped: why a 4-bit build has no table."""

    skipped: Optional[str] = None
    metric: Optional[str] = None  # the fidelity metric (embedding_cosine_mean | label_agreement); loss = 1 - it
    rows: Optional[int] = None  # evaluation rows measured (the check's)
    measured_on: Optional[str] = None
    algorithm: Optional[str] = None  # the 4-bit step's weight-rounding algorithm, where it has one
    operands: Optional[Dict[str, LossRow]] = None
    roles: Optional[Dict[str, LossRow]] = None
    reading: Optional[str] = None
    forwards: Optional[int] = None  # forwards this build ran for the table (0: read from the cache)
    cached: Optional[bool] = None
    seconds: Optional[float] = None


@dataclass(kw_only=True)
class DistillInfo(Section):
    """What the distill step trained (compiler/steps/distill.py), and the fidelity to fp32 on the held-out
    evaluation rows before and after it."""

    train: str  # scales | weights | lora
    sentences: int
    steps: int
    seconds: float  # of the training (the cached entry's, when cached)
    stopped: str  # max_steps | max_minutes
    cached: bool  # the trained state came from the cache (no training in this build)
    loss_first: Optional[float]
    loss_last: Optional[float]
    trained_layers: int
    hidden_blocks: int  # blocks whose hidden states the loss matched
    nvfp4_weights_rounded: int
    fidelity_metric: Optional[str]  # embedding_cosine_mean | label_agreement
    fidelity_before: Optional[float]
    fidelity_after: Optional[float]
    plot: Optional[str]  # distill.png in the run directory; null without matplotlib
    seed: int


@dataclass(kw_only=True)
class Report(Section):
    """report.json: everything one build measured. Sections a build did not run are absent."""

    schema_version: int = SCHEMA_VERSION
    status: Status
    reason: Optional[str] = None  # why it did not pass: the first gate failure, the unmet repair budget
    build: BuildId
    model: Optional[ModelInfo] = None
    data: Optional[DataInfo] = None
    gate: Dict[str, Any]  # the recipe's gate section as resolved (compiler/core/schema.py GateConfig)
    steps: Dict[str, Dict[str, Any]]  # per step, what it did (each step's own keys)
    timings_s: Dict[str, float]
    notes: List[str]
    repair: Optional[RepairSection] = None  # the repair search or replayed map (compiler/repair/)
    distill: Optional[DistillInfo] = None  # quantization-aware distillation (a recipe with the distill step)
    export: Optional[Dict[str, Any]] = None  # the graph fix-ups after export (compiler/graph)
    transformer_fusion: Optional[TransformerFusionInfo] = None  # export.transformer_fusion other than none
    doctor_export: Optional[List[RailResult]] = None
    onnx: Optional[OnnxInfo] = None
    lower: Optional[LowerInfo] = None  # the target's lowering info (targets/*.py)
    placement: Optional[Dict[str, Any]] = None  # the target's placement report
    int8_probe: Optional[Dict[str, Any]] = None  # the machine's int8 speed (compiler/stages/bench/probe.py)
    doctor: Optional[List[RailResult]] = None
    check: Optional[CheckResult] = None
    loss_sources: Optional[LossSources] = None  # 4-bit builds with check.loss_sources (compiler/repair/loss_sources.py)
    bench: Optional[BenchResult] = None
    cache: Optional[Dict[str, Any]] = None  # per kind hit | miss | rebuilt (compiler/rundir/cache.py)

    @classmethod
    def read(cls, path: Path, partial: bool = False) -> "Report":
        """A report.json from disk (partial: see Section.from_dict)."""
        return cls.from_dict(json.loads(Path(path).read_text()), partial=partial)

    @classmethod
    def from_dict(cls, d: Any, partial: bool = False) -> "Report":
        if not isinstance(d, dict):
            raise TypedJSONError(f"report.json holds {type(d).__name__}, not an object")
        version = d.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise TypedJSONError(f"report.json has schema_version {version}; this qcompile reads up to "
                                 f"{SCHEMA_VERSION}: update qcompile")
        if version is None:
            d = _from_unversioned(d)
        return super().from_dict(d, partial=partial)

    def task_drop(self) -> Optional[float]:
        return self.check.task.drop if self.check is not None and self.check.task is not None else None


def _from_unversioned(d: Dict[str, Any]) -> Dict[str, Any]:
    """A report written before schema_version existed (qcompile up to 245eea2): the same layout, but the kind of
    its speed baseline was only said in words (this one migration reads those words; nothing else may), and the
    repair's budget sat under `max_drop` (now under its recipe key: max_fidelity_drop for the fidelity metrics
    the old search could budget, else max_task_drop)."""
    repair = d.get("repair")
    if isinstance(repair, dict) and "max_drop" in repair:
        fidelity = repair.get("metric") in ("embedding_cosine_mean", "label_agreement")
        repair = {k: v for k, v in repair.items() if k != "max_drop"}
        repair["max_fidelity_drop" if fidelity else "max_task_drop"] = d["repair"]["max_drop"]
        d = {**d, "repair": repair}
    bench = d.get("bench")
    if isinstance(bench, dict) and "baseline_kind" not in bench and isinstance(bench.get("baseline"), str):
        words = bench["baseline"]
        kind = (BaselineKind.SELF if "the build is the fp32 engine itself" in words else
                BaselineKind.NONE if words.startswith("none") else BaselineKind.FP32_SAME_RUN)
        d = {**d, "bench": {**bench, "baseline_kind": kind.value}}
    return {**d, "schema_version": SCHEMA_VERSION}


def report_schema() -> Dict[str, Any]:
    return document_schema(Report, "qcompile report.json", SCHEMA_VERSION)


def schema_text() -> str:
    return json.dumps(report_schema(), indent=2) + "\n"


if __name__ == "__main__":  # python -m compiler.core.report_types > docs/report.schema.json
    from compiler.core import report_types  # why: the module by its name (here it runs as __main__)

    sys.stdout.write(report_types.schema_text())
