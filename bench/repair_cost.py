"""What a repair costs and what it buys: builds each recipe with recipe.repair.enabled=true through the real CLI
(a fresh cache, so the sensitivity is measured, not read back) and prints the wall time of the repair stage
(variants, sensitivity, search), the layers that fell back, the metric and the size-vs-metric curve of the search.

    python bench/repair_cost.py                                           # MiniLM, nvfp4 and int8_static, torch
    python bench/repair_cost.py --model tiny_bert --recipes nvfp4 --extra data.evaluation_samples=32
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


def run(model: str, recipe: str, target: str, budget: float, extra, out: Path) -> dict:
    env = dict(os.environ, QCOMPILE_CACHE_DIR=tempfile.mkdtemp(prefix="qcompile-repair-cache-"),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run_dir = out / f"{model}_{recipe}_{target}"
    args = [sys.executable, "-m", "compiler", f"model={model}", f"recipe={recipe}", f"target={target}",
            # the embedding-cosine budget this bench reports on (the built-in data is labeled: max_task_drop
            # would budget retrieval accuracy@1, compiler/repair/budget.py)
            "recipe.repair.enabled=true", f"recipe.repair.max_fidelity_drop={budget}", "bench.enabled=false",
            f"hydra.run.dir={run_dir}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env, cwd=out)
    wall = time.perf_counter() - t0
    found = [p for p in out.glob(f"{run_dir.name}*") if (p / "report.json").exists()]
    if not found:
        return {"recipe": recipe, "rc": proc.returncode, "wall_s": wall, "error": proc.stderr[-500:]}
    report = json.loads((found[0] / "report.json").read_text())
    return {"recipe": recipe, "rc": proc.returncode, "wall_s": round(wall, 1), "dir": str(found[0]),
            "repair": report.get("repair", {}), "repair_s": report["timings_s"].get("repair"),
            "check": report.get("check", {}).get("fidelity", {}), "reason": report.get("reason")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--recipes", nargs="+", default=["nvfp4", "int8_static"])
    ap.add_argument("--target", default="torch")
    ap.add_argument("--budget", type=float, default=0.01, help="recipe.repair.max_fidelity_drop")
    ap.add_argument("--out", default=None, help="where the run directories go (default: a temp dir)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. recipe.repair.ranking_samples=16")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="repair-cost-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(a.model, r, a.target, a.budget, a.extra, out) for r in a.recipes]
    print(f"\nrepair cost on {a.model}, target={a.target}, max_fidelity_drop={a.budget} "
          f"({os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')})\n")
    print("| recipe | exit | build s | repair s (prepare / sensitivity / search) | forwards | fell back | cosine |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rep, sec = r.get("repair", {}), r.get("repair", {}).get("seconds", {})
        split = " / ".join(str(sec.get(k, "-")) for k in ("prepare", "sensitivity", "search"))
        fell = f"{rep.get('fallback_layers', '-')} of {rep.get('quantized_layers', '-')} ({rep.get('fallback', '-')})"
        if rep and not rep.get("met", True):
            fell = (f"unmet within {rep.get('max_fallback_layers')} of {rep.get('quantized_layers')} "
                    f"({rep.get('fallback')})")
        cos = r.get("check", {}).get("embedding_cosine_mean")
        print(f"| {r['recipe']} | {r['rc']} | {r['wall_s']} | {r.get('repair_s', '-')} ({split}) | "
              f"{sec.get('forwards', '-')} | {fell} | "
              f"{cos if cos is None else round(cos, 5)} |")
    for r in rows:
        probes = r.get("repair", {}).get("search", [])
        if probes:
            print(f"\n{r['recipe']}: search path ({r['repair'].get('measurements', '?')} points measured)\n")
            print("| layers in fallback | change | metric | Linear weights MB |\n|---|---|---|---|")
            for p in probes:
                change = f"+{p['added']}" if p.get("added") else f"-{p['removed']}" if p.get("removed") else "-"
                print(f"| {p['fallback_layers']} | {change} | {p['metric']:.5f} | "
                      f"{p['weight_bytes'] / 1e6:.2f} |")
        if r.get("reason"):
            print(f"  {r['recipe']}: {r['reason']}")
    print(f"\nrun directories under {out}")


if __name__ == "__main__":
    main()
