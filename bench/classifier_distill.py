"""Issue 19's classifier goal: a MiniLM fine-tuned on real labeled sentences, whose label agreement under plain
NVFP4 is below 0.97, keeps >= 0.99 of its labels with recipe nvfp4_distill and no FP8 fallback.

The labeled set is real: the 200 movie-review sentences of Pang & Lee's polarity data as gensim 4.4.0 ships
them (gensim/test/test_data/pang_lee_polarity.cor, 100 positive / 100 negative). The script reads that one
file out of the gensim wheel (`pip download gensim==4.4.0 --no-deps`; gensim is neither imported nor installed).
140 rows (70 / 70, seeded) fine-tune all-MiniLM-L6-v2 whole; the evaluation rows are the other 60 plus the 696
rows of qcompile's own sentiment.tsv (a second domain, also labeled), 756 in all. The distillation trains on
the 140 training sentences' text only (data.train_file), never on an evaluation row.

    python bench/classifier_distill.py                      # fine-tunes (~2 min), then nvfp4 and nvfp4_distill
    python bench/classifier_distill.py --work DIR           # keep / reuse the fine-tuned model and files in DIR
    python bench/classifier_distill.py --wheel PATH.whl     # a gensim wheel already on disk
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from classifier_repair import run, summary  # noqa: E402

SEQ_LEN = 64  # the longest Pang & Lee sentence is 58 word pieces + [CLS] + [SEP]
POLARITY_FILE = "gensim/test/test_data/pang_lee_polarity.cor"


def polarity_rows(wheel: Path | None, work: Path) -> list[tuple[str, str]]:
    """(text, label) of the 200 Pang & Lee sentences, read from the gensim wheel (downloaded into work/ if not
    given). The file is cp1252 with a fastText prefix: '__label__pos text'."""
    if wheel is None:
        found = sorted(work.glob("gensim-4.4.0-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "gensim==4.4.0", "--no-deps", "-q",
                            "-d", str(work)], check=True)
            found = sorted(work.glob("gensim-4.4.0-*.whl"))
        wheel = found[0]
    text = zipfile.ZipFile(wheel).read(POLARITY_FILE).decode("cp1252")
    rows = []
    for line in text.splitlines():
        tag, sentence = line.split(" ", 1)
        rows.append((sentence.strip(), {"__label__pos": "positive", "__label__neg": "negative"}[tag]))
    return rows


def split(rows: list[tuple[str, str]], seed: int = 0) -> tuple[list, list]:
    """70 + 70 training rows, the other 30 + 30 held out, chosen by a seeded permutation per label."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in ("negative", "positive"):
        mine = [r for r in rows if r[1] == label]
        order = rng.permutation(len(mine))
        train += [mine[i] for i in order[:70]]
        held += [mine[i] for i in order[70:]]
    return train, held


def write_tsv(path: Path, rows) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


def fine_tune_minilm(out_dir: Path, train: list[tuple[str, str]], seed: int = 0, epochs: int = 4,
                     lr: float = 1e-4) -> Path:
    """all-MiniLM-L6-v2 with a fresh classification head, trained whole (AdamW, batches of 16, seeded order): the
    same loop as bench/classifier_repair.py's MiniLM on other rows."""
    from classifier_fixture import fine_tune
    from classifier_repair import train_minilm_classifier

    return train_minilm_classifier(out_dir, seed, epochs, lr=lr,
                                   tune=lambda m, t: fine_tune(m, t, out_dir, seed, epochs, lr, rows=train,
                                                               seq_len=SEQ_LEN, batch=16))


def prepare(work: Path, wheel: Path | None) -> tuple[Path, Path, Path]:
    """(model dir, training TSV, evaluation TSV) in work/, made once."""
    from classifier_fixture import sentiment_rows

    train, held = split(polarity_rows(wheel, work))
    train_tsv = write_tsv(work / "train.tsv", train)
    eval_tsv = write_tsv(work / "evaluation.tsv", held + list(sentiment_rows()))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        fine_tune_minilm(model_dir, train)
    return model_dir, train_tsv, eval_tsv


def build_args(model_dir: Path, train: Path | None, calibration: Path, evaluation: Path, recipe: str, target: str,
               extra: list[str]) -> list[str]:
    """train None: the distillation trains on the built-in unlabeled corpus instead of the 140 training rows."""
    return ["model=hf", f"model.path={model_dir}", "model.task=classification", f"recipe={recipe}",
            f"target={target}", f"data.calibration_file={calibration}", f"data.evaluation_file={evaluation}",
            *([f"data.train_file={train}"] if train is not None else []), "data.calibration_samples=64",
            "data.evaluation_samples=1000", f"data.seq_len={SEQ_LEN}", f"bench.seq_len={SEQ_LEN}",
            "bench.enabled=false", *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the wheel, the fine-tuned model and the TSVs")
    ap.add_argument("--wheel", default=None, help="a gensim-4.4.0 wheel on disk")
    ap.add_argument("--target", default="torch")
    ap.add_argument("--recipes", nargs="+", default=["nvfp4", "nvfp4_distill"])
    ap.add_argument("--train-text", choices=["rows", "builtin"], default="rows",
                    help="what the distillation trains on: the 140 training rows' text, or the built-in corpus")
    ap.add_argument("--json", default=None, help="also write the summaries here")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every build")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="classifier-distill-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, train, evaluation = prepare(work, Path(a.wheel) if a.wheel else None)
    cache = work / "cache"
    out = {}
    for recipe in a.recipes:
        cwd = Path(tempfile.mkdtemp(prefix=f"build-{recipe}-", dir=work))
        out[recipe] = summary(run(cwd, build_args(model_dir, train if a.train_text == "rows" else None, train,
                                                 evaluation, recipe, a.target, a.overrides), cache))
    print(f"\nMiniLM fine-tuned on 140 Pang & Lee sentences (seed 0), target={a.target}, 756 evaluation rows "
          "(60 held-out Pang & Lee + 696 sentiment.tsv), no fallback\n")
    print("| recipe | exit | label agreement | accuracy fp32 -> target | drop (95% interval) | build s |")
    print("|---|---|---|---|---|---|")
    for recipe, s in out.items():
        ci = s["drop_ci95"] or [float("nan")] * 2
        print(f"| {recipe} | {s['rc']} | {s['label_agreement']} | {s['accuracy_fp32']} -> {s['accuracy_target']} | "
              f"{s['accuracy_drop']} [{ci[0]:.4f}, {ci[1]:.4f}] | {s['wall_s']} |")
        if s["error"]:
            print(s["error"])
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
