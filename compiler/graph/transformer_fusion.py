"""onnxruntime's offline transformer fusions as a graph pass (`export.transformer_fusion`): Attention,
EmbedLayerNormalization, BiasGelu, SkipLayerNormalization written into the graph by
`onnxruntime.transformers.optimizer.optimize_model`, which matches whole encoder subgraphs that ORT's online
optimizer (the session's `graph_optimization: all`) leaves apart on a plain export. The fused ops are onnxruntime
contrib ops: only an onnxruntime session runs them (target=ort).

num_heads and hidden_size come from the model's config (ModelInfo), never from the graph or a name."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

from compiler.core.errors import NotRunnableError, RecipeError, did_you_mean
from compiler.core.hashing import onnx_sha256
from compiler.core.logs import library_output
from compiler.graph.io import needs_external_data, save_onnx

MODES = ("none", "bert")
ORDERS = ("before_quantize", "after_quantize")

# model architecture (ModelInfo.architecture, the config's model_type) -> the optimizer's model_type. Measured
# on the tiny models (onnxruntime 1.32, TorchScript export, opset 17): bert and distilbert fuse Attention,
# EmbedLayerNormalization and BiasGelu, roberta Attention and BiasGelu; modernbert (rotary positions, GeGLU)
# fuses no Attention, only Gelu / LayerNormalization that ORT's online optimizer already fuses: refused.
FAMILIES: Dict[str, str] = {"bert": "bert", "roberta": "bert", "distilbert": "bert"}

# a fused op type a recipe can leave out (export.transformer_fusion_off) -> the FusionOptions switches it needs off
FUSIONS: Dict[str, tuple] = {
    "Attention": ("enable_attention",),
    "EmbedLayerNormalization": ("enable_embed_layer_norm",),
    "SkipLayerNormalization": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
    "BiasGelu": ("enable_bias_gelu",),
    "Gelu": ("enable_gelu",),
    "LayerNormalization": ("enable_layer_norm",),
}


def enabled(export_cfg) -> bool:
    """Whether the export section asks for a fusion (the pipeline then applies it; validation checked it runs)."""
    return str(getattr(export_cfg, "transformer_fusion", "none")) != "none"


def check_fusion(export_cfg, info, capabilities) -> None:
    """Validation (before any weights load): the mode, the order and the fusions left out are known values; the
    fusion needs an onnxruntime session (the target's capability) and a model family whose graph it matches."""
    mode = str(export_cfg.transformer_fusion)
    if mode not in MODES:
        raise RecipeError("export.transformer_fusion", f"bad value {mode!r}", f"use {' or '.join(MODES)}")
    order = str(export_cfg.transformer_fusion_order)
    if order not in ORDERS:
        raise RecipeError("export.transformer_fusion_order", f"bad value {order!r}", f"use {' or '.join(ORDERS)}")
    for op in list(export_cfg.transformer_fusion_off or []):
        if str(op) not in FUSIONS:
            raise RecipeError("export.transformer_fusion_off", f"{op!r} is not a fusion it can leave out",
                              did_you_mean(str(op), FUSIONS))
    if mode == "none":
        return
    if not capabilities.ort_session:
        raise NotRunnableError("export.transformer_fusion", f"{mode} writes onnxruntime contrib ops (Attention, "
                               f"BiasGelu, ...) that target={capabilities.name} does not run",
                               "use target=ort, or export.transformer_fusion=none")
    if info.architecture not in FAMILIES:
        raise RecipeError("export.transformer_fusion", f"onnxruntime's {mode} fusions do not match a "
                          f"{info.architecture} graph ({info.name}; they fuse {', '.join(sorted(FAMILIES))})",
                          "use export.transformer_fusion=none")
    if not (info.num_heads > 0 and info.hidden_size > 0):  # the Attention fusion needs both from the config
        raise RecipeError("export.transformer_fusion", f"{info.name}'s config gives no attention heads / hidden size "
                          f"(num_heads={info.num_heads}, hidden_size={info.hidden_size})",
                          "use export.transformer_fusion=none")


def fusion_options(model_type: str, off: List[str]):
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    options = FusionOptions(model_type)
    # the raw 2D mask, as exported: the bert default (MaskIndexEnd, a 1D index of each row's length) is exact
    # only for right-padded batches
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    for op in off:
        for switch in FUSIONS[op]:
            setattr(options, switch, False)
    return options


def fuse(onnx_path: Path, out_path: Path, export_cfg, info, applied_to: str, cache=None) -> tuple[Path, Dict[str, Any]]:
    """The graph with onnxruntime's transformer fusions (export_cfg.transformer_fusion), and what was fused
    (report.json transformer_fusion). info: the model's ModelInfo (num_heads, hidden_size, architecture).
    With a build cache the result is content-addressed by the input graph's bytes and the options."""
    off = sorted(str(o) for o in (export_cfg.transformer_fusion_off or []))
    key = {"graph": onnx_sha256(onnx_path), "mode": str(export_cfg.transformer_fusion),
           "model_type": FAMILIES[info.architecture], "num_heads": int(info.num_heads),
           "hidden_size": int(info.hidden_size), "off": off}
    out_path = Path(out_path)

    def fuse_timed(dst: Path) -> Dict[str, Any]:
        t0 = time.perf_counter()
        facts = _fuse(Path(onnx_path), dst, key)
        return {**facts, "seconds": round(time.perf_counter() - t0, 3)}

    if cache is None or needs_external_data(onnx_path):  # a > 2 GB graph is not copied into the cache
        facts = fuse_timed(out_path)
    else:
        def build(d: Path) -> None:
            (Path(d) / "fusion.json").write_text(json.dumps(fuse_timed(Path(d) / "fused.onnx"), sort_keys=True) + "\n")

        entry = Path(cache.get_or_create("transformer_fusion", key, build))
        shutil.copyfile(entry / "fused.onnx", out_path)
        out_path.chmod(0o644)  # cache entries are read-only; the copy is the build's own
        facts = json.loads((entry / "fusion.json").read_text())
    return out_path, {"mode": key["mode"], "order": str(export_cfg.transformer_fusion_order), "applied_to": applied_to,
                      "model_type": key["model_type"], "num_heads": key["num_heads"],
                      "hidden_size": key["hidden_size"], "off": off, **facts}


def _fuse(src: Path, dst: Path, key: Dict[str, Any]) -> Dict[str, Any]:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    before = Counter(n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node)
    with library_output("transformer_fusion"):  # the optimizer logs its progress and warnings: into cli.log
        # opt_level 0: only the Python fusions; the session applies ORT's own optimizer (target.graph_optimization)
        model = optimize_model(str(src), model_type=key["model_type"], num_heads=key["num_heads"],
                               hidden_size=key["hidden_size"], optimization_options=fusion_options(key["model_type"],
                                                                                                  key["off"]),
                               opt_level=0)
        stats = model.get_fused_operator_statistics()  # counts every node of the op types it fuses to
        model.topological_sort()
    domains = {n.domain for n in model.model.graph.node} - {"", "ai.onnx"}
    for domain in sorted(domains - {o.domain for o in model.model.opset_import}):
        # the optimizer writes com.microsoft nodes without importing the domain: onnx.checker rejects that
        model.model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    save_onnx(model.model, dst, "auto")  # past 2 GB with its tensors in <dst>.data, like every graph of a build
    after = Counter(n.op_type for n in model.model.graph.node)
    # the fused nodes it wrote: LayerNormalization nodes the export already had do not count
    fused = {op: after[op] - before[op] for op in stats if after[op] > before[op]}
    return {"fused": dict(sorted(fused.items())), "nodes_before": int(sum(before.values())),
            "nodes_after": int(sum(after.values()))}


def fused_op_types(onnx_path: Path) -> Dict[str, int]:
    """The fused op types a graph holds (FUSIONS' op types, by count): what a test or a reader checks."""
    import onnx

    counts = Counter(n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)
    return {op: counts[op] for op in FUSIONS if counts.get(op)}
