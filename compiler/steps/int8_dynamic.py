"""int8_dynamic: int8 weights with activations quantized on the fly, per batch -- onnxruntime's
quantize_dynamic on the exported graph (the common blog path, kept for comparison) or torchao's dynamic int8
activation x int8 weight Linear (aten._int_mm) for target=torch."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, RecipeError
from compiler.core.patterns import matches_any
from compiler.graph.io import needs_external_data
from compiler.steps.base import ACTIVATIONS, ONNX, TORCH, WEIGHTS, Step, StepContext, StepParams
from compiler.steps.torchao_kernels import TorchKernel, apply_kernel
from compiler.steps.ort_quant import (
    check_ops_match,
    exclude_nodes,
    layer_nodes,
    linear_ops_found,
    preprocess,
    quantized_coverage,
    quietly,
)

log = logging.getLogger(__name__)


@dataclass
class Params(StepParams):
    # the exporter writes nn.Linear as MatMul (+Add); other exporters and models emit Gemm: quantize both
    op_types_to_quantize: list[str] = field(default_factory=lambda: ["MatMul", "Gemm"])
    # per-output-channel weight scales (torch: torchao PerRow weights and per-token activations; false: PerTensor
    # both). Measured on MiniLM (128 sentences, mean embedding cosine to fp32; recipes/recipe/int8_dynamic.yaml):
    # ort 0.966 per tensor -> 0.993 per channel; torch (torch.ao, before torchao) 0.949 -> 0.978
    per_channel: bool = True
    weight_type: str = "int8"  # ort: int8 | uint8; torch: int8 only (qint8)
    reduce_range: bool = False  # ort: 7-bit weights, for CPUs without VNNI
    preprocess: bool = False  # the blog path quantizes the exported graph as is

    def problems(self) -> list[tuple[str, str, str]]:
        out = []
        if self.weight_type not in ("int8", "uint8"):
            out.append(("weight_type", f"bad value {self.weight_type!r}", "use int8 or uint8"))
        if not self.op_types_to_quantize:
            out.append(("op_types_to_quantize", "is empty", "use e.g. [MatMul, Gemm]"))
        return out


class Int8DynamicStep(Step):
    name = "int8_dynamic"
    Params = Params
    runs_on = {"ort": ONNX, "torch": TORCH}
    needs_calibration = False
    summary = "dynamic int8: onnxruntime quantize_dynamic (ort) or torchao int8 weights, int8 x int8 products (torch)"

    precision = frozenset({"int8"})
    quantizes_compute = True
    operands = frozenset({WEIGHTS, ACTIVATIONS})  # activations scaled per run from their values

    def validate(self, info, target: TargetCapabilities) -> None:
        super().validate(info, target)
        if not target.runs_onnx and self.params.weight_type != "int8":
            raise RecipeError(f"{self.key}.weight_type", f"{self.params.weight_type} is not runnable on "
                              f"target={target.name} (torchao's dynamic int8 Linear has int8 weights only)",
                              "use weight_type=int8")

    # -- torch: torchao int8 x int8 kernels -------------------------------------------------------------------
    def torch_kernel(self) -> TorchKernel:
        # torchao quantizes each row of the activation on the fly (per token) and multiplies int8 x int8 with
        # aten._int_mm. Measured on MiniLM (128 sentences, mean embedding cosine to fp32): 0.994, where torch.ao's
        # per-tensor dynamic Linear (this step's torch path before torchao) gave 0.978
        gran = "per_row" if self.params.per_channel else "per_tensor"
        return TorchKernel("Int8DynamicActivationInt8WeightConfig", {"granularity": gran},
                           compute=f"int8 x int8 -> int32 (aten._int_mm), activation scales {gran.replace('_', ' ')} "
                                   "computed per call")

    def apply_torch(self, model, ctx: StepContext):
        import torch

        linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        kept = set(self.kept_layers())
        chosen = [n for n in linears if not matches_any(n, ctx.exclude) and n not in kept]
        if not chosen:
            raise BuildError(f"{self.key}: no nn.Linear left to quantize: the model has {len(linears)} and the "
                             f"exclude patterns {ctx.exclude} match all of them")
        ctx.report.update(apply_kernel(model, self.torch_kernel(), chosen, self.key))
        ctx.report["per_channel"] = bool(self.params.per_channel)
        return model

    # -- ONNX: onnxruntime quantize_dynamic -------------------------------------------------------------------
    def apply_onnx(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        p = self.params
        fp32 = onnx.load(str(onnx_path), load_external_data=False)
        check_ops_match(fp32, p.op_types_to_quantize, self.key)
        graph = Path(onnx_path)
        if p.preprocess:
            work_dir = Path(ctx.work_dir or tempfile.mkdtemp(prefix="qcompile."))
            graph = preprocess(graph, work_dir / f"{Path(out_path).stem}.pre.onnx", ctx.report, ctx.cache)
        prepared = onnx.load(str(graph), load_external_data=False)
        excluded = sorted(set(exclude_nodes(prepared, ctx.exclude))
                          | set(layer_nodes(prepared, self.kept_layers(), list(p.op_types_to_quantize))))
        quietly(quantize_dynamic, str(graph), str(out_path), op_types_to_quantize=list(p.op_types_to_quantize),
                 per_channel=bool(p.per_channel), reduce_range=bool(p.reduce_range),
                 weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[p.weight_type],
                 nodes_to_exclude=excluded, use_external_data_format=needs_external_data(graph),
                 # fp32 where shape inference gives no type: the outputs of onnxruntime contrib ops
                 # (export.transformer_fusion's Attention, EmbedLayerNormalization) that onnx cannot infer
                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        quantized = onnx.load(str(out_path), load_external_data=False)
        coverage = quantized_coverage(prepared, quantized, p.op_types_to_quantize)
        if coverage["quantized"] == 0:
            raise BuildError(f"{self.key}: quantize_dynamic quantized none of the {coverage['total']} "
                             f"{'/'.join(p.op_types_to_quantize)} nodes (it takes only those with a constant weight; "
                             f"excluded: {len(excluded)}); the graph's linear layers are {linear_ops_found(prepared)}")
        # dynamic mode quantizes only MatMuls with a constant weight (MatMulConstBOnly): the activation x
        # activation attention MatMuls stay fp32, so the fraction is below 1 by design
        ctx.report.update({"backend": "onnxruntime quantize_dynamic (QOperator, MatMulInteger)",
                           "weight_type": p.weight_type, "per_channel": bool(p.per_channel),
                           "op_types_to_quantize": list(p.op_types_to_quantize), "excluded_nodes": len(excluded),
                           **coverage})
        return Path(out_path)
