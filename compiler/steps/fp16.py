"""fp16: half-precision weights and activations -- onnxruntime's float16 converter on the exported graph,
with the range- or type-sensitive nodes found automatically and kept in fp32 (ort, trt), or the torch
module cast to float16 / bfloat16 (torch)."""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, RecipeError
from compiler.core.feeds import synthetic_feed
from compiler.graph.input_flow import graph_vocab
from compiler.graph.io import exceeds_protobuf, infer_shapes, save_onnx
from compiler.runners.sessions import ort_session
from compiler.steps.base import ONNX, TORCH, Step, StepContext, StepParams
from compiler.steps.ort_quant import layer_nodes

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
TRIG_OPS = ("Sin", "Cos")
# ORT error texts that name the failing node, at load ("in node (X)") and at run time ("Name:'X'")
NODE_IN_ERROR = (r"in node \(([^)]+)\)", r"node with name '([^']+)'", r"Name:'([^']+)'", r"[Nn]ode \(([^)]+)\)")


@dataclass
class Params(StepParams):
    # torch side: float16 | bfloat16. On this AVX2 CPU torch float16 runs (MiniLM mean embedding cosine
    # 0.9999992 to fp32, recipes/recipe/fp16.yaml) but ~7x slower than fp32, bfloat16 ~10x slower and less
    # exact (0.9995): float16 is the default.
    # The ONNX side is always float16 (ORT's converter and CPU kernels).
    dtype: str = "float16"
    # keep the rotary-embedding angles (everything that computes the input of Sin/Cos) in fp32: fp16 has a
    # spacing of 0.25 between 256 and 512, so position x frequency loses up to 0.125 rad before the Sin/Cos
    keep_rotary_fp32: bool = True
    block_ops: List[str] = field(default_factory=list)  # op types kept fp32 on top of ORT's default block list
    max_fixes: int = 32  # load/run failures or overflows fixed by blocking nodes before giving up
    # the converted graph's outputs on a probe input may differ from fp32 by this relative L2 error before
    # the overflow search runs (the converter silently clamps constants beyond 65504 to 65504). fp16 itself
    # gives ~1e-3 (MiniLM hidden states: cosine 0.999999), so 1e-2 flags real range damage only
    max_probe_rel_error: float = 0.01

    def problems(self) -> List[Tuple[str, str, str]]:
        out = []
        if self.dtype not in ("float16", "bfloat16"):
            out.append(("dtype", f"bad value {self.dtype!r}", "use float16 or bfloat16"))
        if not self.max_probe_rel_error > 0:
            out.append(("max_probe_rel_error", f"must be > 0, got {self.max_probe_rel_error}", "use e.g. 0.01"))
        if self.max_fixes < 0:
            out.append(("max_fixes", f"must be >= 0, got {self.max_fixes}", "use e.g. 32"))
        return out


# ---------------------------------------------------------------------------------------------------------------
# finding the nodes to keep in fp32


def rotary_nodes(model) -> Set[str]:
    """Sin/Cos nodes and every node upstream of their inputs (positions, frequencies, their Casts and Muls):
    the rotary-angle subgraph, found by walking the graph, whatever the model calls it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: Set[str] = set()
    stack = [n for n in model.graph.node if n.op_type in TRIG_OPS]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return seen


def offending_node(message: str, model) -> List[str]:
    """The fp32 nodes to block for an ORT error message about the converted graph. A Cast the converter
    inserted ('<tensor>_cast_to_fp32_node') maps back to the nodes on either side of its tensor."""
    names = {n.name for n in model.graph.node}
    for pattern in NODE_IN_ERROR:
        for found in re.findall(pattern, message):
            if found in names:
                return [found]
            tensor = re.sub(r"_cast_to_\w+?(_node)?$", "", found)
            if tensor != found:
                hits = [n.name for n in model.graph.node if tensor in n.output or tensor in n.input]
                if hits:
                    return hits
    return []


def drop_fp16_roundtrips(model) -> int:
    """Remove fp32 -> Cast(fp16) -> Cast(fp32) round trips; returns how many. Fills a gap of onnxruntime's
    converter: two adjacent blocked nodes still exchange their tensor through fp16 (it casts every blocked
    node's outputs to fp16 and its inputs back), so a rotary angle kept 'in fp32' was rounded to fp16 between
    its Mul, Concat and Cos, and a value beyond 65504 became inf between two blocked nodes."""
    import onnx

    typed = infer_shapes(model)  # any size: a 2 GB model cannot be serialized for onnx's inference
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}

    def cast_to(node) -> Optional[int]:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename: Dict[str, str] = {}
    dropped = []
    for node in model.graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        up = producer.get(node.input[0])
        if up is None or cast_to(up) != onnx.TensorProto.FLOAT16 or types.get(up.input[0]) != onnx.TensorProto.FLOAT:
            continue
        rename[node.output[0]] = up.input[0]
        dropped.append(node)
    if not dropped:
        return 0
    for node in dropped:
        model.graph.node.remove(node)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # fp16 casts left without consumers go too
    used = {i for n in model.graph.node for i in n.input} | graph_outputs
    for node in [n for n in model.graph.node if cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in used]:
        model.graph.node.remove(node)
    return len(dropped)


def float_tensors(model) -> List[str]:
    """Names of the float32 tensors the nodes produce (from onnx shape inference)."""
    import onnx

    inferred = infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output)}
    return [o for n in model.graph.node for o in n.output if types.get(o) == onnx.TensorProto.FLOAT]


def overflow_nodes(model, feed: Dict[str, np.ndarray]) -> Set[str]:
    """Nodes whose fp32 inputs or outputs leave the fp16 range on the feed: in fp16 they become inf."""
    import onnx

    probe = copy.deepcopy(model)
    names = float_tensors(probe)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    # optimizations off: keep every tensor as it is; past protobuf's 2 GB the probe goes through a file
    # with external data (an InferenceSession on bytes would need the whole proto serialized)
    if exceeds_protobuf(probe):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fp16-probe.") as tmp:
            sess = ort_session(save_onnx(probe, Path(tmp) / "probe.onnx", "always", check=False), opt_level="disable")
            values = dict(zip(names, sess.run(names, feed)))
    else:
        sess = ort_session(probe.SerializeToString(), opt_level="disable")
        values = dict(zip(names, sess.run(names, feed)))
    big = {n for n, v in values.items() if v.size and float(np.max(np.abs(v))) > FP16_MAX}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            arr = onnx.numpy_helper.to_array(init)
            if arr.size and float(np.max(np.abs(arr))) > FP16_MAX:
                big.add(init.name)
    return {n.name for n in model.graph.node if big & (set(n.input) | set(n.output))}


def _run_model(model, feed: Dict[str, np.ndarray]) -> Tuple[Optional[str], Optional[List[np.ndarray]]]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fp16.") as tmp:
        path = save_onnx(model, Path(tmp) / "fp32.onnx", "auto", check=False)
        return _run(path, feed)


def _run(path: Path, feed: Dict[str, np.ndarray]) -> Tuple[Optional[str], Optional[List[np.ndarray]]]:
    """(error message, None) or (None, outputs) for a graph on the feed with ORT's CPU provider."""
    try:
        sess = ort_session(path)
        return None, sess.run(None, feed)
    except Exception as e:
        return str(e), None


def rel_error(outputs: List[np.ndarray], reference: List[np.ndarray]) -> float:
    """Largest relative L2 error over the float outputs (inf when an output is non-finite)."""
    worst = 0.0
    for o, r in zip(outputs, reference):
        o, r = np.asarray(o, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if not np.issubdtype(r.dtype, np.floating):
            continue
        if not np.all(np.isfinite(o)):
            return float("inf")
        worst = max(worst, float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)))
    return worst


def convert_fp16(model, out_path: Path, feed: Dict[str, np.ndarray], op_block_list: List[str],
                 keep_rotary: bool = True, max_fixes: int = 32, max_rel_error: float = 0.01,
                 keep_nodes: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Convert to fp16 (float32 graph inputs/outputs), then load and run the result in ORT on a probe input.
    Every node ORT rejects is put on the block list; when the outputs come out non-finite or further than
    max_rel_error from fp32, every node whose fp32 values leave the fp16 range is blocked; the conversion is
    redone until the graph runs. keep_nodes: node name -> why, kept fp32 from the start. Returns what was
    blocked and why."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    error, reference = _run_model(model, feed)
    if error is not None:
        raise BuildError(f"fp16: onnxruntime cannot run the fp32 graph itself: {error.splitlines()[0][:300]}")
    notes: List[str] = []
    blocked: Dict[str, str] = dict(keep_nodes or {})
    if keep_rotary:
        blocked.update({n: "rotary angle (Sin/Cos input)" for n in rotary_nodes(model)})
    fixes: List[str] = []
    for attempt in range(max_fixes + 1):
        candidate = copy.deepcopy(model)
        # the dynamo exporter types every intermediate tensor in value_info; the converter retypes some of
        # them fp16 where a blocked node still makes fp32, and shape inference then fails ("Inferred elem
        # type differs from existing elem type: (1) vs (10)"). Types are inferred anew without them.
        del candidate.graph.value_info[:]
        # the converter infers types with onnx.shape_inference.infer_shapes, which serializes the model and fails
        # past protobuf's 2 GB: such a model gets its types from its weight-less copy and the converter none
        large = exceeds_protobuf(candidate)
        if large:
            candidate.graph.value_info.extend(infer_shapes(candidate).graph.value_info)
        converted = convert_float_to_float16(candidate, keep_io_types=True, op_block_list=list(op_block_list),
                                             node_block_list=sorted(blocked), disable_shape_infer=large)
        # blocking nodes inserts Casts after their consumers in the node list; ORT needs topological order
        roundtrips = drop_fp16_roundtrips(converted)
        om = OnnxModel(converted)
        om.topological_sort()
        save_onnx(om.model, out_path, "auto", check=False)
        error, outputs = _run(out_path, feed)
        if error is not None:
            culprits = [n for n in offending_node(error, model) if n not in blocked]
            if not culprits:
                raise BuildError(f"fp16: onnxruntime cannot run the fp16 graph and no node to keep in fp32 could "
                                 f"be found in its error: {error.splitlines()[0][:300]}")
            short = error.splitlines()[0][:160]
            blocked.update({n: f"onnxruntime: {short}" for n in culprits})
            fixes.append(f"blocked {', '.join(culprits)}: {short}")
            continue
        err = rel_error(outputs, reference)
        if err > max_rel_error:
            culprits = sorted(overflow_nodes(model, feed) - set(blocked))
            if culprits:
                blocked.update({n: "values beyond fp16 range (|x| > 65504)" for n in culprits})
                fixes.append(f"blocked {len(culprits)} node(s) whose values overflow fp16 (probe error {err:.3g})")
                continue
            if not np.isfinite(err):
                raise BuildError("fp16: the fp16 graph gives non-finite outputs and no fp32 value leaves the fp16 "
                                 "range on the probe input; keep the model in fp32 (recipe=fp32)")
            notes.append(f"probe relative error {err:.3g} > {max_rel_error} with no value beyond the fp16 range: "
                         "fp16 precision itself (the accuracy gate decides)")
        return {"blocked": blocked, "fixes": fixes, "attempts": attempt + 1, "outputs": outputs,
                "roundtrips_removed": roundtrips,
                "reference": reference, "probe_rel_error": err, "notes": notes, "model": om.model}
    raise BuildError(f"fp16: the graph still fails after {max_fixes} fixes ({len(blocked)} node(s) kept fp32); "
                     f"last: {fixes[-1] if fixes else '?'} -- raise recipe.steps.fp16.max_fixes or use recipe=fp32")


def probe_feed(ctx: StepContext, model, n: int = 2) -> Dict[str, np.ndarray]:
    """A small real input for the load-and-run check: the first calibration samples, else synthetic tokens."""
    names = [i.name for i in model.graph.input]
    if ctx.calibration is not None and len(ctx.calibration) and all(k in ctx.calibration.arrays for k in names):
        return {k: np.ascontiguousarray(ctx.calibration.arrays[k][:n]) for k in names}
    return synthetic_feed(names, n, 16, vocab=graph_vocab(model, "input_ids") or 30522)


# ---------------------------------------------------------------------------------------------------------------
# the step


class Fp16Step(Step):
    name = "fp16"
    Params = Params
    runs_on = {"torch": TORCH, "ort": ONNX, "trt": ONNX}
    needs_calibration = False
    summary = "fp16: ORT float16 conversion with fp32 kept where fp16 fails (found by load+run); torch .half()"
    precision = frozenset({"fp16"})
    # what the fp16 rail shows as kept in fp32 (see apply_onnx's report)
    kept_fp32_report_keys = ("blocked_nodes", "blocked_ops", "blocked_reasons", "blocked_op_types",
                             "blocked_node_names")

    def validate(self, info, target: TargetCapabilities) -> None:
        super().validate(info, target)
        if target.runs_onnx and self.params.dtype != "float16":
            raise RecipeError(f"{self.key}.dtype", f"{self.params.dtype} is not runnable on target={target.name} "
                              "(the ONNX side converts to float16)", "use dtype=float16, or target=torch")

    def apply_torch(self, model, ctx: StepContext):
        import torch

        dtype = getattr(torch, self.params.dtype)
        model = model.to(dtype)  # the predictor casts outputs back to float32; token ids stay int64
        params = sum(p.numel() for p in model.parameters())
        ctx.report.update({"dtype": self.params.dtype, "parameters_converted": int(params),
                           "backend": "torch module.to(dtype), eager"})
        return model

    def apply_onnx(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

        model = onnx.load(str(onnx_path), load_external_data=True)
        feed = probe_feed(ctx, model)
        op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.params.block_ops))

        # a layer kept out by with_layer_formats: every node exported from that module stays fp32
        keep = {n: "layer kept fp32 (layer_formats)" for n in layer_nodes(model, self.kept_layers())}
        result = convert_fp16(model, Path(out_path), feed, op_block, self.params.keep_rotary_fp32,
                              int(self.params.max_fixes), float(self.params.max_probe_rel_error), keep)
        cos = [_cosine(a, b) for a, b in zip(result["reference"], result["outputs"])]
        by_node = {n.name: n.op_type for n in model.graph.node}
        blocked = result["blocked"]
        converted = result["model"]
        graph_ops = Counter(n.op_type for n in model.graph.node)
        ctx.report.update({
            "dtype": "float16", "keep_io_types": True,
            "blocked_nodes": len(blocked),
            "blocked_ops": dict(sorted(Counter(by_node.get(n, "?") for n in blocked).items())),
            "blocked_reasons": dict(sorted(Counter(r.split(":")[0] for r in blocked.values()).items())),
            "blocked_op_types": sorted(t for t in op_block if graph_ops.get(t)),  # ORT's list, present in graph
            "fixes": result["fixes"], "attempts": result["attempts"],
            "casts_added": sum(1 for n in converted.graph.node if n.op_type == "Cast") - graph_ops.get("Cast", 0),
            "probe_output_cosine": [round(c, 6) for c in cos],
            "probe_rel_error": round(float(result["probe_rel_error"]), 6),
            "fp16_roundtrips_removed": result["roundtrips_removed"],
        })
        if result["notes"]:
            ctx.report["notes"] = result["notes"]
        if blocked and len(blocked) <= 40:
            ctx.report["blocked_node_names"] = sorted(blocked)
        return Path(out_path)


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
