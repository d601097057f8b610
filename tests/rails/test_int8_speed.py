"""The int8_speed rail: a planted probe result decides warn / pass; int8 compute is found in the graph
(MatMulInteger, W8A8 Q/DQ) and not in weight-only graphs."""

from __future__ import annotations

import pytest

from compiler.rails import PASSED, SKIPPED, WARNED, RailContext
from compiler.rails.int8_speed import graph_int8_compute, judge, run
from compiler.steps.base import StepContext

AVX2_ONLY = {"cpu": "AMD EPYC", "avx2": True, "fma": True, "avx512": False, "vnni": False, "amx": False}
VNNI = {"cpu": "Xeon", "avx2": True, "fma": True, "avx512": True, "vnni": True, "amx": False}


def planted(ratio, flags=AVX2_ONLY):
    return {"runtime": "ort", "int8_gemm_vs_fp32": ratio, "cpu_flags": flags}


def test_int8_no_faster_than_fp32_warns_and_says_why():
    r = judge(12, planted(1.0))
    assert r["status"] == WARNED
    assert r["message"] == ("int8 on this CPU: 1.00x fp32 for matrix products (ort on AMD EPYC: AVX2, no VNNI/AMX); "
                            "expect size and memory gains, not speed -- a CPU with VNNI/AMX or a GPU runs int8 faster")
    assert r["int8_gemm_vs_fp32"] == 1.0 and r["int8_layers"] == 12


def test_int8_faster_passes():
    r = judge(12, planted(2.31, VNNI))
    assert r["status"] == PASSED
    assert r["message"] == "int8 on this CPU: 2.31x fp32 for matrix products (ort on Xeon: VNNI, AVX512, AVX2, no AMX)"


def test_no_int8_compute_passes_whatever_the_probe():
    assert judge(0, planted(0.5))["status"] == PASSED


def test_applies_to_cpu_targets_only():
    from compiler.rails import int8_speed
    from targets.ort import OrtTarget
    from targets.trt import TrtTarget

    assert int8_speed.applies_to(OrtTarget.capabilities) and not int8_speed.applies_to(TrtTarget.capabilities)


def test_no_probe_is_skipped_with_the_reason():
    r = judge(3, {"skipped": "target trt runs on a GPU; the probe measures CPU matrix products"})
    assert r["status"] == SKIPPED and r["message"].endswith("the probe measures CPU matrix products")
    assert judge(3, None)["status"] == SKIPPED


@pytest.fixture(scope="module")
def graphs(exported, tmp_path_factory):
    from compiler.steps.int4_weight_only import Int4WeightOnlyStep
    from compiler.steps.int4_weight_only import Params as P4
    from compiler.steps.int8_dynamic import Int8DynamicStep
    from compiler.steps.int8_dynamic import Params as P8
    from targets.ort import OrtTarget

    model, data, fp32 = exported["tiny_bert"]
    tmp = tmp_path_factory.mktemp("int8_speed")

    def ctx():
        return StepContext(target=OrtTarget.capabilities, model_info=model.info, work_dir=tmp, report={}, calibration=data.calibration)

    out = {"fp32": fp32,
           "dynamic": Int8DynamicStep(P8()).apply_onnx(fp32, tmp / "dyn.onnx", ctx()),
           "int4": Int4WeightOnlyStep(P4()).apply_onnx(fp32, tmp / "i4.onnx", ctx())}
    return out


def test_graph_int8_compute_counts(graphs):
    import onnx

    counts = {k: graph_int8_compute(onnx.load(str(p), load_external_data=False)) for k, p in graphs.items()}
    # int8_dynamic: 12 weight MatMuls become MatMulInteger; int4 weight-only computes in fp32
    assert counts == {"fp32": 0, "dynamic": 12, "int4": 0}


def test_rail_on_a_graph_with_a_planted_probe(graphs):
    from compiler.core.schema import DoctorConfig
    from targets.ort import OrtTarget

    ctx = RailContext(target=OrtTarget.capabilities, config=DoctorConfig(), onnx_path=graphs["dynamic"], int8_probe=planted(0.98))
    r = run(ctx)
    assert r["status"] == WARNED and r["int8_layers"] == 12 and "0.98x fp32" in r["message"]
    ctx = RailContext(target=OrtTarget.capabilities, config=DoctorConfig(), onnx_path=graphs["int4"], int8_probe=planted(0.98))
    assert run(ctx)["status"] == PASSED
