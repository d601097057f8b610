"""Lower modelopt's FP8 export (TensorRT custom ops trt::TRT_FP8QuantizeLinear / TRT_FP8DequantizeLinear) to
standard ONNX QuantizeLinear / DequantizeLinear with float8e4m3fn zero points (opset >= 19), weights stored
as fp8 initializers, so ONNX Runtime's CPU provider runs the graph."""

from __future__ import annotations

import logging
from typing import Dict

from compiler.core.formats import number_format

log = logging.getLogger(__name__)

MIN_OPSET = number_format("fp8").onnx_opset  # QuantizeLinear / DequantizeLinear accept float8 types from 19 on
TRT_Q, TRT_DQ = "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"


def count_trt_fp8_ops(model) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in (TRT_Q, TRT_DQ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def lower_trt_fp8(model, compress_weights: bool = True):
    """The ModelProto with every TRT FP8 Q/DQ replaced by its standard ONNX equivalent.

    Semantics match: TRT_FP8QuantizeLinear(x, s) = saturate_e4m3(x / s) == QuantizeLinear(x, s,
    zero_point=float8e4m3fn(0), saturate=1) (opset 19), and the DQ is x * s in both.

    compress_weights: modelopt's FP8QuantExporter.compress_weights first turns each weight's
    fp32-initializer -> Q -> DQ into an fp8 initializer -> DequantizeLinear (4x smaller, Transpose folded).

    Fills a gap in modelopt 0.47: its FP8QuantExporter.post_process does this renaming but also rewrites
    attention for TensorRT's MHA fusion (moves Mul/Transpose across Q/DQ, adds an fp8 Q/DQ after every
    Softmax), which changes the numerics away from the torch fake-quant model the build is checked
    against; ORT gains nothing from it. Here only the op lowering is done."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if compress_weights:
        from modelopt.onnx.export import FP8QuantExporter

        model = _quiet(FP8QuantExporter.compress_weights, model)
    graph = gs.import_onnx(model)
    lowered = 0
    for node in graph.nodes:
        if node.domain == "trt" or node.op in (TRT_Q, TRT_DQ):
            if node.op == TRT_Q:
                node.op = "QuantizeLinear"
                if len(node.inputs) == 2:
                    zp = onnx.TensorProto()
                    zp.data_type = onnx.TensorProto.FLOAT8E4M3FN
                    zp.raw_data = b"\x00"  # scalar zero: per-tensor, like the scale
                    node.inputs.append(gs.Constant(f"{node.name}/zero_point", LazyValues(zp)))
                node.attrs["saturate"] = 1
                # the exporter typed the custom op's output uint8; QuantizeLinear's is the zero point's type
                for out in node.outputs:
                    out.dtype = onnx.TensorProto.FLOAT8E4M3FN
            elif node.op == TRT_DQ:
                node.op = "DequantizeLinear"
            elif node.op not in ("QuantizeLinear", "DequantizeLinear"):
                continue  # another TensorRT op: left for the caller's check to report
            node.domain = None  # compress_weights renames its weight DQs but keeps the trt domain
            lowered += 1
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    # drop the custom domain and make sure the default domain is new enough for float8 Q/DQ
    keep = [o for o in out.opset_import if o.domain not in ("trt",)]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    for o in out.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < MIN_OPSET:
            raise ValueError(f"graph opset {o.version} < {MIN_OPSET}: float8 QuantizeLinear needs opset >= {MIN_OPSET}")
    remaining = count_trt_fp8_ops(out)
    if remaining:
        raise RuntimeError(f"TRT FP8 ops left after lowering: {remaining}")
    log.info("lowered %d TensorRT FP8 Q/DQ ops to standard ONNX", lowered)
    return out


def _quiet(fn, *args):
    """modelopt's ONNX exporters print progress to stdout; keep the build's console for qcompile."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)
