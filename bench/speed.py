"""Speed and size of qcompile builds on one model, measured in one run: builds each (recipe, target)
with the real pipeline, then times the engines interleaved (round-robin) on pinned threads and
reports medians and ratios to the first variant, next to the machine's int8 probe and the fraction of its
fp32 matrix-product peak; optionally times full builds of this tree against a git ref (before / after).

    python bench/speed.py                                   # MiniLM: torch fp32, ORT fp32, int8_static, int4
    python bench/speed.py --model tiny_bert --variants fp32:torch int8_static:ort --rounds 3
    python bench/speed.py --build-times main --readme       # + full-build wall times, docs/speed.md block rewritten
    python bench/speed.py --variants fp32:ort int8_static:ort \
        "old=int8_static:ort:recipe.steps.int8_static.fuse_bias=false|target.disabled_optimizers=[]"
                                                            # a variant: [label=]recipe:target[:override|override]
    python bench/speed.py --variants fp32:torch int8_dynamic:torch "compiled=fp32:torch:target.compile=true" \
        "compiled_int8=int8_dynamic:torch:target.compile=true"   # torch: eager and torch.compile'd programs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from readme_block import compose, write_block  # noqa: E402  (bench/, the script's own folder)


TARGETS: dict[str, str] = {}  # variant label -> target
RECIPES: dict[str, str] = {}  # variant label -> recipe


def parse_variant(text: str) -> tuple[str, str, str, list[str]]:
    """'[label=]recipe:target[:override|override]' -> (label, recipe, target, overrides); the label defaults
    to recipe:target, so the same recipe can be timed under different overrides in one run."""
    label, _, spec = text.partition("=") if "=" in text.split(":")[0] else ("", "", text)
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--variants: {text!r} is not [label=]recipe:target[:override|override]")
    overrides = [o for o in parts[2].split("|") if o] if len(parts) == 3 else []
    return label or f"{parts[0]}:{parts[1]}", parts[0], parts[1], overrides


def parse_variants(texts: list[str]) -> list[tuple[str, str, str, list[str]]]:
    """Every --variants entry parsed; two with the same label (the same recipe:target, overrides aside) would share
    a run directory and a table row, so that stops here with the fix."""
    parsed = [parse_variant(t) for t in texts]
    seen: dict[str, str] = {}
    for text, (label, *_rest) in zip(texts, parsed):
        if label in seen:
            raise SystemExit(f"--variants: {seen[label]!r} and {text!r} are both labelled {label!r}; name one, "
                             f"e.g. 'compiled={text}'")
        seen[label] = text
    return parsed


def build(model, recipe, target, out_dir: Path, extra, label: str | None = None):
    """A real qcompile build (bench stage off: we time below, interleaved), and its predictor."""
    from compiler.core.errors import GateError
    from compiler.pipeline import run_build
    from compiler.runners.callable import torch_predictor
    from compiler.stages.models import load_model
    from compiler.stages.validate import validate
    from targets.base import Engine, get_target

    cfg = compose([f"model={model}", f"recipe={recipe}", f"target={target}", "bench.enabled=false", *extra])
    spec = validate(cfg)
    run_dir = out_dir / (label or f"{recipe}_{target}").replace(":", "_").replace("/", "_")
    run_dir.mkdir(parents=True)
    try:
        report = run_build(spec, run_dir)
    except GateError as e:  # a build that misses its gate is still timed; the table shows its fidelity
        print(f"  {recipe}:{target} gate failed ({e}); timing it anyway", flush=True)
        report = json.loads((run_dir / "report.json").read_text())

    def make_predict(threads):
        if target == "torch" and (run_dir / "engine.pt2").is_file():
            # the run's exported program as `qcompile predict` loads it (fp32 too: the same kind of graph)
            tgt = get_target("torch")(spec.target)
            eng = tgt.load(run_dir, report.get("lower") or {}, _inputs(report), _outputs(report))
            return tgt.predictor(eng, threads=threads)
        if target == "torch" and not spec.steps:
            import torch

            torch.set_num_threads(threads)
            m = load_model(spec.model)
            return torch_predictor(m.module, m.input_names, m.output_names)
        if target == "ort":
            tgt = get_target("ort")(spec.target)
            eng = Engine(target="ort", path=None, handle=run_dir / "model.onnx", input_names=_inputs(report),
                         output_names=_outputs(report))
            return tgt.predictor(eng, threads=threads)
        raise SystemExit(f"bench/speed.py times torch fp32 and ORT builds; {recipe}:{target} is not supported here")

    size = report.get("onnx", {}).get("bytes")
    if size is None and (run_dir / "engine.pt2").is_file():  # torch: its exported program (graph + weights)
        size = (run_dir / "engine.pt2").stat().st_size
    if size is None:  # torch without a program: the weights file the model was loaded from
        files = report["model"].get("weight_files", "")
        size = sum((Path(report["model"]["path"]) / f).stat().st_size for f in files.split(",") if f)
        size = size or 4 * report["model"]["parameters"]  # tiny models have no file: fp32 parameter bytes
    return report, make_predict, size


def _inputs(report):
    return ["input_ids", "attention_mask", "token_type_ids"] if report["model"]["architecture"] == "bert" \
        else ["input_ids", "attention_mask"]


def _outputs(report):
    return ["last_hidden_state", "sentence_embedding"]


def machine_figures(args, built, rows):
    """The int8 probe on both runtimes at the model's FFN shape, graph FLOPs, and the fraction of the fp32
    peak each ORT variant reaches (thread CPU time, like the probe)."""
    from compiler.stages.bench.probe import cpu_info, gemm_shape, graph_flops, measure
    from compiler.stages.validate import validate

    spec = validate(compose([f"model={args.model}", "recipe=fp32", "target=ort", *args.override]))
    shape = gemm_shape(spec.model_info, args.batch, args.seq)
    probes = {rt: measure(rt, *shape, threads=args.threads) for rt in ("ort", "torch")}
    out = {"cpu": cpu_info(), "probe": probes}
    onnx_runs = [(v, rep) for v, rep, _, _ in built if TARGETS[v] == "ort"]
    if onnx_runs:
        fp32 = next((rep for v, rep in onnx_runs if RECIPES[v] == "fp32"), onnx_runs[0][1])
        gflop = graph_flops(Path(fp32["build"]["run_dir"]) / "model.onnx", args.batch, args.seq)["gflop"]
        out["gflop"] = gflop
        for row in rows:
            runtime = TARGETS[row["variant"]]
            row["fraction_of_peak"] = gflop / (row["cpu_ms"] / 1e3) / probes[runtime]["fp32_gflops"]
    return out


def peak_regressions(rows, minimum: float) -> list[str]:
    """The ORT fp32 rows whose fraction of the probe's fp32 peak is below minimum (issue 20: ORT fp32 ran at
    0.88 of it; below 0.85 is a regression of the fp32 path, e.g. a lost fusion), one line each."""
    return [f"{r['variant']}: {r['fraction_of_peak']:.2f} of the probe's fp32 peak, below {minimum:.2f}"
            for r in rows if RECIPES.get(r["variant"]) == "fp32" and TARGETS.get(r["variant"]) == "ort"
            and r.get("fraction_of_peak") is not None and r["fraction_of_peak"] < minimum]


def scaling_rows(makers: dict, input_names: list[str], base: str, batches: list[int], seq: int,
                 threads: list[int], vocab: int = 30522) -> list[dict]:
    """Throughput of every variant at each batch x seq and thread count, the variants round-robin in one run
    (compiler/stages/bench/scaling.py's shapes and rounds). One thread: ratios in thread CPU time; more: wall
    clock (this thread's CPU time would miss the workers). samples/s always from the wall clock."""
    from compiler.core.feeds import synthetic_feed
    from compiler.stages.bench import interleaved, ratio_clock
    from compiler.stages.bench.scaling import ROUNDS, SERVER_CALLS

    out = []
    for t in threads:
        predicts = {v: make(t) for v, make in makers.items()}
        for batch in batches:
            feed = synthetic_feed(input_names, batch, seq, vocab=vocab, seed=1)
            for p in predicts.values():
                p(feed)
            calls = SERVER_CALLS if batch > 1 else 10
            times = interleaved(predicts, [feed], ROUNDS, calls)
            clock = ratio_clock(t)
            med = {c: {v: float(np.median(np.concatenate(times[c][v]))) for v in predicts} for c in ("wall", "cpu")}
            for v in predicts:
                out.append({"variant": v, "threads": t, "batch": batch, "seq": seq,
                            "samples_per_s": batch / med["wall"][v], "speedup": med[clock][base] / med[clock][v],
                            "clock": clock})
            print(f"  scaling: {t} thread(s), batch {batch}: " + ", ".join(
                f"{v} {batch / med['wall'][v]:.1f}/s" for v in predicts), flush=True)
    for r in out:
        one = next(o for o in out if o["variant"] == r["variant"] and o["batch"] == r["batch"] and o["threads"] == 1)
        r["scaling_vs_1_thread"] = r["samples_per_s"] / one["samples_per_s"]
    return out


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def time_builds(args):
    """Full builds (`python -m compiler`, check + bench) of this tree and of a git ref, each with a fresh
    cache (cold) and again with it filled (warm), the two trees interleaved so load hits both alike."""
    import shutil
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="qcompile-speed-"))
    before = tmp / "before"
    before.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.build_times], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
    out = {"ref": args.build_times, "args": args.build_args}
    for phase in ("cold", "warm"):
        for name, src in (("before", before), ("after", REPO)):
            env = dict(os.environ, PYTHONPATH=str(src), QCOMPILE_CACHE_DIR=str(tmp / f"cache_{name}"),
                       OMP_NUM_THREADS="1")
            run_dir = tmp / f"{name}_{phase}"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "compiler", *args.build_args, f"hydra.run.dir={run_dir}"],
                                  check=False, cwd=tmp, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            stages = {}
            if (run_dir / "report.json").exists():
                stages = json.loads((run_dir / "report.json").read_text()).get("timings_s", {})
            out[f"{name}_{phase}"] = {"rc": proc.returncode, "wall_s": round(wall, 1), "stages_s": stages,
                                      "load": _loadavg()}
            print(f"build {name} {phase}: rc {proc.returncode}, {wall:.1f}s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def render(args, rows, base, clock_name, extra, builds):
    cpu = extra["cpu"]
    flags = ", ".join(f.upper() for f in ("avx2", "fma", "avx512", "vnni", "amx") if cpu.get(f)) or "none"
    missing = ", ".join(f.upper() for f in ("avx512", "vnni", "amx") if not cpu.get(f))
    lines = [f"`python bench/speed.py{' --build-times ' + args.build_times if builds else ''}` on {cpu['cpu']} "
             f"({cpu['cpu_count']} cores; flags {flags}{'; no ' + missing if missing else ''}), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
             f"{_loadavg()}. {args.note}".rstrip(), ""]
    probe = extra["probe"]
    lines += [("**int8 probe** (one thread, thread CPU time, the model's FFN product "
              f"{probe['ort']['shape_mkn'][0]}x{probe['ort']['shape_mkn'][1]}x{probe['ort']['shape_mkn'][2]}): "
              f"ORT `MatMulInteger` u8s8 {probe['ort']['int8_gops']:.1f} GOP/s vs `MatMul` fp32 "
              f"{probe['ort']['fp32_gflops']:.1f} GFLOP/s = **{probe['ort']['int8_gemm_vs_fp32']:.2f}x**; torch dynamic "
              f"int8 Linear {probe['torch']['int8_gops']:.1f} vs fp32 Linear {probe['torch']['fp32_gflops']:.1f} = "
              f"**{probe['torch']['int8_gemm_vs_fp32']:.2f}x**."), ""]
    if "gflop" in extra:
        lines += [(f"**Graph FLOPs** at batch {args.batch}, seq {args.seq}: {extra['gflop']:.3f} GFLOP (every MatMul "
                  "of the exported graph); fraction of peak = FLOPs / CPU time per call / the probe's fp32 GFLOP/s."), ""]
    lines += [(f"Engines timed round-robin in one run ({args.rounds} rounds x {args.iters} calls, batch {args.batch}, "
              f"seq {args.seq}, {args.threads} thread); ratios over `{base}` in {clock_name}, spread = min..max "
              "over rounds; latencies are wall clock:"), "",
              (f"| variant | p50 ms (wall) | CPU ms | x {base} (spread) | fraction of fp32 peak | artifact MB | "
              "smaller | embedding cosine | top-1 |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{r['fraction_of_peak']:.2f}" if "fraction_of_peak" in r else ""
        cos = "" if r["embedding_cosine"] is None else f"{r['embedding_cosine']:.5f}"
        lines.append(f"| {r['variant']} | {r['p50_ms']:.1f} | {r['cpu_ms']:.1f} | {r['speedup']:.2f}x "
                     f"({r['spread'][0]:.2f}..{r['spread'][1]:.2f}) | {frac} | {r['artifact_mb']:.1f} | "
                     f"{r['smaller']:.2f}x | {cos} | {r['top1_agreement'] if r['top1_agreement'] is not None else ''} |")
    if extra.get("scaling"):
        sc = extra["scaling"]
        cols = [(r["threads"], r["batch"]) for r in sc if r["variant"] == base]
        lines += ["", (f"**Throughput by batch and threads** (same run, variants round-robin, "
                       f"{ROUNDS_NOTE}): samples/s (x `{base}`; scaling over one thread):"), "",
                  "| variant | " + " | ".join(f"{t} thr, batch {b}" for t, b in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for v in dict.fromkeys(r["variant"] for r in sc):
            cells = []
            for t, b in cols:
                r = next(x for x in sc if x["variant"] == v and x["threads"] == t and x["batch"] == b)
                cells.append(f"{r['samples_per_s']:.1f} ({r['speedup']:.2f}x; {r['scaling_vs_1_thread']:.2f})")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if extra.get("peak_regressions") is not None:
        regress = extra["peak_regressions"]
        lines += ["", (f"**ORT fp32 regression check** (fraction of the probe's fp32 peak >= {args.min_fp32_peak:.2f}): "
                       + ("REGRESSION: " + "; ".join(regress) if regress else "passes"))]
    if builds:
        lines += ["", (f"**Full builds** (`python -m compiler {' '.join(builds['args'])}`, load + quantize + export + "
                  f"check + bench), `{builds['ref']}` (before) vs this tree (after), interleaved, wall seconds:"), "",
                  "| cache | before | after | after's stages (s) |", "|---|---|---|---|"]
        for phase in ("cold", "warm"):
            b, a = builds[f"before_{phase}"], builds[f"after_{phase}"]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in a["stages_s"].items())
            lines.append(f"| {phase} | {b['wall_s']:.1f} (rc {b['rc']}) | {a['wall_s']:.1f} (rc {a['rc']}) | {stages} |")
    return "\n".join(lines)


ROUNDS_NOTE = ("3 rounds; 1 thread: ratio in thread CPU time, more threads: wall clock; samples/s wall clock")
PAGE = "docs/speed.md"  # the page holding the marked block (it lived in README.md before)
BEGIN, END = "<!-- speed:begin (bench/speed.py --readme) -->", "<!-- speed:end -->"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--variants", nargs="+",
                    default=["fp32:torch", "fp32:ort", "int8_static:ort", "int8_dynamic:ort", "int4_weight_only:ort"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every build")
    ap.add_argument("--build-times", metavar="GIT_REF", default=None,
                    help="also time full `python -m compiler` builds (check + bench) of this tree and of GIT_REF, "
                         "cold and warm cache, interleaved")
    ap.add_argument("--build-args", nargs="*", default=["model=minilm", "recipe=int8_static", "target=ort"])
    ap.add_argument("--readme", action="store_true", help="rewrite the speed block of docs/speed.md with the result")
    ap.add_argument("--note", default="", help="a line for docs/speed.md (e.g. the machine's load during the run)")
    ap.add_argument("--scaling", action="store_true",
                    help="also throughput at --batch and --server-batch, 1 thread to every core, all variants round-robin")
    ap.add_argument("--server-batch", type=int, default=32)
    ap.add_argument("--min-fp32-peak", type=float, default=0.85,
                    help="ORT fp32 below this fraction of the probe's fp32 peak is a regression: exit 1 (0: no check)")
    args = ap.parse_args()

    from compiler.core.feeds import synthetic_feed
    from compiler.stages.bench import (
        CLOCK_NAMES,
        interleaved,
        ratio_clock,
        summarize,
        time_predict,
    )

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = REPO / "outputs" / "bench" / f"{stamp}_{args.model}"
    built = []
    makers = {}
    for v, recipe, target, overrides in parse_variants(args.variants):
        TARGETS[v], RECIPES[v] = target, recipe
        print(f"building {args.model} {v} ...", flush=True)
        report, make_predict, size = build(args.model, recipe, target, out_dir, [*args.override, *overrides], v)
        predict = make_predict(args.threads)
        makers[v] = make_predict
        built.append((v, report, predict, size))

    feed = synthetic_feed(_inputs(built[0][1]), args.batch, args.seq, seed=1)
    predicts = {v: predict for v, _, predict, _ in built}
    for predict in predicts.values():  # warm-up
        time_predict(predict, feed, 3, 1)
    clock = ratio_clock(args.threads)
    # round-robin so machine load hits every variant alike; wall clock for latencies, thread CPU time
    # (one thread) for the ratios (compiler/stages/bench/ says why)
    times = interleaved(predicts, [feed], args.rounds, args.iters)
    base = built[0][0]
    rows = []
    flat = {c: {v: [t for r in times[c][v] for t in r] for v in predicts} for c in ("wall", "cpu")}
    base_size = built[0][3]
    for v, report, _, size in built:
        s = summarize(flat["wall"][v], args.batch)
        task = report.get("check", {}).get("fidelity", {})
        per_round = [float(np.median(b) / np.median(t)) for t, b in zip(times[clock][v], times[clock][base])]
        rows.append({"variant": v, "p50_ms": s["latency_ms_p50"], "p90_ms": s["latency_ms_p90"],
                     "cpu_ms": float(np.median(flat["cpu"][v]) * 1e3),
                     "speedup": float(np.median(flat[clock][base]) / np.median(flat[clock][v])),
                     "spread": [min(per_round), max(per_round)], "artifact_mb": size / 1e6,
                     "smaller": base_size / size, "embedding_cosine": task.get("embedding_cosine_mean"),
                     "top1_agreement": task.get("top1_agreement")})
    extra = machine_figures(args, built, rows)
    if args.min_fp32_peak:
        extra["peak_regressions"] = peak_regressions(rows, args.min_fp32_peak)
    if args.scaling:
        from compiler.stages.bench.scaling import thread_counts

        extra["scaling"] = scaling_rows(makers, _inputs(built[0][1]), base,
                                        list(dict.fromkeys([args.batch, args.server_batch])), args.seq,
                                        thread_counts(os.cpu_count()))
    builds = time_builds(args) if args.build_times else None
    text = render(args, rows, base, CLOCK_NAMES[clock], extra, builds)
    print(text)
    (out_dir / "speed.md").write_text(text + "\n")
    (out_dir / "speed.json").write_text(json.dumps({"args": vars(args), "rows": rows, "machine": extra,
                                                    "builds": builds, "cpu": os.cpu_count(), "time": time.time()},
                                                   indent=2, default=str))
    print(f"\nwritten: {out_dir / 'speed.md'}")
    if args.readme:
        write_block(PAGE, text, BEGIN, END, "speed section")
    if extra.get("peak_regressions"):
        print("ORT fp32 regression: " + "; ".join(extra["peak_regressions"]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
