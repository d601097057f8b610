"""Sweep summaries: rows from run directories in every end state, the Pareto front, the files written by
the Hydra callback at the end of a real multirun (joblib, in parallel), and the shipped sweep presets."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compiler.commands.sweep import collect_rows, pareto_front, summarize_main, sweep_exit_code, write_summary
from compiler.core.status import Status
from tests.conftest import FAST, REPO


# ---------------------------------------------------------------- synthetic sweep directories

def _report(model, recipe, target, status, ms, cos, top1, mb, rss, reason=None, cache=None):
    # the same-run ratio as compiler/stages/bench/ reports it: none for fp32, which is its own baseline
    speed = ({"baseline": "none: the build is the fp32 engine itself", "baseline_kind": "self"} if recipe == "fp32" else
             {"speedup_vs_fp32": 9.5 / ms, "baseline": "fp32 engine of the same model on target ort, timed round-robin",
              "baseline_kind": "fp32_same_run"})
    r = {"schema_version": 1, "build": {"model": model, "recipe": recipe, "target": target}, "status": status,
         "bench": {"ms_per_sample": ms, "samples_per_s": 1000.0 / ms, "artifact_mb": mb, "peak_rss_mb": rss, **speed},
         "check": {"fidelity": {"embedding_cosine_mean": cos, "top1_agreement": top1}},
         "cache": cache or {"enabled": False}}
    if reason:
        r["reason"] = reason
    return r


def _run(sweep: Path, name: str, num: int, choices, overrides, report=None, failed=None, report_name="report.json"):
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(
        {"hydra": {"job": {"num": num}, "runtime": {"choices": choices}}}))
    (d / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (d / "recipe.yaml").write_text("seed: 0\n")
    if report is not None:
        (d / report_name).write_text(json.dumps(report))
    if failed is not None:
        (d / "FAILED.md").write_text(
            f"# qcompile: {failed[0]}\n\n{failed[1]}\n\nThis directory is not a usable build.\n")
    return d


@pytest.fixture
def sweep(tmp_path):
    """Six jobs of a made-up sweep, one in each end state a run can have."""
    s = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    s.mkdir(parents=True)
    (s / "multirun.yaml").write_text("hydra: {}\n")

    def ch(recipe, target):
        return {"model": "minilm", "recipe": recipe, "target": target}

    _run(s, "0_minilm_fp32_ort", 0, ch("fp32", "ort"), ["recipe=fp32", "target=ort", "seed=0"],
         _report("minilm", "fp32", "ort", "passed", 9.5, 0.99999999, 1.0, 90.9, 610.0,
                 cache={"enabled": True, "dir": "/c", "export": "miss", "entries": []}))
    _run(s, "1_minilm_int8_static_ort", 1, ch("int8_static", "ort"), ["recipe=int8_static", "target=ort", "seed=0"],
         _report("minilm", "int8_static", "ort", "passed", 4.1, 0.9952, 0.96, 23.1, 420.0,
                 cache={"enabled": True, "dir": "/c", "export": "hit", "ort_calibration": "miss", "entries": []}))
    _run(s, "2_minilm_int8_dynamic_ort.gate-failed", 2, ch("int8_dynamic", "ort"),
         ["recipe=int8_dynamic", "target=ort", "seed=0"],
         _report("minilm", "int8_dynamic", "ort", "gate failed", 3.9, 0.934, 0.81, 23.0, 400.0,
                 reason="task: mean embedding cosine 0.93400 < 0.99 (short by 0.05600)"))
    _run(s, "3_minilm_fp16_torch.FAILED", 3, ch("fp16", "torch"), ["recipe=fp16", "target=torch", "seed=0"],
         failed=("build failed", "export (torchscript, opset 17) failed: RuntimeError: boom"))
    # job 4: nvfp4 on ort: validation refused it, its staging dir was discarded; only the job record is left
    (s / ".jobs").mkdir()
    (s / ".jobs" / "4.json").write_text(json.dumps({
        "num": 4, "model": "minilm", "recipe": "nvfp4", "target": "ort", "exit_code": 2,
        "status": Status.NOT_RUNNABLE,
        "overrides": ["recipe=nvfp4", "target=ort", "seed=0"],
        "error": "recipe error: recipe.steps.nvfp4: nvfp4 is not runnable on target=ort "
                 "-- use target=torch or target=trt"}))
    (s / ".jobs" / "0.json").write_text(json.dumps({"num": 0, "exit_code": 0, "error": None}))
    _run(s, "5_minilm_fp32_torch.partial", 5, ch("fp32", "torch"), ["recipe=fp32", "target=torch", "seed=1"])
    (s / ".jobs" / "6.json").write_text(json.dumps({
        "num": 6, "model": "minilm", "recipe": "int8_static", "target": "ort", "exit_code": 2,
        "status": Status.RECIPE_ERROR,
        "overrides": ["recipe=int8_static", "target=ort", "seed=2"],
        "error": "recipe error: recipe.steps.int8_static.calibration: unknown method 'kl'"}))
    return s


def test_rows_from_every_end_state(sweep):
    rows = collect_rows(sweep)
    assert [r.num for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    S = Status
    assert [r.status for r in rows] == [S.PASSED, S.PASSED, S.GATE_FAILED, S.BUILD_FAILED, S.NOT_RUNNABLE, S.INCOMPLETE,
                                        S.RECIPE_ERROR]
    assert [r.label for r in rows] == ["fp32/ort", "int8_static/ort", "int8_dynamic/ort", "fp16/torch", "nvfp4/ort",
                                       "fp32/torch", "int8_static/ort"]
    r1 = rows[1]
    assert (r1.ms_per_sample, r1.embedding_cosine, r1.top1_agreement, r1.artifact_mb, r1.peak_rss_mb) == (
        4.1, 0.9952, 0.96, 23.1, 420.0)
    assert r1.samples_per_s == pytest.approx(1000 / 4.1)
    assert r1.speedup_vs_fp32 == pytest.approx(9.5 / 4.1)
    assert rows[0].speedup_vs_fp32 is None and rows[0].fp32_self and not r1.fp32_self
    assert r1.cache == "export hit, ort_calibration miss"
    assert rows[2].reason.startswith("task: mean embedding cosine 0.93400")
    assert rows[3].reason == "export (torchscript, opset 17) failed: RuntimeError: boom"
    assert rows[4].reason.startswith("recipe.steps.nvfp4: nvfp4 is not runnable on target=ort")
    assert rows[4].run_dir == "" and rows[3].run_dir == "3_minilm_fp16_torch.FAILED"
    # the Pareto front on the same-run speed ratio (fp32: 1 by definition): fp32 (most faithful), int8_static
    # (faster, still faithful) and the gate-failed int8_dynamic (fastest); nothing without measurements
    assert [r.num for r in rows if r.pareto] == [0, 1, 2]
    assert sweep_exit_code(rows) == 3  # the highest exit code of its runs, like the basic launcher's
    assert sweep_exit_code([r for r in rows if r.status != Status.GATE_FAILED]) == 2
    assert sweep_exit_code([r for r in rows if r.status in (Status.PASSED, Status.BUILD_FAILED)]) == 1
    assert sweep_exit_code([r for r in rows if r.status in (Status.PASSED, Status.NOT_RUNNABLE)]) == 0
    assert sweep_exit_code([r for r in rows if r.status in (Status.PASSED, Status.GATE_FAILED)]) == 3


def test_summary_files(sweep):
    files = write_summary(sweep)
    assert sorted(files) == ["pareto.png", "summary.csv", "summary.md"]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    assert rows[1]["recipe"] == "int8_static" and float(rows[1]["ms_per_sample"]) == 4.1
    assert float(rows[1]["embedding_cosine"]) == 0.9952 and rows[1]["pareto"] == "yes"
    assert rows[3]["status"] == "build failed" and rows[3]["ms_per_sample"] == ""
    # seed differs between runs: the overrides column shows it, model/recipe/target have their own
    assert [r["overrides"] for r in rows] == ["seed=0"] * 5 + ["seed=1", "seed=2"]
    md = (sweep / "summary.md").read_text()
    assert "7 runs: 2 passed, 1 gate failed, 1 build failed, 1 recipe error, 1 not runnable, 1 incomplete." in md
    assert ("| 1 | minilm | int8_static | ort | seed=0 | 23.10 | 4.100 | 243.9 | 2.32 | 420 | 0.995200 | 0.960 | * "
            "| passed | `1_minilm_int8_static_ort` |") in md
    assert "- 4 nvfp4/ort [seed=0]: **not runnable**: recipe.steps.nvfp4: nvfp4 is not runnable on target=ort" in md
    assert "Pareto front (higher x fp32 (same run), higher embedding cosine to fp32): int8_dynamic/ort [seed=0], " \
           "int8_static/ort [seed=0], fp32/ort [seed=0]." in md
    png = (sweep / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(str(sweep / "pareto.png")).shape[:2]
    assert (w, h) == (880, 605)


def test_summarize_command_rebuilds_the_same_files(sweep, capsys):
    write_summary(sweep)
    before = {n: (sweep / n).read_bytes() for n in ("summary.md", "summary.csv", "pareto.png")}
    for n in before:
        (sweep / n).unlink()
    assert summarize_main([str(sweep)]) == 0
    assert {n: (sweep / n).read_bytes() for n in before} == before  # same runs, same bytes
    assert "| 0 | minilm | fp32 | ort |" in capsys.readouterr().out


def test_summarize_refuses_what_is_no_sweep(tmp_path):
    from compiler.core.errors import RecipeError

    with pytest.raises(RecipeError, match="holds no run directories"):
        summarize_main([str(tmp_path)])
    with pytest.raises(RecipeError, match="is not a directory"):
        summarize_main([str(tmp_path / "nope")])


def _front_by_sorting(points):
    """An independent reference: sort by latency, keep each point more faithful than all faster ones
    (ties in both coordinates all stay)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best, last = [], float("-inf"), None
    for i in order:
        x, y = points[i]
        if y > best or (last is not None and (x, y) == last):
            front.append(i)
            best, last = max(best, y), (x, y)
    return sorted(front)


def test_pareto_front_matches_a_reference():
    assert pareto_front([(1.0, 0.9), (2.0, 0.95), (3.0, 0.94), (0.5, 0.5), (2.0, 0.95)]) == [0, 1, 3, 4]
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.choice([1, 2, 3, 4, 5]) * 1.0, rng.choice([0.9, 0.95, 0.99, 0.999]))
               for _ in range(rng.randint(1, 9))]
        assert pareto_front(pts) == _front_by_sorting(pts), pts


# ---------------------------------------------------------------- a real multirun

def _sweep_dir(cwd: Path) -> Path:
    dirs = [p for p in (cwd / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow  # three fresh interpreters (the CLI and two joblib workers) and four builds: ~50 s loaded
def test_real_parallel_multirun_writes_the_summary(qcompile, tmp_path):
    """qcompile -m over 2 recipes x 2 targets with the joblib launcher, 2 jobs at a time: 4 rows with the
    numbers each run's report.json holds, and no file written outside the run directories."""
    res = qcompile("-m", "model=tiny_bert", "recipe=fp32,int8_dynamic", "target=torch,ort",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST,
                   fresh_process=True)  # joblib's worker processes outlive a sweep run inside the test process
    assert res.rc == 0, res
    sweep = _sweep_dir(tmp_path)
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [(r["recipe"], r["target"]) for r in rows] == [("fp32", "torch"), ("fp32", "ort"),
                                                          ("int8_dynamic", "torch"), ("int8_dynamic", "ort")]
    for row in rows:
        run = sweep / row["run_dir"]
        report = json.loads((run / "report.json").read_text())
        assert row["status"] == report["status"] == "passed", row
        assert float(row["ms_per_sample"]) == report["bench"]["ms_per_sample"] > 0
        assert float(row["samples_per_s"]) == report["bench"]["samples_per_s"] > 0
        assert float(row["peak_rss_mb"]) == report["bench"]["peak_rss_mb"] > 50
        assert float(row["embedding_cosine"]) == report["check"]["fidelity"]["embedding_cosine_mean"]
        engine = {"torch": ["engine.pt2"], "ort": ["engine.ort.onnx"]}[row["target"]]
        assert float(row["artifact_mb"]) == pytest.approx(sum((run / e).stat().st_size for e in engine) / 1e6)
    by = {(r["recipe"], r["target"]): r for r in rows}
    assert float(by["fp32", "ort"]["embedding_cosine"]) > 0.99999
    for t in ("torch", "ort"):  # quantized: away from fp32 (tiny random weights lose little), not broken
        assert 0.99 < float(by["int8_dynamic", t]["embedding_cosine"]) < float(by["fp32", t]["embedding_cosine"])
    assert float(by["int8_dynamic", "ort"]["artifact_mb"]) < float(by["fp32", "ort"]["artifact_mb"])
    # the fp32 export, this machine's int8 probe and the fp32 reference outputs are shared through the cache
    cache = dict(kv.rsplit(" ", 1) for kv in by["fp32", "ort"]["cache"].split(", "))
    assert cache["export"] in ("miss", "hit") and cache["reference_outputs"] in ("miss", "hit")
    assert by["int8_dynamic", "ort"]["speedup_vs_fp32"] and not by["fp32", "ort"]["speedup_vs_fp32"]
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "4 runs: 4 passed." in (sweep / "summary.md").read_text()
    # parallel jobs shared no writable file: nothing appeared next to outputs/ in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    # each job kept to its own run directory
    assert sorted(p.name for p in sweep.iterdir()) == sorted(
        [".jobs", "multirun.yaml", "summary.md", "summary.csv", "pareto.png", "summary.json"]
        + [r["run_dir"] for r in rows])
    # the sweep's exit code, where `qcompile -m` read it
    assert json.loads((sweep / "summary.json").read_text()) == {"exit_code": 0, "runs": 4,
                                                                "statuses": {"passed": 4}}
    # summarize rebuilds the same table from the directory alone
    csv_before = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    again = qcompile("summarize", str(sweep))
    assert again.rc == 0, again
    assert (sweep / "summary.csv").read_text() == csv_before


def test_sweep_of_impossible_points_still_summarizes(qcompile, tmp_path):
    """Recipe errors leave no run directory; the summary still lists them, with the reason, and a
    combination the capability table rules out is "not runnable", not a failure of the sweep."""
    from compiler.steps.base import STEP_REGISTRY, load_all_steps

    load_all_steps()
    blocked = sorted((name, t) for name, cls in STEP_REGISTRY.items() for t in ("torch", "ort")
                     if t not in cls.runs_on)
    assert blocked, "nvfp4 does not run on ort: the capability table must rule something out"
    step, target = blocked[0]
    res = qcompile("-m", "model=tiny_bert", "recipe=fp32", f"+recipe.steps.{step}={{}}", f"target={target}",
                   "data.seq_len=32,9999", "bench.seq_len=32")
    sweep = _sweep_dir(tmp_path)
    rows = collect_rows(sweep)
    assert [r.status for r in rows] == [Status.NOT_RUNNABLE, Status.RECIPE_ERROR]
    assert f"{step} is not runnable on target={target}" in rows[0].reason
    assert "9999 is above tiny_bert's maximum of 512 positions" in rows[1].reason
    assert res.rc == 2, res  # the recipe error counts, the impossible combination does not
    assert "not runnable" in (sweep / "summary.md").read_text()


# ---------------------------------------------------------------- shipped presets

def _compose(*overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compiler.core.paths import RECIPES_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _validate_job(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compiler.core.paths import RECIPES_DIR
    from compiler.stages.validate import validate

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
    return validate(cfg)


def test_formats_preset_sweeps_every_recipe_on_torch_and_ort():
    """+sweep=formats: every recipe in recipes/recipe/ x torch, ort. Each point validates, or is ruled
    out by the capability table (then the summary says "not runnable")."""
    from compiler.core.errors import RecipeError

    from omegaconf import OmegaConf

    from compiler.core.paths import RECIPES_DIR

    params = _compose("+sweep=formats").hydra.sweeper.params
    excluded = ("nvfp4_gptq", "int4_awq", "nvfp4_distill", "int4_awq_distill")
    assert params["recipe"] == f"glob(*,exclude=[{','.join(excluded)}])" and params["target"] == "torch,ort"
    # the excluded recipes are calibrated-rounding or distilled variants of formats the sweep covers, nothing else
    for name in excluded:
        steps = OmegaConf.load(Path(RECIPES_DIR) / "recipe" / f"{name}.yaml").steps
        assert "distill" in steps or any(str(s.get("algorithm", "max")) not in ("max", "rtn")
                                         for s in steps.values()), name
    recipes = sorted(p.stem for p in (Path(RECIPES_DIR) / "recipe").glob("*.yaml") if p.stem not in excluded)
    assert "fp32" in recipes
    outcomes = {}
    for recipe in recipes:
        for target in ("torch", "ort"):
            job = ["+sweep=formats", f"recipe={recipe}", f"target={target}"]
            try:
                _validate_job(job)
                outcomes[recipe, target] = "ok"
            except RecipeError as e:
                assert e.status == Status.NOT_RUNNABLE, (recipe, target, e.message)
                assert "is not runnable on target=" in e.message, (recipe, target, e.message)
                outcomes[recipe, target] = "not runnable"
    assert outcomes["fp32", "torch"] == outcomes["fp32", "ort"] == "ok"
    for recipe in ("nvfp4", "nvfp4_rotate"):  # torch/trt only, once they exist
        if recipe in recipes:
            assert outcomes[recipe, "ort"] == "not runnable" and outcomes[recipe, "torch"] == "ok"


def test_calibration_preset_points_all_validate():
    params = _compose("+sweep=calibration").hydra.sweeper.params
    methods = str(params["recipe.steps.int8_static.calibration"]).split(",")
    samples = [int(s) for s in str(params["data.calibration_samples"]).split(",")]
    assert methods == ["minmax", "entropy", "percentile"] and samples == [16, 64, 240]
    for m in methods:
        for n in samples:
            spec = _validate_job(["+sweep=calibration", "recipe=int8_static", "target=ort",
                                  f"recipe.steps.int8_static.calibration={m}", f"data.calibration_samples={n}"])
            assert [s.name for s in spec.onnx_steps] == ["int8_static"]
            assert spec.onnx_steps[0].params.calibration == m and spec.data.calibration_samples == n


@pytest.mark.parametrize("preset,plugin,base", [("slurm", "hydra_plugins.hydra_submitit_launcher", "submitit_slurm"),
                                                ("ray_cluster", "hydra_plugins.hydra_ray_launcher", "ray")])
def test_launcher_presets_extend_the_plugin_configs(preset, plugin, base):
    """hydra/launcher=slurm|ray_cluster extend the plugins' own configs; without the plugin installed (it is not a
    qcompile dependency) composing says which plugin config is missing."""
    import importlib.util

    node = OmegaConf.load(REPO / "recipes" / "hydra" / "launcher" / f"{preset}.yaml")
    assert list(node.defaults) == [base]
    if importlib.util.find_spec(plugin) is None:
        with pytest.raises(Exception, match=f"Could not load 'hydra/launcher/{base}'"):
            _compose(f"hydra/launcher={preset}", "recipe=fp32")
    else:
        launcher = _compose(f"hydra/launcher={preset}", "recipe=fp32").hydra.launcher
        for key, value in OmegaConf.to_container(node).items():
            if key != "defaults":
                assert OmegaConf.to_container(launcher)[key] == value
