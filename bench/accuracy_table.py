"""The per-recipe accuracy table of docs/accuracy.md (issue 12): every shipped quantizing recipe built on MiniLM with the
built-in labeled data (120 paraphrase pairs: retrieval) through the real CLI, recipe.repair.enabled=true and a
task budget of max_task_drop=0.01 on the retrieval metric; per build the task metric fp32 / target / drop with
its paired-bootstrap 95% interval, the fidelity (mean embedding cosine), the layers that fell back and the size.

    python bench/accuracy_table.py                        # every quantizing recipe on torch and ort, print the table
    python bench/accuracy_table.py --readme               # ... and rewrite docs/accuracy.md's marked block
    python bench/accuracy_table.py --recipes nvfp4 int8 --targets torch ort --extra recipe.repair.confirm_top=36
    python bench/accuracy_table.py --render-only OUT --commit abc1234 --readme   # table of an earlier (partial) run

The repair ranks on the first --ranking-samples evaluation rows (whole pairs); the check scores all
--evaluation-samples rows (the built-in file holds 240), so the table's drop includes rows the search never saw.
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
sys.path.insert(0, str(REPO))

from readme_block import compose, write_block  # noqa: E402  (bench/, the script's own folder)

PAGE = "docs/accuracy.md"  # the page holding the marked block (it lived in README.md before)
BEGIN, END = "<!-- accuracy:begin (bench/accuracy_table.py --readme) -->", "<!-- accuracy:end -->"


def quantizing_recipes(model: str) -> list[str]:
    """Shipped recipes (recipes/recipe/*.yaml) with a step that quantizes compute, by the steps' declared facts."""
    from compiler.core.errors import RecipeError
    from compiler.stages.validate import validate

    out = []
    for path in sorted((REPO / "recipes" / "recipe").glob("*.yaml")):
        for target in ("torch", "ort"):  # a recipe one target refuses still gets its row (saying why)
            try:
                spec = validate(compose([f"model={model}", f"recipe={path.stem}", f"target={target}"]))
            except RecipeError:
                continue
            if any(s.quantizes_compute for s in spec.steps):
                out.append(path.stem)
            break
    return out


def overrides(model: str, recipe: str, target: str, a) -> list[str]:
    return [f"model={model}", f"recipe={recipe}", f"target={target}", "bench.enabled=false",
            f"data.evaluation_samples={a.evaluation_samples}", "recipe.repair.enabled=true",
            f"recipe.repair.max_task_drop={a.budget}", f"recipe.gate.max_task_drop={a.budget}",
            f"recipe.repair.ranking_samples={a.ranking_samples}", "recipe.repair.metric=task",
            *([f"recipe.gate.task_metric={a.task_metric}"] if a.task_metric else []), *a.extra]


def build(model: str, recipe: str, target: str, a, out: Path, cache: Path) -> dict:
    cwd = out / f"{recipe}_{target}"
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), QCOMPILE_CACHE_DIR=str(cache),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compiler", *overrides(model, recipe, target, a)], cwd=cwd,
                          capture_output=True, text=True, env=env, check=False)
    row = collect(recipe, target, cwd, proc.returncode, proc.stderr)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def collect(recipe: str, target: str, cwd: Path, rc: int | None = None, stderr: str = "") -> dict:
    """A build's row from its run directory under cwd: its report.json, else why it has none."""
    row = {"recipe": recipe, "target": target, "rc": rc}
    reports = sorted(cwd.glob("outputs/*/*/report.json"))
    if not reports:  # a recipe error (exit 2: its one line), a failed build (its FAILED.md says why), unfinished
        failed = sorted(cwd.glob("outputs/*/*.FAILED/FAILED.md"))
        lines = ([ln for ln in failed[-1].read_text().splitlines()[1:] if ln.strip()][:1] if failed else
                 [ln for ln in stderr.splitlines() if ln.startswith("qcompile:")] or stderr.splitlines()[-1:])
        row["error"] = lines[-1] if lines else ("unfinished" if rc is None else f"exit {rc}")
        return row
    row["report"] = json.loads(reports[-1].read_text())
    row["dir"] = str(reports[-1].parent)
    if rc is None:  # rendered later: the exit code the status stands for
        row["rc"] = 0 if row["report"].get("status") == "passed" else 3
    return row


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def cells(row: dict) -> list[str]:
    """One table row: recipe, target, status, metric fp32 / target / drop [95%], cosine, fell back, sizes."""
    head = [f"`{row['recipe']}`", row["target"]]
    if "report" not in row:
        return head + [f"not built ({'exit ' + str(row['rc']) if row['rc'] is not None else 'no run'}): "
                       f"{row.get('error', '')}"] + ["-"] * 6
    rep = row["report"]
    status = rep.get("status", "?")
    task = rep.get("check", {}).get("task")
    if task:
        m = task["metrics"][task["metric"]]
        lo, hi = m["drop_ci95"]
        metric = [f"{m['fp32']:.4f}", f"{m['target']:.4f}", f"{m['drop']:+.4f} [{lo:+.4f}, {hi:+.4f}]"]
    else:
        metric = ["-", "-", "-"]
    cos = rep.get("check", {}).get("fidelity", {}).get("embedding_cosine_mean")
    repair = rep.get("repair", {})
    if repair.get("quantized_layers") is not None:
        fell = f"{repair['fallback_layers']} of {repair['quantized_layers']} ({repair['fallback']})"
        if not repair.get("met", True):
            fell = f"unmet within {repair['max_fallback_layers']} of {repair['quantized_layers']} ({repair['fallback']})"
    else:
        fell = "-"
    probes = {p["fallback_layers"]: p for p in repair.get("search", [])}
    final = probes.get(repair.get("fallback_layers"))
    linear = _mb(final["weight_bytes"]) if final else "-"
    onnx = _mb(rep.get("onnx", {}).get("bytes"))
    return head + [status] + metric + ["-" if cos is None else f"{cos:.4f}", fell, f"{linear} / {onnx}"]


def render(rows: list[dict], a, commit: str) -> str:
    metric = a.task_metric or "accuracy_at_1"
    lines = [f"Measured by `python bench/accuracy_table.py` at commit {commit} on {a.model} ({os.cpu_count()} CPUs, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}): built-in data, {a.evaluation_samples} "
             f"evaluation rows (retrieval, {metric}), `recipe.repair.enabled=true recipe.repair.metric=task "
             f"recipe.repair.max_task_drop={a.budget} recipe.gate.max_task_drop={a.budget}`, the search ranking on "
             f"the first {a.ranking_samples} rows{('; also `' + ' '.join(a.extra) + '`') if a.extra else ''}. Drop = fp32 - "
             "target, its paired-bootstrap 95% interval in brackets; size = the weights of the layers the search "
             "covers (its quantized Linear layers; layers a recipe keeps fp32 by itself are not in it), in their "
             "formats (estimate) / model.onnx where the target exports one.", "",
             f"| recipe | target | status | {metric} fp32 | target | drop [95%] | embedding cosine | fell back | "
             "MB (searched layers est. / onnx) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--recipes", nargs="*", default=None, help="default: every shipped quantizing recipe")
    ap.add_argument("--targets", nargs="+", default=["torch", "ort"])
    ap.add_argument("--budget", type=float, default=0.01, help="recipe.repair.max_task_drop and gate.max_task_drop")
    ap.add_argument("--task-metric", default=None, help="recipe.gate.task_metric (default: the task's, accuracy_at_1)")
    ap.add_argument("--evaluation-samples", type=int, default=240)
    ap.add_argument("--ranking-samples", type=int, default=128)  # recipe.repair.ranking_samples default
    ap.add_argument("--out", default=None, help="where the run directories go (default: a temp dir)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every build")
    ap.add_argument("--readme", action="store_true", help="rewrite the accuracy block of docs/accuracy.md with the table")
    ap.add_argument("--render-only", metavar="OUT", default=None,
                    help="no builds: the table of the builds already under OUT (an earlier --out, finished or not)")
    ap.add_argument("--commit", default=None, help="with --render-only: the commit the builds ran at")
    a = ap.parse_args()
    recipes = a.recipes or quantizing_recipes(a.model)
    if a.render_only:
        out = Path(a.render_only).resolve()
        rows = [collect(recipe, target, out / f"{recipe}_{target}") for recipe in recipes for target in a.targets
                if (out / f"{recipe}_{target}").is_dir()]
        text = render(rows, a, a.commit or "?")
        print(text)
        if a.readme:
            write_block(PAGE, text, BEGIN, END, "accuracy table")
        return
    out = Path(a.out or tempfile.mkdtemp(prefix="accuracy-table-")).resolve()
    cache = out / "cache"  # fresh per run, shared by its builds: the sensitivities are measured, not read back
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    commit += "+local changes" if dirty else ""
    rows = []
    for recipe in recipes:
        for target in a.targets:
            row = build(a.model, recipe, target, a, out, cache)
            rows.append(row)
            print(f"{recipe}:{target} exit {row['rc']} in {row['wall_s']} s", flush=True)
    text = render(rows, a, commit)
    print("\n" + text)
    (out / "accuracy_table.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "report"} | {"cells": cells(r)} for r in rows], indent=1) + "\n")
    print(f"\nrun directories under {out}")
    if a.readme:
        write_block(PAGE, text, BEGIN, END, "accuracy table")


if __name__ == "__main__":
    main()
