"""`qcompile predict <run dir> "a sentence" ...`: text through a finished run's engine on its target, with the
tokenizer and settings the check stage used, read from the run directory alone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from compiler.commands.reproduce import ENGINE_PATTERNS, _matches
from compiler.core.errors import RecipeError
from compiler.core.schema import TargetConfig
from compiler.core.status import FAILED_SUFFIX, GATE_FAILED_SUFFIX, PARTIAL_SUFFIX, Status
from compiler.core.tasks import task_kind
from compiler.rundir.manifest import MANIFEST, check_artifacts
from compiler.stages.data import tokenize
from compiler.stages.models import PREDICT_FILE
from compiler.stages.validate import _typed
from targets.base import get_target, target_names

USAGE = ('qcompile predict <run dir> "a sentence" ... [--file sentences.txt] [--json] [--batch-size N] [--no-verify] '
         '[--allow-gate-failed]')
# files that predict may load although manifest.json does not list them (a TensorRT plan made later by
# build_engine.sh, a graph dropped in): refused like a modified artifact, since nothing vouches for them
LOADABLE_PATTERNS = ("*.onnx", "*.onnx.data", "*.data", "*.pt", "*.pt2", "predict.json", "recipe.yaml")
SHOWN_VALUES = 8  # embedding values printed per sentence (--json gives all of them)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile predict", usage=USAGE,
                                description="Run sentences through a finished run's engine (the check stage's "
                                            "target outputs): embeddings (first values + norm) or labels + scores.")
    p.add_argument("run_dir")
    p.add_argument("sentences", nargs="*")
    p.add_argument("--file", help="one sentence per line (blank lines skipped)")
    p.add_argument("--json", action="store_true", help="every output value as JSON on stdout")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    p.add_argument("--no-verify", action="store_true",
                   help="load the run's files even where they differ from the sha256 in its manifest.json (files "
                        "you changed on purpose); default: refuse, as `qcompile verify` would fail")
    p.add_argument("--allow-gate-failed", action="store_true",
                   help="run a build that failed its accuracy gate (a <name>.gate-failed directory), to look at it")
    return p


def finished_run(path: str, allow_gate_failed: bool = False) -> Path:
    """The run directory, or a RecipeError that says why it cannot be used (exit 2): failed, unfinished, or
    (unless allowed) a build that failed its gate, by its name's suffix or its report's status."""
    run_dir = Path(path).expanduser()
    fix = "pass a finished run directory: qcompile predict outputs/<date>/<run> \"a sentence\""
    if not run_dir.is_dir():
        raise RecipeError("run_dir", f"{run_dir} is not a directory", fix)
    if (run_dir / "FAILED.md").exists() or run_dir.name.endswith((PARTIAL_SUFFIX, FAILED_SUFFIX)):
        raise RecipeError("run_dir", f"{run_dir} is not a finished build (failed or unfinished)", fix)
    missing = [f for f in (MANIFEST, "report.json", "recipe.yaml") if not (run_dir / f).is_file()]
    if missing:
        raise RecipeError("run_dir", f"{run_dir} is not a finished qcompile run (no {', '.join(missing)})", fix)
    status = json.loads((run_dir / "report.json").read_text()).get("status")
    if not allow_gate_failed and (run_dir.name.endswith(GATE_FAILED_SUFFIX) or status == Status.GATE_FAILED):
        raise RecipeError("run_dir", f"{run_dir} failed its accuracy gate (its REPORT.md says why)",
                          "pass a run that passed, or --allow-gate-failed to look at this one anyway")
    if not (run_dir / PREDICT_FILE).is_file():
        raise RecipeError("run_dir", f"{run_dir} has no {PREDICT_FILE} and tokenizer/ (built before qcompile wrote "
                          "them)", f"rebuild it: qcompile rebuild {run_dir}")
    return run_dir


def check_files(run_dir: Path) -> None:
    """Every file predict may load as the build wrote it: each artifact manifest.json lists has its recorded
    sha256 (the check `qcompile verify` makes), and no loadable file was added after the build. A RecipeError
    naming the first file otherwise (exit 2, like predict's other refusals of a run directory)."""
    status, unlisted = check_artifacts(run_dir)
    bad = [f"{name} is modified (its sha256 differs from the one in manifest.json)" if s == "modified"
           else f"{name} is missing (manifest.json lists it)" for name, s in status.items() if s != "ok"]
    bad += [f"{name} is not in manifest.json (added after the build)" for name in unlisted
            if name.startswith("tokenizer/") or _matches(name, ENGINE_PATTERNS + LOADABLE_PATTERNS)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RecipeError("run_dir", f"{run_dir}: {bad[0]}{more}: refusing to run files the build did not write",
                          f"qcompile verify {run_dir} lists every difference; pass --no-verify to run them anyway")


def read_sentences(args) -> list[str]:
    sentences = list(args.sentences)
    if args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise RecipeError("--file", f"{path} is not a file", "give a text file with one sentence per line")
        sentences += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not sentences:
        raise RecipeError("sentences", "no sentence given", f'usage: {USAGE}')
    return sentences


def load_engine(run_dir: Path, spec: dict[str, Any]):
    """(target, engine) of the run: the recipe's target section, the report's lower section, the artifacts."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(run_dir / "recipe.yaml")
    report = json.loads((run_dir / "report.json").read_text())
    target_cfg = _typed(TargetConfig, recipe.get("target", {}), "target")
    if target_cfg.name not in target_names():
        raise RecipeError("target.name", f"the run's target {target_cfg.name!r} is unknown here",
                          f"use a qcompile with target {target_cfg.name}")
    target = get_target(target_cfg.name)(target_cfg)
    engine = target.load(run_dir, report.get("lower") or {}, spec["input_names"], spec["output_names"])
    return target, engine, recipe


def predict(run_dir: Path, sentences: list[str], batch_size: int | None = None, verify: bool = True) -> dict[str, Any]:
    """The run's outputs for the sentences: {"task", "outputs": name -> array [N, ...], "labels"}. verify=False
    loads files that differ from the run's manifest.json (check_files refuses them otherwise)."""
    from transformers import AutoTokenizer

    if verify:
        check_files(run_dir)
    spec = json.loads((run_dir / PREDICT_FILE).read_text())
    target, engine, recipe = load_engine(run_dir, spec)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / spec["tokenizer"]), local_files_only=True)
    # the check stage's tokenization (padding to seq_len) and batching (data.batch_size)
    features = tokenize(tokenizer, sentences, int(spec["seq_len"]), spec["input_names"])
    batch = int(batch_size or recipe.get("data", {}).get("batch_size", 8) or 8)
    run = target.predictor(engine)
    parts: dict[str, list[np.ndarray]] = {}
    for feed in features.batches(batch):
        for name, value in run(feed).items():
            parts.setdefault(name, []).append(value)
    outputs = {name: np.concatenate(values, axis=0) for name, values in parts.items()}
    return {"task": spec["task"], "target": target.name, "outputs": outputs, "labels": spec.get("labels")}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rows(result: dict[str, Any], sentences: list[str]) -> list[dict[str, Any]]:
    """One record per sentence: a classifier's label and scores, an embedding model's embedding and norm."""
    out = []
    kind = task_kind(result["task"])
    if kind.labeled:
        logits = result["outputs"][kind.primary]
        names = result["labels"] or [f"LABEL_{i}" for i in range(logits.shape[-1])]
        for text, row, p in zip(sentences, logits, _softmax(logits)):
            best = int(np.argmax(row))
            out.append({"text": text, "label": names[best], "score": float(p[best]),
                        "scores": {n: float(v) for n, v in zip(names, p)}, "logits": [float(v) for v in row]})
        return out
    emb = result["outputs"][kind.primary]
    for text, row in zip(sentences, emb):
        out.append({"text": text, "norm": float(np.linalg.norm(row.astype(np.float64))),
                    "sentence_embedding": [float(v) for v in row]})
    return out


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        _parser().print_help()
        return 0
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its usage line
        return 2 if e.code else 0
    run_dir = finished_run(args.run_dir, allow_gate_failed=args.allow_gate_failed)
    sentences = read_sentences(args)
    result = predict(run_dir, sentences, args.batch_size, verify=not args.no_verify)
    records = rows(result, sentences)
    if args.json:
        json.dump({"run_dir": str(run_dir), "task": result["task"], "target": result["target"],
                   "predictions": records}, sys.stdout, indent=1)
        print()
        return 0
    for r in records:
        if task_kind(result["task"]).labeled:
            others = ", ".join(f"{n} {p:.3f}" for n, p in r["scores"].items())
            print(f"{r['label']}\t{r['score']:.4f}\t{r['text']}\t({others})")
        else:
            head = " ".join(f"{v:+.4f}" for v in r["sentence_embedding"][:SHOWN_VALUES])
            dim = len(r["sentence_embedding"])
            print(f"norm {r['norm']:.4f}\t[{head} ... ({dim} values)]\t{r['text']}")
    return 0
