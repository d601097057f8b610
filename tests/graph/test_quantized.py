"""compiler/graph/quantized.py: the one table of quantized op types and the node / module helpers every rail,
step and target asks. The sets each former caller kept are pinned here, so merging the tables changed no verdict
on the ops qcompile's quantizers write."""

import pytest
import torch

from compiler.graph.quantized import (
    INT8_COMPUTE_OPS,
    QUANTIZED_COMPUTE_OPS,
    computes_in_int8,
    is_dequantize,
    is_int8_compute,
    is_qoperator,
    is_quantized_compute,
    is_quantized_module,
    is_quantized_node,
)


def test_the_former_tables_are_views_of_the_one_table():
    # coverage's QUANTIZED_COMPUTE and int8_speed's INT8_COMPUTE_OPS, as they were
    assert QUANTIZED_COMPUTE_OPS == {"QLinearMatMul", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul",
                                     "QLinearConv", "ConvInteger", "QGemm", "MatMulIntegerToFloat", "QAttention",
                                     "QOrderedMatMul", "MatMulBnb4"}
    assert INT8_COMPUTE_OPS == {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                                "QGemm", "QAttention", "QLinearConv", "ConvInteger"}


@pytest.mark.parametrize("op,node,qoperator,compute,int8", [
    ("QuantizeLinear", True, False, False, False),
    ("DequantizeLinear", True, False, False, False),
    ("TRT_FP8DequantizeLinear", True, False, False, False),  # TensorRT's own op: quantized, not a QOperator op
    ("MatMulInteger", True, True, True, True),
    ("QLinearSoftmax", True, True, False, False),
    ("QLinearFutureOp", True, True, False, False),  # matched by name
    ("MatMulNBits", True, True, True, False),
    ("DynamicQuantizeLinear", True, True, False, False),
    ("MatMul", False, False, False, False),
    ("Shape", False, False, False, False),
])
def test_node_helpers(op, node, qoperator, compute, int8):
    assert (is_quantized_node(op), is_qoperator(op), is_quantized_compute(op), is_int8_compute(op)) == (
        node, qoperator, compute, int8)
    assert is_dequantize(op) == ("Dequantize" in op)


class _Quantizer:
    def __init__(self, enabled, bits=8):
        self.is_enabled, self.num_bits = enabled, bits


def test_module_helpers():
    plain = torch.nn.Linear(4, 4)
    assert not is_quantized_module(plain) and not computes_in_int8(plain)
    dynamic = torch.ao.nn.quantized.dynamic.Linear(4, 4)
    assert is_quantized_module(dynamic) and computes_in_int8(dynamic)
    fake = torch.nn.Linear(4, 4)
    fake.weight_quantizer, fake.input_quantizer = _Quantizer(True, 4), _Quantizer(False)
    assert is_quantized_module(fake) and not computes_in_int8(fake)  # weight-only 4-bit fake-quant
    fake.weight_quantizer, fake.input_quantizer = _Quantizer(True), _Quantizer(True)
    assert computes_in_int8(fake)
    fake.weight_quantizer.is_enabled = fake.input_quantizer.is_enabled = False
    assert not is_quantized_module(fake)
