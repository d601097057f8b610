"""The int8_saturation rail: integer products whose int8 weights use all 8 bits are counted in the graph (int8_dynamic,
int8_static Q/DQ) and not where reduce_range keeps them to 7 bits or nothing multiplies in int8; a planted probe's
CPU flags decide warn (no VNNI/AMX: onnxruntime's u8s8 pairs saturate in int16) / pass, naming the recipe key that
removes the dependence."""

from __future__ import annotations

import pytest

from compiler.core.schema import DoctorConfig
from compiler.rails import PASSED, SKIPPED, WARNED, RailContext
from compiler.rails.int8_saturation import judge, run, u8s8_products
from compiler.steps.base import StepContext

AVX2_ONLY = {"cpu": "AMD EPYC", "avx2": True, "fma": True, "avx512": False, "vnni": False, "amx": False}
AVX512_NO_VNNI = {"cpu": "Xeon Skylake", "avx2": True, "avx512": True, "vnni": False, "amx": False}
VNNI = {"cpu": "Xeon", "avx2": True, "fma": True, "avx512": True, "vnni": True, "amx": False}


def probe(flags):
    return {"runtime": "ort", "int8_gemm_vs_fp32": 2.0, "cpu_flags": flags}


@pytest.fixture(scope="module")
def graphs(exported, tmp_path_factory):
    from compiler.steps.int4_weight_only import Int4WeightOnlyStep
    from compiler.steps.int4_weight_only import Params as P4
    from compiler.steps.int8_dynamic import Int8DynamicStep
    from compiler.steps.int8_dynamic import Params as PD
    from compiler.steps.int8_static import Int8StaticStep
    from compiler.steps.int8_static import Params as PS
    from targets.ort import OrtTarget

    model, data, fp32 = exported["tiny_bert"]
    tmp = tmp_path_factory.mktemp("int8_saturation")

    def ctx():
        return StepContext(target=OrtTarget.capabilities, model_info=model.info, work_dir=tmp, report={},
                           calibration=data.calibration)

    return {"fp32": fp32,
            "int4": Int4WeightOnlyStep(P4()).apply_onnx(fp32, tmp / "i4.onnx", ctx()),
            "dynamic": Int8DynamicStep(PD()).apply_onnx(fp32, tmp / "dyn.onnx", ctx()),
            "dynamic_7bit": Int8DynamicStep(PD(reduce_range=True)).apply_onnx(fp32, tmp / "dyn7.onnx", ctx()),
            "static": Int8StaticStep(PS(exclude=[])).apply_onnx(fp32, tmp / "st.onnx", ctx()),
            "static_7bit": Int8StaticStep(PS(exclude=[], reduce_range=True)).apply_onnx(fp32, tmp / "st7.onnx", ctx())}


def test_products_and_their_eight_bit_weights_are_counted(graphs):
    import onnx

    counts = {k: u8s8_products(onnx.load(str(p), load_external_data=False)) for k, p in graphs.items()}
    # tiny BERT's 12 encoder Linears (the pooler is excluded by the model section): MatMulInteger / QDQ MatMul;
    # reduce_range keeps every weight in [-64, 64]; fp32 and int4 weight-only multiply in floating point
    assert counts == {"fp32": (0, 0), "int4": (0, 0), "dynamic": (12, 12), "dynamic_7bit": (12, 0),
                      "static": (12, 12), "static_7bit": (12, 0)}, counts


def test_a_cpu_without_vnni_warns_and_names_the_fix(graphs):
    from compiler.steps.int8_dynamic import Int8DynamicStep, Params
    from targets.ort import OrtTarget

    step = Int8DynamicStep(Params())
    for flags in (AVX2_ONLY, AVX512_NO_VNNI):
        ctx = RailContext(target=OrtTarget.capabilities, config=DoctorConfig(), onnx_path=graphs["dynamic"],
                          int8_probe=probe(flags), recipe_steps=[step])
        r = run(ctx)
        assert r["status"] == WARNED and (r["u8s8_products"], r["eight_bit_weights"]) == (12, 12)
        assert r["message"] == (
            f"12 of 12 u8s8 int8 products have 8-bit weights and {flags['cpu']} has no VNNI/AMX: onnxruntime adds "
            "their u8*s8 pairs in int16, which saturates, so the check's figures are this CPU's and a VNNI CPU "
            "computes the graph exactly (recipe.steps.int8_dynamic.reduce_range=true gives 7-bit weights that "
            "cannot saturate)")


def test_vnni_passes_and_still_says_what_another_cpu_would_do(graphs):
    from targets.ort import OrtTarget

    ctx = RailContext(target=OrtTarget.capabilities, config=DoctorConfig(), onnx_path=graphs["static"],
                      int8_probe=probe(VNNI))
    r = run(ctx)
    assert r["status"] == PASSED
    assert r["message"].startswith("12 of 12 u8s8 int8 products have 8-bit weights: exact on Xeon (VNNI); a CPU "
                                   "without VNNI adds their pairs in int16 and saturates")
    assert r["message"].endswith("(quantizing with reduce_range=True gives 7-bit weights that cannot saturate)")


def test_seven_bit_weights_or_no_products_pass_on_any_cpu(graphs):
    from targets.ort import OrtTarget

    for name in ("dynamic_7bit", "static_7bit", "fp32", "int4"):
        ctx = RailContext(target=OrtTarget.capabilities, config=DoctorConfig(), onnx_path=graphs[name],
                          int8_probe=probe(AVX2_ONLY))
        assert run(ctx)["status"] == PASSED, name
    assert judge(12, 0, probe(AVX2_ONLY), "")["message"] == ("12 u8s8 int8 products, every weight within 7 bits: "
                                                              "exact on any CPU")


def test_without_a_probe_it_reads_this_cpu_and_skips_a_cpu_without_the_saturating_kernels(monkeypatch):
    from compiler.rails import int8_saturation

    monkeypatch.setattr(int8_saturation, "cpu_info", lambda: dict(AVX2_ONLY))
    assert judge(12, 12, None, "")["status"] == WARNED  # `qcompile doctor` on a file: no probe, the CPU's own flags
    assert judge(12, 12, {"skipped": "bench.probe=false"}, "")["status"] == WARNED
    arm = {"cpu": "Neoverse-N1", "avx2": False, "avx512": False, "vnni": False, "amx": False}
    monkeypatch.setattr(int8_saturation, "cpu_info", lambda: arm)
    r = judge(12, 12, None, "")
    assert r["status"] == SKIPPED and r["message"] == ("12 of 12 u8s8 int8 products have 8-bit weights; Neoverse-N1 "
                                                       "shows no AVX2/AVX-512 flags, whose u8s8 kernels are the ones "
                                                       "that saturate")


def test_applies_where_onnxruntime_runs_the_graph_on_the_cpu():
    from compiler.rails import int8_saturation
    from targets.ort import OrtTarget
    from targets.torch import TorchTarget
    from targets.trt import TrtTarget

    assert int8_saturation.applies_to(OrtTarget.capabilities)
    assert not int8_saturation.applies_to(TrtTarget.capabilities) and not int8_saturation.applies_to(TorchTarget.capabilities)


def test_weights_saved_as_external_data_are_read_from_beside_the_graph(graphs, tmp_path):
    """A graph over 2 GB keeps its weights in model.onnx.data and the rails load graphs without it: the rail reads
    each int8 weight from there (a build of a 2 GB BERT failed on this rail before)."""
    import onnx

    from targets.ort import OrtTarget

    model = onnx.load(str(graphs["dynamic"]))
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    assert (tmp_path / "model.onnx.data").stat().st_size > 0
    ctx = RailContext(target=OrtTarget.capabilities, config=DoctorConfig(), onnx_path=tmp_path / "model.onnx",
                      int8_probe=probe(AVX2_ONLY))
    r = run(ctx)
    assert r["status"] == WARNED and (r["u8s8_products"], r["eight_bit_weights"]) == (12, 12)
