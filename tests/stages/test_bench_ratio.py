"""The bench stage's same-run ratio to fp32, data-shape feeds, graph FLOPs and the int8 probe's code
paths (their plumbing and arithmetic, not this machine's timing values)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from compiler.stages.bench import data_feeds, ratio_summary, run_bench
from compiler.stages.data import Features
from compiler.stages.bench.probe import cpu_info, graph_flops, int8_probe, measure


def cfg(**kw):
    base = {"batch_size": 1, "seq_len": 8, "warmup": 1, "iterations": 6, "threads": 1, "rounds": 3, "shapes": "fixed",
                "sort_by_length": False, "baseline": "fp32"}
    return SimpleNamespace(**{**base, **kw})


def busy(seconds_of_cpu: float):
    def predict(feed):
        end = time.thread_time() + seconds_of_cpu
        while time.thread_time() < end:
            pass
        return {}
    return predict


def test_ratio_summary_arithmetic():
    r = ratio_summary([[1.0, 1.0], [2.0, 2.0]], [[2.0, 2.0], [3.0, 3.0]])
    assert r["speedup_vs_fp32_rounds"] == [2.0, 1.5]
    assert r["speedup_vs_fp32_spread"] == [1.5, 2.0]
    assert r["speedup_vs_fp32"] == pytest.approx(2.5 / 1.5)  # median of all fp32 calls / median of all build calls
    total = ratio_summary([[1.0, 2.0]], [[3.0, 3.0]], combine=sum)
    assert total["speedup_vs_fp32"] == 2.0


def test_run_bench_reports_the_ratio_with_its_spread(tmp_path):
    out = run_bench(lambda: busy(0.001), ["input_ids"], cfg(), [], make_baseline=lambda: busy(0.004))
    assert out["speedup_clock"] == "thread CPU time" and out["rounds"] == 3
    assert len(out["speedup_vs_fp32_rounds"]) == 3
    lo, hi = out["speedup_vs_fp32_spread"]
    assert lo <= hi
    # the baseline burns 4x the CPU of the build: the ratio points the right way (baseline / build)
    assert out["speedup_vs_fp32"] > 2.0
    assert out["fp32_latency_ms_p50"] > out["latency_ms_p50"]


def test_baseline_none_has_no_ratio():
    out = run_bench(lambda: busy(0.0005), ["input_ids"], cfg(baseline="none"), [], make_baseline=None)
    assert "speedup_vs_fp32" not in out and out["iterations"] == 6


def features():
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    ids = np.where(mask == 1, 7, 0)
    return Features(texts=["a", "b", "c", "d"], arrays={"input_ids": ids, "attention_mask": mask})


def test_data_feeds_pad_each_batch_to_its_longest_sentence():
    feeds = data_feeds(features(), 2)
    assert [f["input_ids"].shape for f in feeds] == [(2, 6), (2, 2)]
    feeds = data_feeds(features(), 2, sort_by_length=True)
    assert [f["input_ids"].shape for f in feeds] == [(2, 2), (2, 6)]
    assert feeds[0]["attention_mask"].sum(axis=1).tolist() == [1, 2]


def test_data_shapes_pass_in_run_bench():
    out = run_bench(lambda: busy(0.0005), ["input_ids", "attention_mask"], cfg(shapes="data"), [],
                    make_baseline=lambda: busy(0.001), evaluation=features())
    d = out["data_shapes"]
    assert d["sentences"] == 4 and d["batches"] == 4 and d["tokens_max"] == 6
    assert d["shapes"].startswith("data: 4 evaluation sentences, batch 1") and "speedup_vs_fp32" in d
    assert out["shapes"].startswith("fixed: batch 1 x seq 8")


def test_graph_flops_of_tiny_bert(exported):
    _, _, fp32 = exported["tiny_bert"]
    f = graph_flops(fp32, 2, 16)
    b, s, h, i, layers = 2, 16, 64, 256, 2
    # per layer: Q, K, V, output projections, FFN up and down, attention QK^T and PV; 2 FLOPs per MAC
    expected = b * layers * (8 * s * h * h + 4 * s * h * i + 4 * s * s * h)
    assert f["gflop"] * 1e9 == expected and f["matmuls_counted"] == 16 and f["matmuls_unknown_shape"] == 0


def test_graph_flops_leaves_no_file_in_the_working_directory(tmp_path, monkeypatch):
    """A graph onnxruntime's symbolic shape inference cannot finish (a TensorRT custom op, as in every NVFP4
    graph): it raises, and the sym_shape_infer_temp.onnx (+ external data) it saves on the way lands in a scratch
    directory, not in the directory the user ran qcompile from."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("TRT_FP4DynamicQuantize", ["x"], ["y"], domain="trt")
    graph = helper.make_graph([node], "custom", [x], [y])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trt", 1)]),
              str(path))
    cwd = tmp_path / "user"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
        graph_flops(path, 1, 4)
    assert list(cwd.iterdir()) == []


def test_cpu_info_reads_flags_from_cpuinfo_text():
    text = "model name\t: Test CPU\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_int8\n"
    info = cpu_info(text)
    assert (info["cpu"], info["avx2"], info["avx512"], info["vnni"], info["amx"]) == ("Test CPU", True, True, True, True)
    assert cpu_info("model name: Old\nflags: sse sse2\n")["avx2"] is False


@pytest.mark.parametrize("runtime", ["ort", "torch"])
def test_probe_measures_both_products(runtime):
    r = measure(runtime, 16, 32, 64, rounds=1, iters=2)
    assert r["runtime"] == runtime and r["shape_mkn"] == [16, 32, 64]
    assert r["int8_gops"] > 0 and r["fp32_gflops"] > 0
    assert r["int8_gemm_vs_fp32"] == pytest.approx(r["int8_gops"] / r["fp32_gflops"])


def test_probe_is_cached_per_machine(tmp_path):
    from compiler.rundir.cache import Cache

    cache = Cache(tmp_path, versions={"test": "1"})
    first = int8_probe("ort", (16, 32, 64), 1, cache)
    again = int8_probe("ort", (16, 32, 64), 1, cache)
    assert first == again and [e["result"] for e in cache.events] == ["miss", "hit"]
    assert first["cpu_flags"] == cpu_info()
    with pytest.raises(ValueError, match="no int8 probe for runtime 'trt'"):
        int8_probe("trt", (16, 32, 64))


@pytest.mark.parametrize("override,text", [
    ("bench.baseline=int8", "bench.baseline: bad value 'int8' -- use fp32 or none"),
    ("bench.shapes=sentences", "bench.shapes: bad value 'sentences' -- use fixed or data"),
    ("bench.rounds=0", "bench.rounds: must be > 0, got 0"),
])
def test_bad_bench_options_are_recipe_errors(override, text):
    from compiler.core.errors import RecipeError
    from compiler.stages.validate import validate
    from tests.conftest import compose

    with pytest.raises(RecipeError) as e:
        validate(compose("model=tiny_bert", "recipe=int8_dynamic", "target=ort", override))
    assert str(e.value).startswith(text)


def test_build_reports_the_same_run_ratio_probe_and_rail(qcompile):
    """A real build: report.json and REPORT.md carry speedup_vs_fp32 (fixed and data shapes), the manifest
    the probe's figure and CPU flags, the rail table the int8_speed row."""
    import json

    from tests.conftest import FAST

    r = qcompile("model=tiny_bert", "recipe=int8_dynamic", "target=ort", *FAST, "bench.shapes=data",
                 "bench.iterations=4", "bench.rounds=2")
    assert r.rc == 0, r
    (run_dir,) = r.run_dirs()
    report = json.loads((run_dir / "report.json").read_text())
    bench = report["bench"]
    assert bench["speedup_vs_fp32"] > 0 and len(bench["speedup_vs_fp32_rounds"]) == 2
    assert bench["baseline"].startswith("fp32 engine of the same model on target ort")
    assert bench["baseline_kind"] == "fp32_same_run" and report["schema_version"] == 1  # the fact, as a field
    assert bench["data_shapes"]["speedup_vs_fp32"] > 0 and bench["data_shapes"]["sentences"] == 32
    assert bench["flops"]["matmuls_counted"] == 16 and 0 < bench["fp32_fraction_of_fp32_peak"]
    md = (run_dir / "REPORT.md").read_text()
    assert "| speedup_vs_fp32 (same run, thread CPU time) |" in md and "| data: 32 evaluation sentences" in md
    probe = json.loads((run_dir / "manifest.json").read_text())["int8_probe"]
    assert probe["shape_mkn"] == [32, 64, 256] and set(probe["cpu_flags"]) >= {"avx2", "vnni", "amx", "avx512"}
    rail = {x["rail"]: x for x in report["doctor"]}["int8_speed"]
    assert rail["int8_layers"] == 12 and rail["int8_gemm_vs_fp32"] == round(probe["int8_gemm_vs_fp32"], 3)
    assert rail["status"] == ("warned" if probe["int8_gemm_vs_fp32"] < 1.15 else "passed")


def test_int8_speed_note_when_fast_kernels_give_a_slow_build():
    from compiler.stages.bench import int8_speed_note

    rail = {"rail": "int8_speed", "int8_layers": 12, "int8_gemm_vs_fp32": 1.96}
    note = int8_speed_note({"speedup_vs_fp32": 0.94}, [rail])
    assert note.startswith("int8 matrix products run 1.96x fp32 on this CPU (probe), yet this build is 0.94x its "
                           "fp32 engine end to end (same run)")
    assert int8_speed_note({"speedup_vs_fp32": 1.6}, [rail]) is None  # the build is faster: nothing to explain
    assert int8_speed_note({"speedup_vs_fp32": 0.94}, [{**rail, "int8_gemm_vs_fp32": 1.0}]) is None  # the rail warns
    assert int8_speed_note({"speedup_vs_fp32": 0.94}, [{**rail, "int8_layers": 0}]) is None
