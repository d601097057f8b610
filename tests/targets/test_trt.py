"""The TensorRT target: options derived from the recipe, hardware checks given a fake GPU, the engine
inspector's per-layer report, the engine build against a recording stand-in of TensorRT's API, the no-GPU
path end to end; real engine builds are marked gpu."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from compiler.core.errors import BuildError, RecipeError
from compiler.core.schema import TargetConfig
from targets import profiles as P
from targets import trt as T
from targets import trt_build as B
from targets import trt_hardware as H
from targets import trt_layers as L
from tests.conftest import FAST
from tests.targets import fake_tensorrt as FT

H100 = H.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "test")
A100 = H.GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), "test")
L4 = H.GpuInfo("NVIDIA L4", (8, 9), "test")
B200 = H.GpuInfo("NVIDIA B200", (10, 0), "test")


def target_cfg(**kw) -> TargetConfig:
    node = OmegaConf.merge(OmegaConf.load(Path(__file__).parents[2] / "recipes" / "target" / "trt.yaml"), kw)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TargetConfig), node))


def engine_buildable() -> bool:
    return H.detect_tensorrt()[0] is not None and H.detect_gpu() is not None


# --- recipe -> precisions -> hardware checks --------------------------------------------------------

@pytest.mark.parametrize("steps,expected", [
    ({}, ["fp32"]),
    ({"fp16": {}}, ["fp16"]),
    ({"int8": {"calibration": "minmax"}}, ["int8"]),
    ({"int8_smoothquant": {"alpha": 0.5}}, ["int8"]),
    ({"rotate": {"method": "hadamard"}, "nvfp4": {}}, ["nvfp4"]),
    ({"fp8": {}, "int8_weight_only": {}}, ["fp8", "int8"]),
    ({"rotate": {}}, ["fp32"]),  # rotate declares no format
    ({"fp8_lookalike_name": {"format": "fp8"}}, ["fp32"]),  # no step of that name: nothing is guessed from it
])
def test_recipe_precisions(steps, expected):
    assert H.recipe_precisions(steps) == expected


def test_nvfp4_on_hopper_names_recipe_gpu_and_fix():
    msg, fix = H.hardware_problem("nvfp4", ["nvfp4"], H100, "10.13.0.35")
    assert msg == ("recipe=nvfp4 builds nvfp4 layers, which need compute capability 10.0+ (Blackwell) and "
                   "TensorRT >= 10.11; found NVIDIA H100 80GB HBM3 (compute capability 9.0) with TensorRT 10.13.0.35")
    assert fix.startswith("use recipe=fp8 (runs on this GPU)")
    assert "target.build_engine=false" in fix


def test_nvfp4_on_blackwell_needs_tensorrt_10_11():
    msg, fix = H.hardware_problem("nvfp4_rotate", ["nvfp4"], B200, "10.9.0")
    assert "found NVIDIA B200 (compute capability 10.0) with TensorRT 10.9.0" in msg
    assert fix.startswith("upgrade to tensorrt>=10.11")
    assert H.hardware_problem("nvfp4_rotate", ["nvfp4"], B200, "10.11.0") is None
    assert H.hardware_problem("nvfp4", ["nvfp4"], B200, "11.0.0") is None


def test_fp8_needs_ada_or_hopper():
    msg, fix = H.hardware_problem("fp8", ["fp8"], A100, "10.13")
    assert "compute capability 8.9+ (Ada / Hopper)" in msg and "NVIDIA A100-SXM4-40GB (compute capability 8.0)" in msg
    assert fix.startswith("use recipe=int8")
    assert H.hardware_problem("fp8", ["fp8"], L4, "10.0.1") is None
    assert H.hardware_problem("fp8", ["fp8"], H100, "10.13") is None


def test_int8_and_fp32_build_anywhere_tensorrt_10_runs():
    assert H.hardware_problem("int8", ["int8"], A100, "10.0") is None
    assert H.hardware_problem("fp32", ["fp32"], A100, "10.0") is None
    msg, fix = H.hardware_problem("fp32", ["fp32"], A100, "8.6.1")
    assert msg == "target=trt needs TensorRT >= 10.0; found TensorRT 8.6.1"
    # no GPU or no TensorRT: nothing to check (the engine is not built at all)
    assert H.hardware_problem("nvfp4", ["nvfp4"], None, "10.13") is None
    assert H.hardware_problem("nvfp4", ["nvfp4"], H100, None) is None


def test_engine_decision():
    assert H.engine_decision("false", H100, "10.13") == (False, "target.build_engine=false")
    assert H.engine_decision("auto", H100, "10.13") == (True, "")
    assert H.engine_decision("auto", None, None, "not installed") == (
        False, "needs the tensorrt Python package (not installed) and an NVIDIA GPU")
    assert H.engine_decision("require", None, "10.13") == (False, "needs an NVIDIA GPU")


def test_build_engine_values():
    assert H.normalize_build_engine(False) == "false"
    assert H.normalize_build_engine("False") == "false"  # what OmegaConf makes of a bool in a str field
    assert H.normalize_build_engine("True") == "require"
    assert H.normalize_build_engine("auto") == "auto"
    with pytest.raises(RecipeError) as e:
        H.normalize_build_engine("maybe")
    assert str(e.value) == ("target.build_engine: bad value 'maybe' -- use auto (build where TensorRT and a GPU "
                            "are present), require, or false")


def test_parse_nvidia_smi_and_versions():
    assert H.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\nNVIDIA H100 80GB HBM3, 9.0\n") == H.GpuInfo(
        "NVIDIA H100 80GB HBM3", (9, 0), "nvidia-smi")
    assert H.parse_nvidia_smi("NVIDIA GeForce RTX 5090, 12.0") .capability == (12, 0)
    assert H.parse_version("10.11.0.33") == (10, 11, 0, 33)
    assert H.parse_version("11.0.0a1") == (11, 0, 0)


def _fake_machine(monkeypatch, gpu, trt_version, trt_error=""):
    monkeypatch.setattr(T, "detect_gpu", lambda: gpu)
    monkeypatch.setattr(T, "detect_tensorrt", lambda: (trt_version, trt_error))


def test_check_environment_fake_hopper_rejects_nvfp4(monkeypatch):
    _fake_machine(monkeypatch, H100, "10.13.0")
    recipe = OmegaConf.create({"name": "nvfp4_rotate", "steps": {"rotate": {}, "nvfp4": {}}})
    with pytest.raises(RecipeError) as e:
        T.TrtTarget(target_cfg()).check_environment(recipe)
    assert str(e.value).startswith("target=trt: recipe=nvfp4_rotate builds nvfp4 layers, which need compute "
                                   "capability 10.0+ (Blackwell)")
    assert "found NVIDIA H100 80GB HBM3 (compute capability 9.0)" in str(e.value)
    assert "use recipe=fp8" in str(e.value) and "target.build_engine=false" in str(e.value)
    # build_engine=false: no engine, so no hardware to check
    T.TrtTarget(target_cfg(build_engine="false")).check_environment(recipe)
    T.TrtTarget(target_cfg()).check_environment(OmegaConf.create({"name": "fp8", "steps": {"fp8": {}}}))


def test_check_environment_require_without_tensorrt(monkeypatch):
    _fake_machine(monkeypatch, None, None, "not installed")
    recipe = OmegaConf.create({"name": "fp32", "steps": {}})
    T.TrtTarget(target_cfg()).check_environment(recipe)  # auto: fine, the CPU path
    with pytest.raises(BuildError) as e:
        T.TrtTarget(target_cfg(build_engine="require")).check_environment(recipe)
    assert str(e.value).startswith("target.build_engine=require, but the TensorRT engine cannot be built here: "
                                   "needs the tensorrt Python package (not installed) and an NVIDIA GPU -- ")
    assert "target.build_engine=auto" in str(e.value)


def test_shape_ranges_validated():
    P.validate_shape_ranges(target_cfg())
    with pytest.raises(RecipeError) as e:
        P.validate_shape_ranges(target_cfg(opt_shapes={"seq": 1024}))
    assert str(e.value) == ("target.opt_shapes.seq: min 1 <= opt 1024 <= max 512 does not hold -- choose "
                            "target.min_shapes.seq <= target.opt_shapes.seq <= target.max_shapes.seq")
    with pytest.raises(RecipeError) as e:
        P.validate_shape_ranges(target_cfg(max_shapes={"tokens": 4}))
    assert str(e.value) == "target.max_shapes.tokens: unknown axis -- the profile axes are batch and seq"
    with pytest.raises(RecipeError) as e:
        P.validate_shape_ranges(target_cfg(min_quantized_layer_fraction=1.5))
    assert str(e.value).startswith("target.min_quantized_layer_fraction: must be in [0, 1], got 1.5")


# --- network options derived from the recipe -------------------------------------------------------

def test_profile_shapes_cover_every_input():
    inputs = [("input_ids", ["batch", "seq"]), ("attention_mask", ["s0", "s1"]), ("pixel_scale", [1, 3])]
    prof = P.profile_shapes(inputs, {"batch": 1, "seq": 16}, {"batch": 8, "seq": 128}, {"batch": 64, "seq": 512})
    assert prof == {
        "input_ids": {"min": [1, 16], "opt": [8, 128], "max": [64, 512]},
        "attention_mask": {"min": [1, 16], "opt": [8, 128], "max": [64, 512]},
        "pixel_scale": {"min": [1, 3], "opt": [1, 3], "max": [1, 3]},
    }
    assert P.shape_arg(prof, "max") == "input_ids:64x512,attention_mask:64x512,pixel_scale:1x3"
    with pytest.raises(BuildError) as e:
        P.profile_shapes([("x", ["batch", "seq", "channels"])], {"batch": 1, "seq": 1}, {"batch": 1, "seq": 1},
                         {"batch": 1, "seq": 1})
    assert "input x: dynamic dimension 2 ('channels') is neither batch nor seq" in str(e.value)


def test_profile_from_exported_graph(tiny_bert, tmp_path):
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "m.onnx",
                       ExportConfig())
    cfg = target_cfg()
    prof = P.profile_shapes(P.onnx_inputs(path), cfg.min_shapes, cfg.opt_shapes, cfg.max_shapes)
    assert list(prof) == list(tiny_bert.input_names)
    assert all(p == {"min": [1, 1], "opt": [8, 128], "max": [64, 512]} for p in prof.values())


def test_trtexec_and_qcompile_commands():
    prof = {"input_ids": {"min": [1, 1], "opt": [8, 128], "max": [64, 512]}}
    assert B.trtexec_args("model.onnx", prof, 2048, "timing.cache") == [
        "trtexec", "--onnx=model.onnx", "--stronglyTyped", "--minShapes=input_ids:1x1", "--optShapes=input_ids:8x128",
        "--maxShapes=input_ids:64x512", "--memPoolSize=workspace:2048M", "--timingCacheFile=timing.cache",
        "--profilingVerbosity=detailed", "--exportLayerInfo=engine.layers.json", "--saveEngine=engine.plan"]
    assert B.qcompile_args(["model=tiny_bert", "recipe=int8", "target=trt", "target.build_engine=false",
                            "data.seq_len=32"], "x", "y") == [
        "qcompile", "model=tiny_bert", "recipe=int8", "target=trt", "data.seq_len=32", "target.build_engine=require"]
    assert B.qcompile_args(None, "minilm", "fp8") == ["qcompile", "model=minilm", "recipe=fp8", "target=trt",
                                                       "target.build_engine=require"]


# --- the engine inspector's per-layer report --------------------------------------------------------

def _t(name, fmt, dims=(-1, 128, 64)):
    return {"Name": name, "Location": "Device", "Dimensions": list(dims), "Format/Datatype": fmt}


# Built from the documented layer-information JSON (ProfilingVerbosity.DETAILED): TensorRT 10's
# "Format/Datatype" strings, Myelin's short kgen names ("Half"), TensorRT 11's split Datatype/Format.
SAMPLE = {
    "Layers": [
        {"Name": "/embeddings/word_embeddings/Gather", "LayerType": "Gather", "ParameterType": "Gather",
         "Inputs": [_t("input_ids", "Row major linear Int64 format", (-1, -1))],
         "Outputs": [_t("emb", "Row major linear FP32")]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to q_proj", "LayerType": "Reformat",
         "Inputs": [_t("emb", "Row major linear FP32")], "Outputs": [_t("emb_h", "Row major linear FP16 format")]},
        {"Name": "/encoder/layer.0/attention/self/query/input_quantizer/QuantizeLinear", "LayerType": "Scale",
         "ParameterType": "Quantize", "Inputs": [_t("emb_h", "Row major linear FP16 format")],
         "Outputs": [_t("emb_q", "Row major Int8 format")]},
        {"Name": "/encoder/layer.0/attention/self/query/MatMul", "LayerType": "CaskGemmMatrixMultiply",
         "ParameterType": "MatrixMultiply", "Inputs": [_t("emb_q", "Row major Int8 format")],
         "Outputs": [_t("q", "Row major linear FP16 format")], "Weights": {"Type": "Int8", "Count": 4096},
         "TacticName": "sm90_xmma_gemm_i8i8_f16"},
        {"Name": "/encoder/layer.0/attention/self/key/MatMul", "LayerType": "gemm",
         "Inputs": [{"Name": "emb_q", "Dimensions": [-1, 128, 64], "Datatype": "Int8", "Format": "Row major"}],
         "Outputs": [{"Name": "k", "Dimensions": [-1, 128, 64], "Datatype": "Half", "Format": "Row major"}]},
        {"Name": "/encoder/layer.0/attention/self/MatMul_1", "LayerType": "gemm",
         "Inputs": [_t("probs", "Half"), _t("v", "Half")], "Outputs": [_t("ctx", "Half")]},
        {"Name": "/encoder/layer.0/output/LayerNorm", "LayerType": "kgen", "Inputs": [_t("ctx", "Half")],
         "Outputs": [_t("ln", "Float")]},
        {"Name": "{ForeignNode[/pooler/dense/MatMul.../pooler/Tanh]}", "LayerType": "Myelin",
         "Inputs": [_t("ln", "Float")], "Outputs": [_t("pooled", "Float")]},
    ],
    "Bindings": ["input_ids", "last_hidden_state"],
}


@pytest.mark.parametrize("text,cls", [
    ("Row major linear FP32", "fp32"), ("Float", "fp32"), ("Half", "fp16"), ("Row major linear FP16 format", "fp16"),
    ("Channel major INT8 format where channel % 16 == 0", "int8"), ("Int8", "int8"), ("Row major linear FP8 format", "fp8"),
    ("Float8E4M3", "fp8"), ("FP4", "fp4"), ("Row major linear BFloat16 format", "bf16"), ("Row major linear UInt8 format", "index"),
    ("Row major linear Int64 format", "index"), ("Row major linear Int32", "index"), ("Int4", "int4"), ("", None),
])
def test_dtype_class(text, cls):
    assert L.dtype_class(text) == cls


def test_summarize_layers_counts_precisions():
    s = L.summarize_layers(json.dumps(SAMPLE))
    kinds = {layer["name"]: (layer["kind"], layer["precision"]) for layer in s["per_layer"]}
    assert kinds["/embeddings/word_embeddings/Gather"] == ("data", "fp32")  # int64 ids in, floats out
    assert kinds["/encoder/layer.0/attention/self/query/input_quantizer/QuantizeLinear"] == ("qdq", "fp16")
    assert kinds["/encoder/layer.0/attention/self/query/MatMul"] == ("gemm", "int8")
    assert kinds["/encoder/layer.0/attention/self/key/MatMul"] == ("gemm", "int8")  # TensorRT 11 keys
    assert kinds["/encoder/layer.0/attention/self/MatMul_1"] == ("gemm", "fp16")
    assert kinds["/encoder/layer.0/output/LayerNorm"] == ("other", "fp16")
    assert kinds["{ForeignNode[/pooler/dense/MatMul.../pooler/Tanh]}"] == ("fused", "fp32")
    assert s["by_precision"] == {"fp16": 3, "fp32": 3, "int8": 2}
    assert s["gemm_by_precision"] == {"fp16": 1, "int8": 2}
    assert (s["fraction_basis"], s["basis_layers"], s["quantized_layers"]) == ("matmul/conv layers", 3, 2)
    assert s["quantized_layer_fraction"] == pytest.approx(2 / 3)
    assert s["high_precision_layers"] == ["/encoder/layer.0/attention/self/MatMul_1"]
    assert s["by_kind"] == {"gemm": 3, "qdq": 1, "data": 2, "fused": 1, "other": 1}


def _with_gemm_precisions(*fmts):
    layers = [{"Name": f"/l{i}/MatMul", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [_t("x", f)],
               "Outputs": [_t("y", "Half")]} for i, f in enumerate(fmts)]
    return L.summarize_layers({"Layers": layers})


def test_verdict_warns_when_quantized_recipe_stays_high_precision():
    s = _with_gemm_precisions("Int8", "Half", "Half", "Row major linear FP32")
    level, msg = L.quantization_verdict(s, graph_quantized=True, min_fraction=0.0)
    assert level == "warn"
    assert msg.startswith("quantized recipe, but 1 of 4 matmul/conv layers run quantized (25%); high precision: "
                          "2 in fp16, 1 in fp32: TensorRT kept most of them in high precision")
    # the same engine from an fp16 recipe (no Q/DQ in the graph) is fine
    assert L.quantization_verdict(s, graph_quantized=False, min_fraction=0.0)[0] == "ok"


def test_verdict_fails_below_recipe_threshold():
    s = _with_gemm_precisions("Int8", "FP8", "Half")
    level, msg = L.quantization_verdict(s, graph_quantized=True, min_fraction=0.9)
    assert level == "fail"
    assert msg.startswith("2 of 3 matmul/conv layers run quantized (67%); high precision: 1 in fp16: below "
                          "target.min_quantized_layer_fraction=0.9")
    assert L.quantization_verdict(s, graph_quantized=True, min_fraction=0.6) == (
        "ok", "2 of 3 matmul/conv layers run quantized (67%); high precision: 1 in fp16")


def test_verdict_without_detailed_layer_info():
    s = L.summarize_layers({"Layers": ["Reformatting CopyNode for Input Tensor 0", "q_proj + bias"]})
    assert s["detailed"] is False and s["quantized_layer_fraction"] is None
    level, msg = L.quantization_verdict(s, graph_quantized=True, min_fraction=0.5)
    assert level == "fail" and "cannot be checked: per-layer precision unknown: the engine was built without " \
                               "detailed profiling verbosity" in msg


def test_graph_quantization(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("TRT_FP8QuantizeLinear", ["d", "s"], ["f"], domain="trt"),
             helper.make_node("TRT_FP8DequantizeLinear", ["f", "s"], ["y"], domain="trt")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt", 1)])
    onnx.save(model, tmp_path / "q.onnx")
    g = L.graph_quantization(tmp_path / "q.onnx")
    assert g == {"qdq_nodes": 4, "qdq_ops": {"DequantizeLinear": 1, "QuantizeLinear": 1, "TRT_FP8DequantizeLinear": 1,
                                             "TRT_FP8QuantizeLinear": 1},
                 "custom_ops": ["trt::TRT_FP8DequantizeLinear", "trt::TRT_FP8QuantizeLinear"]}
    assert P.onnx_inputs(tmp_path / "q.onnx") == [("x", ["batch", 4])]


# --- the engine build, against a recording stand-in of TensorRT's Python API -----------------------
# tests/targets/fake_tensorrt.py: not TensorRT; it records which calls Polygraphy's loaders make for
# build_engine with which values (the network flag, the pool limit, the profile, the timing cache round
# trip) so that logic is tested here; the real API is exercised by the gpu tests below.

def _fake_tensorrt(calls, **kw):
    return FT.make(calls, sample=SAMPLE, **kw)


PROFILES = {"input_ids": {"min": [1, 1], "opt": [8, 128], "max": [64, 512]},
            "attention_mask": {"min": [1, 1], "opt": [8, 128], "max": [64, 512]}}


def test_build_engine_calls(monkeypatch, tmp_path):
    calls = []
    FT.install(monkeypatch, _fake_tensorrt(calls))
    r = B.build_engine(tmp_path / "model.onnx", PROFILES, 1024, tmp_path / "engine.plan", tmp_path / "timing.cache")
    assert ("create_network", 1 << 0) in calls  # strongly typed
    assert ("parse_from_file", "model.onnx") in calls
    assert ("pool", "WORKSPACE", 1024 << 20) in calls
    assert ("verbosity", "DETAILED") in calls
    assert ("profile", {"input_ids": ((1, 1), (8, 128), (64, 512)),
                        "attention_mask": ((1, 1), (8, 128), (64, 512))}) in calls
    assert ("create_timing_cache", b"") in calls and r.timing_cache_loaded is False
    assert (tmp_path / "engine.plan").read_bytes() == b"PLAN:"
    assert (tmp_path / "timing.cache").read_bytes() == b"+tactics"
    assert r.device_memory_bytes == 3 << 20 and json.loads(r.inspector_json) == SAMPLE
    # a rebuild reuses the cache it wrote: the builder starts from the saved tactics
    calls.clear()
    r2 = B.build_engine(tmp_path / "model.onnx", PROFILES, 1024, tmp_path / "engine2.plan", tmp_path / "timing2.cache",
                        timing_cache_in=tmp_path / "timing.cache")
    assert ("create_timing_cache", b"+tactics") in calls and r2.timing_cache_loaded is True


def test_build_engine_tensorrt_without_strongly_typed_flag(monkeypatch, tmp_path):
    calls = []  # a TensorRT where the deprecated flag is gone: always strongly typed, flags 0
    FT.install(monkeypatch, _fake_tensorrt(calls, strongly_typed=False))
    B.build_engine(tmp_path / "model.onnx", PROFILES, 64, tmp_path / "engine.plan", tmp_path / "timing.cache")
    assert ("create_network", 0) in calls


def test_build_engine_errors(monkeypatch, tmp_path):
    FT.install(monkeypatch, _fake_tensorrt([], parse_ok=False))
    with pytest.raises(BuildError) as e:
        B.build_engine(tmp_path / "model.onnx", PROFILES, 64, tmp_path / "engine.plan", tmp_path / "timing.cache")
    assert str(e.value) == ("TensorRT 10.13.0.35's ONNX parser rejected model.onnx: In node 12 "
                            "(importFallbackPluginImporter): UNSUPPORTED_NODE: no importer for op TRT_Bogus")
    FT.install(monkeypatch, _fake_tensorrt([], inputs=("input_ids", "token_type_ids")))
    with pytest.raises(BuildError) as e:
        B.build_engine(tmp_path / "model.onnx", PROFILES, 64, tmp_path / "engine.plan", tmp_path / "timing.cache")
    assert "TensorRT network inputs ['token_type_ids'] have no optimization profile" in str(e.value)


def test_build_engine_errors_survive_a_quieted_polygraphy_logger(monkeypatch, tmp_path):
    """The parser's errors are read from Polygraphy's log: a logger another part of the process left at
    CRITICAL (the check stage once did, for good) must not turn them into 'Could not parse ONNX correctly'."""
    from polygraphy.logger import G_LOGGER

    FT.install(monkeypatch, _fake_tensorrt([], parse_ok=False))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), pytest.raises(BuildError) as e:
        B.build_engine(tmp_path / "model.onnx", PROFILES, 64, tmp_path / "engine.plan", tmp_path / "timing.cache")
    assert "UNSUPPORTED_NODE: no importer for op TRT_Bogus" in str(e.value)


def test_build_engine_without_tensorrt(monkeypatch, tmp_path):
    FT.install(monkeypatch, None)  # import tensorrt -> ImportError
    with pytest.raises(BuildError) as e:
        B.build_engine(tmp_path / "model.onnx", PROFILES, 64, tmp_path / "engine.plan", tmp_path / "timing.cache")
    assert str(e.value).startswith("building a TensorRT engine needs the tensorrt package")
    assert "pip install 'qcompile[gpu]'" in str(e.value)


def test_lower_with_recording_tensorrt(monkeypatch, tmp_path, tiny_bert):
    """lower() on a 'machine' with TensorRT and a GPU: plan, layer report, cache and verdict wiring."""
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    onnx_path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "model.onnx",
                            ExportConfig())
    calls = []
    FT.install(monkeypatch, _fake_tensorrt(calls, inputs=tuple(tiny_bert.input_names)))
    _fake_machine(monkeypatch, H100, "10.13.0.35")
    eng = T.TrtTarget(target_cfg(workspace_mb=512)).lower(tiny_bert, onnx_path, tmp_path)
    assert eng.path == tmp_path / "engine.plan" and eng.files == [tmp_path / "engine.plan"]
    assert eng.info["engine_built"] is True and eng.info["runner"] == "TensorRT (polygraphy TrtRunner)"
    assert eng.info["layers"]["quantized_layer_fraction"] == pytest.approx(2 / 3)
    assert eng.info["quantization_check"]["status"] == "ok"  # fp32 graph: no Q/DQ, nothing to warn about
    assert ("pool", "WORKSPACE", 512 << 20) in calls
    layers = json.loads((tmp_path / "engine.layers.json").read_text())
    assert len(layers["layers"]) == len(SAMPLE["Layers"]) and layers["inspector"] == SAMPLE
    assert "--memPoolSize=workspace:512M" in (tmp_path / "build_engine.sh").read_text()
    # the recipe asks for more quantized layers than the engine has: the build fails, files stay for a look
    with pytest.raises(BuildError) as e:
        T.TrtTarget(target_cfg(min_quantized_layer_fraction=0.9)).lower(tiny_bert, onnx_path, tmp_path)
    assert str(e.value).startswith("TensorRT engine precision: 2 of 3 matmul/conv layers run quantized (67%)")


def test_build_run_dir_cli(monkeypatch, tmp_path, tiny_bert, capsys):
    """`python -m targets.trt build <run_dir>` (what build_engine.sh runs without trtexec): the run's
    model.onnx and recipe.yaml target settings; a second build reuses the run's timing cache."""
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "model.onnx",
                ExportConfig())
    OmegaConf.save({"recipe": {"name": "fp32"}, "target": {"name": "trt", "workspace_mb": 256}}, tmp_path / "recipe.yaml")
    FT.install(monkeypatch, None)
    assert T.main(["build", str(tmp_path)]) == 1
    assert "build failed: building a TensorRT engine needs the tensorrt package" in capsys.readouterr().err
    calls = []
    FT.install(monkeypatch, _fake_tensorrt(calls, inputs=tuple(tiny_bert.input_names)))
    assert T.main(["build", str(tmp_path)]) == 0
    assert ("pool", "WORKSPACE", 256 << 20) in calls and ("create_timing_cache", b"") in calls
    assert (tmp_path / "engine.plan").exists() and (tmp_path / "engine.layers.json").exists()
    assert "engine: " in capsys.readouterr().out
    calls.clear()
    assert T.main(["build", str(tmp_path)]) == 0
    assert ("create_timing_cache", b"+tactics") in calls
    assert T.main(["nonsense"]) == 2


# --- the no-GPU path, end to end ---------------------------------------------------------------------

@pytest.mark.skipif(engine_buildable(), reason="this machine can build engines: the no-GPU path is not taken")
def test_no_gpu_build_writes_command_and_says_engine_not_built(qcompile):
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=trt", *FAST)
    assert r.rc == 0, r
    assert "TensorRT engine NOT built (needs " in r.stdout + r.stderr
    (run,) = r.run_dirs()
    assert not (run / "engine.plan").exists()
    report = json.loads((run / "report.json").read_text())
    lower = report["lower"]
    assert lower["engine_built"] is False and lower["engine_not_built"].startswith("needs ")
    assert lower["runner"] == "the ONNX reference evaluator (onnx.reference + TensorRT custom ops)"
    assert "not TensorRT" in lower["bench_note"]
    assert report["placement"] == {"device": "cpu", "runtime": lower["runner"], "engine_built": False}
    # the check really ran the TensorRT-ready graph against the fp32 torch reference
    assert report["check"]["passed"] is True
    assert report["check"]["per_output"]["sentence_embedding"]["cosine_mean"] > 0.99999
    script = (run / "build_engine.sh").read_text()
    for part in ("trtexec \\\n    --onnx=model.onnx \\\n    --stronglyTyped",
                 "--minShapes=input_ids:1x1,attention_mask:1x1,token_type_ids:1x1",
                 "--optShapes=input_ids:8x128,attention_mask:8x128,token_type_ids:8x128",
                 "--maxShapes=input_ids:64x512,attention_mask:64x512,token_type_ids:64x512",
                 "--memPoolSize=workspace:4096M", "--timingCacheFile=timing.cache", "--saveEngine=engine.plan",
                 "python -m targets.trt build .",
                 "#   qcompile model=tiny_bert recipe=fp32 target=trt " + " ".join(FAST) + " target.build_engine=require"):
        assert part in script, part
    assert (run / "build_engine.sh").stat().st_mode & 0o111


@pytest.mark.skipif(engine_buildable(), reason="this machine can build engines")
def test_require_without_gpu_fails_before_loading(qcompile):
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=trt", "target.build_engine=require", *FAST)
    assert r.rc == 1, r
    assert ("qcompile: build failed: target.build_engine=require, but the TensorRT engine cannot be built here: "
            "needs ") in r.stderr
    assert "Traceback" not in r.stderr
    assert r.run_dirs() == []  # stopped at validation: no run directory at all


# --- on a GPU with TensorRT ----------------------------------------------------------------------------

def _require_tensorrt():
    pytest.importorskip("tensorrt")


@pytest.mark.gpu
def test_gpu_engine_fp32_matches_torch_and_rebuild_reuses_cache(qcompile):
    _require_tensorrt()
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=trt", "target.build_engine=require", *FAST)
    assert r.rc == 0, r
    (run,) = r.run_dirs()
    report = json.loads((run / "report.json").read_text())
    assert report["lower"]["engine_built"] is True and (run / "engine.plan").stat().st_size > 0
    assert report["check"]["fidelity"]["embedding_cosine_mean"] > 0.999
    assert report["lower"]["layers"]["layers"] > 0 and report["bench"]["latency_ms_p50"] > 0
    r2 = qcompile("model=tiny_bert", "recipe=fp32", "target=trt", "target.build_engine=require",
                  f"target.timing_cache={run / 'timing.cache'}", *FAST)
    assert r2.rc == 0, r2
    run2 = [d for d in r2.run_dirs() if d != run][0]
    assert json.loads((run2 / "report.json").read_text())["lower"]["timing_cache"]["reused"] is True


@pytest.mark.gpu
def test_gpu_int8_qdq_engine_runs_quantized(qcompile):
    _require_tensorrt()
    r = qcompile("model=tiny_bert", "recipe=int8", "target=trt", "target.build_engine=require", *FAST)
    assert r.rc in (0, 3), r  # 3: the tiny model's accuracy gate, still a built engine
    (run,) = r.run_dirs()
    lower = json.loads((run / "report.json").read_text())["lower"]
    assert lower["engine_built"] is True and lower["graph"]["qdq_nodes"] > 0
    assert lower["layers"]["by_precision"].get("int8", 0) > 0, lower["layers"]


@pytest.mark.gpu
def test_gpu_trt_runner_vs_fp32(tiny_bert, tiny_data, tmp_path):
    _require_tensorrt()
    from compiler.core.schema import ExportConfig
    from compiler.runners.callable import torch_predictor
    from compiler.stages.export import export_onnx

    onnx_path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "model.onnx",
                            ExportConfig())
    target = T.TrtTarget(target_cfg(build_engine="require", max_shapes={"batch": 16, "seq": 64},
                                    opt_shapes={"batch": 8, "seq": 32}))
    eng = target.lower(tiny_bert, onnx_path, tmp_path)
    predict = target.predictor(eng)
    ref = torch_predictor(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names)
    feed = next(iter(tiny_data.evaluation.batches(8)))
    a, b = predict(feed)["sentence_embedding"], ref(feed)["sentence_embedding"]
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.999
    assert eng.info["gpu_memory"]["engine_and_context_mb"] > 0


def test_cpu_runner_choice(tmp_path, tiny_bert, monkeypatch):
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    _fake_machine(monkeypatch, None, None, "not installed")
    with pytest.raises(RecipeError) as e:
        T.TrtTarget(target_cfg(cpu_runner="numpy")).check_environment(OmegaConf.create({"name": "fp32", "steps": {}}))
    assert str(e.value).startswith("target.cpu_runner: bad value 'numpy' -- use reference")
    onnx_path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "model.onnx",
                            ExportConfig())
    feed = {n: np.ones((2, 8), np.int64) for n in tiny_bert.input_names}
    outs = {}
    for runner in ("reference", "ort"):
        target = T.TrtTarget(target_cfg(cpu_runner=runner))
        eng = target.lower(tiny_bert, onnx_path, tmp_path)
        assert eng.handle["kind"] == runner and eng.info["cpu_runner"] == runner
        outs[runner] = target.predictor(eng)(feed)["sentence_embedding"]
    np.testing.assert_allclose(outs["ort"], outs["reference"], atol=1e-5)
    # a graph with TensorRT custom ops cannot go to onnxruntime: lower still writes the ONNX and the build
    # script (check.enabled=false bench.enabled=false builds); asking it to run is the error
    monkeypatch.setattr(T, "graph_quantization", lambda p: {"qdq_nodes": 2, "qdq_ops": {}, "custom_ops": ["trt::TRT_FP4QDQ"]})
    target = T.TrtTarget(target_cfg(cpu_runner="ort"))
    eng = target.lower(tiny_bert, onnx_path, tmp_path)
    assert eng.info["cpu_runner"] == "none" and (tmp_path / "build_engine.sh").exists()
    with pytest.raises(BuildError) as e:
        target.predictor(eng)
    assert str(e.value) == ("no engine and no CPU runner for the TensorRT-ready graph: target.cpu_runner=ort: "
                            "onnxruntime cannot run the TensorRT custom ops ['trt::TRT_FP4QDQ'] of this graph -- use "
                            "target.cpu_runner=reference")


# --- the timing cache shared by parallel jobs ------------------------------------------------------

def _hold_cache_lock(shared: str, ready, release) -> None:
    """Another job merging into the shared cache: it holds the lock while the file is half-written."""
    with B._lock(Path(shared)):
        Path(shared).write_bytes(b"half")
        ready.set()
        release.wait(10)
        Path(shared).write_bytes(b"complete tactics")


def test_run_copy_of_the_shared_timing_cache_waits_for_a_writer(tmp_path):
    """Two processes: while one rewrites the shared cache under its lock, the other's run copy blocks and
    then gets the whole new file, never the half-written one (Polygraphy's LockFile is per process)."""
    import multiprocessing as mp
    import threading

    shared = tmp_path / "shared.cache"
    shared.write_bytes(b"old")
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_hold_cache_lock, args=(str(shared), ready, release))
    writer.start()
    try:
        assert ready.wait(30)
        got = {}
        reader = threading.Thread(target=lambda: got.update(path=B.run_timing_cache(shared, tmp_path / "run.cache")))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not (tmp_path / "run.cache").exists()  # blocked on the writer's lock
        release.set()
        reader.join(30)
        assert got["path"] == tmp_path / "run.cache"
        assert (tmp_path / "run.cache").read_bytes() == b"complete tactics"
    finally:
        release.set()
        writer.join(30)
    # each job builds from its own copy: a second run gets its own file
    assert B.run_timing_cache(shared, tmp_path / "run2.cache").read_bytes() == b"complete tactics"
    assert B.run_timing_cache(None, tmp_path / "run3.cache") == tmp_path / "run3.cache"
    assert not (tmp_path / "run3.cache").exists()


def test_shared_timing_cache_merged_back_under_lock(monkeypatch, tmp_path, tiny_bert):
    """lower() with target.timing_cache: the build loads its run copy, and merges what it learned into the
    shared file (TensorRT's combine) instead of overwriting it."""
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx

    onnx_path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "model.onnx",
                            ExportConfig())
    shared = tmp_path / "caches" / "shared.cache"
    shared.parent.mkdir()
    shared.write_bytes(b"from-another-job+tactics")
    calls = []
    FT.install(monkeypatch, _fake_tensorrt(calls, inputs=tuple(tiny_bert.input_names)))
    _fake_machine(monkeypatch, H100, "10.13.0.35")
    eng = T.TrtTarget(target_cfg(timing_cache=str(shared))).lower(tiny_bert, onnx_path, tmp_path)
    assert ("create_timing_cache", b"from-another-job+tactics") in calls  # loaded from the run's copy
    assert ("combine", b"from-another-job+tactics") in calls  # merged into the shared file, not overwritten
    assert eng.info["timing_cache"]["reused"] is True and (tmp_path / "timing.cache").exists()


def test_build_info_is_passed_in_not_read_back(tmp_path, tiny_bert, monkeypatch):
    """The recipe name and the command line's overrides come from the pipeline (BuildInfo), not from
    recipe.yaml on disk or Hydra's global state; lower leaves the engine's info to itself afterwards."""
    from compiler.core.schema import ExportConfig
    from compiler.stages.export import export_onnx
    from targets.base import BuildInfo

    onnx_path = export_onnx(tiny_bert.module, tiny_bert.input_names, tiny_bert.output_names, tmp_path / "model.onnx",
                            ExportConfig())
    _fake_machine(monkeypatch, None, None, "not installed")
    (tmp_path / "recipe.yaml").write_text("recipe: {name: not_this_one}\n")
    info = BuildInfo(model_name="tiny_bert", recipe_name="int8_static", overrides=["recipe=int8_static", "target=trt"])
    T.TrtTarget(target_cfg()).lower(tiny_bert, onnx_path, tmp_path, info)
    script = (tmp_path / "build_engine.sh").read_text()
    assert "#   qcompile recipe=int8_static target=trt target.build_engine=require" in script
    T.TrtTarget(target_cfg()).lower(tiny_bert, onnx_path, tmp_path, BuildInfo(model_name="tiny_bert",
                                                                             recipe_name="fp8"))
    assert "#   qcompile model=tiny_bert recipe=fp8 target=trt target.build_engine=require" in (
        tmp_path / "build_engine.sh").read_text()
    assert "not_this_one" not in (tmp_path / "build_engine.sh").read_text()
