"""Whether an ONNX node or a torch module is quantized, decided in one place: one table of onnxruntime's and
ONNX's quantized op types with what each does, and the module checks (torch.ao quantized modules, modelopt
quantizers). The rails, the targets and the repair ask these helpers instead of keeping op lists of their own."""

from __future__ import annotations

# what a quantized op does; an op type not in the table is matched by name (QLinear*, *Integer, TRT_*)
QDQ = "qdq"  # the standard quantization boundary: QuantizeLinear / DequantizeLinear
INT8_COMPUTE = "int8_compute"  # multiplies 8-bit integers (onnxruntime's CPU int8 kernels)
NBIT_COMPUTE = "nbit_compute"  # 4-bit weight kernels (MatMulNBits, bitsandbytes)
GPU_INT8_COMPUTE = "gpu_int8_compute"  # CUDA-only int8 matrix products
OTHER = "other"  # quantized tensors in, not a matrix product (QOperator element-wise ops, dynamic quantization)

QUANTIZED_OPS: dict[str, str] = {
    "QuantizeLinear": QDQ, "DequantizeLinear": QDQ,
    "MatMulInteger": INT8_COMPUTE, "QLinearMatMul": INT8_COMPUTE, "DynamicQuantizeMatMul": INT8_COMPUTE,
    "MatMulIntegerToFloat": INT8_COMPUTE, "QGemm": INT8_COMPUTE, "QAttention": INT8_COMPUTE,
    "QLinearConv": INT8_COMPUTE, "ConvInteger": INT8_COMPUTE,
    "MatMulNBits": NBIT_COMPUTE, "MatMulBnb4": NBIT_COMPUTE,
    "QOrderedMatMul": GPU_INT8_COMPUTE,
    "DynamicQuantizeLinear": OTHER, "DynamicQuantizeLSTM": OTHER, "QOrderedAttention": OTHER,
    "QLinearAdd": OTHER, "QLinearMul": OTHER, "QLinearSoftmax": OTHER, "QLinearSigmoid": OTHER,
    "QLinearLeakyRelu": OTHER, "QLinearConcat": OTHER, "QLinearGlobalAveragePool": OTHER,
    "QLinearAveragePool": OTHER, "QLinearReduceMean": OTHER, "QLinearWhere": OTHER, "QEmbedLayerNormalization": OTHER,
}
QDQ_OPS = tuple(op for op, what in QUANTIZED_OPS.items() if what == QDQ)
# float matrix products: quantized when a dequantized weight feeds them
FLOAT_COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv"})
QUANTIZED_COMPUTE_OPS = frozenset(op for op, what in QUANTIZED_OPS.items()
                                  if what in (INT8_COMPUTE, NBIT_COMPUTE, GPU_INT8_COMPUTE))
INT8_COMPUTE_OPS = frozenset(op for op, what in QUANTIZED_OPS.items() if what == INT8_COMPUTE)


def is_quantized_node(op_type: str) -> bool:
    """The node carries quantized arithmetic or a quantization boundary: Q/DQ, onnxruntime's quantized ops
    (QOperator QLinear*, *Integer, contrib), TensorRT's TRT_* quantize custom ops."""
    return op_type in QUANTIZED_OPS or op_type.startswith(("QLinear", "TRT_")) or op_type.endswith("Integer")


def is_qoperator(op_type: str) -> bool:
    """A quantized op other than the standard Q/DQ boundary and TensorRT's own ops (what an explicit-quantization
    graph for TensorRT must not hold)."""
    return is_quantized_node(op_type) and op_type not in QDQ_OPS and not op_type.startswith("TRT_")


def is_quantized_compute(op_type: str) -> bool:
    """A matrix product computed on quantized operands by the op itself (int8 or 4-bit kernels)."""
    return op_type in QUANTIZED_COMPUTE_OPS


def is_int8_compute(op_type: str) -> bool:
    """A matrix product on 8-bit integers in onnxruntime's CPU kernels."""
    return op_type in INT8_COMPUTE_OPS


def is_dequantize(op_type: str) -> bool:
    """DequantizeLinear in any domain, and TensorRT's TRT_*DequantizeLinear custom ops."""
    return "Dequantize" in op_type


# -- torch modules ---------------------------------------------------------------------------------------------

def is_torch_quantized(module) -> bool:
    """A torch.ao quantized Linear / Conv (static or dynamic), a layer whose weight is a torchao quantized
    tensor (its linear runs torchao's kernels), or the CPU int8 Linear target=torch lowers those to."""
    cls = type(module)
    return (".quantized." in f"{cls.__module__}." and cls.__name__ in ("Linear", "Conv1d", "Conv2d")
            or torchao_weight(module) is not None or is_lean_int8_linear(module))


def is_lean_int8_linear(module) -> bool:
    """compiler.numerics.int8_linear's Int8DynamicLinear / Int8StaticLinear (checked by name: this module does not
    import torch)."""
    cls = type(module)
    return cls.__name__ in ("Int8DynamicLinear", "Int8StaticLinear") and cls.__module__ == "compiler.numerics.int8_linear"


def is_int4_dequant_linear(module) -> bool:
    """compiler.numerics.int4_linear's Int4DequantLinear: int4 codes dequantized around an fp32 product (modelopt's
    int4 weight-only fake-quant numbers, in a form torch.export traces)."""
    cls = type(module)
    return cls.__name__ == "Int4DequantLinear" and cls.__module__ == "compiler.numerics.int4_linear"


def torchao_weight(module):
    """The module's weight when it is a torchao tensor subclass (torchao.quantization.quantize_ put it there)."""
    w = getattr(module, "weight", None)
    return w if w is not None and type(w).__module__.startswith("torchao.") else None


def enabled_quantizers(module) -> list:
    """The module's modelopt weight / input quantizers that are switched on."""
    quantizers = [getattr(module, a, None) for a in ("weight_quantizer", "input_quantizer")]
    return [q for q in quantizers if q is not None and bool(getattr(q, "is_enabled", False))]


def is_quantized_module(module) -> bool:
    """A torch quantized module, or a layer with an enabled modelopt quantizer (fake-quant) or lowered from one."""
    return is_torch_quantized(module) or is_int4_dequant_linear(module) or bool(enabled_quantizers(module))


def computes_in_int8(module) -> bool:
    """The layer multiplies 8-bit integers: a torch.ao quantized Linear, a torchao int8 weight that quantizes its
    activations, or modelopt input and weight quantizers both on at 8 bits (W8A8)."""
    cls = type(module)
    if cls.__module__.startswith("torch.ao.nn.quantized") and cls.__name__ == "Linear" or is_lean_int8_linear(module):
        return True
    w = torchao_weight(module)
    if w is not None:  # torchao: int8 weights with activation quantization (not weight-only) multiply in int8
        return getattr(w, "act_quant_kwargs", None) is not None and str(getattr(w, "qdata", None).dtype) == "torch.int8"
    iq, wq = getattr(module, "input_quantizer", None), getattr(module, "weight_quantizer", None)
    if iq is None or wq is None:
        return False
    return all(getattr(q, "is_enabled", False) and getattr(q, "num_bits", None) == 8 for q in (iq, wq))
