"""Bench stage: warm-up, then latency p50/p90 at the recipe's batch and sequence length, throughput,
peak resident memory while running, artifact size, and the speed-up over the same model's fp32 engine
on the same target timed round-robin in the same run (a ratio survives machine load; a latency does not)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compiler.core.feeds import synthetic_feed
from compiler.core.hashing import onnx_sha256
from compiler.core.report_types import BaselineKind
from compiler.stages.bench.op_profile import Profiler
from compiler.stages.bench.probe import graph_flops
from compiler.stages.bench.scaling import scaling_for_build
from compiler.stages.export import cached_fp32_export, export_onnx
from targets.trt_hardware import detect_gpu


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


def time_predict(predict: Callable, feed: dict[str, np.ndarray], warmup: int, iterations: int,
                 progress_label: str = "") -> list[float]:
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


def summarize(times: list[float], batch: int) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"latency_ms_p50": p50, "latency_ms_p90": float(np.percentile(ms, 90)),
            "latency_ms_mean": float(ms.mean()), "ms_per_sample": p50 / batch,
            "samples_per_s": batch / (p50 / 1e3) if p50 > 0 else float("inf"), "iterations": len(times)}


def data_feeds(features, batch_size: int, sort_by_length: bool = False) -> list[dict[str, np.ndarray]]:
    """The evaluation sentences as served: each batch cut to its longest sentence (dynamic padding), in
    data order or sorted by length (similar lengths batched together: less padding)."""
    arrays = features.arrays
    lengths = arrays["attention_mask"].sum(axis=1) if "attention_mask" in arrays else \
        np.full(len(features), next(iter(arrays.values())).shape[1])
    order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(lengths))
    feeds = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(int(lengths[idx].max()), 1)
        feeds.append({k: np.ascontiguousarray(v[idx, :width]) for k, v in arrays.items()})
    return feeds


def interleaved(predicts: dict[str, Callable], feeds: list[dict[str, np.ndarray]], rounds: int,
                calls_per_round: int) -> dict[str, dict[str, list[list[float]]]]:
    """clock ("wall" | "cpu") -> predictor -> per round the seconds of `calls_per_round` calls cycling
    through `feeds`. The predictors take turns round by round, so a load change hits them alike."""
    out: dict[str, dict[str, list[list[float]]]] = {"wall": {k: [] for k in predicts}, "cpu": {k: [] for k in predicts}}
    for _ in range(rounds):
        for name, predict in predicts.items():
            wall, cpu = [], []
            for i in range(calls_per_round):
                feed = feeds[i % len(feeds)]
                t0, c0 = time.perf_counter(), time.thread_time()
                predict(feed)
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - t0)
            out["wall"][name].append(wall)
            out["cpu"][name].append(cpu)
    return out


def ratio_clock(threads: int) -> str:
    """Which clock the speed-up ratios use. One thread runs the engine on the calling thread (ORT with
    intra_op_num_threads=1, torch with set_num_threads(1)), so that thread's CPU time is the engine's work
    alone, while on shared cores the wall clock charges a long call more preemption than a short one.
    More threads: the wall clock (this thread's CPU time would miss the workers)."""
    return "cpu" if int(threads) == 1 else "wall"


CLOCK_NAMES = {"cpu": "thread CPU time", "wall": "wall clock"}


def ratio_summary(build_rounds: list[list[float]], base_rounds: list[list[float]], combine=np.median) -> dict[str, Any]:
    """speedup = baseline time / build time over all rounds (combine: median per call for fixed shapes, sum
    for a pass over the data), and per round (its spread: min, max over the rounds)."""
    per_round = [float(combine(b) / combine(t)) for t, b in zip(build_rounds, base_rounds)]
    if combine is np.median:
        total = float(np.median(np.concatenate(base_rounds)) / np.median(np.concatenate(build_rounds)))
    else:
        total = float(np.median([combine(r) for r in base_rounds]) / np.median([combine(r) for r in build_rounds]))
    return {"speedup_vs_fp32": total, "speedup_vs_fp32_spread": [round(min(per_round), 4), round(max(per_round), 4)],
            "speedup_vs_fp32_rounds": [round(r, 4) for r in per_round]}


def _median_ms(rounds: list[list[float]]) -> float:
    return float(np.median(np.concatenate(rounds)) * 1e3)


def warm_up(name: str, predict: Callable, feed: dict[str, np.ndarray], warmup: int, profiler=None) -> None:
    """The warm-up calls, through the op profiler when one is given (compiler/stages/bench/op_profile.py: it
    switches its profiler off again before the timed loop)."""
    if profiler is not None:
        profiler.warm_up(name, predict, feed, warmup)
        return
    for _ in range(warmup):
        predict(feed)


def run_bench(make_predict: Callable[[], Callable], input_names: list[str], cfg, artifact_files: list[Path],
              label: str = "bench", make_baseline: Callable[[], Callable] | None = None,
              evaluation=None, profiler=None, vocab: int = 30522) -> dict[str, Any]:
    """cfg is the `bench` section. make_predict builds the engine's predictor (its load is in the peak).
    make_baseline (optional) builds the same model's fp32 predictor on the same target: both are then timed
    round-robin in this one run and the result carries speedup_vs_fp32 and its spread. evaluation (the
    evaluation Features) is needed for cfg.shapes == "data". profiler (an op_profile.Profiler) profiles the
    fp32 engine's warm-up calls and the build in a short loop after the timed one (outside the peak window)."""
    batch = int(cfg.batch_size)
    feed = synthetic_feed(input_names, batch, int(cfg.seq_len), vocab=vocab, seed=1)
    rounds = max(1, min(int(getattr(cfg, "rounds", 1) or 1), int(cfg.iterations)))
    per_round = max(1, int(cfg.iterations) // rounds)
    with PeakRSS() as mem:
        predict = make_predict()
        warm_up("build", predict, feed, int(cfg.warmup))
    predicts = {"build": predict}
    if make_baseline is not None:
        baseline = make_baseline()
        warm_up("fp32", baseline, feed, int(cfg.warmup), profiler)
        predicts["fp32"] = baseline
    clock = ratio_clock(int(cfg.threads))
    times = interleaved(predicts, [feed], rounds, per_round)
    out = summarize([t for r in times["wall"]["build"] for t in r], batch)  # wall: the latencies users see
    out.update({
        "shapes": f"fixed: batch {batch} x seq {int(cfg.seq_len)} (synthetic tokens, every position valid)",
        "batch_size": batch, "seq_len": int(cfg.seq_len), "threads": int(cfg.threads), "rounds": rounds,
        "cpu_ms_p50": _median_ms(times["cpu"]["build"]),
        "peak_rss_mb": mem.peak_rss / 2**20, "peak_rss_increase_mb": (mem.peak_rss - mem.start_rss) / 2**20,
        "artifact_bytes": int(sum(Path(f).stat().st_size for f in artifact_files if Path(f).exists())),
    })
    out["artifact_mb"] = out["artifact_bytes"] / 1e6
    if "fp32" in predicts:
        out.update(ratio_summary(times[clock]["build"], times[clock]["fp32"]))
        out.update({"speedup_clock": CLOCK_NAMES[clock], "fp32_latency_ms_p50": _median_ms(times["wall"]["fp32"]),
                    "fp32_cpu_ms_p50": _median_ms(times["cpu"]["fp32"])})
    if str(getattr(cfg, "shapes", "fixed")) == "data":
        out["data_shapes"] = bench_data_shapes(predicts, evaluation, cfg)
    if profiler is not None:
        profiler.after_timing("build", predict, feed)
    return out


def bench_data_shapes(predicts: dict[str, Callable], evaluation, cfg) -> dict[str, Any]:
    """Passes over the evaluation sentences at their own lengths (predictors interleaved pass by pass):
    latency per batch, sentences per second, and the speed-up over whole passes."""
    if evaluation is None or not len(evaluation):
        return {"skipped": "no evaluation sentences loaded"}
    batch = int(cfg.batch_size)
    sort = bool(getattr(cfg, "sort_by_length", False))
    feeds = data_feeds(evaluation, batch, sort)
    for p in predicts.values():  # warm-up on the shortest and longest shapes
        for f in (min(feeds, key=lambda f: f["input_ids"].shape[1]), max(feeds, key=lambda f: f["input_ids"].shape[1])):
            p(f)
    rounds = max(1, min(3, int(getattr(cfg, "rounds", 1) or 1)))
    times = interleaved(predicts, feeds, rounds, len(feeds))
    wall = times["wall"]["build"]
    widths = [f["input_ids"].shape[1] for f in feeds]
    out = {"shapes": f"data: {len(evaluation)} evaluation sentences, batch {batch}, each batch padded to its longest "
                     f"sentence ({'sorted by length' if sort else 'data order'})",
           "sentences": len(evaluation), "batches": len(feeds), "sort_by_length": sort,
           "tokens_mean": float(np.mean(widths)), "tokens_max": int(max(widths)), "rounds": rounds,
           "latency_ms_p50": _median_ms(wall), "pass_ms_median": float(np.median([sum(r) for r in wall]) * 1e3)}
    out["sentences_per_s"] = len(evaluation) / (out["pass_ms_median"] / 1e3)
    if "fp32" in predicts:
        clock = ratio_clock(int(cfg.threads))
        out.update(ratio_summary(times[clock]["build"], times[clock]["fp32"], combine=sum))
        out.update({"speedup_clock": CLOCK_NAMES[clock],
                    "fp32_pass_ms_median": float(np.median([sum(r) for r in times["wall"]["fp32"]]) * 1e3)})
    return out


def fp32_baseline(target, reference, spec, cache, work_dir: Path, profile_prefix: str | None = None):
    """(make_predict, fp32 ONNX path or None, BaselineKind, why not) for the same model's fp32 engine on the
    build's target: the unmodified reference module lowered the way the build was (ONNX targets: the cached
    fp32 export). profile_prefix: the predictor's onnxruntime profile (Target.predictor). make_predict's own
    arguments (threads, profile_prefix) default to the bench's."""
    if str(spec.bench.baseline) == "none":
        return None, None, BaselineKind.NONE, "bench.baseline=none"
    if not spec.steps:
        return None, None, BaselineKind.SELF, "the build is the fp32 engine itself"
    if target.capabilities.gpu:
        if detect_gpu() is None:
            return (None, None, BaselineKind.NONE,
                    f"target {target.name} times a GPU engine and this machine has no NVIDIA GPU")
    base_dir = Path(work_dir) / "fp32_baseline"
    base_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = None
    if target.needs_onnx:
        if cache is not None:
            onnx_path = cached_fp32_export(reference, spec, base_dir / "export.onnx", cache)
        else:
            onnx_path = export_onnx(reference.module, reference.input_names, reference.output_names,
                                    base_dir / "export.onnx", spec.export)
    engine = target.lower(reference, onnx_path, base_dir)
    threads = int(spec.bench.threads) or None
    def make_predict(threads: int | None = threads, profile_prefix: str | None = profile_prefix):
        return target.predictor(engine, threads=threads, profile_prefix=profile_prefix)

    return make_predict, onnx_path, BaselineKind.FP32_SAME_RUN, None


def cached_graph_flops(graph: Path, batch: int, seq: int, cache=None) -> dict[str, Any]:
    """graph_flops through the cache, keyed by the graph's bytes and the shape: a warm build counts the same fp32
    export again otherwise (onnxruntime's symbolic shape inference over the whole graph, about 0.7 s on MiniLM)."""
    if cache is None:
        return graph_flops(graph, batch, seq)

    def build(d: Path) -> None:
        (d / "flops.json").write_text(json.dumps(graph_flops(graph, batch, seq), sort_keys=True) + "\n")

    entry = cache.get_or_create("graph_flops", {"graph_sha256": onnx_sha256(graph), "batch": int(batch),
                                                "seq": int(seq)}, build)
    return json.loads((Path(entry) / "flops.json").read_text())


def bench_engine(target, engine, reference, spec, evaluation, cache, work_dir: Path, onnx_path: Path | None,
                 probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bench stage of a build: the engine timed against its fp32 baseline (same run, round-robin),
    plus the fraction of the machine's fp32 matrix-product peak (graph FLOPs / latency / probe GFLOP/s) and,
    with bench.profile, where the time goes by op type and the int8 bound (compiler/stages/bench/op_profile.py)."""
    profiler = None
    threads = int(spec.bench.threads) or None
    if spec.bench.profile:
        profiler = Profiler(runs_torch=not target.capabilities.runs_onnx,
                            make_profiled=lambda prefix: target.predictor(engine, threads=threads, profile_prefix=prefix))
    make_baseline, fp32_onnx, kind, why = fp32_baseline(target, reference, spec, cache, work_dir,
                                                        profiler.prefix("fp32") if profiler else None)
    out = run_bench(lambda: target.predictor(engine, threads=threads), reference.input_names, spec.bench,
                    engine.files, label=f"bench {spec.recipe_name}/{spec.target.name}", make_baseline=make_baseline,
                    evaluation=evaluation, profiler=profiler, vocab=reference.vocab)
    out["baseline_kind"] = kind  # the fact readers use (compiler/core/report_types.py); "baseline" says it in words
    if profiler is not None:
        out["profile"] = profiler.section(probe, out.get("speedup_vs_fp32"), is_fp32=not spec.steps).to_dict()
    if spec.bench.scaling:
        fp32 = None if make_baseline is None else (lambda t: make_baseline(t, None))
        out["scaling"] = scaling_for_build(target, engine, fp32, reference.input_names, spec.bench,
                                           interleaved, vocab=reference.vocab).to_dict()
    if why:
        out["baseline"] = f"none: {why}"
    else:
        out["baseline"] = f"fp32 engine of the same model on target {spec.target.name}, timed round-robin in this run"
    graph = fp32_onnx or onnx_path
    if graph is not None:
        try:
            out["flops"] = cached_graph_flops(Path(graph), int(spec.bench.batch_size), int(spec.bench.seq_len), cache)
        except Exception as e:  # noqa: BLE001 -- shape inference can fail on an exotic graph: the bench still stands
            out["flops"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    peak = (probe or {}).get("fp32_gflops")
    gflop = out.get("flops", {}).get("gflop")
    if peak and gflop:
        # the probe's peak is in thread CPU time (one thread): compare like with like where the bench ran
        # one thread, else against the wall-clock latency
        key = "cpu_ms_p50" if int(spec.bench.threads) == 1 else "latency_ms_p50"
        out["fp32_peak_gflops"] = float(peak)
        out["fraction_of_fp32_peak"] = gflop / (out[key] / 1e3) / float(peak)
        if f"fp32_{key}" in out:
            out["fp32_fraction_of_fp32_peak"] = gflop / (out[f"fp32_{key}"] / 1e3) / float(peak)
        elif not spec.steps:
            out["fp32_fraction_of_fp32_peak"] = out["fraction_of_fp32_peak"]
    return out


def int8_speed_note(bench: dict[str, Any], rails: list[dict[str, Any]]) -> str | None:
    """A report note when a build computes in int8, the probe measured int8 matrix products faster than fp32,
    and the build still is not faster than fp32 end to end: the time goes elsewhere (quantizing activations,
    dequantizing, the non-matmul ops), which the probe alone would not show."""
    rail = next((r for r in rails or [] if r.get("rail") == "int8_speed"), None)
    speedup = bench.get("speedup_vs_fp32")
    if not rail or not rail.get("int8_layers") or speedup is None or "int8_gemm_vs_fp32" not in rail:
        return None
    kernel = float(rail["int8_gemm_vs_fp32"])
    if kernel < 1.15 or speedup >= 1.15:
        return None
    return (f"int8 matrix products run {kernel:.2f}x fp32 on this CPU (probe), yet this build is {speedup:.2f}x its "
            "fp32 engine end to end (same run): the int8 kernels' gain is eaten by quantizing activations, "
            "dequantizing outputs and the ops that stay fp32 (attention softmax, LayerNorm, GELU) -- expect size "
            "and memory gains here, not speed")
