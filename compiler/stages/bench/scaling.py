"""Throughput at the shapes a user deploys: the bench batch and a server batch, from one thread to every core,
the build and its fp32 engine timed round-robin in the same run (bench.scaling, opt-in)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from compiler.core.feeds import synthetic_feed

# round-robin rounds per (threads, shape): the ratio is a median over rounds x calls; a server batch of
# 32 x 128 costs ~0.5 s a call for MiniLM on one core, so calls per round stay few
ROUNDS = 3
SERVER_CALLS = 2


def thread_counts(cores: int | None) -> list[int]:
    """1, 2, 4, ... up to and always including every core."""
    cores = max(1, int(cores or 1))
    out = [1]
    while out[-1] * 2 < cores:
        out.append(out[-1] * 2)
    return out + ([cores] if cores > 1 else [])


@dataclass
class ScalingRow:
    """One (threads, shape): throughput of the build (and its fp32 engine), median wall-clock latency."""

    threads: int
    batch: int
    seq: int
    latency_ms_p50: float
    samples_per_s: float
    fp32_samples_per_s: Optional[float] = None
    speedup_vs_fp32: Optional[float] = None
    scaling_vs_1_thread: Optional[float] = None  # samples/s over the same shape's one-thread samples/s


@dataclass
class ScalingReport:
    """report.json's bench.scaling."""

    threads: list[int]
    shapes: list[list[int]]
    rows: list[ScalingRow] = field(default_factory=list)
    clock: str = "wall clock"  # several threads: this thread's CPU time would miss the workers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_scaling(make_build: Callable[[int], Callable], make_fp32: Callable[[int], Callable] | None,
                input_names: list[str], shapes: list[tuple[int, int]], threads: list[int], round_robin: Callable,
                calls: dict[tuple[int, int], int] | None = None, warmup: int = 1, vocab: int = 30522) -> ScalingReport:
    """make_build(threads) / make_fp32(threads) build a predictor pinned to that many threads; per thread
    count both are timed at each (batch, seq) shape by round_robin (the bench's `interleaved`: ROUNDS rounds)."""
    report = ScalingReport(threads=list(threads), shapes=[list(s) for s in shapes])
    one: dict[tuple[int, int], float] = {}
    for t in threads:
        predicts = {"build": make_build(t)}
        if make_fp32 is not None:
            predicts["fp32"] = make_fp32(t)
        for batch, seq in shapes:
            feed = synthetic_feed(input_names, batch, seq, vocab=vocab, seed=1)
            for p in predicts.values():
                for _ in range(warmup):
                    p(feed)
            n = (calls or {}).get((batch, seq), SERVER_CALLS)
            wall = round_robin(predicts, [feed], ROUNDS, n)["wall"]
            med = {k: float(np.median(np.concatenate(v))) for k, v in wall.items()}
            row = ScalingRow(t, batch, seq, med["build"] * 1e3, batch / med["build"])
            if "fp32" in med:
                row.fp32_samples_per_s = batch / med["fp32"]
                row.speedup_vs_fp32 = med["fp32"] / med["build"]
            one.setdefault((batch, seq), row.samples_per_s)
            row.scaling_vs_1_thread = row.samples_per_s / one[(batch, seq)]
            report.rows.append(row)
    return report


def scaling_for_build(target, engine, make_fp32: Callable[[int], Callable] | None, input_names: list[str],
                      cfg, round_robin: Callable, vocab: int = 30522) -> ScalingReport:
    """bench.scaling for a build: the bench shape and the server batch (bench.server_batch x bench.seq_len),
    1..every core (os.cpu_count). make_fp32(threads): the fp32 baseline's predictor (None: no baseline)."""
    shapes = list(dict.fromkeys([(int(cfg.batch_size), int(cfg.seq_len)), (int(cfg.server_batch), int(cfg.seq_len))]))
    calls = {shapes[0]: max(2, int(cfg.iterations) // ROUNDS)}
    out = run_scaling(lambda t: target.predictor(engine, threads=t), make_fp32, input_names, shapes,
                      thread_counts(os.cpu_count()), round_robin, calls, vocab=vocab)
    if not target.capabilities.runs_onnx:  # torch's thread count is process-wide: back to the bench's
        target.predictor(engine, threads=int(cfg.threads) or None)
    return out


def markdown_lines(scaling: dict[str, Any]) -> list[str]:
    """REPORT.md: one row per (threads, shape)."""
    if not scaling or not scaling.get("rows"):
        return []
    lines = [f"### Throughput by batch and threads (same run, {scaling.get('clock', '')})", "",
             "| threads | batch x seq | samples/s | fp32 samples/s | speedup vs fp32 | scaling vs 1 thread |",
             "|---|---|---|---|---|---|"]
    for r in scaling["rows"]:
        fp32 = f"{r['fp32_samples_per_s']:.1f}" if r.get("fp32_samples_per_s") else ""
        speed = f"{r['speedup_vs_fp32']:.3f}" if r.get("speedup_vs_fp32") else ""
        lines.append(f"| {r['threads']} | {r['batch']} x {r['seq']} | {r['samples_per_s']:.1f} | {fp32} | {speed} | "
                     f"{r['scaling_vs_1_thread']:.2f} |")
    return lines
