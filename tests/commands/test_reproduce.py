"""Reproducible builds: `qcompile verify` catches a tampered or missing artifact and a TensorRT engine on
another TensorRT/GPU; `qcompile rebuild` of a run gives byte-identical model.onnx and quantized graphs,
and names the artifacts that differ when they do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compiler.commands.reproduce import compare_artifacts, verify_run
from tests.conftest import FAST, run_cli


def _cli(cwd: Path, *args, timeout=900):
    return run_cli(cwd, *args, timeout=timeout)


def _build(cwd: Path, recipe: str, target: str = "ort", allow_gate_failure: bool = False) -> Path:
    proc = _cli(cwd, "model=tiny_bert", f"recipe={recipe}", f"target={target}", *FAST)
    assert proc.returncode in ((0, 3) if allow_gate_failure else (0,)), proc.stderr[-3000:]
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir() and (p / "manifest.json").exists()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("fp32"), "fp32")


@pytest.fixture
def run_copy(fp32_run, tmp_path):
    dest = tmp_path / fp32_run.name
    shutil.copytree(fp32_run, dest)
    return dest


# ---------------------------------------------------------------- verify

def test_verify_passes_on_an_untouched_run(fp32_run):
    proc = _cli(fp32_run.parent, "verify", str(fp32_run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((fp32_run / "manifest.json").read_text())
    assert {"model.onnx", "engine.ort.onnx", "recipe.yaml"} <= set(manifest["artifacts"])
    assert f"artifacts: {len(manifest['artifacts'])}/{len(manifest['artifacts'])} match manifest.json" in proc.stdout
    assert "versions: same as recorded" in proc.stdout and "hardware: same as recorded" in proc.stdout
    assert proc.stdout.rstrip().endswith("verify: OK")


def test_verify_detects_a_tampered_artifact(run_copy):
    onnx = run_copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    onnx.write_bytes(bytes(data))
    (run_copy / "engine.ort.onnx").unlink()
    proc = _cli(run_copy.parent, "verify", str(run_copy))
    assert proc.returncode == 1
    assert "MODIFIED  model.onnx" in proc.stdout and "MISSING   engine.ort.onnx" in proc.stdout
    assert "recipe.yaml" in proc.stdout and "verify: FAILED" in proc.stdout
    res = verify_run(run_copy)
    assert res.artifacts["model.onnx"] == "modified" and res.artifacts["engine.ort.onnx"] == "missing"
    assert res.artifacts["recipe.yaml"] == "ok"


def test_verify_reports_other_versions_and_hardware(run_copy):
    from compiler.rundir.manifest import hardware, package_versions

    versions = {**package_versions(), "onnxruntime": "1.99.0"}
    here = {**hardware(), "cpu": "Some Other CPU"}
    res = verify_run(run_copy, versions=versions, hardware=here)
    assert res.versions == {"onnxruntime": {"recorded": package_versions()["onnxruntime"], "installed": "1.99.0"}}
    assert res.hardware["cpu"]["here"] == "Some Other CPU"
    assert res.exit_code() == 0 and res.exit_code(strict=True) == 1  # artifacts intact: only --strict fails
    (run_copy / "notes.txt").write_text("added later")
    assert verify_run(run_copy).unlisted == ["notes.txt"]


def _fake_trt_run(run_copy: Path, trt: str, gpu: str, cap: str) -> None:
    """A run directory as the TensorRT target leaves it on a GPU machine: engine.plan in the manifest."""
    from compiler.core.hashing import file_sha256

    (run_copy / "engine.plan").write_bytes(b"serialized engine")
    m = json.loads((run_copy / "manifest.json").read_text())
    m["artifacts"]["engine.plan"] = file_sha256(run_copy / "engine.plan")
    m["versions"]["tensorrt"] = trt
    m["hardware"].update({"gpu": gpu, "gpu_capability": cap, "cuda": "12.8"})
    (run_copy / "manifest.json").write_text(json.dumps(m))


def test_verify_refuses_a_tensorrt_engine_from_another_gpu_or_version(run_copy):
    from compiler.rundir.manifest import hardware, package_versions

    _fake_trt_run(run_copy, "10.11.0", "NVIDIA H100 80GB HBM3", "9.0")
    same = verify_run(run_copy, versions={**package_versions(), "tensorrt": "10.11.0"},
                      hardware={**hardware(), "gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0", "cuda": "12.8"})
    assert same.engine_problems == [] and same.exit_code() == 0
    other_trt = verify_run(run_copy, versions={**package_versions(), "tensorrt": "10.12.0"},
                           hardware={**hardware(), "gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0",
                                     "cuda": "12.8"})
    assert other_trt.exit_code() == 1
    assert other_trt.engine_problems[0].startswith("engine.plan was built for tensorrt=10.11.0; this machine has "
                                                   "tensorrt=10.12.0: a TensorRT engine is never reused")
    other_gpu = verify_run(run_copy, versions={**package_versions(), "tensorrt": "10.11.0"},
                           hardware={**hardware(), "gpu": "NVIDIA A100-SXM4-80GB", "gpu_capability": "8.0",
                                     "cuda": "12.8"})
    assert other_gpu.exit_code() == 1
    assert "gpu=NVIDIA H100 80GB HBM3, gpu_capability=9.0; this machine has gpu=NVIDIA A100-SXM4-80GB, " \
           "gpu_capability=8.0" in other_gpu.engine_problems[0]
    # this CPU machine: no GPU at all
    here = verify_run(run_copy)
    assert here.exit_code() == 1 and "engine.plan was built for" in here.engine_problems[0]


def test_verify_refuses_what_is_no_finished_run(tmp_path):
    (tmp_path / "x.FAILED").mkdir()
    (tmp_path / "x.FAILED" / "FAILED.md").write_text("# qcompile: build failed\n")
    proc = _cli(tmp_path, "verify", str(tmp_path / "x.FAILED"))
    assert proc.returncode == 2
    assert "is a failed build (see its FAILED.md): it has no manifest" in proc.stderr
    proc = _cli(tmp_path, "rebuild", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


# ---------------------------------------------------------------- rebuild

@pytest.mark.parametrize("recipe", ["int8_static"])  # fp32: test_rebuild_names_the_artifacts_that_differ
def test_rebuild_gives_identical_hashes(tmp_path, recipe):
    """A quantized run rebuilt from its recipe.yaml (cache off) gives byte-identical model.onnx,
    engine and recipe: fixed seeds, deterministic export and calibration. (Its accuracy gate on 32 tiny
    evaluation sentences does not matter here: a gate-failed run is complete and rebuilds the same.)"""
    run = _build(tmp_path, recipe, allow_gate_failure=True)
    proc = _cli(tmp_path, "rebuild", str(run.relative_to(tmp_path)))  # the default place, relative paths
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rebuilds = list((tmp_path / "outputs" / "rebuild").glob("*/*"))
    assert len(rebuilds) == 1, rebuilds
    again = rebuilds[0]
    assert again.name.endswith(run.name.split("_", 1)[1])
    assert again.name.endswith(".gate-failed") == run.name.endswith(".gate-failed")
    original = json.loads((run / "manifest.json").read_text())["artifacts"]
    rebuilt = json.loads((again / "manifest.json").read_text())["artifacts"]
    assert {"model.onnx", "engine.ort.onnx", "recipe.yaml"} <= set(original)
    assert rebuilt == original
    assert f"rebuild: {len(original)}/{len(original)} artifacts byte-identical" in proc.stdout
    record = json.loads((again / "rebuild.json").read_text())
    assert record["identical"] is True and record["inputs"] == {
        "data_sha256": "same", "recipe_sha256": "same", "weights_sha256": "same"}
    report = json.loads((again / "report.json").read_text())
    assert report["cache"] == {"enabled": False}  # really rebuilt, not copied from the cache
    assert report["steps"][recipe]["where"] == "onnx"


def test_a_trt_rebuild_writes_the_same_build_script(tmp_path):
    """build_engine.sh quotes the qcompile command of the build (its overrides): the rebuild quotes the same one, so
    every artifact, the script included, is byte-identical (it quoted `model=... recipe=... target=trt` without the
    overrides before)."""
    run = _build(tmp_path, "fp32", target="trt")
    proc = _cli(tmp_path, "rebuild", str(run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    original = json.loads((run / "manifest.json").read_text())["artifacts"]
    assert "build_engine.sh" in original
    assert f"rebuild: {len(original)}/{len(original)} artifacts byte-identical" in proc.stdout, proc.stdout


def test_rebuild_names_the_artifacts_that_differ(run_copy, tmp_path):
    """Plant a difference: the original manifest recorded another engine; the rebuild must say so."""
    m = json.loads((run_copy / "manifest.json").read_text())
    m["artifacts"]["engine.ort.onnx"] = "0" * 64
    (run_copy / "manifest.json").write_text(json.dumps(m))
    proc = _cli(tmp_path, "rebuild", str(run_copy), "--out", str(tmp_path / "again"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DIFFERENT: engine.ort.onnx" in proc.stdout
    lines = {ln.split()[0]: ln.split()[-1] for ln in proc.stdout.splitlines()
             if ln.startswith(("model.onnx ", "engine.ort.onnx ", "recipe.yaml "))}
    assert lines == {"model.onnx": "identical", "engine.ort.onnx": "differs", "recipe.yaml": "identical"}
    # the rebuild dir keeps its own, verifiable manifest; a second rebuild into it is refused
    assert _cli(tmp_path, "verify", str(tmp_path / "again")).returncode == 0
    again = _cli(tmp_path, "rebuild", str(run_copy), "--out", str(tmp_path / "again"))
    assert again.returncode == 2 and "exists already" in again.stderr


def test_compare_artifacts_expects_tensorrt_plans_to_differ():
    cmp = compare_artifacts({"model.onnx": "a", "engine.plan": "b", "old.txt": "c"},
                            {"model.onnx": "a", "engine.plan": "x", "new.txt": "d"})
    assert {k: v["result"] for k, v in cmp.items()} == {
        "engine.plan": "differs (expected)", "model.onnx": "identical", "new.txt": "only in rebuild",
        "old.txt": "only in original"}
