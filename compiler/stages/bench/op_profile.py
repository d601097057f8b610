"""Where a build's time goes: a per-op-type profile of the engine and of its same-run fp32 baseline
(onnxruntime's profiler for ONNX Runtime sessions, torch.profiler for the torch target), and the upper bound
on the int8 speed-up that the profile and the int8 probe allow."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from compiler.graph.quantized import FLOAT_COMPUTE_OPS, is_int8_compute

# Profiled runs per engine, after one cold call (dropped). Profiling never touches the bench's numbers:
# - the fp32 baseline: its warm-up calls are the profiled runs (its session opens with profiling on, then
#   end_profiling() switches onnxruntime's profiler off -- it records nothing after that -- before the timed
#   loop); no extra calls with the default bench.warmup of 5;
# - the build: a short extra loop after the timed one (for onnxruntime on a second session opened with
#   profiling on), since its load and warm-up are the bench's peak-memory window, which the profiler's event
#   buffers (~2 MB for tiny_bert's 5 runs) must stay out of. Cost: one session and 5 calls.
# Four runs: a fixed-shape encoder pass repeats its kernels exactly, and each node's median over the runs
# shrugs off a preempted call on shared cores; more runs would only cost build time.
PROFILE_RUNS = 4
COLD_RUNS = 1  # the first call allocates buffers and picks kernels: never in the profile
TOP_OPS = 8  # rows of REPORT.md's table (the rest is one "other" row)

# torch: the calls that are one nn.Linear each (fp32 / int8 kernels); a Linear's site is its call order
TORCH_FLOAT_PRODUCTS = frozenset({"aten::linear"})
# (torch.ao's Linear kernels; torchao's int8 x int8 product inside each quantized Linear, target=torch's int8_dynamic)
TORCH_INT8_PRODUCTS = frozenset({"quantized::linear_dynamic", "quantized::linear", "aten::_int_mm"})
_FUSION_SUFFIX = re.compile(r"/[A-Za-z0-9]*Fusion/?$")


@dataclass
class OpStat:
    """One op type over the profiled runs: milliseconds per run, calls per run, share of the profiled time."""

    op: str
    ms: float
    calls: int
    share: float


@dataclass
class OpTable:
    """An engine's profile by op type. products_ms: per matrix-product site (an ONNX node's name with the
    suffixes quantization and ORT's fusions add stripped; torch: `aten::linear#k`, the k-th Linear call of
    a run) its ms per run; int8_sites: the sites that run an int8 kernel."""

    profiler: str
    runs: int
    total_ms: float
    ops: list[OpStat]
    products_ms: dict[str, float] = field(default_factory=dict)
    int8_sites: list[str] = field(default_factory=list)
    # onnxruntime: the execution providers that ran the profiled nodes. A GPU provider's node time is the
    # host side of the call (launching kernels), not the GPU's time
    providers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def op_table(profiler: str, runs: int, nodes: dict[str, tuple[str, list[float]]],
             sites: dict[str, list[str]] | None = None, int8_sites: list[str] | None = None,
             site_us: dict[str, list[float]] | None = None) -> OpTable:
    """The table from each node's microseconds over `runs` runs (node -> (op, one sample per run)): a node's
    time is its median over the runs (a shared core preempts single calls; a median shrugs that off), an op's
    ms the sum over its nodes, its calls the number of its nodes (calls per run), its share of the total.
    sites: product site -> its nodes (its ms: theirs summed, the same medians, so sites add up within total);
    site_us: product site -> its own samples where it is no set of nodes (torch: a Linear call's inclusive time)."""
    med = {key: float(np.median(us)) for key, (_, us) in nodes.items() if us}
    op_us: dict[str, float] = {}
    calls: dict[str, int] = {}
    for key, us in med.items():
        op = nodes[key][0]
        op_us[op] = op_us.get(op, 0.0) + us
        calls[op] = calls.get(op, 0) + 1
    total = float(sum(op_us.values()))
    ops = [OpStat(op, us / 1e3, calls[op], us / total if total else 0.0)
           for op, us in sorted(op_us.items(), key=lambda kv: (-kv[1], kv[0]))]
    products = {site: sum(med.get(k, 0.0) for k in keys) / 1e3 for site, keys in (sites or {}).items()}
    products.update({site: float(np.median(us)) / 1e3 for site, us in (site_us or {}).items() if us})
    return OpTable(profiler, max(1, int(runs)), total / 1e3, ops, products, sorted(set(int8_sites or [])))


def _sample(nodes: dict[str, tuple[str, list[float]]], key: str, op: str, us: float) -> None:
    nodes.setdefault(key, (op, []))[1].append(us)


# -- onnxruntime ----------------------------------------------------------------------------------------

def product_site(node_name: str) -> str:
    """The fp32 node a matrix product comes from: quantize_dynamic appends `_quant`, ORT's fusions append
    `/<Name>Fusion/` (MatMulScaleFusion, MatMulAddFusion); the static QDQ -> integer fusion keeps the name."""
    name = node_name
    while True:
        stripped = _FUSION_SUFFIX.sub("", name)
        stripped = stripped[:-len("_quant")] if stripped.endswith("_quant") else stripped
        if stripped == name:
            return name
        name = stripped


def ort_table(events: list[dict[str, Any]], cold_runs: int = COLD_RUNS) -> OpTable:
    """onnxruntime's profile (the JSON end_profiling() writes) by op type: the kernel time of every node
    event (`<node>_kernel_time`, cat Node) inside the model_run events after the first `cold_runs`."""
    run_spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                       if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = run_spans[cold_runs:] if len(run_spans) > cold_runs else run_spans
    nodes: dict[str, tuple[str, list[float]]] = {}
    sites: dict[str, list[str]] = {}
    int8: list[str] = []
    providers: set[str] = set()
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in kept):
            continue
        node = name[:-len("_kernel_time")]
        op = str(e.get("args", {}).get("op_name", "?"))
        providers.add(str(e.get("args", {}).get("provider", "?")))
        _sample(nodes, node, op, float(e["dur"]))
        if (op in FLOAT_COMPUTE_OPS or is_int8_compute(op)) and node not in sites.get(product_site(node), []):
            sites.setdefault(product_site(node), []).append(node)
            if is_int8_compute(op):
                int8.append(product_site(node))
    table = op_table("onnxruntime", len(kept), nodes, sites, int8)
    table.providers = sorted(providers)
    return table


def ort_profiled_warmup(predict: Callable, feed, warmup: int) -> Callable[[], OpTable | None]:
    """Warm-up calls through onnxruntime's profiler, then the profiler off (predict.end_profiling, which
    session_predictor attaches: '' when the session was opened without a profile prefix). Returns the
    table's reader: the JSON is parsed later, outside the bench's peak-memory window."""
    for _ in range(max(int(warmup), COLD_RUNS + PROFILE_RUNS)):
        predict(feed)
    path = predict.end_profiling()

    def read() -> OpTable | None:
        if not path:
            return None
        try:
            events = json.loads(Path(path).read_text())
        finally:
            Path(path).unlink(missing_ok=True)
        return ort_table(events)

    return read


# -- torch ---------------------------------------------------------------------------------------------

RUN_MARK = "qcompile::run"


def torch_table(events, runs: int) -> OpTable:
    """torch.profiler's events by op (self CPU time, so nested aten calls are counted once), each run told
    apart by its RUN_MARK record_function; Linear calls numbered in call order within a run are the sites."""
    marks = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == RUN_MARK)
    per_run: dict[int, list] = {}
    for e in events:
        if e.device_type.name != "CPU" or e.name == RUN_MARK:
            continue
        run = next((i for i, (lo, hi) in enumerate(marks) if lo <= e.time_range.start <= hi), None)
        if run is not None:
            per_run.setdefault(run, []).append(e)
    nodes: dict[str, tuple[str, list[float]]] = {}
    site_us: dict[str, list[float]] = {}
    int8: list[str] = []
    for evs in per_run.values():
        seen: dict[str, int] = {}
        linear = 0
        for e in sorted(evs, key=lambda e: e.time_range.start):
            k = seen[e.name] = seen.get(e.name, -1) + 1
            key = f"{e.name}#{k}"  # the k-th call of this op in the run: the same call every run
            _sample(nodes, key, e.name, float(e.self_cpu_time_total))
            if e.name in TORCH_FLOAT_PRODUCTS or e.name in TORCH_INT8_PRODUCTS:
                site = f"aten::linear#{linear}"
                linear += 1
                # a Linear's time is its call's own plus its children's (addmm, the transposes): inclusive
                site_us.setdefault(site, []).append(float(e.cpu_time_total))
                if e.name in TORCH_INT8_PRODUCTS and site not in int8:
                    int8.append(site)
    return op_table("torch.profiler", len(marks), nodes, None, int8, site_us)


def torch_profiled_warmup(predict: Callable, feed, warmup: int) -> Callable[[], OpTable]:
    """Warm-up calls, all but the cold one under torch.profiler (CPU activities only), each in a RUN_MARK.
    Returns the table's reader (events summarized later, outside the bench's peak-memory window)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    n = max(int(warmup), COLD_RUNS + PROFILE_RUNS)
    for _ in range(COLD_RUNS):
        predict(feed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n - COLD_RUNS):
            with record_function(RUN_MARK):
                predict(feed)
    return lambda: torch_table(prof.events(), n - COLD_RUNS)


# -- the bound -------------------------------------------------------------------------------------------

@dataclass
class Int8Bound:
    """What the build could reach if every product it quantized ran at the probe's int8 speed."""

    int8_vs_fp32: float
    quantized_fp32_ms: float
    rest_fp32_ms: float
    bound_ms: float
    bound_speedup: float
    build_speedup: Optional[float] = None
    fraction_of_bound: Optional[float] = None
    int8_products: int = 0
    products_found_in_fp32: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def int8_bound(quantized_fp32_ms: float, rest_fp32_ms: float, int8_vs_fp32: float,
               build_speedup: float | None = None) -> Int8Bound:
    """The int8 upper bound from an fp32 profile and the int8 probe.

    bound_ms = quantized_fp32_ms / int8_vs_fp32 + rest_fp32_ms, where quantized_fp32_ms is the fp32 engine's
    time in the matrix products the build runs in int8, rest_fp32_ms all its other time (attention products
    left in fp32, softmax, LayerNorm, GELU, reshapes) and int8_vs_fp32 the probe's int8 / fp32 matrix-product
    speed ratio. bound_speedup = fp32 time / bound_ms; fraction_of_bound = build_speedup / bound_speedup
    (1.0: the build is as fast as its int8 kernels allow; the extra Q/DQ work and unfused ops cost the rest).
    E.g. 80 ms of quantized products + 20 ms rest at 2.0x: bound 60 ms, 1.667x; a build at 1.5x is at 0.9."""
    if int8_vs_fp32 <= 0:
        raise ValueError(f"int8_vs_fp32 must be positive, got {int8_vs_fp32}")
    fp32_ms = quantized_fp32_ms + rest_fp32_ms
    bound_ms = quantized_fp32_ms / int8_vs_fp32 + rest_fp32_ms
    bound_speedup = fp32_ms / bound_ms if bound_ms > 0 else float("inf")
    fraction = build_speedup / bound_speedup if build_speedup is not None and bound_speedup else None
    return Int8Bound(float(int8_vs_fp32), float(quantized_fp32_ms), float(rest_fp32_ms), float(bound_ms),
                     float(bound_speedup), build_speedup, fraction)


def bound_from_profiles(build: OpTable, fp32: OpTable, int8_vs_fp32: float,
                        build_speedup: float | None) -> Int8Bound:
    """int8_bound over the fp32 profile: the quantized time is the fp32 time of the product sites the build
    runs in int8 (matched by site); every other op of the fp32 profile is the rest."""
    found = [s for s in build.int8_sites if s in fp32.products_ms]
    quantized = float(sum(fp32.products_ms[s] for s in found))
    bound = int8_bound(quantized, max(0.0, fp32.total_ms - quantized), int8_vs_fp32, build_speedup)
    bound.int8_products, bound.products_found_in_fp32 = len(build.int8_sites), len(found)
    return bound


# -- the report section ----------------------------------------------------------------------------------

@dataclass
class BenchProfile:
    """report.json's bench.profile: the build's and its fp32 engine's op tables, and the int8 bound (or why
    there is none)."""

    build: Optional[OpTable] = None
    fp32: Optional[OpTable] = None
    bound: Optional[Int8Bound] = None
    bound_skipped: Optional[str] = None
    skipped: Optional[str] = None
    note: str = (f"{PROFILE_RUNS} runs per engine after {COLD_RUNS} cold one (fp32: its warm-up; build: after the timed "
                 "loop), never during timing; ms per run (each node's median over the runs), calls per run, share of the "
                 "profiled op time")

    def to_dict(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped}
        out: dict[str, Any] = {"note": self.note, "build": self.build.to_dict() if self.build else None}
        if self.fp32 is not None:
            out["fp32"] = self.fp32.to_dict()
        if self.bound is not None:
            out["bound"] = self.bound.to_dict()
        if self.bound_skipped:
            out["bound_skipped"] = self.bound_skipped
        return out


class Profiler:
    """run_bench's `profiler`: one table per predictor name, through onnxruntime's profiler where the
    predictor is a session opened with prefix() (it has end_profiling), through torch.profiler where the
    engine is a torch module (runs_torch). make_profiled(prefix): a fresh predictor of the build's engine
    with onnxruntime's profiler on (after_timing uses it)."""

    def __init__(self, runs_torch: bool, make_profiled: Callable[[str], Callable] | None = None):
        self.runs_torch = runs_torch
        self.make_profiled = make_profiled
        self._readers: dict[str, Callable[[], OpTable | None]] = {}
        self._tables: dict[str, OpTable] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="qcompile-profile-")

    def prefix(self, name: str) -> str:
        """onnxruntime's profile_file_prefix for predictor `name` (engines that are no session ignore it)."""
        return str(Path(self._dir.name) / name)

    def warm_up(self, name: str, predict: Callable, feed, warmup: int) -> None:
        """The predictor's warm-up calls, profiled where a profiler fits it."""
        if hasattr(predict, "end_profiling"):
            self._readers[name] = ort_profiled_warmup(predict, feed, warmup)
        elif self.runs_torch:
            self._readers[name] = torch_profiled_warmup(predict, feed, warmup)
        else:
            for _ in range(int(warmup)):
                predict(feed)

    def after_timing(self, name: str, predict: Callable, feed) -> None:
        """Profile `name` in a short extra loop after the timed one: torch.profiler around the bench's own
        (warm) predictor, or a second onnxruntime session from make_profiled."""
        if self.runs_torch:
            self._readers[name] = torch_profiled_warmup(predict, feed, 0)
        elif self.make_profiled is not None:
            profiled = self.make_profiled(self.prefix(name))
            if hasattr(profiled, "end_profiling"):
                self._readers[name] = ort_profiled_warmup(profiled, feed, 0)

    def tables(self) -> dict[str, OpTable]:
        """Predictor name -> its table (the profiles read now, once)."""
        for name, read in list(self._readers.items()):
            table = read()
            if table is not None:
                self._tables[name] = table
            del self._readers[name]
        return dict(self._tables)

    def section(self, probe: dict[str, Any] | None, build_speedup: float | None, is_fp32: bool) -> BenchProfile:
        """The bench.profile section; is_fp32: the build is the fp32 engine itself (its own baseline)."""
        tables = self.tables()
        self._dir.cleanup()
        build = tables.get("build")
        if build is None:
            return BenchProfile(skipped="no per-op profiler for this engine (onnxruntime sessions and torch "
                                        "modules only: not a TensorRT plan or the onnx reference evaluator)")
        fp32 = build if is_fp32 else tables.get("fp32")
        out = BenchProfile(build=build, fp32=None if is_fp32 else fp32)
        ratio = (probe or {}).get("int8_gemm_vs_fp32")
        if is_fp32:
            out.bound_skipped = "the build is the fp32 engine"
        elif fp32 is None:
            out.bound_skipped = "no profiled fp32 baseline in this run (bench.baseline=none, or none for this target)"
        elif not ratio:
            out.bound_skipped = "no int8 probe ratio (bench.probe=false, or no probe for this target)"
        elif not build.int8_sites:
            out.bound_skipped = "the build runs no int8 matrix-product kernel (nothing the probe's ratio applies to)"
        else:
            out.bound = bound_from_profiles(build, fp32, float(ratio), build_speedup)
        return out


# -- REPORT.md -------------------------------------------------------------------------------------------

def markdown_lines(profile: dict[str, Any], top: int = TOP_OPS) -> list[str]:
    """A short table: the top ops of the build and of its fp32 engine side by side, the rest as "other",
    then the bound line."""
    if not profile or profile.get("skipped"):
        return [f"Op profile: skipped ({profile.get('skipped')})."] if profile else []
    build, fp32 = profile.get("build") or {}, profile.get("fp32")
    b_ops = {o["op"]: o for o in build.get("ops", [])}
    f_ops = {o["op"]: o for o in (fp32 or {}).get("ops", [])}
    ranked = sorted(set(b_ops) | set(f_ops),
                    key=lambda op: -max(b_ops.get(op, {}).get("share", 0.0), f_ops.get(op, {}).get("share", 0.0)))
    shown = ranked[:top]
    providers = f" on {', '.join(build['providers'])}" if build.get("providers") else ""
    lines = [f"### Where the time goes ({build.get('profiler')}{providers})", "", f"{profile.get('note', '')}.", ""]
    head = "| op | ms | share | calls |" + (" fp32 ms | fp32 share | fp32 calls |" if fp32 else "")
    lines += [head, "|---|---|---|---|" + ("---|---|---|" if fp32 else "")]

    def cells(o):
        return f" {o['ms']:.3f} | {o['share']:.1%} | {o['calls']} |" if o else " | | |"

    for op in shown:
        lines.append(f"| {op} |" + cells(b_ops.get(op)) + (cells(f_ops.get(op)) if fp32 else ""))

    def rest(ops):
        others = [o for name, o in ops.items() if name not in shown]
        if not others:
            return " | | |"
        return (f" {sum(o['ms'] for o in others):.3f} | {sum(o['share'] for o in others):.1%} | "
                f"{sum(o['calls'] for o in others)} |")

    lines.append("| other |" + rest(b_ops) + (rest(f_ops) if fp32 else ""))
    lines.append(f"| total | {build.get('total_ms', 0.0):.3f} | 100% | |"
                 + (f" {fp32.get('total_ms', 0.0):.3f} | 100% | |" if fp32 else ""))
    bound = profile.get("bound")
    lines.append("")
    if bound:
        frac = bound.get("fraction_of_bound")
        lines.append(f"int8 bound: {bound['quantized_fp32_ms']:.3f} ms of fp32 products the build runs in int8 "
                     f"({bound['products_found_in_fp32']}/{bound['int8_products']} found) / "
                     f"{bound['int8_vs_fp32']:.2f} (probe) + {bound['rest_fp32_ms']:.3f} ms rest = "
                     f"{bound['bound_ms']:.3f} ms: at most {bound['bound_speedup']:.3f}x fp32"
                     + (f"; this build is at {frac:.2f} of that bound." if frac is not None else "."))
    elif profile.get("bound_skipped"):
        lines.append(f"int8 bound: not computed ({profile['bound_skipped']}).")
    return lines

