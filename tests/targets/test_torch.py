"""target=torch: torchao's real kernels where a step declares one (int8_dynamic, int8_weight_only), modelopt fake-quant
with the step's reason where torchao has none, and the exported program (engine.pt2) that `qcompile predict` loads
in a fresh process without the build."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from tests.steps.modelopt_cases import caps, make_step, rel_err, torch_outputs

from compiler.steps.base import StepContext
from compiler.steps.torchao_kernels import NoKernel, TorchKernel
from tests.conftest import REPO, run_cli

SENTENCES = ["A happy dog runs across the green field.", "The stock market fell sharply on Monday.",
             "She plays the violin in an orchestra.", "Rain is expected for the whole weekend.",
             "He forgot his keys at the office again."]
WEIGHT_ONLY_REL_BOUND = 2e-3  # tests/steps/test_int8_weight_only.py: int8 weights, fp32 activations
BUILD = ["model=tiny_bert", "target=torch", "data.calibration_samples=8", "data.seq_len=24", "data.batch_size=2",
         "bench.enabled=false"]


def _build(root: Path, recipe: str) -> Path:
    sentences = root / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    proc = run_cli(root, *BUILD, f"recipe={recipe}", f"data.evaluation_file={sentences}",
                   f"data.evaluation_samples={len(SENTENCES)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in (root / "outputs").rglob("manifest.json")]
    return run_dir


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("torch_int8_dynamic"), "int8_dynamic")


def _ctx(model, target="torch", exclude=("*pooler*",)):
    return StepContext(target=caps(target), model_info=model.info, exclude=list(exclude), report={})


def _graph_ops(program) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            ops[str(node.target)] = ops.get(str(node.target), 0) + 1
    return ops


def test_int8_dynamic_run_holds_a_program_with_int8_matrix_products(dynamic_run):
    import torch

    report = json.loads((dynamic_run / "report.json").read_text())
    # torchao quantized the 12 encoder Linears; on the CPU target=torch runs each as its lean int8 Linear
    assert report["lower"]["kernels"] == {"mode": "real", "real_layers": 12, "fake_quant_layers": 0,
                                          "cpu_int8_linear": 12}
    assert report["lower"]["artifact"] == "exported_program" and "torchao" not in report["lower"]
    assert report["steps"]["int8_dynamic"]["kernels"] == "real"
    assert report["steps"]["int8_dynamic"]["backend"] == "torchao Int8DynamicActivationInt8WeightConfig"
    manifest = json.loads((dynamic_run / "manifest.json").read_text())
    assert "engine.pt2" in manifest["artifacts"]
    program = torch.export.load(str(dynamic_run / "engine.pt2"))
    ops = _graph_ops(program)
    # the 12 encoder Linear layers multiply int8 x int8 (aten._int_mm) after quantizing their input per call with
    # aten ops (no torchao op: the program loads without torchao); only the pooler (excluded) is an fp32 linear,
    # and no quantized layer dequantizes its weight into an fp32 mm
    assert ops["aten._int_mm.default"] == 12 and not any(op.startswith("torchao.") for op in ops), ops
    assert ops.get("aten.linear.default", 0) == 1 and "aten.mm.default" not in ops, ops
    weights = [v for k, v in program.state_dict.items() if k.endswith("weight_t")]
    assert len(weights) == 12 and all(w.dtype == torch.int8 for w in weights)


def test_predict_in_a_fresh_process_equals_the_engine_the_check_ran(dynamic_run, tiny_bert, tmp_path):
    """The check ran the program lowered from the quantized module; predict (the CLI in a new interpreter, which
    imports nothing of the build) loads engine.pt2 and gives the same outputs for the evaluation sentences."""
    from compiler.commands.predict import predict
    from compiler.core.schema import TargetConfig
    from compiler.stages.data import tokenize
    from compiler.steps.int8_dynamic import Int8DynamicStep, Params
    from compiler.stages.models import LoadedModel
    from targets.torch import TorchTarget

    quantized = Int8DynamicStep(Params()).apply_torch(copy.deepcopy(tiny_bert.module), _ctx(tiny_bert, exclude=[]))
    model = LoadedModel(**{**tiny_bert.__dict__, "module": quantized})
    target = TorchTarget(TargetConfig(name="torch"))
    engine = target.lower(model, None, tmp_path)
    features = tokenize(tiny_bert.tokenizer, SENTENCES, 24, tiny_bert.input_names)
    run_engine = target.predictor(engine)
    expected = np.concatenate([run_engine(f)["sentence_embedding"] for f in features.batches(2)])

    got = predict(dynamic_run, SENTENCES)["outputs"]["sentence_embedding"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    proc = run_cli(REPO, "predict", str(dynamic_run), *SENTENCES, "--json", fresh_process=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = np.array([p["sentence_embedding"] for p in json.loads(proc.stdout)["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(printed, got, rtol=0, atol=1e-6)
    (tmp_path / "fp32").mkdir()
    fp32 = target.predictor(target.lower(tiny_bert, None, tmp_path / "fp32"))
    ref = np.concatenate([fp32(f)["sentence_embedding"] for f in features.batches(2)])
    cos = np.sum(ref * got, axis=-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert 0.9999 < cos.min() and not np.allclose(got, ref, atol=1e-7)  # quantized, close to fp32


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_modernbert"])
def test_int8_weight_only_torchao_is_close_to_the_modelopt_fake_quant_reference(which, request):
    """Same format (int8 weights per output channel, fp32 activations), two implementations: torchao keeps int8
    weights and multiplies them back in fp32; modelopt's fake-quant rounds the fp32 weights. Their grids differ by
    a hair (torchao: scale max / 127.5, codes -128..127; modelopt: max / 127, codes -127..127), so each rounds
    some weights to a different step. Measured relative L2 of last_hidden_state: torchao vs modelopt 4.4e-4
    (tiny BERT) and 3.6e-5 (tiny ModernBERT), each about as far from fp32 (4e-4, 2.5e-5): the weight-only bound
    of tests/steps/test_int8_weight_only.py (2e-3) holds for both and for their difference."""
    import torch

    model = request.getfixturevalue(which)
    data = request.getfixturevalue("tiny_data" if which == "tiny_bert" else "tiny_modernbert_data")
    feed = next(iter(data.evaluation.batches(8)))
    exclude = ["*pooler*", "*embeddings*", "*head*"]
    real_ctx, fake_ctx = _ctx(model, "torch", exclude), _ctx(model, "ort", exclude)
    real = make_step("int8_weight_only").apply_torch(copy.deepcopy(model.module), real_ctx)
    fake = make_step("int8_weight_only").apply_torch(copy.deepcopy(model.module), fake_ctx)
    assert real_ctx.report["kernels"] == "real" and "kernels" not in fake_ctx.report  # ort exports the fake-quant
    tensors = [m.weight for m in real.modules() if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ == "Int8Tensor"]
    assert len(tensors) == real_ctx.report["quantized"] == fake_ctx.report["weight_quantizers"] > 0
    assert all(t.qdata.dtype == torch.int8 and t.act_quant_kwargs is None for t in tensors)  # weight-only
    ref, r, f = torch_outputs(model.module, feed), torch_outputs(real, feed), torch_outputs(fake, feed)
    assert rel_err(r[0], f[0]) < WEIGHT_ONLY_REL_BOUND, rel_err(r[0], f[0])
    assert 1e-6 < rel_err(r[0], ref[0]) < WEIGHT_ONLY_REL_BOUND  # quantized, within the format's error


def test_a_format_without_a_torchao_kernel_runs_fake_quant_and_says_why(tiny_bert, tiny_data):
    ctx = StepContext(target=caps("torch"), model_info=tiny_bert.info, calibration=tiny_data.calibration,
                      exclude=["*pooler*"], report={})
    make_step("int8").apply_torch(copy.deepcopy(tiny_bert.module), ctx)
    assert ctx.report["kernels"] == "fake_quant" and ctx.report["weight_quantizers"] == 12
    assert ctx.report["kernels_reason"].startswith("calibrated static int8: torchao 0.18 has "
                                                   "Int8StaticActivationInt8WeightConfig")
    assert "target=torch lowers to int8 x int8 Linears on the CPU" in ctx.report["kernels_reason"]
    # every quantizing step declares what lowers it on target=torch
    declared = {name: type(make_step(name).torch_kernel()) for name in
                ("int8_dynamic", "int8_weight_only", "int8", "int8_static", "int8_smoothquant", "fp8", "nvfp4",
                 "int4_weight_only")}
    assert declared == {"int8_dynamic": TorchKernel, "int8_weight_only": TorchKernel, "int8": NoKernel,
                        "int8_static": NoKernel, "int8_smoothquant": NoKernel, "fp8": NoKernel, "nvfp4": NoKernel,
                        "int4_weight_only": NoKernel}


def test_a_calibrated_int8_run_multiplies_in_int8_and_predict_loads_it(tmp_path_factory):
    """int8 (modelopt's calibrated W8A8) on target=torch: the lowering runs its fake-quant Linears as int8 x int8
    products (compiler/numerics/int8_linear.Int8StaticLinear), so the run keeps an exported program that predict
    loads, and no step reason is left to give."""
    import torch

    run_dir = _build(tmp_path_factory.mktemp("torch_int8"), "int8")
    report = json.loads((run_dir / "report.json").read_text())
    kernels = report["lower"]["kernels"]
    # the recipe keeps the FFN down-projections fp32 (recipe.steps.int8.exclude): 10 of the 12 encoder Linears
    assert kernels == {"mode": "real", "real_layers": 10, "fake_quant_layers": 0, "cpu_int8_linear": 10}
    assert report["steps"]["int8"]["kernels"] == "fake_quant"  # what the step made; the lowering made it int8
    assert report["lower"]["artifact"] == "exported_program" and (run_dir / "engine.pt2").is_file()
    ops = _graph_ops(torch.export.load(str(run_dir / "engine.pt2")))
    assert ops["aten._int_mm.default"] == 10 and ops.get("aten.linear.default", 0) == 3, ops  # 2 FFN down + pooler
    proc = run_cli(REPO, "predict", str(run_dir), *SENTENCES[:2], "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout)["predictions"]) == 2


def test_a_fake_quant_run_reports_its_kernels_and_keeps_a_program_predict_loads(tmp_path_factory):
    """fp8 has no CPU kernel: its layers stay modelopt fake-quant, which now traces under torch.export (modelopt's
    export_torch_mode), so the run keeps engine.pt2 and predict runs it. A run without the program (planted: the file
    swapped for a state dict, as a module torch.export cannot trace leaves it) is refused with the reason."""
    import shutil

    import torch

    run_dir = _build(tmp_path_factory.mktemp("torch_fp8"), "fp8")
    report = json.loads((run_dir / "report.json").read_text())
    kernels = report["lower"]["kernels"]
    assert (kernels["mode"], kernels["real_layers"]) == ("fake_quant", 0) and kernels["fake_quant_layers"] > 0
    assert "cpu_int8_linear" not in kernels
    assert kernels["reasons"]["fp8"].startswith("fp8: torchao's float8 kernels")
    assert report["lower"]["artifact"] == "exported_program" and (run_dir / "engine.pt2").is_file()
    assert "notes" not in report["lower"]
    ops = _graph_ops(torch.export.load(str(run_dir / "engine.pt2")))
    assert ops.get("tensorrt.quantize_op.default", 0) > 0, ops  # modelopt's FP8 fake-quant op (a CPU kernel too)
    proc = run_cli(REPO, "predict", str(run_dir), *SENTENCES[:2], "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout)["predictions"]) == 2
    planted = tmp_path_factory.mktemp("torch_fp8_no_program") / run_dir.name
    shutil.copytree(run_dir, planted)
    (planted / "engine.pt2").unlink()
    torch.save({}, planted / "engine.pt")
    proc = run_cli(REPO, "predict", str(planted), "a sentence", "--no-verify")  # the manifest lists engine.pt2
    assert proc.returncode == 1
    assert (f"{planted} keeps engine.pt, the state dict of its quantized torch module, and no exported program "
            "(engine.pt2): torch.export could not trace that module (the run's report.json lower.notes say why)"
            ) in proc.stderr
