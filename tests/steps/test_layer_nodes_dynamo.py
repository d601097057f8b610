"""Per-layer maps on the ONNX side for both exporters: the dynamo exporter names nodes 'node_MatMul_54' and keeps
the module path in node metadata, so a layer kept out by name (repair maps, model.exclude patterns) must be found
through that metadata, before and after onnxruntime's pre-processing."""

from __future__ import annotations

import onnx
import pytest

from compiler.steps.base import StepContext
from compiler.steps.int8_static import Int8StaticStep, Params
from compiler.steps.ort_quant import exclude_nodes, layer_nodes
from modelopt_cases import caps

LAYER = "inner.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def dynamo_bert(tiny_bert, tmp_path_factory):
    from compiler import graph as graph_passes
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    root = tmp_path_factory.mktemp("dynamo_bert")
    cfg = ExportConfig(exporter="dynamo")
    path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, root / "export.onnx", cfg)
    return graph_passes.fix_exported(path, root, cfg, {})


def test_dynamo_nodes_map_to_their_modules(dynamo_bert, tiny_bert):
    g = onnx.load(str(dynamo_bert), load_external_data=False)
    linear = [n for n in g.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert all(n.name.startswith("node_") for n in linear)  # the name says nothing about the module
    found = layer_nodes(g, [LAYER], ["MatMul", "Gemm"])
    assert len(found) == 1
    # every Linear of the torch model maps to exactly one linear node of its own
    names = [n for n, m in tiny_bert.module.named_modules() if type(m).__name__ == "Linear" and "pooler" not in n]
    mapped = {n: layer_nodes(g, [n], ["MatMul", "Gemm"]) for n in names}
    assert all(len(v) == 1 for v in mapped.values()), mapped
    assert len({v[0] for v in mapped.values()}) == len(names)
    assert exclude_nodes(g, ["*layer.0.attention.self.query"], ["MatMul", "Gemm"]) == found


def test_kept_layer_stays_fp32_in_a_dynamo_graph(dynamo_bert, tiny_bert, tiny_data, tmp_path):
    ctx = StepContext(target=caps("ort"), model_info=tiny_bert.info, calibration=tiny_data.calibration,
                      work_dir=tmp_path)
    step = Int8StaticStep(Params()).with_layer_formats({LAYER: "fp32"})
    out = step.apply_onnx(dynamo_bert, tmp_path / "q.onnx", ctx)
    g = onnx.load(str(out), load_external_data=False)
    assert ctx.report["excluded_nodes"] >= 1
    kept = layer_nodes(g, [LAYER], ["MatMul", "Gemm"])
    assert len(kept) == 1
    producers = {o: n for n in g.graph.node for o in n.output}
    inits = {i.name for i in g.graph.initializer}

    def int8_weight(node) -> bool:  # its weight input is dequantized from an int8 initializer
        w = producers.get(node.input[1])
        return w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits

    node = next(n for n in g.graph.node if n.name == kept[0])
    assert not int8_weight(node)  # the kept layer's weight stays fp32 ...
    # ... while the other Linear layers got int8 weights: a Q/DQ MatMul, or (target=ort's fuse_bias pass) the
    # MatMul and its bias written as one MatMulIntegerToFloat reading the int8 weight itself
    others = [n for n in g.graph.node if n.name != kept[0] and (
        (n.op_type == "MatMul" and int8_weight(n)) or (n.op_type == "MatMulIntegerToFloat" and n.input[1] in inits))]
    assert len(others) >= 10
