"""Step `distill`: quantization-aware distillation. After the quantizing steps, it trains the fake-quantized model
(the student) to match the fp32 model (the teacher) on unlabeled text, on the CPU: per-block hidden-state MSE
(layer-wise) plus the task output (embedding cosine for an embedder, the softmax KL for a classifier, as
compiler.core.tasks says the model's outputs are read). What it trains (`train`):

- ``scales``: only the NVFP4 weights' per-block e4m3 scales (learned-step-size, LSQ: the rounding of values and
  of the e4m3 scale passed straight through), the weights fixed; the cheapest, NVIDIA's "scale only" QAD;
- ``weights``: every quantized Linear's weight and bias, through the quantizers' straight-through estimator;
- ``lora``: low-rank adapters on those weights (W + B @ A in front of the weight quantizer), folded into the
  weights before export, plus the biases.

The trained weights go back through the quantizers the quantizing step chose: NVFP4 weights are rounded onto the
grid with fixed block scales (compiler.steps.nvfp4.fix_weight_scales), so the exported TensorRT graph equals the
torch fake-quant as for a post-training build. The trained state is cached content-addressed (student weights and
quantizer state, teacher weights, training text, parameters, seed), so rebuilds and sweeps do not retrain; the
cache writes an entry in one rename, so an interrupted training leaves nothing a rerun could read.

Library use and gaps: modelopt.torch.distill gives the classifier's loss (LogitsDistillationLoss) and modelopt's
quantizers give the straight-through gradients (the project's CPU NVFP4 kernels keep them). Its DistillationModel
(mtd.convert) is not used: it turns the student into a DynamicModule whose forward also runs the teacher and must
be exported back (mtd.export) before the export stage, and it has no per-batch padding mask for the hidden-state
loss; the hooks below capture each block's output for the masked MSE instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from compiler.core.errors import BuildError, RecipeError
from compiler.core.tasks import task_kind
from compiler.steps.base import TORCH, Step, StepContext, StepParams
from compiler.steps.nvfp4 import FIXED_SCALES_BACKEND, fix_weight_scales, mark_for_trt_export
from compiler.steps.reorder import in_original_order

log = logging.getLogger(__name__)

TRAIN_MODES = ("scales", "weights", "lora")
SCALES_FORMATS = ("nvfp4",)  # the formats whose scales train=scales learns
CACHE_KIND = "distill"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"


@dataclass
class DistillParams(StepParams):
    train: str = "weights"  # scales (NVFP4 block scales only) | weights (straight-through) | lora (adapters, folded)
    max_steps: int = 200  # optimizer steps (batches); training stops at whichever bound comes first
    max_minutes: float = 10.0  # wall-clock bound; stopping on it makes the result depend on the machine's speed
    lr: float = 1e-4  # AdamW, linear warmup then cosine decay to 0 at max_steps
    warmup: float = 0.05  # fraction of max_steps
    batch_size: int = 16  # training sentences per step (each batch cut to its longest sentence)
    seed: Optional[int] = None  # None: the build's seed
    hidden_weight: float = 1.0  # weight of the per-block hidden-state MSE (normalized by the teacher's power)
    output_weight: float = 10.0  # weight of the task output term (1 - cosine, or the softmax KL)
    token_weight: float = 0.0  # embedders: weight of 1 - cosine per token of the other outputs (last_hidden_state)
    temperature: float = 1.0  # classifiers: the softmax KL's temperature (soft targets carry the margins)
    lora_rank: int = 8  # train=lora: the adapters' rank

    def problems(self) -> List[Tuple[str, str, str]]:
        out = []
        if self.train not in TRAIN_MODES:
            out.append(("train", f"bad value {self.train!r}", f"use one of {list(TRAIN_MODES)}"))
        if self.max_steps <= 0:
            out.append(("max_steps", f"must be > 0, got {self.max_steps}", "set max_steps to a positive number, e.g. 200"))
        if not self.max_minutes > 0:
            out.append(("max_minutes", f"must be > 0, got {self.max_minutes}",
                        "set max_minutes to a positive number of minutes, e.g. 10"))
        if not self.lr > 0:
            out.append(("lr", f"must be > 0, got {self.lr}", "set lr to a positive number, e.g. 1e-4"))
        if not 0 <= self.warmup < 1:
            out.append(("warmup", f"{self.warmup} is not a fraction below 1", "use a value in [0, 1), e.g. 0.05"))
        if self.batch_size <= 0:
            out.append(("batch_size", f"must be > 0, got {self.batch_size}", "set batch_size to e.g. 16"))
        if not self.token_weight >= 0:
            out.append(("token_weight", f"must be >= 0, got {self.token_weight}", "use e.g. token_weight=10 (0: off)"))
        if not self.temperature > 0:
            out.append(("temperature", f"must be > 0, got {self.temperature}", "use e.g. temperature=1"))
        if self.lora_rank <= 0:
            out.append(("lora_rank", f"must be > 0, got {self.lora_rank}", "set lora_rank to e.g. 8"))
        if self.hidden_weight < 0 or self.output_weight < 0 or self.hidden_weight + self.output_weight == 0:
            out.append(("output_weight", f"hidden_weight={self.hidden_weight}, output_weight={self.output_weight}: "
                        "the loss needs a positive weight and no negative one", "use e.g. hidden_weight=1 output_weight=10"))
        return out


# ---- what is trained ----------------------------------------------------------------------------------------


def trained_layers(module) -> List[str]:
    """The Linear layers a quantizing step put an enabled modelopt weight quantizer on (what distill trains)."""
    import torch

    out = []
    for name, sub in module.named_modules():
        wq = getattr(sub, "weight_quantizer", None)
        if isinstance(getattr(sub, "weight", None), torch.Tensor) and wq is not None and getattr(wq, "is_enabled", False):
            out.append(name)
    return out


def _lora_quantizer(quantizer, out_features: int, in_features: int, rank: int, generator):
    """The layer's weight quantizer behind W + B @ A (A random at 1/sqrt(in) scale, B zero: training starts at the
    quantized model). Library gap: torch's parametrizations swap the module's class, which drops modelopt's dynamic
    `weight` attribute (the one that calls the weight quantizer), so the adapter sits in front of the quantizer."""
    import torch

    class LoRAWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quantizer = quantizer
            self.a = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
            self.b = torch.nn.Parameter(torch.zeros(out_features, rank))

        def delta(self):
            return self.b @ self.a

        def forward(self, w):
            return self.quantizer(w + self.delta())

    return LoRAWeight()


def _learned_scales(quantizer):
    """An NVFP4 fixed-scale weight quantizer (compiler.steps.nvfp4.fix_weight_scales) whose per-block e4m3 scales
    are a parameter: y = clamp_round(w / (e4m3(s) * gs)) * e4m3(s) * gs, the e2m1 rounding and the e4m3 rounding
    of s passed straight through (LSQ). Library gap: modelopt's LSQ (StaticBlockScaleQuantizer.enable_lsq) needs
    a static per-block quantizer, which the dynamic (max) and GPTQ NVFP4 weights are not, and its per-block amax
    is not the e4m3 scale the exported graph stores."""
    import torch

    from compiler.numerics.nvfp4 import E2M1_MAX, round_to_e2m1, to_e4m3

    class LearnedScaleFP4(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quantizer = quantizer
            # learned in log space (lr is a relative step, whatever the block's scale); starts at the fixed scales
            self.register_buffer("start", quantizer._qc_scale_e4m3.detach().clone().float())
            self.log_scale = torch.nn.Parameter(torch.zeros_like(self.start))
            self.register_buffer("global_scale", quantizer._qc_global_scale.detach().clone().float())

        @property
        def scale(self):
            return self.start * torch.exp(self.log_scale)

        def e4m3_scale(self):
            s = self.scale
            return s + (to_e4m3(s) - s).detach()

        def forward(self, w):
            blocks = w.float().reshape(*self.scale.shape, -1)
            unscale = (self.e4m3_scale() * self.global_scale).unsqueeze(-1)
            safe = torch.where(unscale > 0, unscale, torch.ones_like(unscale))
            x = (blocks / safe).clamp(-E2M1_MAX, E2M1_MAX)
            q = x + (round_to_e2m1(x) - x).detach()
            y = torch.where(unscale > 0, q * unscale, torch.zeros_like(q))
            return y.reshape(w.shape).to(w.dtype)

        def fold(self):
            with torch.no_grad():
                self.quantizer._qc_scale_e4m3.copy_(to_e4m3(self.scale))

    return LearnedScaleFP4()


def prepare(module, layers: List[str], p: DistillParams, seed: int) -> List[Any]:
    """Make the trained tensors trainable (and only those); train=lora puts the adapters in. Returns them."""
    import torch

    for prm in module.parameters():
        prm.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    params = []
    for name in layers:
        sub = module.get_submodule(name)
        if p.train == "scales":
            wq = sub.weight_quantizer
            if getattr(wq, "backend", None) != FIXED_SCALES_BACKEND:
                continue  # not NVFP4 (a layer the layer map gave fp8 / int8): its scales stay calibrated
            sub.weight_quantizer = _learned_scales(wq)
            params.append(sub.weight_quantizer.log_scale)
            continue
        if p.train == "lora":
            out_f, in_f = sub.weight.shape
            sub.weight_quantizer = _lora_quantizer(sub.weight_quantizer, out_f, in_f, int(p.lora_rank), gen)
            params += [sub.weight_quantizer.a, sub.weight_quantizer.b]
        else:
            sub.weight.requires_grad_(True)
            params.append(sub.weight)
        if getattr(sub, "bias", None) is not None:
            sub.bias.requires_grad_(True)
            params.append(sub.bias)
    return params


def merge(module, layers: List[str]) -> None:
    """Fold LoRA adapters into the weights and give the layers their own quantizers back; freeze everything."""
    import torch

    for name in layers:
        sub = module.get_submodule(name)
        wrapper = sub.weight_quantizer
        if hasattr(wrapper, "delta") and hasattr(wrapper, "quantizer"):  # lora
            with torch.no_grad():
                sub.weight.add_(wrapper.delta())
            sub.weight_quantizer = wrapper.quantizer
        elif hasattr(wrapper, "fold") and hasattr(wrapper, "quantizer"):  # learned scales
            wrapper.fold()
            sub.weight_quantizer = wrapper.quantizer
    for prm in module.parameters():
        prm.requires_grad_(False)


def trained_state(module, layers: List[str]) -> Dict[str, Any]:
    """The trained tensors (weights and biases of the trained layers), before the quantizers' rounding."""
    out = {}
    for name in layers:
        sub = module.get_submodule(name)
        scale = getattr(sub.weight_quantizer, "_qc_scale_e4m3", None)
        if scale is not None:
            out[f"{name}.weight_quantizer._qc_scale_e4m3"] = scale.detach().clone()
        out[f"{name}.weight"] = sub.weight.detach().clone()
        if getattr(sub, "bias", None) is not None:
            out[f"{name}.bias"] = sub.bias.detach().clone()
    return out


def load_state(module, state: Dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for key, value in state.items():
            layer, attr = key.rsplit(".", 1)
            getattr(module.get_submodule(layer), attr).copy_(value)


def finalize(module) -> int:
    """Round trained NVFP4 weights the way the graph will store them: a weight with fixed (calibrated) block scales
    is put on its grid; a dynamic one (algorithm max) gets its scales fixed from the trained weight under the
    calibrated global amax (fix_weight_scales), so torch fake-quant and graph keep being the same numbers. Other
    formats (int4, fp8, int8) keep their calibrated quantizers: their fake-quant reads the trained weight."""
    import torch

    from compiler.numerics.nvfp4 import nvfp4_fake_quant_with_scales

    n = 0
    with torch.no_grad():
        for _, sub in module.named_modules():
            wq = getattr(sub, "weight_quantizer", None)
            if wq is not None and getattr(wq, "backend", None) == FIXED_SCALES_BACKEND:
                sub.weight.copy_(nvfp4_fake_quant_with_scales(sub.weight, wq._qc_scale_e4m3, wq._qc_global_scale))
                n += 1
    fixed = fix_weight_scales(module)
    if fixed:
        mark_for_trt_export(module)
    return n + fixed


# ---- the loss -----------------------------------------------------------------------------------------------


def blocks_of(module) -> List[str]:
    """The model's transformer blocks: the longest ModuleList whose every element holds a Linear."""
    import torch

    best: List[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.ModuleList) and len(sub) > len(best) and all(
                any(isinstance(m, torch.nn.Linear) for m in child.modules()) for child in sub):
            best = [f"{name}.{i}" for i in range(len(sub))]
    return best


class Capture:
    """Forward hooks that keep each block's output (the hidden state: the first element of a tuple), in the
    original channel order (a reorder step permuted the student's residual stream, not the teacher's)."""

    def __init__(self, module, names: List[str]):
        self.out: Dict[str, Any] = {}
        self.module = module
        self.handles = [module.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(mod, inp, out):
            self.out[name] = in_original_order(self.module, out[0] if isinstance(out, (tuple, list)) else out, name)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def trim(feed: Dict[str, Any]) -> Dict[str, Any]:
    """Cut a batch to its longest sentence (padding columns only change nothing under the attention mask)."""
    mask = feed.get("attention_mask")
    if mask is None:
        return feed
    n = int(mask.sum(1).max())
    return {k: v[:, :max(n, 1)] for k, v in feed.items()}


class Loss:
    """hidden_weight * mean over blocks of the masked hidden-state MSE (normalized by the teacher's mean power) +
    output_weight * the task term on the primary output."""

    def __init__(self, kind, p: DistillParams, blocks: List[str]):
        self.kind, self.p, self.blocks = kind, p, blocks
        self.kl = None
        if not kind.output_cosine:  # logits: KL of the softmax (modelopt.torch.distill)
            from modelopt.torch.distill.losses import LogitsDistillationLoss

            self.kl = LogitsDistillationLoss(temperature=float(p.temperature))

    def __call__(self, s_out, t_out, s_hidden, t_hidden, mask) -> Tuple[Any, float, float]:
        import torch

        i = self.kind.primary_index
        s, t = s_out[i], t_out[i]
        if self.kl is not None:
            task = self.kl(s, t)
        else:
            task = (1 - torch.nn.functional.cosine_similarity(s.flatten(1), t.flatten(1), dim=-1)).mean()
        hidden = torch.zeros(())
        if self.blocks and self.p.hidden_weight > 0:
            m = mask.unsqueeze(-1).to(s.dtype) if mask is not None else None
            terms = []
            for b in self.blocks:
                hs, ht = s_hidden[b], t_hidden[b]
                if m is not None and hs.dim() == 3 and hs.shape[1] == m.shape[1]:
                    terms.append((((hs - ht) ** 2) * m).sum() / ((ht ** 2) * m).sum().clamp_min(1e-12))
                else:
                    terms.append(((hs - ht) ** 2).sum() / (ht ** 2).sum().clamp_min(1e-12))
            hidden = torch.stack(terms).mean()
        total = self.p.hidden_weight * hidden + self.p.output_weight * task
        if self.kl is None and self.p.token_weight > 0:
            for j, (so, to) in enumerate(zip(s_out, t_out)):
                if j == i or so is None or so.dim() != 3:
                    continue
                per_token = 1 - torch.nn.functional.cosine_similarity(so, to, dim=-1)
                m = mask.to(per_token.dtype) if mask is not None and mask.shape == per_token.shape else \
                    torch.ones_like(per_token)
                total = total + float(self.p.token_weight) * (per_token * m).sum() / m.sum().clamp_min(1.0)
        return total, float(hidden.detach()), float(task.detach())


def _run(module, feed):
    import torch

    return module(*[torch.from_numpy(v) for v in feed.values()])


def fidelity(student, teacher, features, kind, batch_size: int) -> Tuple[str, float]:
    """Mean primary-output cosine (embedders) or label agreement (classifiers) of student vs teacher."""
    import torch

    vals = []
    with torch.no_grad():
        for feed in features.batches(batch_size):
            feed = trim(feed)
            s, t = _run(student, feed)[kind.primary_index], _run(teacher, feed)[kind.primary_index]
            if kind.output_cosine:
                vals.append(torch.nn.functional.cosine_similarity(s.flatten(1), t.flatten(1), dim=-1))
            else:
                vals.append((s.argmax(-1) == t.argmax(-1)).float())
    name = "embedding_cosine_mean" if kind.output_cosine else "label_agreement"
    return name, float(torch.cat(vals).mean())


def state_sha256(module) -> str:
    """sha256 of a module's whole state (parameters and buffers, quantizer scales included), by name."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- training -----------------------------------------------------------------------------------------------


def train(student, teacher, features, kind, p: DistillParams, seed: int, params: List[Any], blocks: List[str]
          ) -> Dict[str, Any]:
    """AdamW over `params` for max_steps batches (or max_minutes); returns the history for the report and plot."""
    import numpy as np
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    loss_fn = Loss(kind, p, blocks)
    opt = torch.optim.AdamW(params, lr=float(p.lr), weight_decay=0.0)
    steps = int(p.max_steps)
    warm = int(round(float(p.warmup) * steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = np.random.default_rng(seed)
    n, bs = len(features), min(int(p.batch_size), len(features))
    order: List[int] = []
    s_cap, t_cap = Capture(student, blocks), Capture(teacher, blocks)
    history: Dict[str, Any] = {"loss": [], "hidden": [], "task": [], "stopped": "max_steps"}
    t0 = time.perf_counter()
    student.eval()  # no dropout: the same batches give the same gradients (deterministic for a seed)
    teacher.eval()
    try:
        # the load and calibration stages leave autograd off process-wide (inference only); training needs it
        with torch.enable_grad(), Progress(TextColumn("[distill]"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                      TimeElapsedColumn(), transient=True) as progress:
            bar = progress.add_task("distill", total=steps, loss="-")
            for step in range(steps):
                if time.perf_counter() - t0 > 60.0 * float(p.max_minutes):
                    history["stopped"] = "max_minutes"
                    break
                if len(order) < bs:
                    order += gen.permutation(n).tolist()
                idx, order = sorted(order[:bs]), order[bs:]
                feed = trim({k: v[idx] for k, v in features.arrays.items()})
                mask = torch.from_numpy(feed["attention_mask"]) if "attention_mask" in feed else None
                with torch.no_grad():
                    t_out = _run(teacher, feed)
                t_hidden = dict(t_cap.out)
                s_out = _run(student, feed)
                loss, hidden, task = loss_fn(s_out, t_out, s_cap.out, t_hidden, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history["loss"].append(float(loss.detach()))
                history["hidden"].append(hidden)
                history["task"].append(task)
                progress.update(bar, advance=1, loss=f"{history['loss'][-1]:.4g}")
                if step % 25 == 0 or step == steps - 1:
                    log.info("[distill] step %d/%d loss %.5g (hidden %.4g, task %.4g)", step + 1, steps, history["loss"][-1],
                             hidden, task)
    finally:
        s_cap.close()
        t_cap.close()
    history["steps"] = len(history["loss"])
    history["seconds"] = round(time.perf_counter() - t0, 3)
    return history


def plot(path: Path, history: Dict[str, Any]) -> Optional[str]:
    """distill.png: the loss per step (and its two terms); None when matplotlib is missing."""
    try:
        # matplotlib only here: optional and slow to import; without it the build keeps its numbers
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log.warning("distill.png not written: %s", e)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(history["loss"]) + 1)
    ax.plot(steps, history["loss"], label="loss")
    ax.plot(steps, history["hidden"], label="hidden-state MSE", alpha=0.7)
    ax.plot(steps, history["task"], label="output term", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title("distill: student (fake-quant) vs teacher (fp32)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


class DistillStep(Step):
    name = "distill"
    Params = DistillParams
    # wherever a quantizing step made torch fake-quant (validation checks that one precedes it on the torch side)
    runs_on = {"torch": TORCH, "trt": TORCH, "ort": TORCH}
    summary = "quantization-aware distillation: trains the fake-quant model to match fp32 on unlabeled text (CPU)"
    must_follow_quantizers = True
    trains = True

    def validate_after(self, before, target) -> None:
        if self.params.train == "scales" and not any(set(SCALES_FORMATS) & set(s.precisions()) for s in before):
            made = sorted({f for s in before for f in s.precisions()})
            raise RecipeError(f"{self.key}.train", f"scales learns {' / '.join(SCALES_FORMATS)} block scales; the "
                              f"steps before distill make {', '.join(made) or 'no quantized format'}",
                              "use train=weights or train=lora")

    def validate_with_repair(self, repair_key: str, before) -> None:
        # the repair re-runs the quantizing steps on the trained float weights (compiler/pipeline.py
        # train_before_repair, with what each step's carry_trained_state keeps): it must quantize them as trained
        if self.params.train == "scales":
            raise RecipeError(f"{self.key}.train", "train=scales learns the 4-bit block scales of every layer, which "
                              f"a repair ({repair_key}) recalibrates on the layers it keeps in 4 bits",
                              "use train=weights or train=lora with repair, or turn repair off")
        for step in before:
            if step.quantizes_compute and not step.requantizes_as_trained():
                algorithm = getattr(step.params, "algorithm", None)
                choices = tuple(step.algorithms_requantized_as_trained)
                raise RecipeError(f"{step.key}.algorithm" if algorithm else repair_key,
                                  f"a repair ({repair_key}) after {self.name} re-quantizes the trained weights, and "
                                  f"{step.name}{f' algorithm={algorithm}' if algorithm else ''} would calibrate them "
                                  "anew (measured: a second rounding that undoes the training)",
                                  f"use {step.key}.algorithm={' / '.join(choices)} (the repair carries their scales "
                                  "over from the training), or turn repair off" if algorithm and choices else
                                  "use a quantizing step a repair can carry over (nvfp4 algorithm=max / mse / "
                                  "four_over_six / local_hessian), or turn repair off")

    def apply_torch(self, model, ctx: StepContext):
        model = self.train_only(model, ctx)
        # the rounding computes what the fake-quant forward did (fix_weight_scales checks it exactly): the held-out
        # fidelity train_only measured is the rounded model's
        ctx.report["nvfp4_weights_rounded"] = finalize(model)
        model.eval()
        metric, before, after = (ctx.report[k] for k in ("fidelity_metric", "fidelity_before", "fidelity_after"))
        if before is not None and after is not None and after < before:
            # measured once: nvfp4_distill on a repaired map (11 FP8 layers) diverged at lr 5e-4 (loss 0.10 -> 0.38)
            log.warning("[distill] the held-out %s fell %.4f -> %.4f: the training made the model worse (loss %.4g -> "
                        "%.4g); try a lower recipe.steps.distill.lr", metric, before, after,
                        ctx.report["loss_first"], ctx.report["loss_last"])
        log.info("[distill] %s: %d steps on %d sentences (%s), %s %.4f -> %.4f%s", self.params.train,
                 ctx.report["steps"], ctx.report["sentences"], ctx.report["stopped"], metric,
                 before or float("nan"), after or float("nan"), " (cached)" if ctx.report["cached"] else "")
        return model

    def train_only(self, model, ctx: StepContext):
        """The training, without rounding the trained weights onto the 4-bit grid (apply_torch does that next): the
        pipeline's repair reads these float weights, to search and build its layer map on the trained model."""
        import torch

        p = self.params
        if ctx.teacher is None or ctx.train is None:
            raise BuildError("distill: the pipeline gave no fp32 teacher or no training text")
        kind = task_kind(ctx.task)
        seed = int(ctx.seed if p.seed is None else p.seed)
        layers = trained_layers(model)
        if not layers:
            raise BuildError("distill: no Linear layer has a modelopt weight quantizer (nothing to train)")
        if p.train == "scales":
            # the learned scales start from the fixed ones: a dynamic (max) NVFP4 weight gets its max scales fixed
            # (fix_weight_scales), its float weight kept (the scales are learned against it, rounded at the end)
            keep = {n: module_weight.detach().clone() for n, module_weight in
                    ((n, model.get_submodule(n).weight) for n in layers)}
            if fix_weight_scales(model):
                mark_for_trt_export(model)
                load_state(model, {f"{n}.weight": w for n, w in keep.items()})
            if not any(getattr(model.get_submodule(n).weight_quantizer, "backend", None) == FIXED_SCALES_BACKEND
                       for n in layers):
                raise BuildError(f"{self.key}.train: scales learns NVFP4 block scales; no layer is NVFP4 here "
                                 "(use train=weights or lora)")
        blocks = blocks_of(model) if p.hidden_weight > 0 else []
        metric, before = fidelity(model, ctx.teacher, ctx.evaluation, kind, ctx.batch_size) \
            if ctx.evaluation is not None else (None, None)
        key = {"student_sha256": state_sha256(model), "teacher_sha256": state_sha256(ctx.teacher),
               "train_sha256": ctx.train.sha256(), "params": dataclasses.asdict(p), "seed": seed, "task": kind.name,
               "layers": layers, "blocks": blocks}

        def build(d: Path) -> None:
            torch.manual_seed(seed)
            params = prepare(model, layers, p, seed)
            history = train(model, ctx.teacher, ctx.train, kind, p, seed, params, blocks)
            merge(model, layers)
            torch.save(trained_state(model, layers), d / STATE_FILE)
            (d / HISTORY_FILE).write_text(json.dumps(history) + "\n")

        cached = False
        if ctx.cache is not None:
            marker = {"built": False}

            def build_once(d: Path) -> None:
                marker["built"] = True
                build(d)

            entry = ctx.cache.get_or_create(CACHE_KIND, key, build_once)
            cached = not marker["built"]
            if cached:
                load_state(model, torch.load(entry / STATE_FILE, weights_only=True))
            history = json.loads((entry / HISTORY_FILE).read_text())
        else:  # no cache (cache.enabled=false): the same files, in a directory that goes away
            with tempfile.TemporaryDirectory(dir=ctx.work_dir) as tmp:
                build(Path(tmp))
                history = json.loads((Path(tmp) / HISTORY_FILE).read_text())
        model.eval()
        _, after = fidelity(model, ctx.teacher, ctx.evaluation, kind, ctx.batch_size) if ctx.evaluation is not None \
            else (None, None)
        png = plot(Path(ctx.run_dir) / "distill.png", history) if ctx.run_dir is not None else None
        ctx.report.update({
            "train": p.train, "sentences": len(ctx.train), "steps": int(history["steps"]),
            "seconds": float(history["seconds"]), "stopped": history["stopped"], "cached": cached,
            "loss_first": history["loss"][0] if history["loss"] else None,
            "loss_last": history["loss"][-1] if history["loss"] else None,
            "trained_layers": len(layers), "hidden_blocks": len(blocks), "nvfp4_weights_rounded": 0,
            "fidelity_metric": metric, "fidelity_before": before, "fidelity_after": after, "plot": png,
            "seed": seed,
        })
        return model
