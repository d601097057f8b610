"""`qcompile predict <run dir> ...`: a finished run directory alone (tokenizer files, predict.json, the engine)
turns text into exactly the outputs the check stage compared, and refuses anything that is not a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, data_cfg, model_cfg, run_cli

SENTENCES = ["A happy dog runs across the green field.", "The stock market fell sharply on Monday.",
             "She plays the violin in an orchestra.", "Rain is expected for the whole weekend.",
             "He forgot his keys at the office again."]
BUILD = ["recipe=int8_static", "data.calibration_samples=8", "data.seq_len=24", "data.batch_size=2",
         "bench.enabled=false"]


def _cli(cwd: Path, *args, timeout=900):
    return run_cli(cwd, *args, timeout=timeout)


def _build(root: Path, *overrides) -> Path:
    sentences = root / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    proc = _cli(root, *BUILD, f"data.evaluation_file={sentences}", f"data.evaluation_samples={len(SENTENCES)}",
                *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in (root / "outputs").rglob("manifest.json")]
    return run_dir


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("predict_embedding"), "model=tiny_bert", "target=ort")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("predict_classifier"), "model=tiny_bert", "target=ort",
                  "model.task=classification", "+model.tiny.num_labels=3")


def check_stage_target_outputs(run_dir: Path, model_overrides, tmp_path: Path):
    """What the check stage compared for this run, recomputed the way the pipeline does: the evaluation set
    loaded and tokenized by load_data, batched by data.batch_size, the target freshly lowered from model.onnx,
    Polygraphy's Comparator against the fp32 reference."""
    from compiler.core.schema import GateConfig, TargetConfig
    from compiler.pipeline import reference_runner
    from compiler.stages.check import compare_outputs
    from compiler.stages.data import load_data
    from compiler.stages.models import load_model
    from compiler.stages.validate import _typed
    from targets.base import get_target

    recipe = OmegaConf.load(run_dir / "recipe.yaml")
    model = load_model(model_cfg("tiny_bert", **model_overrides))
    data = load_data(data_cfg(**OmegaConf.to_container(recipe.data)), model.tokenizer, model.input_names)
    feeds = list(data.evaluation.batches(int(recipe.data.batch_size)))
    target = get_target(str(recipe.target.name))(_typed(TargetConfig, recipe.target, "target"))
    engine = target.lower(model, run_dir / "model.onnx", tmp_path)
    return compare_outputs(reference_runner(model), target.runner(engine), feeds, GateConfig())["outputs"]["target"]


def test_predict_embeddings_equal_the_check_stage_target_outputs(embedding_run, tmp_path):
    from compiler.commands.predict import predict

    expected = check_stage_target_outputs(embedding_run, {}, tmp_path)
    got = predict(embedding_run, SENTENCES)
    assert got["target"] == "ort" and got["task"] == "embedding"
    for name in ("last_hidden_state", "sentence_embedding"):
        np.testing.assert_array_equal(got["outputs"][name], expected[name])
    # the CLI prints every value of --json: float32 -> JSON -> float32 is exact
    proc = _cli(REPO, "predict", str(embedding_run), *SENTENCES[:2], "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)["predictions"]
    assert [p["text"] for p in printed] == SENTENCES[:2]
    np.testing.assert_array_equal(np.array([p["sentence_embedding"] for p in printed], np.float32),
                                  expected["sentence_embedding"][:2])
    assert printed[0]["norm"] == pytest.approx(1.0, abs=1e-5)  # mean pool + L2 norm inside the graph


def test_predict_on_a_trt_run_without_tensorrt_equals_the_check_stage_cpu_runner(tmp_path_factory, tmp_path):
    """No TensorRT here: the check ran model.onnx on the CPU runner lower() chose; predict runs the same."""
    from compiler.commands.predict import predict

    run_dir = _build(tmp_path_factory.mktemp("predict_trt"), "model=tiny_bert", "target=trt")
    report = json.loads((run_dir / "report.json").read_text())
    if report["lower"].get("engine_built"):
        pytest.skip("TensorRT built an engine here: the CPU-runner path is not what this run used")
    expected = check_stage_target_outputs(run_dir, {}, tmp_path)
    got = predict(run_dir, SENTENCES)
    assert got["target"] == "trt"
    np.testing.assert_array_equal(got["outputs"]["sentence_embedding"], expected["sentence_embedding"])


def test_predict_reads_sentences_from_a_file_and_prints_first_values_and_norm(embedding_run, tmp_path, capsys):
    lines = tmp_path / "in.txt"
    lines.write_text(f"{SENTENCES[0]}\n\n{SENTENCES[1]}\n")
    rc, stdout, stderr = _main(capsys, "predict", str(embedding_run), "--file", str(lines))
    assert rc == 0, stderr
    out = stdout.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("norm 1.0000") and out[0].endswith(SENTENCES[0])
    assert "(64 values)" in out[0]  # tiny_bert's hidden size


def test_predict_classifier_gives_the_config_label_names_and_scores(classifier_run, tmp_path, capsys):
    spec = json.loads((classifier_run / "predict.json").read_text())
    assert spec["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"] and spec["task"] == "classification"
    expected = check_stage_target_outputs(classifier_run, {"task": "classification", "tiny": {"num_labels": 3}},
                                          tmp_path)["logits"]
    rc, stdout, stderr = _main(capsys, "predict", str(classifier_run), *SENTENCES, "--json")
    assert rc == 0, stderr
    printed = json.loads(stdout)["predictions"]
    np.testing.assert_array_equal(np.array([p["logits"] for p in printed], np.float32), expected)
    for p, row in zip(printed, expected):
        assert p["label"] == f"LABEL_{int(np.argmax(row))}"
        assert sum(p["scores"].values()) == pytest.approx(1.0)
        assert p["score"] == max(p["scores"].values())


def test_run_dir_holds_the_tokenizer_as_hashed_artifacts_and_verify_passes(embedding_run):
    manifest = json.loads((embedding_run / "manifest.json").read_text())
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "predict.json"} <= set(manifest["artifacts"])
    spec = json.loads((embedding_run / "predict.json").read_text())
    assert spec["seq_len"] == 24 and spec["padding"] == "max_length" and spec["labels"] is None
    proc = _cli(REPO, "verify", str(embedding_run))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _main(capsys, *argv):
    """The CLI in this process (a subprocess costs a fresh import of torch): (exit code, stdout, stderr)."""
    from compiler.commands.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["missing", "empty", "failed", "no_predict_files"])
def test_predict_on_a_dir_that_is_not_a_finished_run_is_one_line_exit_2(case, embedding_run, tmp_path, capsys):
    target = tmp_path / "run"
    if case == "empty":
        target.mkdir()
    elif case == "failed":
        _copy_run(embedding_run, target)
        (target / "FAILED.md").write_text("# failed\n")
    elif case == "no_predict_files":  # a run directory written before predict existed
        _copy_run(embedding_run, target)
        (target / "predict.json").unlink()
    rc, stdout, stderr = _main(capsys, "predict", str(target), "a sentence")
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: recipe error: run_dir:"), stderr
    assert str(target) in lines[0]
    assert stdout == ""


def _flip_weights(engine: Path) -> None:
    """Invert 16 bytes in the middle of every matrix-product weight (quantized or not) of an ONNX file, in
    place: the file still loads, every sentence's outputs change."""
    import onnx

    model = onnx.load(str(engine))
    weights = {i for n in model.graph.node if "MatMul" in n.op_type or n.op_type == "DequantizeLinear"
               for i in n.input}
    data = bytearray(engine.read_bytes())
    for init in model.graph.initializer:
        if init.name in weights and len(init.raw_data) >= 64:
            start = data.find(init.raw_data) + len(init.raw_data) // 2
            data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    engine.write_bytes(bytes(data))


TAMPER = {
    "engine": ("engine.ort.onnx", "engine.ort.onnx is modified (its sha256 differs from the one in manifest.json)"),
    "tokenizer": ("tokenizer/tokenizer.json", "tokenizer/tokenizer.json is modified"),
    "predict.json": ("predict.json", "predict.json is modified"),
    "model.onnx removed": ("model.onnx", "model.onnx is missing (manifest.json lists it)"),
    "graph added": ("extra.onnx", "extra.onnx is not in manifest.json (added after the build)"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_predict_refuses_a_file_that_differs_from_the_manifest(case, embedding_run, tmp_path, capsys):
    """Issue 17 item 4: one changed byte in the engine's weights made `verify` fail while `predict` served the
    altered weights. Every file predict may load is checked against manifest.json first."""
    run = _copy_run(embedding_run, tmp_path / "run")
    name, text = TAMPER[case]
    if case == "engine":
        _flip_weights(run / name)
    elif case == "model.onnx removed":
        (run / name).unlink()
    elif case == "graph added":
        (run / name).write_bytes((run / "model.onnx").read_bytes())
    else:  # JSON that still parses, other bytes
        (run / name).write_text((run / name).read_text() + "\n")
    rc, stdout, stderr = _main(capsys, "predict", str(run), "a sentence")
    assert rc == 2, stderr
    assert stderr.splitlines() == [stderr.strip()] and stdout == ""
    assert stderr.startswith(f"qcompile: recipe error: run_dir: {run}: {text}"), stderr
    assert stderr.rstrip().endswith(f"-- qcompile verify {run} lists every difference; pass --no-verify to run "
                                    "them anyway"), stderr


def test_predict_no_verify_runs_the_changed_engine(embedding_run, tmp_path, capsys):
    from compiler.commands.predict import predict

    run = _copy_run(embedding_run, tmp_path / "run")
    _flip_weights(run / "model.onnx")  # the graph the ort target serves (engine.ort.onnx is ORT's optimized copy)
    rc, stdout, stderr = _main(capsys, "predict", str(run), *SENTENCES[:2], "--json", "--no-verify")
    assert rc == 0, stderr
    got = np.array([r["sentence_embedding"] for r in json.loads(stdout)["predictions"]], dtype=np.float32)
    original = predict(embedding_run, SENTENCES[:2])["outputs"]["sentence_embedding"]
    assert not np.array_equal(got, original)  # the altered weights did run


@pytest.mark.parametrize("how", ["name", "report"])
def test_predict_refuses_a_gate_failed_run_unless_asked(how, embedding_run, tmp_path, capsys):
    """A gate-failed build is complete but not a passing run: predict names it; --allow-gate-failed runs it."""
    if how == "name":  # <name>.gate-failed, as every build that fails its gate ends (compiler/rundir/lifecycle.py)
        run = _copy_run(embedding_run, tmp_path / "run.gate-failed")
    else:  # a run dir renamed by hand: the report still says so
        run = _copy_run(embedding_run, tmp_path / "run")
        report = json.loads((run / "report.json").read_text())
        (run / "report.json").write_text(json.dumps({**report, "status": "gate failed"}))
    rc, stdout, stderr = _main(capsys, "predict", str(run), "a sentence")
    assert rc == 2 and stdout == ""
    assert stderr.strip() == (f"qcompile: recipe error: run_dir: {run} failed its accuracy gate (its REPORT.md says "
                              "why) -- pass a run that passed, or --allow-gate-failed to look at this one anyway")
    rc, stdout, stderr = _main(capsys, "predict", str(run), "a sentence", "--allow-gate-failed")
    assert rc == 0 and stdout.startswith("norm "), stderr
