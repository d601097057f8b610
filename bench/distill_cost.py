"""What `nvfp4_distill` (or any recipe with the distill step) costs on a model: the build's wall-clock seconds, its
peak memory (the build process's max RSS), the training's steps and seconds, and the fidelity before / after.

    python bench/distill_cost.py                        # MiniLM, recipe nvfp4_distill, target torch
    python bench/distill_cost.py recipe=int4_awq_distill recipe.steps.distill.lr=3e-4

Extra arguments are qcompile overrides. The build runs in a child process (bench disabled, a fresh cache so the
distillation really trains); wall-clock seconds depend on the machine's load, so say how loaded it was."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    overrides = ["model=minilm", "recipe=nvfp4_distill", "target=torch", "bench.enabled=false"]
    keys = {a.split("=", 1)[0] for a in argv}
    overrides = [o for o in overrides if o.split("=", 1)[0] not in keys] + argv
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QCOMPILE_CACHE_DIR": str(Path(tmp) / "cache")}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "compiler", *overrides], cwd=tmp, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        reports = sorted(Path(tmp, "outputs").rglob("report.json"))
        if not reports:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        report = json.loads(reports[-1].read_text())
    distill = report.get("distill") or {}
    check = report.get("check") or {}
    fid = check.get("fidelity") or check
    row = {"overrides": overrides, "build_s": round(seconds, 1), "peak_rss_mb": round(peak_mb), "rc": proc.returncode,
           "timings_s": report.get("timings_s"), "distill": distill,
           "embedding_cosine_mean": fid.get("embedding_cosine_mean"), "embedding_cosine_min": fid.get("embedding_cosine_min"),
           "load_avg": os.getloadavg()}
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
