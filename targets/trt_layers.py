"""The TensorRT engine inspector's per-layer report, read as data: which layers run in which precision,
the quantized fraction and its verdict, and the Q/DQ content of the graph the engine was built from."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Ordered: narrow formats before the wide names they contain (FLOAT8 before FLOAT, UINT8 before INT8).
_DTYPE_RULES = [
    (("FP4", "FLOAT4", "E2M1"), "fp4"),
    (("FP8", "FLOAT8", "E4M3", "E5M2"), "fp8"),
    (("INT4",), "int4"),
    (("UINT8",), "index"),
    (("INT8",), "int8"),
    (("BFLOAT16", "BF16"), "bf16"),
    (("FP16", "HALF"), "fp16"),
    (("FP32", "FLOAT"), "fp32"),
    (("INT32", "INT64", "INT16", "BOOL", "UINT"), "index"),
]
QUANTIZED_LAYER_PRECISIONS = ("fp4", "int4", "fp8", "int8")
FLOAT_LAYER_PRECISIONS = ("bf16", "fp16", "fp32")
_GEMM = re.compile(r"matrixmultiply|matmul|gemm|convolution|fullyconnected|\bconv", re.IGNORECASE)
_QDQ = re.compile(r"quantize", re.IGNORECASE)
_DATA = re.compile(r"^(reformat|shuffle|noop|constant|shape|slice|concatenation|gather|identity|cast|"
                   r"resize|padding|fill|scatter|assertion)", re.IGNORECASE)


def dtype_class(text: str | None) -> str | None:
    """Map an inspector format/datatype string ('Row major linear FP32', 'Channel major INT8 format ...',
    'Half', TensorRT 11's separate 'Datatype') to fp4 | int4 | fp8 | int8 | bf16 | fp16 | fp32 | index."""
    if not text:
        return None
    upper = str(text).upper()
    for keys, cls in _DTYPE_RULES:
        if any(k in upper for k in keys):
            return cls
    return None


def tensor_precision(tensor: Mapping[str, Any]) -> str | None:
    # TensorRT <= 10: "Format/Datatype"; TensorRT 11 split it into "Datatype" and "Format"
    if "Format/Datatype" in tensor:
        return dtype_class(tensor["Format/Datatype"])
    return dtype_class(" ".join(str(tensor[k]) for k in ("Datatype", "Format") if tensor.get(k)))


def _pick(classes: Sequence[str | None]) -> str | None:
    present = [c for c in classes if c]
    for p in QUANTIZED_LAYER_PRECISIONS + FLOAT_LAYER_PRECISIONS:
        if p in present:
            return p
    return "index" if present else None


def classify_layer(layer: Any) -> dict[str, Any]:
    """One inspector layer -> {name, type, kind: gemm | qdq | data | fused | other, precision}.
    A layer's precision is the narrowest format among its inputs and weights (a fused int8 GEMM reads
    int8 and writes fp16/fp32); its outputs decide only when the inputs say nothing."""
    if not isinstance(layer, Mapping):  # ProfilingVerbosity.LAYER_NAMES_ONLY: just a name
        return {"name": str(layer), "type": "?", "kind": "other", "precision": "unknown"}
    name = str(layer.get("Name", "?"))
    ltype = str(layer.get("ParameterType") or layer.get("LayerType") or "?")
    subtype = str(layer.get("LayerType", ""))
    ins = [tensor_precision(t) for t in layer.get("Inputs") or [] if isinstance(t, Mapping)]
    outs = [tensor_precision(t) for t in layer.get("Outputs") or [] if isinstance(t, Mapping)]
    weights = [dtype_class(layer[k].get("Type")) for k in ("Weights",) if isinstance(layer.get(k), Mapping)]
    precision = _pick(ins + weights) or _pick(outs) or "unknown"
    if precision == "index" and _pick(outs) not in (None, "index"):
        precision = _pick(outs)  # e.g. an embedding Gather: int64 ids in, floats out
    text = f"{ltype} {subtype}"
    if subtype.lower() == "myelin" or name.startswith("{ForeignNode"):
        kind = "fused"  # a Myelin foreign node: many ONNX nodes, its inner precisions not listed
    elif _QDQ.search(text) or (_QDQ.search(name) and not _GEMM.search(text)):
        kind = "qdq"
    elif _GEMM.search(text) or _GEMM.search(name):
        kind = "gemm"
    elif _DATA.match(ltype) or _DATA.match(subtype):
        kind = "data"
    else:
        kind = "other"
    return {"name": name, "type": ltype, "kind": kind, "precision": precision}


def summarize_layers(engine_info: Any) -> dict[str, Any]:
    """The engine inspector's get_engine_information(LayerInformationFormat.JSON) -> which layers run in
    which precision, and the fraction that run quantized. The fraction's basis is the matmul/conv layers
    when the engine names any (these are what quantization is for), else every compute layer."""
    data = json.loads(engine_info) if isinstance(engine_info, (str, bytes)) else engine_info
    raw = data.get("Layers", []) if isinstance(data, Mapping) else list(data or [])
    layers = [classify_layer(layer) for layer in raw]
    detailed = any(isinstance(layer, Mapping) for layer in raw)

    def hist(items):
        out: dict[str, int] = {}
        for it in items:
            out[it["precision"]] = out.get(it["precision"], 0) + 1
        return dict(sorted(out.items()))

    gemm = [layer for layer in layers if layer["kind"] == "gemm" and layer["precision"] not in ("unknown", "index")]
    compute = [layer for layer in layers if layer["kind"] in ("gemm", "other") and layer["precision"] not in ("unknown", "index")]
    basis_name, basis = ("matmul/conv layers", gemm) if gemm else ("compute layers", compute)
    quantized = [layer for layer in basis if layer["precision"] in QUANTIZED_LAYER_PRECISIONS]
    fraction = (len(quantized) / len(basis)) if basis else None
    return {
        "layers": len(layers),
        "detailed": detailed,
        "by_precision": hist(layers),
        "by_kind": {k: sum(1 for layer in layers if layer["kind"] == k) for k in ("gemm", "qdq", "data", "fused", "other")},
        "gemm_by_precision": hist(gemm),
        "fraction_basis": basis_name,
        "basis_layers": len(basis),
        "quantized_layers": len(quantized),
        "quantized_layer_fraction": fraction,
        "high_precision_layers": [layer["name"] for layer in basis if layer["precision"] in FLOAT_LAYER_PRECISIONS][:20],
        "per_layer": layers,
    }


def quantization_verdict(summary: Mapping[str, Any], graph_quantized: bool, min_fraction: float
                         ) -> tuple[str, str]:
    """('ok' | 'warn' | 'fail', message). Fail when target.min_quantized_layer_fraction asks for more
    quantized layers than the engine has; warn when a quantized recipe left most layers in fp16/fp32 --
    the usual cause of "INT8 is slower than FP16" in TensorRT (Q/DQ placed where TensorRT cannot fuse it)."""
    frac = summary.get("quantized_layer_fraction")
    basis = summary.get("fraction_basis", "layers")
    if frac is None:
        why = ("the engine was built without detailed profiling verbosity" if not summary.get("detailed")
               else "its layers are fused Myelin nodes whose inner precisions the inspector does not list")
        msg = f"per-layer precision unknown: {why}"
        if min_fraction > 0:
            return "fail", (f"target.min_quantized_layer_fraction={min_fraction} cannot be checked: {msg} -- "
                            "set target.min_quantized_layer_fraction=0 to build anyway")
        return ("warn" if graph_quantized else "ok"), msg
    n_q, n = summary.get("quantized_layers", 0), summary.get("basis_layers", 0)
    high = {k: v for k, v in summary.get("gemm_by_precision" if basis.startswith("matmul") else "by_precision",
                                         {}).items() if k in FLOAT_LAYER_PRECISIONS}
    high_s = ", ".join(f"{v} in {k}" for k, v in high.items()) or "none"
    state = f"{n_q} of {n} {basis} run quantized ({frac:.0%}); high precision: {high_s}"
    if min_fraction > 0 and frac < min_fraction:
        return "fail", (f"{state}: below target.min_quantized_layer_fraction={min_fraction} -- check the "
                        f"Q/DQ placement (engine.layers.json lists every layer's precision), or lower the threshold")
    if graph_quantized and frac < 0.5:
        return "warn", (f"quantized recipe, but {state}: TensorRT kept most of them in high precision, so "
                        "expect this engine to be no faster than fp16 (see engine.layers.json)")
    if not graph_quantized:
        return "ok", f"{state} (the graph has no Q/DQ nodes)"
    return "ok", state


def graph_quantization(onnx_path: Path) -> dict[str, Any]:
    """Q/DQ nodes in the TensorRT-ready graph, by op type, and its custom-domain ops."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    qdq: dict[str, int] = {}
    custom = set()
    for node in model.graph.node:
        if "quantize" in node.op_type.lower() or node.op_type.startswith("TRT_FP4"):
            qdq[node.op_type] = qdq.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            custom.add(f"{node.domain}::{node.op_type}")
    return {"qdq_nodes": int(sum(qdq.values())), "qdq_ops": dict(sorted(qdq.items())), "custom_ops": sorted(custom)}
