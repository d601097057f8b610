"""Bench stage: warm-up, then latency p50/p90 at the recipe's batch and sequence length, throughput,
peak resident memory while running, and artifact size."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np


class PeakRSS:
    """Samples this process's resident set size in a thread; peak above the starting RSS."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._interval = interval
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = self._proc.memory_info().rss

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)


def time_predict(predict: Callable, feed: Dict[str, np.ndarray], warmup: int, iterations: int,
                 progress_label: str = "") -> List[float]:
    """Latencies in seconds of `iterations` calls after `warmup` calls."""
    from rich.progress import Progress

    for _ in range(warmup):
        predict(feed)
    times = []
    with Progress(transient=True, disable=not progress_label) as progress:
        task = progress.add_task(progress_label or "bench", total=iterations)
        for _ in range(iterations):
            t0 = time.perf_counter()
            predict(feed)
            times.append(time.perf_counter() - t0)
            progress.advance(task)
    return times


def summarize(times: List[float], batch: int) -> Dict[str, float]:
    ms = np.asarray(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"latency_ms_p50": p50, "latency_ms_p90": float(np.percentile(ms, 90)),
            "latency_ms_mean": float(ms.mean()), "ms_per_sample": p50 / batch,
            "samples_per_s": batch / (p50 / 1e3) if p50 > 0 else float("inf"), "iterations": len(times)}


def run_bench(make_predict: Callable[[], Callable], input_names: List[str], cfg, artifact_files: List[Path],
              label: str = "bench") -> Dict[str, Any]:
    """cfg is the `bench` section. make_predict builds the engine's predictor (its load is in the peak)."""
    from compiler.core.feeds import synthetic_feed

    feed = synthetic_feed(input_names, int(cfg.batch_size), int(cfg.seq_len), seed=1)
    with PeakRSS() as mem:
        predict = make_predict()
        times = time_predict(predict, feed, int(cfg.warmup), int(cfg.iterations), progress_label=label)
    out = summarize(times, int(cfg.batch_size))
    out.update({
        "batch_size": int(cfg.batch_size), "seq_len": int(cfg.seq_len), "threads": int(cfg.threads),
        "peak_rss_mb": mem.peak_rss / 2**20, "peak_rss_increase_mb": (mem.peak_rss - mem.start_rss) / 2**20,
        "artifact_bytes": int(sum(Path(f).stat().st_size for f in artifact_files if Path(f).exists())),
    })
    out["artifact_mb"] = out["artifact_bytes"] / 1e6
    return out
