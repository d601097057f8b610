"""Speed and size of qcompile builds on one model, measured in one run: builds each (recipe, target)
with the real pipeline, then times the engines interleaved (round-robin) on pinned threads and
reports medians and ratios to the first variant.

    python bench/speed.py                                   # MiniLM: torch fp32, ORT fp32, ORT int8_static
    python bench/speed.py --model tiny_bert --variants fp32:torch int8_static:ort --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    return cfg


def build(model, recipe, target, out_dir: Path, extra):
    """A real qcompile build (bench stage off: we time below, interleaved), and its predictor."""
    from compiler.stages.models import load_model
    from compiler.pipeline import run_build
    from compiler.runners.callable import torch_predictor
    from compiler.stages.validate import validate
    from targets.base import Engine, get_target

    cfg = compose([f"model={model}", f"recipe={recipe}", f"target={target}", "bench.enabled=false", *extra])
    spec = validate(cfg)
    run_dir = out_dir / f"{recipe}_{target}"
    run_dir.mkdir(parents=True)
    report = run_build(spec, run_dir)

    def make_predict(threads):
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
    if size is None:  # torch: the weights file the model was loaded from
        files = report["model"].get("weight_files", "")
        size = sum((Path(report["model"]["path"]) / f).stat().st_size for f in files.split(",") if f)
        size = size or 4 * report["model"]["parameters"]  # tiny models have no file: fp32 parameter bytes
    return report, make_predict, size


def _inputs(report):
    return ["input_ids", "attention_mask", "token_type_ids"] if report["model"]["architecture"] == "bert" \
        else ["input_ids", "attention_mask"]


def _outputs(report):
    return ["last_hidden_state", "sentence_embedding"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--variants", nargs="+", default=["fp32:torch", "fp32:ort", "int8_static:ort"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every build")
    args = ap.parse_args()

    from compiler.stages.bench import summarize, time_predict
    from compiler.core.feeds import synthetic_feed

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = REPO / "outputs" / "bench" / f"{stamp}_{args.model}"
    built = []
    for v in args.variants:
        recipe, target = v.split(":")
        print(f"building {args.model} {recipe} on {target} ...", flush=True)
        report, make_predict, size = build(args.model, recipe, target, out_dir, args.override)
        predict = make_predict(args.threads)
        built.append((v, report, predict, size))

    feed = synthetic_feed(_inputs(built[0][1]), args.batch, args.seq, seed=1)
    times = {v: [] for v, *_ in built}
    for v, _, predict, _ in built:  # warm-up
        time_predict(predict, feed, 3, 1)
    for r in range(args.rounds):  # round-robin so machine load hits every variant alike
        for v, _, predict, _ in built:
            times[v] += time_predict(predict, feed, 0, args.iters)
    base = built[0][0]
    rows = []
    base_ms = summarize(times[base], args.batch)["latency_ms_p50"]
    base_size = built[0][3]
    for v, report, _, size in built:
        s = summarize(times[v], args.batch)
        task = report.get("check", {}).get("fidelity", {})
        rows.append({"variant": v, "p50_ms": s["latency_ms_p50"], "p90_ms": s["latency_ms_p90"],
                     "speedup_vs_" + base: base_ms / s["latency_ms_p50"], "artifact_mb": size / 1e6,
                     "smaller_than_" + base: base_size / size, "embedding_cosine": task.get("embedding_cosine_mean"),
                     "top1_agreement": task.get("top1_agreement")})
    lines = [f"# bench/speed.py: {args.model}, batch {args.batch}, seq {args.seq}, {args.threads} thread(s), "
             f"{args.rounds}x{args.iters} interleaved iterations", "",
             "| variant | p50 ms | p90 ms | speed-up vs " + base + " | artifact MB | size ratio | embedding cosine | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['speedup_vs_' + base]:.2f}x | "
                     f"{row['artifact_mb']:.1f} | {row['smaller_than_' + base]:.2f}x | "
                     f"{row['embedding_cosine'] if row['embedding_cosine'] is None else round(row['embedding_cosine'], 5)} | "
                     f"{row['top1_agreement']} |")
    text = "\n".join(lines)
    print(text)
    (out_dir / "speed.md").write_text(text + "\n")
    (out_dir / "speed.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                    "cpu": os.cpu_count(), "time": time.time()}, indent=2))
    print(f"\nwritten: {out_dir / 'speed.md'}")


if __name__ == "__main__":
    main()
