"""Task kinds declared once: what a model of each kind (model.task) outputs and which output its metrics read,
the wrapper and transformers head that give those outputs, its fidelity metrics; and the labeled evaluation
tasks that score it (the data columns they read, their metrics). Every module asks these objects instead of
comparing task names; a new kind is one `register_*` call (tests/core/test_tasks_formats.py adds one)."""

from __future__ import annotations

from dataclasses import dataclass

# How a labeled evaluation task's examples are laid out and scored (compiler/numerics/metrics.py implements
# each; compiler/stages/data.py reads each):
LABELS = "labels"  # one text and a class label per example; scored on the predicted class (argmax)
SCORED_PAIRS = "scored_pairs"  # two texts and a gold number per example; scored on the pair's cosine
RANKED_PAIRS = "ranked_pairs"  # a query and its gold partner; scored on the partner's rank among all partners
LAYOUTS = (LABELS, SCORED_PAIRS, RANKED_PAIRS)


@dataclass(frozen=True)
class TaskKind:
    """model.task: what the wrapped model outputs."""

    name: str
    outputs: tuple[str, ...]  # the wrapped model's outputs, in order (the ONNX graph's output names)
    primary: str  # the output task metrics, fidelity metrics and the repair read
    wrapper: str  # the export wrapper (compiler/stages/models.py WRAPPERS)
    head: str  # the transformers Auto class that loads it
    fidelity: str  # which fidelity metrics (compiler/numerics/metrics.py FIDELITY)
    output_cosine: bool  # a cosine between two outputs is a statistic of them (not of 2-value logits)
    labeled: bool  # its outputs are scores over named classes (config id2label)
    builtin_evaluation: str  # how the built-in evaluation sentences are read (data.format)
    fidelity_summary: str  # the fidelity metrics, for people
    summary: str = ""

    @property
    def primary_index(self) -> int:
        return self.outputs.index(self.primary)

    def eval_tasks(self) -> tuple[EvalTask, ...]:
        """The labeled evaluation tasks that can score this kind's outputs."""
        return tuple(t for t in EVAL_TASKS.values() if t.model_task == self.name)


@dataclass(frozen=True)
class EvalTask:
    """A labeled evaluation set's task: named by its columns (TSV header, JSONL keys), scored by its metrics
    (the first is gate.task_metric's default; all higher-is-better) on one output of one model kind."""

    name: str
    columns: tuple[str, ...]
    metrics: tuple[str, ...]
    model_task: str  # the TaskKind whose outputs it scores
    layout: str  # LABELS | SCORED_PAIRS | RANKED_PAIRS

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"eval task {self.name}: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")

    @property
    def output(self) -> str:
        return task_kind(self.model_task).primary

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    @property
    def texts_per_example(self) -> int:
        return 1 if self.layout == LABELS else 2


TASK_KINDS: dict[str, TaskKind] = {}
EVAL_TASKS: dict[str, EvalTask] = {}


def register_task_kind(kind: TaskKind) -> TaskKind:
    TASK_KINDS[kind.name] = kind
    return kind


def register_eval_task(task: EvalTask) -> EvalTask:
    EVAL_TASKS[task.name] = task
    return task


def task_kind(name: str) -> TaskKind:
    try:
        return TASK_KINDS[str(name)]
    except KeyError:
        raise KeyError(f"unknown model task {name!r}; known: {', '.join(TASK_KINDS)}") from None


def eval_task(name: str) -> EvalTask:
    try:
        return EVAL_TASKS[str(name)]
    except KeyError:
        raise KeyError(f"unknown evaluation task {name!r}; known: {', '.join(EVAL_TASKS)}") from None


EMBEDDING = register_task_kind(TaskKind(
    name="embedding", outputs=("last_hidden_state", "sentence_embedding"), primary="sentence_embedding",
    wrapper="EmbeddingWrapper", head="AutoModel", fidelity="embedding_fidelity", output_cosine=True, labeled=False,
    builtin_evaluation="paired_text", fidelity_summary="embedding cosine, top-1 agreement", summary="mean pool + L2 norm"))
# the built-in paraphrase pairs score embeddings, not logits: a classifier reads them as plain sentences and is
# gated on fidelity to fp32 alone
CLASSIFICATION = register_task_kind(TaskKind(
    name="classification", outputs=("logits",), primary="logits", wrapper="ClassifierWrapper",
    head="AutoModelForSequenceClassification", fidelity="classifier_fidelity", output_cosine=False, labeled=True,
    builtin_evaluation="text", fidelity_summary="label agreement, KL", summary="logits"))

register_eval_task(EvalTask("classification", ("text", "label"), ("accuracy", "macro_f1"), "classification", LABELS))
register_eval_task(EvalTask("sts", ("sentence1", "sentence2", "score"), ("spearman", "pearson"), "embedding",
                            SCORED_PAIRS))
# the built-in evaluation set (data.format=paired_text): lines 1-2, 3-4, ... are paraphrases, each the other's
# gold partner
PARAPHRASE_TASK = "retrieval"
register_eval_task(EvalTask("retrieval", ("query", "positive"), ("accuracy_at_1", "mrr"), "embedding", RANKED_PAIRS))
