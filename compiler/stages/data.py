"""Calibration and evaluation data: sentences (plain text) or labeled rows (TSV / JSONL: classification, STS,
retrieval) read from files, tokenized into fixed-length feeds, with the gold labels the check scores."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.core.errors import BuildError, RecipeError
from compiler.core.paths import BUILTIN_DATA_DIR
from compiler.core.tasks import EMBEDDING, EVAL_TASKS, LABELS, PARAPHRASE_TASK, RANKED_PAIRS, SCORED_PAIRS, eval_task, task_kind
from compiler.numerics.metrics import TaskLabels

log = logging.getLogger(__name__)

BUILTIN_DIR = BUILTIN_DATA_DIR

# data.format: how evaluation_file is read. auto: by extension (.tsv, .jsonl, anything else plain text);
# the built-in evaluation set is paired_text (lines 1-2, 3-4, ... are paraphrases of each other).
FORMATS = ("auto", "text", "paired_text", "tsv", "jsonl")


def _expected(sep: str = ",") -> str:
    """The columns of every labeled task (a file's columns -- TSV header / JSONL keys -- say its task)."""
    return " | ".join(sep.join(t.columns) for t in EVAL_TASKS.values())


@dataclass
class Features:
    """Tokenized sentences: name -> int64 array [N, seq_len], in the model's input order."""

    texts: list[str]
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}

    def sha256(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.arrays[k]).tobytes())
        return h.hexdigest()


@dataclass
class Dataset:
    calibration: Features
    evaluation: Features
    files: dict[str, str]  # role -> path
    files_sha256: dict[str, str]
    # gold labels scored on evaluation's rows (None: plain text, fidelity only)
    evaluation_labels: TaskLabels | None = None
    # the training text of a step that trains (distill), never the evaluation rows; None when none trains
    train: Features | None = None
    train_info: dict | None = None


@dataclass
class Rows:
    """A data file parsed: task None (plain sentences) or a labeled task, one tuple of fields per example."""

    path: Path
    task: str | None
    examples: list[tuple]
    lines: list[int]  # 1-based line of each example, for error messages
    paired: bool = False  # paired_text: example 2k and 2k+1 are each other's gold partner
    digest: str = ""

    def texts(self) -> list[str]:
        """Every sentence of the rows (what calibration feeds the model)."""
        if self.task is None or self.paired:
            return [e[0] for e in self.examples]
        return [t for e in self.examples for t in e[:eval_task(self.task).texts_per_example]]


def _read_lines(path: Path, key: str, chars: str | None = None) -> list[tuple[int, str]]:
    """Non-blank lines, numbered from 1, stripped of `chars` (None: all whitespace; TSV keeps its tabs, so an
    empty last field is reported as empty rather than missing)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RecipeError(key, f"cannot read {path}: {e.strerror}", "give an existing UTF-8 text file, one sentence per line") from e
    except UnicodeDecodeError as e:
        raise RecipeError(key, f"{path} is not UTF-8 text", "save it as UTF-8, one sentence per line") from e
    return [(i, ln.strip(chars)) for i, ln in enumerate(lines, 1) if ln.strip()]


def read_sentences(path: Path, key: str) -> list[str]:
    return [ln for _, ln in _read_lines(path, key)]


def _task_named(columns) -> str | None:
    return next((t.name for t in EVAL_TASKS.values() if set(t.columns) <= set(columns)), None)


def _task_of(columns, path: Path, where: str, key: str) -> str:
    task = _task_named(columns)
    if task:
        return task
    where = f"{path}:{where}: columns" if where else "columns"
    raise RecipeError(key, f"{where} {', '.join(map(str, columns)) or '(none)'} name no task",
                      f"use the columns {_expected()}")


def _header_task(header: list[str], path: Path, line: int, key: str) -> str:
    """The task a TSV's header names; a first row that names none is most often data (a file without a
    header), so the error says a header is needed, shows one, and names data.columns."""
    task = _task_named(header)
    if task:
        return task
    shown = "<TAB>".join(header)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    like = next((t for t in EVAL_TASKS.values() if len(t.columns) == len(header)), next(iter(EVAL_TASKS.values())))
    example, example_cols = "<TAB>".join(like.columns), "[" + ",".join(like.columns) + "]"
    raise RecipeError(key, f"{path}:{line}: the first row must be a header naming the columns, e.g. {example}; "
                      f"it reads {shown!r}, which names no task",
                      f"add a header row ({_expected('<TAB>')}), or give "
                      f"data.columns={example_cols} for a file without one")


def _fields(row: dict[str, object], task: str, path: Path, line: int, key: str) -> tuple:
    kind = eval_task(task)
    cols = kind.columns
    values = []
    for c in cols:
        v = row.get(c)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise RecipeError(key, f"{path}:{line}: empty or missing {c!r}", f"every row needs {', '.join(cols)}")
        values.append(v.strip() if isinstance(v, str) else v)
    if kind.layout == SCORED_PAIRS:
        try:
            values[2] = float(values[2])
        except (TypeError, ValueError):
            raise RecipeError(key, f"{path}:{line}: {cols[2]} {values[2]!r} is not a number",
                              "give the gold similarity as a number, e.g. 3.8") from None
        if not np.isfinite(values[2]):
            raise RecipeError(key, f"{path}:{line}: {cols[2]} {values[2]!r} is not finite", "give a finite number")
    if kind.layout == LABELS:
        values[1] = str(values[1])
    for i, (c, v) in enumerate(zip(cols, values)):
        if i < kind.texts_per_example and not isinstance(v, str):
            raise RecipeError(key, f"{path}:{line}: {c!r} is {type(v).__name__}, not text", f"give {c} as a string")
    return tuple(values)


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return {".tsv": "tsv", ".jsonl": "jsonl"}.get(path.suffix.lower(), "text")


def read_rows(path: Path, fmt: str, key: str, columns: list[str] | None = None) -> Rows:
    """Parse a data file; a malformed row is a RecipeError naming the file, the line and what was expected.
    columns (data.columns): the fields of a TSV that has no header row."""
    fmt = _format_of(path, fmt)
    lines = _read_lines(path, key, " \r\n" if fmt == "tsv" else None)
    digest = hashlib.sha256("\n".join(ln for _, ln in lines).encode()).hexdigest()
    if fmt in ("text", "paired_text"):
        rows = Rows(path, None, [(ln,) for _, ln in lines], [i for i, _ in lines], digest=digest)
        if fmt == "paired_text":
            if len(lines) % 2:
                raise RecipeError(key, f"{path}:{lines[-1][0]}: paired_text needs an even number of sentences "
                                  f"(lines 1-2, 3-4, ... are pairs); this last one has no partner",
                                  "add its paraphrase on the next line or remove it")
            rows.task, rows.paired = PARAPHRASE_TASK, True
        return rows
    if fmt == "tsv":
        if not lines:
            return Rows(path, None, [], [], digest=digest)
        first_line, first = lines[0][0], [h.strip() for h in lines[0][1].split("\t")]
        if columns:  # a file without a header: data.columns names its fields (a header row equal to it is skipped)
            header, body = list(columns), lines[1:] if first == list(columns) else lines
            task = _task_of(header, path, "", "data.columns")
        else:
            header, body = first, lines[1:]
            task = _header_task(header, path, first_line, key)
        examples, at = [], []
        for i, ln in body:
            parts = ln.split("\t")
            if len(parts) != len(header):
                raise RecipeError(key, f"{path}:{i}: {len(parts)} tab-separated fields, expected {len(header)} "
                                  f"({', '.join(header)})", "fix that row (one tab between fields, no tabs inside)")
            examples.append(_fields(dict(zip(header, parts)), task, path, i, key))
            at.append(i)
        return Rows(path, task, examples, at, digest=digest)
    if fmt == "jsonl":
        task, examples, at = None, [], []
        for i, ln in lines:
            try:
                row = json.loads(ln)
            except json.JSONDecodeError as e:
                raise RecipeError(key, f"{path}:{i}: not a JSON object ({e.msg})",
                                  f"write one object per line with the keys {_expected()}") from None
            if not isinstance(row, dict):
                raise RecipeError(key, f"{path}:{i}: a JSON {type(row).__name__}, not an object",
                                  f"write one object per line with the keys {_expected()}")
            if task is None:
                task = _task_of(sorted(row), path, str(i), key)
            examples.append(_fields(row, task, path, i, key))
            at.append(i)
        return Rows(path, task, examples, at, digest=digest)
    raise RecipeError("data.format", f"bad value {fmt!r}", f"use one of {', '.join(FORMATS)}")


def label_ids(label_names: dict[int, str]) -> dict[str, int]:
    """Label text -> class id: a row's label may be the class name (config id2label) or its id."""
    ids = {str(i): int(i) for i in label_names}
    ids.update({str(name): int(i) for i, name in label_names.items()})
    return ids


def check_labels(rows: Rows, key: str, model_task: str, label_names: dict[int, str] | None) -> None:
    """The rows' task fits the model, and every classification label is in the model's label set."""
    if rows.task is None:
        return
    task, kind = eval_task(rows.task), task_kind(model_task)
    if task.model_task != model_task:
        fits = " / ".join(f"({', '.join(t.columns)})" for t in kind.eval_tasks())
        raise RecipeError(key, f"{rows.path} holds {task.name} rows ({', '.join(task.columns)}) but model.task="
                          f"{model_task}", f"they score {task.output}, which model.task={task.model_task} outputs: set "
                          f"model.task={task.model_task}, or give {fits + ' rows or ' if fits else ''}plain text")
    if task.layout == LABELS:
        if not label_names:
            raise RecipeError(key, f"{rows.path} holds labels but the model's config names no labels (id2label)",
                              "save the classifier with its id2label / label2id in config.json")
        ids = label_ids(label_names)
        for (_, label), line in zip(rows.examples, rows.lines):
            if label not in ids:
                names = ", ".join(f"{i}={n}" for i, n in sorted(label_names.items()))
                raise RecipeError(key, f"{rows.path}:{line}: label {label!r} is not in the model's label set ({names})",
                                  "use one of those names or ids, or fix the row")


def _take_count(n: int, available: int, key: str, role: str, path: Path, policy: str, unit: str) -> int:
    if available == 0:
        raise BuildError(f"data.{role}_file: {path} holds no {unit}; {role} needs at least one")
    if n > available:
        if policy == "error":
            raise RecipeError(key, f"{n} samples asked but {path.name} has {available}",
                              f"set {key}<={available} or data.on_short_data=clamp")
        log.warning("%s=%d but %s has only %d %s: using all %d", key, n, path.name, available, unit, available)
        return available
    return n


def _take(sentences: list[str], n: int, key: str, role: str, path: Path, policy: str) -> list[str]:
    return sentences[:_take_count(n, len(sentences), key, role, path, policy, "sentences")]


def evaluation_set(rows: Rows, n: int, label_names: dict[int, str] | None = None
                   ) -> tuple[list[str], TaskLabels | None]:
    """The first n examples as the texts to run (in order) and the gold labels indexing them."""
    ex = rows.examples[:n]
    if rows.task is None:
        return [e[0] for e in ex], None
    if rows.paired:  # each sentence is a query; its gold partner is the other line of its pair
        ex = ex[:len(ex) - len(ex) % 2]
        idx = np.arange(len(ex))
        return [e[0] for e in ex], TaskLabels(rows.task, queries=idx, candidates=idx, gold=idx ^ 1)
    layout = eval_task(rows.task).layout
    if layout == LABELS:
        ids = label_ids(label_names or {})
        names = tuple(str(label_names[i]) for i in sorted(label_names)) if label_names else ()
        return [e[0] for e in ex], TaskLabels(rows.task, labels=np.array([ids[e[1]] for e in ex], np.int64),
                                              label_names=names)
    texts = [t for e in ex for t in e[:2]]
    k = np.arange(len(ex))
    if layout == SCORED_PAIRS:
        return texts, TaskLabels(rows.task, pairs=np.stack([2 * k, 2 * k + 1], axis=1),
                                 scores=np.array([e[2] for e in ex], np.float64))
    assert layout == RANKED_PAIRS
    # query i at row 2i retrieves among all positives (rows 2j+1); its gold is its own positive
    return texts, TaskLabels(rows.task, queries=2 * k, candidates=2 * k + 1, gold=k)


def data_file(cfg, role: str) -> Path:
    given = getattr(cfg, f"{role}_file")
    return Path(given).expanduser() if given else BUILTIN_DIR / f"{role}.txt"


def builtin_evaluation(cfg) -> bool:
    """The evaluation set is the sentences shipped with qcompile, read as data.format=auto."""
    return not cfg.evaluation_file and cfg.format == "auto"


def file_format(cfg, role: str, model_task: str = EMBEDDING.name) -> str:
    """data.format applies to evaluation_file; calibration files go by extension. The built-in evaluation set
    is paraphrase pairs (a retrieval task on sentence embeddings) for an embedding model and plain sentences
    for a classifier, whose logits those pairs cannot score: it is gated on fidelity to fp32 alone."""
    if role == "evaluation" and builtin_evaluation(cfg):
        return task_kind(model_task).builtin_evaluation
    return cfg.format if role == "evaluation" else "auto"


def read_data_file(cfg, role: str, model_task: str = EMBEDDING.name) -> Rows:
    return read_rows(data_file(cfg, role), file_format(cfg, role, model_task), f"data.{role}_file",
                     columns=getattr(cfg, "columns", None))


def say_what_labels_would_add(cfg, model_task: str) -> None:
    """One console line: a classifier checked on the built-in sentences has no gold labels."""
    kind = task_kind(model_task)
    if builtin_evaluation(cfg) and kind.builtin_evaluation == "text" and kind.eval_tasks():
        task = kind.eval_tasks()[0]
        log.warning("model.task=%s without labeled data: the gate checks fidelity to fp32 (%s) on the built-in "
                    "sentences; data.evaluation_file=<a TSV with a %s header> adds %s", kind.name,
                    kind.fidelity_summary, ",".join(task.columns), " / ".join(task.metrics))


def check_data_files(cfg, need_calibration: bool = True, model_task: str = EMBEDDING.name,
                     label_names: dict[int, str] | None = None) -> str | None:
    """Validate-time look at the data files (no tokenizer, no weights): malformed rows, labels outside the
    model's label set, an empty file, or fewer examples than asked with data.on_short_data=error are recipe
    errors before any model loads. Returns the evaluation task (None: plain text)."""
    if cfg.format not in FORMATS:
        raise RecipeError("data.format", f"bad value {cfg.format!r}", f"use one of {', '.join(FORMATS)}")
    if cfg.columns is not None:
        check_columns(cfg)
    task = None
    for role in ("calibration", "evaluation"):
        path = data_file(cfg, role)
        key = f"data.{role}_file"
        rows = read_data_file(cfg, role, model_task)
        if not rows.examples:
            raise RecipeError(key, f"{path} holds no sentences",
                              "give a UTF-8 text file with one sentence per line")
        if role == "evaluation":
            check_labels(rows, key, model_task, label_names)
            task = rows.task
            available = len(rows.examples)
        else:
            if not need_calibration:
                continue
            available = len(rows.texts())
        n = int(getattr(cfg, f"{role}_samples"))
        if n > available and cfg.on_short_data == "error":
            raise RecipeError(f"data.{role}_samples", f"{n} samples asked but {path.name} has {available}",
                              f"set data.{role}_samples<={available} or data.on_short_data=clamp")
    return task


def check_columns(cfg) -> None:
    """data.columns: distinct names that name a task, for an evaluation file read as TSV."""
    cols = [str(c) for c in cfg.columns]
    if len(set(cols)) != len(cols) or not cols:
        raise RecipeError("data.columns", f"{cols} repeats a column or names none", "give each field's name once, "
                          "e.g. data.columns=[text,label]")
    _task_of(cols, Path(), "", "data.columns")
    formats = {role: _format_of(data_file(cfg, role), file_format(cfg, role)) for role in ("evaluation", "calibration")}
    if "tsv" not in formats.values():
        raise RecipeError("data.columns", f"names the fields of a TSV without a header, but "
                          f"{data_file(cfg, 'evaluation')} is read as {formats['evaluation']}",
                          "give a .tsv data.evaluation_file (or data.format=tsv), or remove data.columns")


# distill's training text when data.train_file is unset (compiler/datasets/README.md says where it comes from)
BUILTIN_TRAIN = "unlabeled.txt"


def train_file(cfg) -> Path:
    given = getattr(cfg, "train_file", None)
    return Path(given).expanduser() if given else BUILTIN_DIR / BUILTIN_TRAIN


def read_train_rows(cfg) -> Rows:
    """data.train_file read by extension (one sentence a line, or a labeled .tsv / .jsonl whose text columns
    are taken); its labels are never read."""
    return read_rows(train_file(cfg), "auto", "data.train_file")


def check_train_file(cfg, model_task: str = EMBEDDING.name) -> None:
    """Validate-time: the training text exists, holds sentences, and is not the evaluation file (a student
    trained on the rows the check measures would report a fidelity it does not have)."""
    path, evaluation = train_file(cfg), data_file(cfg, "evaluation")
    same = "is the evaluation file"
    if path.resolve() != evaluation.resolve():
        rows = read_train_rows(cfg)
        if not rows.texts():
            raise RecipeError("data.train_file", f"{path} holds no sentences",
                              "give a UTF-8 text file with one sentence per line (or a labeled file with a text column)")
        ev = read_data_file(cfg, "evaluation", model_task)
        if rows.digest != ev.digest:
            return
        same = f"has the same rows as the evaluation file {evaluation}"
    raise RecipeError("data.train_file", f"{path} {same}; distill would train on the rows the check measures",
                      "give other text (one sentence a line), or leave data.train_file unset for the built-in corpus")


def load_train(cfg, tokenizer, input_names: list[str], evaluation_texts: list[str]) -> tuple[Features, dict]:
    """The training sentences tokenized at data.seq_len, without any sentence that is also an evaluation row;
    and what was read (for the report)."""
    rows = read_train_rows(cfg)
    held_out = set(evaluation_texts)
    texts = rows.texts()
    kept = [t for t in texts if t not in held_out]
    if not kept:
        raise BuildError(f"data.train_file: every sentence of {train_file(cfg)} is an evaluation row")
    info = {"file": str(train_file(cfg)), "sha256": rows.digest, "sentences": len(kept),
            "dropped_evaluation_rows": len(texts) - len(kept)}
    return tokenize(tokenizer, kept, int(cfg.seq_len), input_names), info


def tokenize(tokenizer, texts: list[str], seq_len: int, input_names: list[str]) -> Features:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    arrays = {}
    for name in input_names:
        if name in enc:
            arrays[name] = enc[name].astype(np.int64)
        elif name == "token_type_ids":
            arrays[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            raise BuildError(f"tokenizer gives no {name!r} (has {sorted(enc.keys())})")
    return Features(texts=list(texts), arrays=arrays)


def load_data(cfg, tokenizer, input_names: list[str], need_calibration: bool = True,
              label_names: dict[int, str] | None = None, evaluation_limit: int | None = None,
              model_task: str = EMBEDDING.name, need_train: bool = False) -> Dataset:
    """Load stage for data. cfg is the `data` section; label_names the model's id2label (classifiers);
    evaluation_limit (check.samples) takes fewer evaluation examples than data.evaluation_samples."""
    say_what_labels_would_add(cfg, model_task)
    files, hashes, feats = {}, {}, {}
    labels = None
    for role in ("calibration", "evaluation"):
        path = data_file(cfg, role)
        files[role] = str(path)
        rows = read_data_file(cfg, role, model_task)
        hashes[role] = rows.digest
        n = int(getattr(cfg, f"{role}_samples"))
        key = f"data.{role}_samples"
        if role == "calibration":
            sentences = rows.texts()
            if not need_calibration:
                n = min(n, len(sentences)) or 1
            chosen = _take(sentences, n, key, role, path, cfg.on_short_data)
        else:
            n = _take_count(n, len(rows.examples), key, role, path, cfg.on_short_data,
                            "examples" if rows.task else "sentences")
            if evaluation_limit:
                n = min(n, int(evaluation_limit))
            chosen, labels = evaluation_set(rows, n, label_names)
            if not chosen:
                raise BuildError(f"data.evaluation_samples: {n} example(s) of {path} make no complete pair")
        feats[role] = tokenize(tokenizer, chosen, int(cfg.seq_len), input_names)
    train, train_info = None, None
    if need_train:
        # every evaluation row of the file is held out, not only the evaluation_samples the check runs
        held_out = read_data_file(cfg, "evaluation", model_task).texts()
        train, train_info = load_train(cfg, tokenizer, input_names, held_out)
        files["train"], hashes["train"] = train_info["file"], train_info["sha256"]
    return Dataset(calibration=feats["calibration"], evaluation=feats["evaluation"], files=files,
                   files_sha256=hashes, evaluation_labels=labels, train=train, train_info=train_info)
