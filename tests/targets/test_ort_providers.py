"""ONNX Runtime with GPU execution providers: provider names and availability checked before anything
is built, provider options (TensorRT EP defaults from the recipe), and the placement check that catches
onnxruntime's silent fall-back to the CPU -- planted here with a real CPU session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from omegaconf import OmegaConf

from compiler.core.errors import BuildError, RecipeError
from compiler.core.schema import TargetConfig
from targets import ort as O
from tests.conftest import FAST

CPU_ONLY = "CUDAExecutionProvider" not in ort.get_available_providers()


def ort_cfg(**kw) -> TargetConfig:
    node = OmegaConf.merge(OmegaConf.load(Path(__file__).parents[2] / "recipes" / "target" / "ort.yaml"), kw)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TargetConfig), node))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """y = x @ W with dynamic batch and sequence: enough to create sessions."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["input_ids", "W"], ["y"])], "g", [x], [y], [w])
    path = tmp_path_factory.mktemp("ort") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.skipif(not CPU_ONLY, reason="this onnxruntime has the CUDA provider")
def test_cuda_provider_on_cpu_only_onnxruntime_is_a_build_error(tiny_onnx):
    with pytest.raises(BuildError) as e:
        O.create_session(tiny_onnx, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    msg = str(e.value)
    assert msg.startswith(f"target.providers: CUDAExecutionProvider not available in this onnxruntime "
                          f"{ort.__version__} build (available: ")
    assert "install onnxruntime-gpu==1.31.1 instead of onnxruntime (pip install 'qcompile[gpu]'" in msg
    assert msg.endswith("or use target.providers=[CPUExecutionProvider]")
    with pytest.raises(BuildError) as e:
        O.OrtTarget(ort_cfg(providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])).check_environment(None)
    assert "TensorrtExecutionProvider, CUDAExecutionProvider not available" in str(e.value)


def test_unknown_provider_name_is_a_recipe_error():
    with pytest.raises(RecipeError) as e:
        O.check_providers(["CUDAExecutonProvider"])
    assert str(e.value) == ("target.providers: unknown execution provider 'CUDAExecutonProvider' -- did you mean "
                            "'CUDAExecutionProvider'?")
    with pytest.raises(RecipeError) as e:
        O.OrtTarget(ort_cfg(provider_options={"CUDAExecutionProvider": {"device_id": 0}})).check_environment(None)
    assert str(e.value).startswith("target.provider_options.CUDAExecutionProvider: options for a provider not in "
                                   "target.providers")


def test_silent_cpu_fallback_is_caught(monkeypatch, tiny_onnx):
    """onnxruntime-gpu on a machine without a GPU lists CUDA as available and then runs on the CPU with
    only a log line. Plant exactly that: skip the availability check, let the real onnxruntime fall back."""
    monkeypatch.setattr(O, "check_providers", lambda providers: None)
    with pytest.warns(UserWarning):  # onnxruntime's own notice, easy to miss in a log
        with pytest.raises(BuildError) as e:
            O.create_session(tiny_onnx, ["CUDAExecutionProvider"])
    assert str(e.value) == ("target.providers: asked for CUDAExecutionProvider but the session runs "
                            "['CPUExecutionProvider']: onnxruntime fell back silently (no GPU, or a provider "
                            "library failed to load)")
    sess = O.create_session(tiny_onnx, ["CPUExecutionProvider"])  # the provider asked for: fine
    x = np.ones((2, 3, 4), np.float32)
    np.testing.assert_allclose(sess.run(None, {"input_ids": x})[0], x @ np.arange(16, dtype=np.float32).reshape(4, 4))


def test_gpu_provider_without_gpu_fails_at_validation(monkeypatch):
    """onnxruntime-gpu installed (CUDA 'available') on a machine without a GPU: caught before export."""
    import targets.trt_hardware as H

    monkeypatch.setattr(O, "check_providers", lambda providers: None)
    monkeypatch.setattr(O, "detect_gpu", lambda: None)  # where targets.ort looks it up
    with pytest.raises(BuildError) as e:
        O.OrtTarget(ort_cfg(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])).check_environment(None)
    assert str(e.value).startswith("target.providers: CUDAExecutionProvider needs an NVIDIA GPU and none was found")
    monkeypatch.setattr(O, "detect_gpu", lambda: H.GpuInfo("NVIDIA L4", (8, 9), "test"))
    O.OrtTarget(ort_cfg(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])).check_environment(None)


def test_provider_list_attaches_options():
    assert O.provider_list(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                           {"TensorrtExecutionProvider": {"trt_fp16_enable": False}, "CUDAExecutionProvider": {}}) == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": False}), "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_tensorrt_ep_options_from_the_recipe(tiny_onnx, tmp_path):
    cfg = ort_cfg(providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"], workspace_mb=1024,
                  max_shapes={"batch": 32, "seq": 256},
                  provider_options={"TensorrtExecutionProvider": {"trt_engine_cache_enable": False}})
    opts = O.OrtTarget(cfg).provider_options(tiny_onnx, tmp_path)
    assert opts == {"TensorrtExecutionProvider": {
        "trt_max_workspace_size": 1024 << 20,
        "trt_engine_cache_enable": False,  # the recipe's option wins over the default
        "trt_engine_cache_path": str(tmp_path / "ort_trt_cache"),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path / "ort_trt_cache"),
        "trt_profile_min_shapes": "input_ids:1x1x4", "trt_profile_opt_shapes": "input_ids:8x128x4",
        "trt_profile_max_shapes": "input_ids:32x256x4"}}
    assert O.OrtTarget(ort_cfg()).provider_options(tiny_onnx, tmp_path) == {}


@pytest.mark.skipif(not CPU_ONLY, reason="this onnxruntime has the CUDA provider")
def test_cli_cuda_provider_without_gpu_fails_before_loading(qcompile):
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=ort", "target.providers=[CUDAExecutionProvider]", *FAST)
    assert r.rc == 1, r
    assert "qcompile: build failed: target.providers: CUDAExecutionProvider not available in this onnxruntime" in r.stderr
    assert "Traceback" not in r.stderr and r.run_dirs() == []


@pytest.mark.gpu
@pytest.mark.parametrize("providers", [["CUDAExecutionProvider"], ["TensorrtExecutionProvider", "CUDAExecutionProvider"]])
def test_gpu_providers_end_to_end(qcompile, providers):
    if providers[0] not in ort.get_available_providers():
        pytest.skip(f"{providers[0]} not in this onnxruntime (pip install 'qcompile[gpu]')")
    r = qcompile("model=tiny_bert", "recipe=fp32", "target=ort", f"target.providers=[{','.join(providers)}]", *FAST)
    assert r.rc == 0, r
    import json

    (run,) = r.run_dirs()
    report = json.loads((run / "report.json").read_text())
    assert report["lower"]["session_providers"][0] == providers[0]
    assert report["check"]["fidelity"]["embedding_cosine_mean"] > 0.999


def test_disabled_optimizers_leave_skiplayernorm_unfused(tmp_path):
    """target.disabled_optimizers reaches onnxruntime: Add + LayerNormalization stays two nodes with the
    default [SkipLayerNormFusion] and becomes SkipLayerNormalization with []; the numbers agree."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = 8
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("LayerNormalization", ["s", "g", "be"], ["y"], axis=-1, epsilon=1e-5)], "add_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, hidden]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, hidden])],
        initializer=[numpy_helper.from_array(np.linspace(0.5, 1.5, hidden, dtype=np.float32), "g"),
                     numpy_helper.from_array(np.zeros(hidden, np.float32), "be")])
    path = tmp_path / "add_ln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((1, 4, hidden)).astype(np.float32) for n in "ab"}
    assert ort_cfg().disabled_optimizers == ["SkipLayerNormFusion"]
    got = {}
    for label, disabled in (("default", ort_cfg().disabled_optimizers), ("none", [])):
        saved = tmp_path / f"{label}.opt.onnx"
        sess = O.create_session(path, ["CPUExecutionProvider"], "extended", threads=1, optimized_path=saved,
                                disabled_optimizers=disabled)
        got[label] = ([n.op_type for n in onnx.load(str(saved)).graph.node], sess.run(["y"], feed)[0])
    assert got["default"][0] == ["Add", "LayerNormalization"]
    assert got["none"][0] == ["SkipLayerNormalization"]
    np.testing.assert_allclose(got["default"][1], got["none"][1], atol=1e-5)
