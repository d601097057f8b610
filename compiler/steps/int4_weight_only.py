"""int4_weight_only: 4-bit block-wise weights, fp32 activations -- onnxruntime's MatMulNBitsQuantizer
(MatMul -> MatMulNBits, the CPU path of Olive and Neural Compressor) on ort, modelopt's
INT4_BLOCKWISE_WEIGHT_ONLY_CFG fake-quant on torch (symmetric blocks only, no int4 kernel: size, not speed)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from compiler.core.capabilities import TargetCapabilities
from compiler.core.errors import BuildError, NotRunnableError, RecipeError
from compiler.graph.io import save_onnx
from compiler.steps.base import ONNX, TORCH, WEIGHTS, Step, StepContext, StepParams
from compiler.steps.modelopt import _mtq, exclude_patterns, quantize_module
from compiler.steps.ort_quant import check_ops_match, exclude_nodes, layer_nodes, quietly
from compiler.steps.torchao_kernels import NoKernel, fake_quant_report

log = logging.getLogger(__name__)

# onnxruntime's algorithms that need nothing beyond onnxruntime and torch: "rtn" is its DEFAULT blockwise
# quantizer (round to nearest per block; its own "RTN" config goes through neural-compressor, not a
# dependency here), "hqq" is Half-Quadratic Quantization (optimizes scale and zero point per block)
ORT_ALGORITHMS = ("rtn", "hqq")
# target=torch: modelopt's calibration algorithms on its INT4 block quantizer (INT4_BLOCKWISE_WEIGHT_ONLY_CFG's
# weights, INT4_AWQ_CFG's algorithms); "rtn" is its max calibration (round to nearest with each block's max).
# The data-driven ones (all but rtn) read the calibration data.
#   awq_lite  per-input-channel scales searched on the activations, folded into the weights (AWQ)
#   awq_clip  each block's clipping range searched to minimize the layer output error
#   awq_full  awq_lite then awq_clip
#   mse       each block's amax searched (0.25x..4x of its max) to minimize the weight's squared error
#   gptq      weights rounded column by column, the error spread over the rest (second-order, GPTQ)
TORCH_ALGORITHMS = {"rtn": "max", "awq_lite": {"method": "awq_lite"}, "awq_clip": {"method": "awq_clip"},
                    "awq_full": {"method": "awq_full"}, "mse": {"method": "mse"}, "gptq": {"method": "gptq"}}
ALGORITHMS = tuple(dict.fromkeys(ORT_ALGORITHMS + tuple(TORCH_ALGORITHMS)))
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8


@dataclass
class Params(StepParams):
    algorithm: str = "rtn"  # ort: rtn | hqq; torch: rtn | awq_lite | awq_clip | awq_full | mse | gptq
    block_size: int = 32  # weights per scale along the input dimension (power of two, >= 16)
    is_symmetric: bool = False  # rtn: zero point 0 (hqq is always asymmetric)
    # MatMulNBits' compute precision on the CPU; None: onnxruntime's default (fp32). 4 = int8 compute
    accuracy_level: int | None = None
    op_types_to_quantize: list[str] = field(default_factory=lambda: ["MatMul"])
    exclude: list[str] = field(default_factory=list)  # extra node / module patterns kept fp32 (on model.exclude)

    def problems(self) -> list[tuple[str, str, str]]:
        out = []
        if self.algorithm not in ALGORITHMS:
            out.append(("algorithm", f"bad value {self.algorithm!r}", f"use one of {list(ALGORITHMS)}"))
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            out.append(("block_size", f"bad value {self.block_size}", "use a power of two >= 16 (e.g. 32, 64, 128)"))
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            out.append(("accuracy_level", f"bad value {self.accuracy_level}",
                        "use null or 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8)"))
        if not self.op_types_to_quantize or set(self.op_types_to_quantize) - {"MatMul", "Gather"}:
            out.append(("op_types_to_quantize", f"bad value {list(self.op_types_to_quantize)}",
                        "use [MatMul] (optionally with Gather)"))
        return out


class Int4WeightOnlyStep(Step):
    name = "int4_weight_only"
    Params = Params
    runs_on: ClassVar[dict[str, str]] = {"ort": ONNX, "torch": TORCH}
    needs_calibration = False
    summary = "int4 block-wise weights, fp32 activations: onnxruntime MatMulNBits (ort), modelopt fake-quant (torch)"

    KEY = "recipe.steps.int4_weight_only"

    precision = frozenset({"int4"})
    trainable_fake_quant = True  # its torch side: modelopt TensorQuantizers (distill trains them)
    quantizes_compute = True  # MatMulNBits replaces the MatMuls (weights quantized; activations stay fp32)
    operands = frozenset({WEIGHTS})

    def validate(self, info, target: TargetCapabilities) -> None:
        super().validate(info, target)
        p = self.params
        # target-dependent: a hole in a sweep's matrix (NotRunnableError), not a broken recipe
        if not target.runs_onnx and p.algorithm not in TORCH_ALGORITHMS:
            raise NotRunnableError(f"{self.KEY}.algorithm", f"{p.algorithm} is not runnable on target={target.name} "
                              "(an onnxruntime MatMulNBits algorithm)",
                              f"use one of {list(TORCH_ALGORITHMS)} or target=ort")
        if self.runs_on.get(target.name) == ONNX and p.algorithm not in ORT_ALGORITHMS:
            raise NotRunnableError(f"{self.KEY}.algorithm", f"{p.algorithm} is not runnable on target={target.name} "
                              "(a modelopt calibration, torch side only)",
                              f"use one of {list(ORT_ALGORITHMS)} or target=torch")
        if not target.runs_onnx and not p.is_symmetric:
            # modelopt's int4 blocks are symmetric (scale = amax / 7, no zero point); running them for an
            # asymmetric recipe measured MiniLM at cosine 0.960 where the ort build it stands for gave 0.976
            raise NotRunnableError(f"{self.KEY}.is_symmetric", f"asymmetric int4 (is_symmetric=false) is not runnable "
                                   f"on target={target.name} (modelopt's int4 weight-only has no zero point)",
                                   "use target=ort, or is_symmetric=true for symmetric blocks on torch")
        if not target.runs_onnx and p.accuracy_level is not None:
            raise RecipeError(f"{self.KEY}.accuracy_level", f"is an onnxruntime MatMulNBits option, not runnable on "
                              f"target={target.name}", "use accuracy_level=null or target=ort")

    def __init__(self, params):
        super().__init__(params)
        # rtn / hqq read no data; modelopt's other calibrations (torch) read the calibration set
        self.needs_calibration = str(params.algorithm) not in ORT_ALGORITHMS

    def own_exclude(self) -> list[str]:
        return list(self.params.exclude or [])

    def exclude(self, ctx: StepContext) -> list[str]:
        return list(ctx.exclude or []) + list(self.params.exclude or [])

    # -- ONNX: onnxruntime MatMulNBitsQuantizer --------------------------------------------------------------
    def apply_onnx(self, onnx_path: Path, out_path: Path, ctx: StepContext) -> Path:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        p = self.params
        model = onnx.load(str(onnx_path), load_external_data=True)
        check_ops_match(model, p.op_types_to_quantize, self.KEY)
        excluded = sorted(set(exclude_nodes(model, self.exclude(ctx), list(p.op_types_to_quantize)))
                          | set(layer_nodes(model, self.kept_layers(), list(p.op_types_to_quantize))))
        ops = tuple(p.op_types_to_quantize)
        if p.algorithm == "hqq":
            algo = nbits.HQQWeightOnlyQuantConfig(block_size=int(p.block_size), bits=4, op_types_to_quantize=ops)
        else:
            algo = nbits.DefaultWeightOnlyQuantConfig(block_size=int(p.block_size), is_symmetric=bool(p.is_symmetric),
                                                      accuracy_level=p.accuracy_level, op_types_to_quantize=ops)
        quantizer = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=int(p.block_size),
                                               is_symmetric=bool(p.is_symmetric), accuracy_level=p.accuracy_level,
                                               nodes_to_exclude=excluded, op_types_to_quantize=ops, algo_config=algo)
        quietly(quantizer.process)
        out = quantizer.model.model
        count = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
        if count == 0:
            raise BuildError(f"{self.KEY}: MatMulNBitsQuantizer replaced no MatMul (it takes those with a constant "
                             f"2-D weight; excluded: {len(excluded)})")
        left = sum(1 for n in out.graph.node if n.op_type == "MatMul")
        ctx.report.update({"backend": f"onnxruntime MatMulNBitsQuantizer ({p.algorithm}, MatMulNBits)",
                           "block_size": int(p.block_size), "accuracy_level": p.accuracy_level,
                           "is_symmetric": bool(p.is_symmetric), "quantized": count, "matmul_left_fp32": left,
                           "excluded_nodes": len(excluded)})
        return save_onnx(out, out_path, "auto")

    # -- torch: modelopt INT4_BLOCKWISE_WEIGHT_ONLY_CFG ------------------------------------------------------
    def torch_kernel(self) -> NoKernel:
        return NoKernel("int4 weight-only: torchao 0.18's int4 kernels are CUDA (Int4WeightOnlyConfig: tinygemm, "
                        "mslk); its x86 CPU int4 tensor is a prototype (PrototypeInt4WeightOnlyConfig) with "
                        "asymmetric blocks, not this step's symmetric ones or its calibrations; torch's CPU int4 "
                        "product (aten._weight_int4pack_mm_for_cpu) ran 143x slower than fp32 in fp32. target=torch "
                        "stores the weights as 4-bit codes, dequantized around an fp32 product at every call "
                        "(compiler/numerics/int4_linear.py): size, not speed")

    def apply_torch(self, model, ctx: StepContext):
        cfg = copy.deepcopy(_mtq().INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and isinstance(entry.get("cfg"), dict):
                entry["cfg"] = {**entry["cfg"], "block_sizes": {-1: int(self.params.block_size), "type": "static"}}
        algorithm = str(self.params.algorithm)
        # layer_formats: the layers with_layer_formats kept out (fp32) stay out here too, as on the ort side
        quantize_module(model, cfg, ctx, algorithm=copy.deepcopy(TORCH_ALGORITHMS[algorithm]),
                        exclude=exclude_patterns(ctx) + list(self.params.exclude or []),
                        layer_formats=self.layer_formats or None)
        ctx.report.update({"backend": "modelopt INT4_BLOCKWISE_WEIGHT_ONLY_CFG (fake-quant)",
                           "block_size": int(self.params.block_size)})
        if algorithm != "rtn":  # the default build's report keeps its keys
            ctx.report["algorithm"] = algorithm
        if not ctx.target.runs_onnx:
            ctx.report.update(fake_quant_report(self.torch_kernel().reason))
        return model
