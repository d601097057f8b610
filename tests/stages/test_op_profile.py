"""The bench's per-op-type profile (compiler/stages/bench/op_profile.py): its structure and arithmetic on planted
timings, real onnxruntime and torch profiles of tiny models, a tiny_bert build's report section, and
bench.profile=false. Never a timing value: only sums, counts, names and the bound's formula."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import compose

from compiler.core.errors import RecipeError
from compiler.stages.bench import run_bench
from compiler.stages.bench.op_profile import (
    PROFILE_RUNS,
    OpTable,
    Profiler,
    bound_from_profiles,
    int8_bound,
    markdown_lines,
    op_table,
    ort_table,
    product_site,
)


def assert_table_sane(table: dict, ops_allowed=None):
    ops = table["ops"]
    assert ops, "an empty profile"
    assert math.isclose(sum(o["share"] for o in ops), 1.0, rel_tol=1e-9)
    assert all(isinstance(o["calls"], int) and o["calls"] > 0 for o in ops)
    assert all(o["ms"] >= 0 for o in ops)
    assert math.isclose(sum(o["ms"] for o in ops), table["total_ms"], rel_tol=1e-9)
    assert len({o["op"] for o in ops}) == len(ops)
    if ops_allowed is not None:
        assert {o["op"] for o in ops} <= set(ops_allowed)


# -- the bound's formula ----------------------------------------------------------------------------------

def test_int8_bound_on_planted_timings():
    b = int8_bound(quantized_fp32_ms=80.0, rest_fp32_ms=20.0, int8_vs_fp32=2.0, build_speedup=1.5)
    assert b.bound_ms == pytest.approx(60.0)
    assert b.bound_speedup == pytest.approx(100.0 / 60.0)  # 1.667x
    assert b.fraction_of_bound == pytest.approx(0.9)
    assert int8_bound(80.0, 20.0, 2.0).fraction_of_bound is None  # no same-run speed-up: no fraction
    # nothing quantized: the bound is the fp32 engine itself
    assert int8_bound(0.0, 100.0, 2.0, 1.0).bound_speedup == pytest.approx(1.0)


def test_int8_bound_rejects_a_ratio_that_is_not_positive():
    with pytest.raises(ValueError, match="int8_vs_fp32 must be positive, got 0"):
        int8_bound(80.0, 20.0, 0.0)


def test_bound_counts_only_the_products_the_build_runs_in_int8():
    fp32 = OpTable("onnxruntime", 4, 100.0, [], products_ms={"q": 50.0, "k": 30.0, "attn": 5.0})
    build = OpTable("onnxruntime", 4, 70.0, [], int8_sites=["k", "q", "not-in-fp32"])
    b = bound_from_profiles(build, fp32, 2.0, 1.5)
    assert b.quantized_fp32_ms == pytest.approx(80.0) and b.rest_fp32_ms == pytest.approx(20.0)
    assert b.bound_ms == pytest.approx(60.0) and b.fraction_of_bound == pytest.approx(0.9)
    assert (b.int8_products, b.products_found_in_fp32) == (3, 2)


# -- tables from planted profiler output ----------------------------------------------------------------

def test_op_table_shares_calls_and_medians():
    nodes = {"q": ("MatMul", [30.0, 30.0, 300.0]), "k": ("MatMul", [30.0, 31.0, 29.0]), "a": ("Add", [40.0] * 3)}
    t = op_table("x", 3, nodes, sites={"q": ["q"], "k": ["k"]}, int8_sites=["q"])
    assert [o.op for o in t.ops] == ["MatMul", "Add"]
    assert [o.calls for o in t.ops] == [2, 1]  # nodes per op: calls per run
    assert t.ops[0].ms == pytest.approx(0.060)  # per-node medians: the preempted 300 us call does not count
    assert t.total_ms == pytest.approx(0.100)
    assert [o.share for o in t.ops] == pytest.approx([0.6, 0.4])
    assert t.products_ms == pytest.approx({"q": 0.03, "k": 0.03}) and t.int8_sites == ["q"]


def test_product_site_strips_what_quantization_and_fusions_append():
    assert product_site("/l.0/query/MatMul_quant") == "/l.0/query/MatMul"
    assert product_site("/l.0/self/MatMul/MatMulScaleFusion/") == "/l.0/self/MatMul"
    assert product_site("/l.0/out/MatMul") == "/l.0/out/MatMul"


def _node(name, op, ts, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_ort_table_drops_the_cold_run_and_finds_int8_sites():
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              _node("/q/MatMul_quant", "DynamicQuantizeMatMul", 10, 90),  # cold run: dropped
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
              _node("/q/MatMul_quant", "DynamicQuantizeMatMul", 210, 30),
              _node("/s/MatMul", "MatMul", 240, 10),
              {"cat": "Node", "name": "/s/MatMul_fence_before", "ts": 239, "dur": 0, "args": {"op_name": "MatMul"}}]
    t = ort_table(events)
    assert t.runs == 1 and [o.op for o in t.ops] == ["DynamicQuantizeMatMul", "MatMul"]
    assert t.int8_sites == ["/q/MatMul"] and t.products_ms == pytest.approx({"/q/MatMul": 0.03, "/s/MatMul": 0.01})


# -- real profilers on tiny models ----------------------------------------------------------------------

def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["a"], name="add"),
         helper.make_node("Softmax", ["a"], ["y"], name="sm", axis=-1)], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnxruntime_profile_of_a_session_then_profiler_off(tmp_path):
    from compiler.runners.sessions import ort_session, session_predictor

    profiler = Profiler(runs_torch=False)
    predict = session_predictor(ort_session(_tiny_onnx(tmp_path / "t.onnx"), opt_level="disable", threads=1,
                                            profile_prefix=profiler.prefix("build")))
    feed = {"x": np.ones((4, 8), np.float32)}
    profiler.warm_up("build", predict, feed, warmup=0)
    table = profiler.tables()["build"].to_dict()
    assert table["runs"] == PROFILE_RUNS and table["profiler"] == "onnxruntime"
    assert_table_sane(table, ops_allowed={"MatMul", "Add", "Softmax"})
    assert {o["op"]: o["calls"] for o in table["ops"]} == {"MatMul": 1, "Add": 1, "Softmax": 1}
    assert list(table["products_ms"]) == ["mm"] and table["int8_sites"] == []
    assert table["providers"] == ["CPUExecutionProvider"]
    assert predict.end_profiling() == ""  # the profiler is off: the timed loop that follows is not profiled
    section = profiler.section({"int8_gemm_vs_fp32": 2.0}, None, is_fp32=True).to_dict()
    assert section["bound_skipped"] == "the build is the fp32 engine" and "fp32" not in section
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("target_name", ["ort", "trt"])
def test_targets_open_a_profiled_session_for_the_build(tmp_path, target_name):
    """target=ort's session and target=trt's onnxruntime CPU fallback open with the profiler when given a
    prefix: the build's profiled loop after the timed one (Profiler.after_timing) gets its table."""
    from compiler.core.schema import TargetConfig
    from targets.base import Engine, get_target

    onnx_path = _tiny_onnx(tmp_path / "t.onnx")
    target = get_target(target_name)(TargetConfig(name=target_name))
    handle = onnx_path if target_name == "ort" else {"kind": "ort", "onnx": onnx_path}
    engine = Engine(target=target_name, path=None, handle=handle, input_names=["x"], output_names=["y"])
    assert target.predictor(engine, threads=1).end_profiling() == ""  # the bench's own session: no profiler
    profiler = Profiler(runs_torch=False, make_profiled=lambda prefix: target.predictor(engine, 1, prefix))
    profiler.after_timing("build", None, {"x": np.ones((4, 8), np.float32)})
    table = profiler.tables()["build"].to_dict()
    assert_table_sane(table, ops_allowed={"MatMul", "Add", "Softmax", "Gemm", "FusedMatMul"})
    assert table["runs"] == PROFILE_RUNS and table["providers"] == ["CPUExecutionProvider"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao: still ships the kernels
def test_torch_profile_names_the_int8_linear_sites():
    import torch

    torch.manual_seed(0)
    fp32 = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)

    def predictor(module):
        def predict(feed):
            with torch.inference_mode():
                return {"y": module(torch.from_numpy(feed["x"])).numpy()}
        return predict

    profiler = Profiler(runs_torch=True)
    feed = {"x": np.ones((4, 16), np.float32)}
    profiler.warm_up("fp32", predictor(fp32), feed, warmup=2)
    profiler.warm_up("build", predictor(int8), feed, warmup=2)
    f, b = profiler.tables()["fp32"].to_dict(), profiler.tables()["build"].to_dict()
    for t in (f, b):
        assert t["runs"] == PROFILE_RUNS and t["profiler"] == "torch.profiler"
        assert_table_sane(t)
        assert all(o["op"].startswith(("aten::", "quantized::")) for o in t["ops"])
    assert {o["op"]: o["calls"] for o in f["ops"]}["aten::linear"] == 2
    assert b["int8_sites"] == ["aten::linear#0", "aten::linear#1"] and f["int8_sites"] == []
    assert sorted(f["products_ms"]) == ["aten::linear#0", "aten::linear#1"]
    section = profiler.section({"int8_gemm_vs_fp32": 1.5}, 1.2, is_fp32=False).to_dict()
    assert section["bound"]["products_found_in_fp32"] == 2 and section["bound"]["int8_vs_fp32"] == 1.5
    assert section["bound"]["fraction_of_bound"] == pytest.approx(1.2 / section["bound"]["bound_speedup"])


def test_an_engine_without_a_profiler_is_said_skipped():
    cfg = SimpleNamespace(batch_size=1, seq_len=8, warmup=2, iterations=2, threads=1, rounds=1, shapes="fixed",
                          sort_by_length=False, baseline="none")
    profiler = Profiler(runs_torch=False)
    calls = []
    run_bench(lambda: (lambda feed: calls.append(1) or {}), ["input_ids"], cfg, [], profiler=profiler)
    assert len(calls) == 2 + 2  # warm-up and timed calls as without the profiler
    assert set(profiler.section(None, None, is_fp32=False).to_dict()) == {"skipped"}


def test_the_build_is_profiled_after_the_timed_loop_and_the_fp32_engine_in_its_warm_up():
    """The build's load and warm-up are the peak-memory window: no profiler there; the profiled build runs
    come after every timed call."""
    log = []

    class Recorder:
        def warm_up(self, name, predict, feed, warmup):
            log.append(("warm_up", name))
            for _ in range(warmup):
                predict(feed)

        def after_timing(self, name, predict, feed):
            log.append(("after_timing", name))

    def make(name):
        return lambda: (lambda feed: log.append(("call", name)) or {})

    cfg = SimpleNamespace(batch_size=1, seq_len=8, warmup=1, iterations=2, threads=1, rounds=1, shapes="fixed",
                          sort_by_length=False, baseline="fp32")
    run_bench(make("build"), ["input_ids"], cfg, [], make_baseline=make("fp32"), profiler=Recorder())
    assert ("warm_up", "build") not in log and log.count(("warm_up", "fp32")) == 1
    assert log[-1] == ("after_timing", "build") and log.count(("after_timing", "build")) == 1


def test_markdown_table_has_top_ops_other_and_the_bound():
    build = op_table("onnxruntime", 1, {f"n{i}": (f"Op{i}", [float(10 - i)]) for i in range(10)})
    fp32 = op_table("onnxruntime", 1, {"m1": ("MatMul", [40.0]), "m2": ("MatMul", [40.0]), "a": ("Add", [20.0])})
    section = {"note": "n", "build": build.to_dict(), "fp32": fp32.to_dict(),
               "bound": int8_bound(80.0, 20.0, 2.0, 1.5).to_dict() | {"int8_products": 2, "products_found_in_fp32": 2}}
    text = "\n".join(markdown_lines(section, top=4))
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| op ")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["MatMul", "Add", "Op0", "Op1", "other", "total"]
    assert "at most 1.667x fp32; this build is at 0.90 of that bound" in text
    assert markdown_lines({"skipped": "why"}) == ["Op profile: skipped (why)."]
    alone = markdown_lines({"note": "n", "build": fp32.to_dict(), "bound_skipped": "the build is the fp32 engine"})
    assert "| op | ms | share | calls |" in alone and "| MatMul | 0.080 | 80.0% | 2 |" in alone
    assert alone[-1] == "int8 bound: not computed (the build is the fp32 engine)."


# -- a build ---------------------------------------------------------------------------------------------

def _build(tmp_path, *overrides):
    from compiler.pipeline import run_build
    from compiler.rundir.cache import open_cache
    from compiler.stages.validate import validate

    spec = validate(compose("model=tiny_bert", "target=ort", f"cache.dir={tmp_path / 'cache'}",
                            "data.calibration_samples=8", "data.evaluation_samples=8", "data.seq_len=32",
                            "bench.iterations=2", "bench.seq_len=32", *overrides))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_build(spec, run_dir, cache=open_cache(spec.cache)), run_dir


def test_int8_static_build_reports_its_profile_and_bound(tmp_path):
    import onnx

    report, run_dir = _build(tmp_path, "recipe=int8_static")
    profile = report["bench"]["profile"]
    assert set(profile) >= {"build", "fp32", "bound", "note"}
    # op names come from the graph onnxruntime runs (its optimized graph, saved as engine.ort.onnx)
    graph_ops = {n.op_type for n in onnx.load(str(run_dir / "engine.ort.onnx"), load_external_data=False).graph.node}
    assert_table_sane(profile["build"], ops_allowed=graph_ops)
    assert_table_sane(profile["fp32"])
    assert profile["build"]["runs"] == profile["fp32"]["runs"] == PROFILE_RUNS
    assert {"QuantizeLinear", "MatMulIntegerToFloat"} <= {o["op"] for o in profile["build"]["ops"]}
    assert not any("Integer" in o["op"] for o in profile["fp32"]["ops"])
    bound = profile["bound"]
    assert bound["int8_products"] == bound["products_found_in_fp32"] > 0
    assert bound["int8_vs_fp32"] == report["int8_probe"]["int8_gemm_vs_fp32"]
    assert bound["build_speedup"] == report["bench"]["speedup_vs_fp32"]
    assert bound["quantized_fp32_ms"] + bound["rest_fp32_ms"] == pytest.approx(profile["fp32"]["total_ms"])
    assert sum(profile["fp32"]["products_ms"].values()) <= profile["fp32"]["total_ms"] * (1 + 1e-9)
    expect = int8_bound(bound["quantized_fp32_ms"], bound["rest_fp32_ms"], bound["int8_vs_fp32"],
                        bound["build_speedup"])
    assert bound["fraction_of_bound"] == pytest.approx(expect.fraction_of_bound)
    text = (run_dir / "REPORT.md").read_text()
    assert "### Where the time goes (onnxruntime on CPUExecutionProvider)" in text and "| other |" in text and "int8 bound:" in text
    assert report["bench"]["iterations"] == 2  # the timed loop is what it was


def test_profile_false_leaves_no_profile_and_scaling_is_opt_in(tmp_path):
    """One cheap build for two bench switches: bench.profile=false, and the opt-in bench.scaling (its
    structure; compiler/stages/bench/scaling.py's own tests are in test_scaling.py)."""
    report, run_dir = _build(tmp_path, "recipe=fp32", "bench.profile=false", "check.enabled=false",
                             "bench.scaling=true", "bench.server_batch=2")
    assert "profile" not in report["bench"]
    text = (run_dir / "REPORT.md").read_text()
    assert "Where the time goes" not in text
    scaling = report["bench"]["scaling"]
    assert scaling["shapes"] == [[1, 32], [2, 32]] and scaling["threads"][0] == 1
    assert len(scaling["rows"]) == 2 * len(scaling["threads"])
    assert all(r["fp32_samples_per_s"] is None for r in scaling["rows"])  # fp32 is its own baseline: none
    assert "### Throughput by batch and threads" in text


def test_profile_is_validated_like_the_other_keys():
    from compiler.stages.validate import validate

    with pytest.raises(RecipeError) as info:
        validate(compose("model=tiny_bert", "recipe=fp32", "bench.profile=maybe"))
    assert str(info.value).startswith("bench.profile: bad value 'maybe'")
    assert validate(compose("model=tiny_bert", "recipe=fp32")).bench.profile is True

