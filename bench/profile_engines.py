"""Several ONNX Runtime engines profiled side by side, by op type, in one process: the per-op-type table every
benchmarked build writes (compiler/stages/bench/op_profile.py, onnxruntime's profiler) covers one engine and
its fp32 baseline; comparing two int8 graphs (int8_static against int8_dynamic) needs them in one run.

    python bench/profile_engines.py static=outputs/bench/<run>/int8_static_ort/model.onnx \\
        dynamic=outputs/bench/<run>/int8_dynamic_ort/model.onnx

One thread, the sessions called round-robin (--runs each, the first --cold dropped), each node's median per
run, summed by op type (ms per run, nodes). Sessions open as target=ort opens them: graph optimization "all",
no spinning, and onnxruntime's SkipLayerNormFusion off (--disabled-optimizers; target.disabled_optimizers).
Kernel time only: a session's overhead between kernels is not in it. Input: token ids
below 100 (every vocabulary has them; kernel time does not depend on them), batch --batch x --seq."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.stages.bench.op_profile import ort_table  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", help="label=path/to/model.onnx")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cold", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--disabled-optimizers", nargs="*", default=["SkipLayerNormFusion"])
    args = ap.parse_args(argv)
    import onnxruntime as ort

    rng = np.random.RandomState(0)
    feed = {"input_ids": rng.randint(1, 100, (args.batch, args.seq)).astype(np.int64),
            "attention_mask": np.ones((args.batch, args.seq), np.int64),
            "token_type_ids": np.zeros((args.batch, args.seq), np.int64)}
    tmp = Path(tempfile.mkdtemp(prefix="profile_engines."))
    sessions = {}
    for item in args.engines:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"{item!r}: write label=path/to/model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp / label)
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(args.disabled_optimizers))
        names = {i.name for i in sess.get_inputs()}
        sessions[label] = (sess, {k: v for k, v in feed.items() if k in names})
    for _ in range(args.runs):  # round-robin: a slow stretch of the machine hits every engine alike
        for sess, f in sessions.values():
            sess.run(None, f)
    tables = {label: ort_table(json.loads(Path(sess.end_profiling()).read_text()), cold_runs=args.cold)
              for label, (sess, _) in sessions.items()}
    ms = {label: {o.op: (o.ms, o.calls) for o in t.ops} for label, t in tables.items()}
    ops = sorted({op for m in ms.values() for op in m}, key=lambda op: -max(m.get(op, (0, 0))[0] for m in ms.values()))
    print("| op type | " + " | ".join(f"{label} ms (nodes)" for label in tables) + " |")
    print("|---|" + "---|" * len(tables))
    for op in ops:
        cells = [f"{m[op][0]:.2f} ({m[op][1]})" if op in m else "-" for m in ms.values()]
        print(f"| `{op}` | " + " | ".join(cells) + " |")
    print("| total | " + " | ".join(f"{t.total_ms:.2f}" for t in tables.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
