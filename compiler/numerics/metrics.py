"""Task metrics against gold labels (classification, STS, retrieval) and fidelity metrics against the fp32
reference, in numpy: cheap enough for a repair loop to call once per candidate precision map."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.core.tasks import EVAL_TASKS, LABELS, SCORED_PAIRS, EvalTask, eval_task, task_kind

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def default_metric(task: str) -> str:
    return eval_task(task).default_metric


@dataclass(frozen=True)
class TaskLabels:
    """Gold labels of an evaluation set, indexed into the rows of the model outputs they are scored on.

    classification: `labels[i]` is the class id of output row i.
    sts: output rows `pairs[i, 0]` and `pairs[i, 1]` are a sentence pair with gold similarity `scores[i]`.
    retrieval: query row `queries[i]` is scored by where its gold partner row `candidates[gold[i]]` ranks
    among all `candidates` rows (the query's own row, when it is a candidate too, is left out)."""

    task: str
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    pairs: np.ndarray | None = None
    scores: np.ndarray | None = None
    queries: np.ndarray | None = None
    candidates: np.ndarray | None = None
    gold: np.ndarray | None = None
    metrics: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if self.task not in EVAL_TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(EVAL_TASKS)}")
        object.__setattr__(self, "metrics", self.kind.metrics)

    @property
    def kind(self) -> EvalTask:
        return eval_task(self.task)

    @property
    def output(self) -> str:
        return self.kind.output

    def __len__(self) -> int:
        """Number of scored examples (the unit the bootstrap resamples)."""
        if self.kind.layout == LABELS:
            return len(self.labels)
        if self.kind.layout == SCORED_PAIRS:
            return len(self.scores)
        return len(self.queries)

    def subset(self, rows: int) -> TaskLabels:
        """The labels of output rows [0, rows) alone (the repair's ranking subset): classification keeps the
        first rows' labels; sts the pairs with both rows inside; retrieval searches only the candidates inside
        and keeps the queries whose gold partner is inside (gold re-indexed), so no query scores against a
        partner that was never run."""
        if self.kind.layout == LABELS:
            return TaskLabels(self.task, labels=self.labels[:rows], label_names=self.label_names)
        if self.kind.layout == SCORED_PAIRS:
            keep = np.all(self.pairs < rows, axis=1)
            return TaskLabels(self.task, pairs=self.pairs[keep], scores=self.scores[keep])
        inside = self.candidates < rows
        new_index = np.cumsum(inside) - 1  # old candidate position -> position among the kept candidates
        keep = (self.queries < rows) & inside[self.gold]
        return TaskLabels(self.task, queries=self.queries[keep], candidates=self.candidates[inside],
                          gold=new_index[self.gold[keep]])

    def example_stats(self, outputs: np.ndarray) -> np.ndarray:
        """Per-example statistic every metric of the task is a function of: the predicted class
        (classification), the cosine of the pair (sts), the 1-based rank of the gold partner (retrieval)."""
        x = np.asarray(outputs, dtype=np.float64)
        if self.kind.layout == LABELS:
            return np.argmax(x, axis=-1)
        e = _normalize(x)
        if self.kind.layout == SCORED_PAIRS:
            return np.sum(e[self.pairs[:, 0]] * e[self.pairs[:, 1]], axis=-1)
        sim = e[self.queries] @ e[self.candidates].T
        sim[self.queries[:, None] == self.candidates[None, :]] = -np.inf  # a query never retrieves itself
        gold_sim = sim[np.arange(len(self.queries)), self.gold]
        # ties count against the gold partner (a collapsed model that scores everything equal ranks it
        # last), and so do NaN outputs
        rank = np.sum(sim >= gold_sim[:, None], axis=1)
        return np.where(np.isfinite(gold_sim), rank, len(self.candidates)).astype(np.float64)

    def score(self, stats: np.ndarray, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The task's metrics from example_stats; idx ([B, n] example indices) scores B resamples at once."""
        if idx is None:
            idx = np.arange(len(self))[None, :]
            return {k: float(v[0]) for k, v in self.score(stats, idx).items()}
        s = stats[idx]
        if self.kind.layout == LABELS:
            y = self.labels[idx]
            values = {"accuracy": lambda: np.mean(s == y, axis=1),
                      "macro_f1": lambda: _macro_f1(s, y, int(max(stats.max(), self.labels.max())) + 1)}
        elif self.kind.layout == SCORED_PAIRS:
            g = self.scores[idx]
            values = {"spearman": lambda: _pearson(_ranks(s), _ranks(g)), "pearson": lambda: _pearson(s, g)}
        else:
            values = {"accuracy_at_1": lambda: np.mean(s == 1, axis=1), "mrr": lambda: np.mean(1.0 / s, axis=1)}
        return {m: values[m]() for m in self.metrics}  # the metrics the task declares, in its order


def task_metric(labels: TaskLabels, outputs: np.ndarray, metric: str) -> float:
    """One metric of one set of outputs against the gold labels (the repair loop's objective)."""
    return labels.score(labels.example_stats(outputs))[metric]


def task_metrics(labels: TaskLabels, outputs: np.ndarray) -> dict[str, float]:
    return labels.score(labels.example_stats(outputs))


def compare_task(labels: TaskLabels, reference: np.ndarray, target: np.ndarray,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, float]]:
    """Per metric: fp32 value, target value, drop = fp32 - target, and the 95% interval of the drop from a
    paired bootstrap over examples (the same resampled examples score both, so shared noise cancels)."""
    ref_stats, tgt_stats = labels.example_stats(reference), labels.example_stats(target)
    ref, tgt = labels.score(ref_stats), labels.score(tgt_stats)
    idx = np.random.default_rng(seed).integers(0, len(labels), size=(resamples, len(labels)))
    ref_b, tgt_b = labels.score(ref_stats, idx), labels.score(tgt_stats, idx)
    out = {}
    for m in labels.metrics:
        drops = ref_b[m] - tgt_b[m]
        drops = drops[np.isfinite(drops)]
        lo, hi = (np.percentile(drops, [2.5, 97.5]) if len(drops) else (float("nan"), float("nan")))
        out[m] = {"fp32": ref[m], "target": tgt[m], "drop": ref[m] - tgt[m], "drop_ci95": [float(lo), float(hi)]}
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def _macro_f1(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 per row, averaged over the classes present in that row's gold or predictions (as
    scikit-learn does with labels=None); numpy only, vectorized over bootstrap rows."""
    c = np.arange(n_classes)[None, None, :]
    p, g = pred[:, :, None] == c, gold[:, :, None] == c
    tp = np.sum(p & g, axis=1)
    denom = np.sum(p, axis=1) + np.sum(g, axis=1)  # 2tp + fp + fn
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.maximum(denom, 1), 0.0)
    return np.sum(f1, axis=1) / np.maximum(np.sum(present, axis=1), 1)


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata  # average ranks for ties, as Spearman's rho needs

    return rankdata(x, axis=-1)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt(np.sum(a * a, axis=-1) * np.sum(b * b, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(a * b, axis=-1) / den, np.nan)


# ---- fidelity: target against the fp32 reference, no labels needed ----

def embedding_fidelity(ref: np.ndarray, tgt: np.ndarray) -> dict[str, float]:
    """Mean / min cosine of target vs reference embeddings; retrieval top-1 agreement (each sentence's
    nearest other sentence is the same under both)."""
    r, t = _normalize(np.asarray(ref, np.float64)), _normalize(np.asarray(tgt, np.float64))
    cos = np.sum(r * t, axis=-1)

    def top1(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argmax(s, axis=1)

    agree = float(np.mean(top1(r) == top1(t))) if len(r) > 1 else 1.0
    return {"embedding_cosine_mean": float(np.mean(cos)), "embedding_cosine_min": float(np.min(cos)),
            "top1_agreement": agree}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def classifier_fidelity(ref_logits: np.ndarray, tgt_logits: np.ndarray) -> dict[str, float]:
    """Label agreement (argmax equal), mean KL(softmax(target) || softmax(reference)) in nats -- the
    information lost when the fp32 distribution stands in for the target's -- and max abs logit difference."""
    r, t = np.asarray(ref_logits, np.float64), np.asarray(tgt_logits, np.float64)
    lr, lt = _log_softmax(r), _log_softmax(t)
    kl = np.sum(np.exp(lt) * (lt - lr), axis=-1)
    return {"label_agreement": float(np.mean(np.argmax(r, -1) == np.argmax(t, -1))),
            "kl_target_reference_mean": float(np.mean(kl)),
            "max_abs_logit_diff": float(np.max(np.abs(r - t)))}


# TaskKind.fidelity -> the fidelity metrics of that kind's primary output (target against the fp32 reference)
FIDELITY = {f.__name__: f for f in (embedding_fidelity, classifier_fidelity)}


def fidelity_metrics(model_task: str, reference: dict[str, np.ndarray], target: dict[str, np.ndarray]
                     ) -> dict[str, float]:
    kind = task_kind(model_task)
    return FIDELITY[kind.fidelity](reference[kind.primary], target[kind.primary])
