"""bench/gpu_check.py without a CUDA device: one clear SKIP line, exit 0, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, QCOMPILE_GPU_CHECK_FORCE_NO_CUDA="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out)], check=False,
                          cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("SKIP gpu_check: no CUDA device (torch ")
    assert lines[0].endswith("run this on a machine with an NVIDIA GPU; nothing was run")
    assert not out.exists() and "Traceback" not in proc.stderr
