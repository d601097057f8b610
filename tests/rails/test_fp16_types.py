"""Rail 5 (fp16 types): the rotary-embedding failure planted (a float16 Cast feeding a Mul with a
float32 operand), a clean fp16 conversion, and what the fp16 step kept in fp32."""

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from compiler.core.schema import DoctorConfig
from compiler.rails import FAILED, PASSED, SKIPPED, RailContext, fp16_types
from targets import capabilities_of


def _rotary_like(tmp_path, broken: bool):
    """cos/sin tables computed in fp32 multiplied with the (converted) fp16 activations: a converter
    that casts one side and not the other leaves Mul(float16, float) -- ORT refuses to load it."""
    cos = numpy_helper.from_array(np.cos(np.arange(8, dtype=np.float32)).reshape(1, 8), "cos")
    nodes = [h.make_node("Cast", ["x"], ["xh"], to=T.FLOAT16)]
    if broken:
        nodes.append(h.make_node("Mul", ["xh", "cos"], ["yh"]))  # float16 * float: type clash
    else:
        nodes += [h.make_node("Cast", ["cos"], ["cos_h"], to=T.FLOAT16), h.make_node("Mul", ["xh", "cos_h"], ["yh"])]
    nodes.append(h.make_node("Cast", ["yh"], ["y"], to=T.FLOAT))
    g = h.make_graph(nodes, "rotary", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 8])], initializer=[cos])
    path = tmp_path / f"rotary_{'broken' if broken else 'ok'}.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def test_type_clash_fails_with_the_ort_error(tmp_path):
    path = _rotary_like(tmp_path, broken=True)
    model = onnx.load(str(path))
    assert fp16_types.has_fp16(model)
    assert fp16_types.type_errors(model) and "Mul" in fp16_types.type_errors(model)[0]
    assert fp16_types.ort_loads(path)  # ORT's own error text
    r = fp16_types.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=path))
    assert r["status"] == FAILED and "does not load in ONNX Runtime" in r["message"]
    assert "keep the offending subgraph in fp32" in r["message"]


def test_consistent_fp16_graph_passes_and_reports_what_the_step_kept(tmp_path):
    path = _rotary_like(tmp_path, broken=False)
    from compiler.steps.fp16 import Fp16Step
    from compiler.steps.fp16 import Params as Fp16Params
    from compiler.steps.int8_static import Int8StaticStep
    from compiler.steps.int8_static import Params as Int8Params

    # what each step kept in fp32 is read from the report keys the step declares (kept_fp32_report_keys)
    steps = {"fp16": {"where": "onnx", "blocked_nodes": ["/rotary/Mul", "/rotary/Cast"], "blocked_op_types": ["Range"],
                      "dtype": "float16"},
             "int8_static": {"blocked_nodes": ["not fp16's"]}}
    recipe_steps = [Fp16Step(Fp16Params()), Int8StaticStep(Int8Params())]
    r = fp16_types.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=path, steps=steps,
                                   recipe_steps=recipe_steps))
    assert r["status"] == PASSED
    assert r["kept_fp32"] == {"blocked_nodes": ["/rotary/Mul", "/rotary/Cast"], "blocked_op_types": ["Range"]}
    assert r["kept_fp32_count"] == 3 and "kept in fp32 by the fp16 step: 3" in r["message"]


def test_real_fp16_conversion_loads(tmp_path):
    """onnxruntime.transformers.float16 on a small MLP: the rail sees fp16 and ORT loads it."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Relu", ["m"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2, 8])], [h.make_tensor_value_info("y", T.FLOAT, [2, 8])],
                     initializer=[w])
    fp16 = convert_float_to_float16(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), keep_io_types=True)
    path = tmp_path / "fp16.onnx"
    onnx.save(fp16, str(path))
    r = fp16_types.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=path))
    assert r["status"] == PASSED and r["fp16"] is True


def test_fp32_graph_skips(tmp_path):
    path = _rotary_like(tmp_path, broken=False)
    m = onnx.load(str(path))
    # strip every fp16 mention: the same graph without casts
    g = h.make_graph([h.make_node("Mul", ["x", "cos"], ["y"])], "g", list(m.graph.input), list(m.graph.output),
                     initializer=list(m.graph.initializer))
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    assert fp16_types.run(RailContext(target=capabilities_of("ort"), config=DoctorConfig(), onnx_path=path))["status"] == SKIPPED
