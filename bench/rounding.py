"""Weight-rounding calibrations on one model (issue 19 section 2): builds a 4-bit recipe (default `nvfp4`) with each
`recipe.steps.<its step>.algorithm` through the real CLI (a fresh cache per build, no repair, no benchmark) and prints
the mean / min embedding cosine to fp32 on the evaluation sentences (report.json check.fidelity), the top-1
retrieval agreement, the quantize-torch stage seconds and the build's wall seconds.

    python bench/rounding.py                                             # MiniLM, target torch, every algorithm
    python bench/rounding.py --algorithms max awq_lite mse --target trt
    python bench/rounding.py --model tiny_bert --extra data.evaluation_samples=32
    python bench/rounding.py --recipe int4_awq --algorithms rtn awq_lite awq_full mse gptq   # int4 on torch

The cosines do not depend on machine load; the seconds do (measure them on an idle machine).
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

from compiler.steps.nvfp4 import ALGORITHMS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(model: str, recipe: str, step: str, algorithm: str, target: str, extra, out: Path) -> dict:
    env = dict(os.environ, QCOMPILE_CACHE_DIR=tempfile.mkdtemp(prefix="qcompile-rounding-cache-"),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run_dir = out / f"{model}_{recipe}_{algorithm}_{target}"
    args = [sys.executable, "-m", "compiler", f"model={model}", f"recipe={recipe}", f"target={target}",
            f"recipe.steps.{step}.algorithm={algorithm}", "bench.enabled=false", f"hydra.run.dir={run_dir}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env, cwd=out)
    wall = time.perf_counter() - t0
    found = [p for p in out.glob(f"{run_dir.name}*") if (p / "report.json").exists()]
    if not found:
        return {"algorithm": algorithm, "rc": proc.returncode, "wall_s": round(wall, 1), "error": proc.stderr[-400:]}
    report = json.loads((found[0] / "report.json").read_text())
    fid = report.get("check", {}).get("fidelity", {})
    return {"algorithm": algorithm, "rc": proc.returncode, "wall_s": round(wall, 1),
            "quantize_s": report.get("timings_s", {}).get("quantize-torch"),
            "cosine_mean": fid.get("embedding_cosine_mean"), "cosine_min": fid.get("embedding_cosine_min"),
            "top1": fid.get("top1_agreement")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--recipe", default="nvfp4", help="a shipped recipe whose (one) step has an algorithm parameter")
    ap.add_argument("--target", default="torch")
    ap.add_argument("--algorithms", nargs="+", default=None, help="default: every nvfp4 algorithm")
    ap.add_argument("--out", default=None, help="where the run directories go (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every build")
    a = ap.parse_args(argv)
    from omegaconf import OmegaConf

    steps = list(OmegaConf.load(REPO / "recipes" / "recipe" / f"{a.recipe}.yaml").steps)
    step = next(s for s in steps if s in ("nvfp4", "int4_weight_only", "fp8"))
    algorithms = a.algorithms or list(ALGORITHMS)
    out = Path(a.out or tempfile.mkdtemp(prefix="qcompile-rounding-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"| algorithm | mean cosine | min cosine | top-1 | quantize s | build s |  ({a.model}, recipe={a.recipe}, "
          f"target={a.target})")
    print("|---|---|---|---|---|---|")
    for algo in algorithms:
        r = build(a.model, a.recipe, step, algo, a.target, a.extra, out)
        rows.append(r)
        if "error" in r:
            print(f"| {algo} | failed (exit {r['rc']}): {r['error'].strip().splitlines()[-1] if r['error'].strip() else ''} |")
        else:
            print(f"| {algo} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['top1']:.3f} | {r['quantize_s']} "
                  f"| {r['wall_s']} |", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
