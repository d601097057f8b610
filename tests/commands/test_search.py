"""Search instead of grids: the objectives a build returns to Hydra's Optuna sweeper (passing, gate-failed and
failed builds), a real NSGA-II search on tiny_bert, and the axes the sweep summary picks (same-run speed ratio
or latency; size against task drop for a repair-budget sweep)."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compiler.commands.search import PENALTY, BuildResult, check_objectives, objective_values
from compiler.commands.sweep import (COSINE, DROP, LATENCY, REPAIR_DROP, REPAIR_SIZE, SIZE, SPEEDUP, Row, choose_axes,
                                     mark_pareto, plot_pareto, read_run, render_markdown, sweep_exit_code, write_summary)
from compiler.core.errors import RecipeError
from compiler.core.report_types import SCHEMA_VERSION, Report
from compiler.core.status import Status
from tests.conftest import FAST

NAMES = ("fidelity_loss", "artifact_mb", "time_vs_fp32", "task_drop", "latency_ms")


def _typed(report: dict) -> Report:
    """A hand-made report.json of this schema version, as readers get it (missing values read as None)."""
    return Report.from_dict({"schema_version": SCHEMA_VERSION, **report}, partial=True)


def _report(status, cos=0.99, mb=23.1, speedup=1.25, ms=4.0, drop=0.01, baseline="fp32_same_run"):
    bench = {"artifact_mb": mb, "ms_per_sample": ms, "baseline_kind": baseline}
    if speedup is not None:
        bench["speedup_vs_fp32"] = speedup
    check = {"fidelity": {"embedding_cosine_mean": cos, "top1_agreement": 1.0}}
    if drop is not None:
        check["task"] = {"task": "retrieval", "metric": "accuracy_at_1",
                         "metrics": {"accuracy_at_1": {"fp32": 0.9, "target": 0.9 - drop, "drop": drop},
                                     "mrr": {"fp32": 0.95, "target": 0.9, "drop": 0.05}}}
    return _typed({"status": status, "bench": bench, "check": check})


# ---------------------------------------------------------------- objectives of one build

def test_objectives_of_a_passing_build_are_its_measurements():
    v = objective_values(_report(Status.PASSED), NAMES)
    assert v == pytest.approx((0.01, 23.1, 0.8, 0.01, 4.0))
    # an fp32 build is its own baseline (bench times no second engine): time ratio 1 by definition
    fp32 = _report(Status.PASSED, cos=1.0, speedup=None, baseline="self")
    assert objective_values(fp32, ["time_vs_fp32", "fidelity_loss"]) == (1.0, 0.0)
    # a classifier: the share of labels that changed
    clf = _typed({"status": "passed", "check": {"fidelity": {"label_agreement": 0.97, "mean_kl": 0.01}}})
    assert objective_values(clf, ["fidelity_loss"]) == pytest.approx((0.03,))


def test_objectives_of_a_gate_failed_build_are_real_points_and_a_failed_build_is_penalized():
    # failing the gate is a measured point: the sampler learns where the loss is
    assert objective_values(_report(Status.GATE_FAILED, cos=0.93, drop=0.2), NAMES[:4]) == pytest.approx(
        (0.07, 23.1, 0.8, 0.2))
    # a build that failed (no report, a not-runnable recipe, an exception) measured nothing: the penalty,
    # which every real point beats (not NaN: see PENALTY)
    assert objective_values(None, NAMES[:3]) == (PENALTY,) * 3
    assert objective_values(_typed({"status": "build failed"}), NAMES[:2]) == (PENALTY,) * 2
    assert objective_values(_typed({"status": "repair budget not met"}), NAMES[:1]) == (PENALTY,)
    # a number the build lacks (task_drop on unlabeled data, time_vs_fp32 with bench.baseline=none)
    v = objective_values(_report(Status.PASSED, drop=None, speedup=None, baseline="none"),
                         ["task_drop", "time_vs_fp32", "artifact_mb"])
    assert v == (PENALTY, PENALTY, 23.1)


def test_build_result_is_what_the_optuna_sweeper_reads_and_the_summary_records():
    import optuna

    ok = BuildResult((0.01, 23.1, 0.8), NAMES[:3], {"exit_code": 0, "status": "passed", "error": None})
    failed = BuildResult((PENALTY,) * 3, NAMES[:3], {"exit_code": 2, "status": "not runnable", "error": "x"})
    # joblib hands it back from another process: it pickles with its outcome and names
    back = pickle.loads(pickle.dumps(ok))
    assert back == ok and back.outcome == ok.outcome and back.names == NAMES[:3]
    assert ok.objectives() == {"fidelity_loss": 0.01, "artifact_mb": 23.1, "time_vs_fp32": 0.8}
    assert failed.objectives() == dict.fromkeys(NAMES[:3])  # None: nothing measured (JSON has no penalty)
    # what hydra-optuna-sweeper does with a return value: float() of each (one objective: float() of it)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize"] * 3)
    for ret in (ok, failed):
        study.tell(study.ask(), values=[float(v) for v in ret])
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert [t.number for t in study.best_trials] == [0]  # the penalty is dominated
    assert float(BuildResult((0.5,), ["fidelity_loss"], {})) == 0.5
    with pytest.raises(TypeError, match="3 objectives .* cannot be one float"):
        float(ok)


def test_objectives_are_checked_against_the_sweeper_directions():
    assert check_objectives(["fidelity_loss", "artifact_mb"], ["minimize", "minimize"]) == (
        "fidelity_loss", "artifact_mb")
    assert check_objectives(["artifact_mb"], None) == ("artifact_mb",)  # a grid: no directions to match
    with pytest.raises(RecipeError, match="unknown objective 'fidelity_los' -- did you mean 'fidelity_loss'"):
        check_objectives(["fidelity_los"])
    with pytest.raises(RecipeError, match=r"hydra.sweeper.direction: 1 direction\(s\) for 2 objectives"):
        check_objectives(["fidelity_loss", "artifact_mb"], "minimize")
    with pytest.raises(RecipeError, match="'maximize': every qcompile objective is a loss"):
        check_objectives(["artifact_mb"], ["maximize"])
    with pytest.raises(RecipeError, match="search.objectives: is empty"):
        check_objectives([])


# ---------------------------------------------------------------- the axes of the summary

def _row(num, status=Status.PASSED, **kw) -> Row:
    base = dict(num=num, model="minilm", recipe="nvfp4", target="torch", status=status, run_dir=f"{num}_run")
    base.update(kw)
    return Row(**base)


def _ratio_rows():
    return [_row(0, recipe="fp32", ms_per_sample=9.0, embedding_cosine=1.0, fp32_self=True),
            _row(1, ms_per_sample=4.0, speedup_vs_fp32=2.2, embedding_cosine=0.99),
            _row(2, status=Status.GATE_FAILED, ms_per_sample=3.0, speedup_vs_fp32=2.9, embedding_cosine=0.93),
            _row(3, status=Status.BUILD_FAILED)]  # no numbers: not asked


def _plotted(rows, path):
    """pareto.png written from rows, and the matplotlib Axes it was drawn on (x label, title, points)."""
    import matplotlib.figure

    seen = []
    real = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **kw):
        seen.append(fig.axes[0])
        return real(fig, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "savefig", keep)
        plot_pareto(rows, path)
    return seen[0]


def test_axes_are_the_same_run_ratio_where_every_finished_run_has_one(tmp_path):
    rows = _ratio_rows()
    assert choose_axes(rows) == (SPEEDUP, COSINE)
    assert SPEEDUP.get(rows[0]) == 1.0  # fp32: its own baseline
    ax = _plotted(rows, tmp_path / "pareto.png")
    assert ax.get_xlabel() == "speed vs the fp32 engine, same run (x, higher is better)"
    assert "same-run speed ratio" not in ax.get_title()  # nothing left off: nothing said


def test_pareto_plots_the_ratio_and_names_the_runs_without_one(tmp_path):
    # issue 17 item 12: one finished run without the ratio (bench.baseline=none) used to turn the whole plot
    # into latency, which does not compare across runs built in parallel; the ratio stays the axis
    rows = _ratio_rows() + [_row(4, recipe="int8_static", ms_per_sample=5.0, embedding_cosine=0.995)]
    assert choose_axes(rows) == (SPEEDUP, COSINE)
    ax = _plotted(rows, tmp_path / "pareto.png")
    assert ax.get_xlabel() == "speed vs the fp32 engine, same run (x, higher is better)"
    said = "No same-run speed ratio to fp32 (not plotted, not on the front): int8_static/torch"
    assert said in " ".join(ax.get_title().split())
    xs = sorted(float(x) for c in ax.collections for x, _ in c.get_offsets())
    assert 5.0 not in xs and set(xs) <= {1.0, 2.2, 2.9}  # no latency mixed into the ratio axis
    mark_pareto(rows)
    assert not rows[4].pareto
    md = render_markdown(rows, tmp_path)
    assert "| 0 | minilm | fp32 | torch |  | 9.000 |  | 1 (itself) |" in md  # fp32: 1 by definition, as plotted
    assert f"**{said} -- bench.baseline=none, or a GPU target timed on a machine without one**" in render_markdown(
        rows, tmp_path)
    # no run has a ratio: latency, and the plot says why it is not the ratio
    only = [_row(1, ms_per_sample=4.0, embedding_cosine=0.99), _row(2, ms_per_sample=3.0, embedding_cosine=0.93)]
    assert choose_axes(only) == (LATENCY, COSINE)
    ax = _plotted(only, tmp_path / "latency.png")
    assert "No run has a same-run speed ratio to fp32: the plot shows latency" in " ".join(ax.get_title().split())


def _budget_rows(repair_drop=True, with_labels=True, weights=True):
    # budget -> (fallback layers, drop, MB, cosine); 0.002 found a worse map than 0.005: dominated
    points = {0.002: (9, 0.005, 30.0, 0.991), 0.005: (7, 0.004, 28.0, 0.990), 0.01: (4, 0.009, 25.0, 0.985),
              0.02: (1, 0.015, 22.0, 0.975)}
    rows = [_row(i, overrides={"recipe": "nvfp4", "recipe.repair.max_task_drop": str(b)}, repair_budget=b,
                 fallback_layers=n, repair_metric="accuracy_at_1", repair_drop=d if repair_drop else None,
                 task_metric="accuracy_at_1" if with_labels else "", task_drop=d if with_labels else None,
                 repair_weight_mb=mb / 4 if weights else None, artifact_mb=mb, embedding_cosine=cos,
                 ms_per_sample=50.0, speedup_vs_fp32=0.15)
            for i, (b, (n, d, mb, cos)) in enumerate(points.items())]
    rows.append(_row(4, status="repair budget not met", repair_budget=0.0, repair_metric="accuracy_at_1",
                     run_dir="4_run.gate-failed",
                     overrides={"recipe": "nvfp4", "recipe.repair.max_task_drop": "0.0"},
                     reason="budget not met even with all 12 layers in fp8"))
    return rows


def test_a_repair_budget_sweep_is_a_size_vs_drop_curve(tmp_path):
    rows = _budget_rows()
    # x: the quantized weights at their formats (target=torch keeps fake-quant weights fp32 in engine.pt)
    assert choose_axes(rows) == (REPAIR_SIZE, REPAIR_DROP)
    assert choose_axes(_budget_rows(weights=False)) == (SIZE, REPAIR_DROP)
    mark_pareto(rows)
    assert [r.num for r in rows if r.pareto] == [1, 2, 3]
    md = render_markdown(rows, tmp_path)
    assert "| accuracy_at_1 drop | budget | fallbacks | accuracy_at_1 drop (repair) | weights MB (repair) |" in md
    # each row: its budget, how many layers fell back, the drop it reached and the size
    assert ("| 1 | minilm | nvfp4 | torch | recipe.repair.max_task_drop=0.005 | 28.00 | 50.000 |  | 0.15 |  | "
            "0.990000 |  | 0.0040 | 0.0050 | 7 | 0.004 | 7.00 | * | passed | `1_run` |") in md
    # an unmet budget chose no map: no fallback count, no drop (its reason has the best point)
    assert ("| 4 | minilm | nvfp4 | torch | recipe.repair.max_task_drop=0.0 |  |  |  |  |  |  |  |  | 0.0000 |  |  "
            "|  |  | repair budget not met | `4_run.gate-failed` |") in md
    assert sweep_exit_code(rows) == 3  # exits like the single build: 3, a budget not met
    assert ("Pareto front (lower quantized weights MB, lower drop of the budgeted metric): nvfp4/torch [recipe.repair.max_task_drop=0.02], "
            "nvfp4/torch [recipe.repair.max_task_drop=0.01], nvfp4/torch [recipe.repair.max_task_drop=0.005].") in md
    files = write_summary(tmp_path, rows)
    assert files["pareto.png"].read_bytes()[:4] == b"\x89PNG"
    with open(files["summary.csv"]) as f:
        got = list(csv.DictReader(f))
    assert [(r["repair_budget"], r["fallback_layers"], r["task_drop"], r["artifact_mb"]) for r in got[:2]] == [
        ("0.002", "9", "0.005", "30.0"), ("0.005", "7", "0.004", "28.0")]
    # a replayed map has no search to read its drop from: the task metric's drop, checked on the full set
    assert choose_axes(_budget_rows(repair_drop=False, weights=False)) == (SIZE, DROP)
    # without either, the curve is size against the embedding cosine
    plain = _budget_rows(repair_drop=False, with_labels=False, weights=False)
    assert choose_axes(plain) == (SIZE, COSINE)
    mark_pareto(plain)
    assert [r.num for r in plain if r.pareto] == [0, 1, 2, 3]  # 0.002 is now the most faithful: a trade-off


def test_a_searchs_front_is_over_its_objectives_not_the_plot_axes():
    names = ["fidelity_loss", "artifact_mb", "time_vs_fp32"]
    rows = [_row(0, speedup_vs_fp32=1.2, embedding_cosine=0.99, ms_per_sample=4.0, artifact_mb=23.0,
                 objectives=dict(zip(names, (0.01, 23.0, 0.83)))),
            # slower and less faithful than 0, but smaller: on the 3-objective front, off the 2-D one
            _row(1, speedup_vs_fp32=1.1, embedding_cosine=0.98, ms_per_sample=4.4, artifact_mb=12.0,
                 objectives=dict(zip(names, (0.02, 12.0, 0.91)))),
            _row(2, speedup_vs_fp32=1.0, embedding_cosine=0.97, ms_per_sample=4.8, artifact_mb=23.0,
                 objectives=dict(zip(names, (0.03, 23.0, 1.0)))),
            _row(3, status=Status.NOT_RUNNABLE, objectives=dict.fromkeys(names))]
    mark_pareto(rows)
    assert [r.num for r in rows if r.pareto] == [0, 1]
    for r in rows:
        r.objectives = {}
    mark_pareto(rows)  # the same runs from a grid: the front over (speed ratio, cosine)
    assert [r.num for r in rows if r.pareto] == [0]


def test_a_repair_rows_numbers_come_from_its_report(tmp_path):
    def run(name, repair):
        d = tmp_path / name
        d.mkdir()
        (d / "report.json").write_text(json.dumps({"status": "passed", "build": {}, "repair": repair}))
        return read_run(d, tmp_path)

    search = [{"fallback_layers": 0, "drop": 0.03, "weight_bytes": 1_000_000},
              {"fallback_layers": 12, "drop": 0.004, "weight_bytes": 3_000_000},
              {"fallback_layers": 6, "drop": 0.012, "weight_bytes": 2_000_000},
              {"fallback_layers": 9, "drop": 0.008, "weight_bytes": 2_500_000}]
    met = run("met", {"metric": "embedding_cosine_mean", "max_fidelity_drop": 0.01, "met": True, "fallback_layers": 9,
                      "search": search})
    assert (met.repair_budget, met.fallback_layers, met.repair_drop, met.repair_weight_mb, met.repair_metric) == (
        0.01, 9, 0.008, 2.5, "embedding_cosine_mean")
    unmet = run("unmet", {"metric": "embedding_cosine_mean", "max_fidelity_drop": 0.002, "met": False, "fallback_layers": 0,
                          "search": search})
    assert (unmet.repair_budget, unmet.fallback_layers, unmet.repair_drop, unmet.repair_weight_mb) == (
        0.002, None, None, None)
    replayed = run("replayed", {"replayed": True, "fallback_layers": 7})
    assert (replayed.repair_budget, replayed.fallback_layers, replayed.repair_drop) == (None, 7, None)
    # the repair package names the budget by its recipe key
    fidelity = run("fidelity", {"metric": "embedding_cosine_mean", "max_fidelity_drop": 0.01, "met": True,
                                "fallback_layers": 9, "search": search})
    assert (fidelity.repair_budget, fidelity.repair_drop) == (0.01, 0.008)


# ---------------------------------------------------------------- a real search

def _sweep_dir(cwd: Path) -> Path:
    dirs = [p for p in (cwd / "outputs" / "multirun").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_optuna_search_on_tiny_bert_returns_objectives_and_marks_the_front(qcompile, tmp_path):
    """The shipped preset's NSGA-II over 3 trials: recipe from one that builds and one the capability table
    refuses (nvfp4 on ort) with seed 0 draws both; the summary's front is Optuna's own."""
    res = qcompile("-m", "+search=ort_quant", "model=tiny_bert", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.population_size=3", "recipe=choice(int8_dynamic,nvfp4)",
                   "recipe.gate.min_top1_agreement=0.5", *FAST)
    assert res.rc == 0, res  # a not-runnable point is a hole in the matrix, not a failure
    sweep = _sweep_dir(tmp_path)
    records = {r["num"]: r for r in (json.loads(p.read_text()) for p in (sweep / ".jobs").glob("*.json"))}
    assert len(records) == 3
    by_status = {}
    for rec in records.values():
        by_status.setdefault(rec["status"], []).append(rec)
    assert sorted(by_status) == [Status.NOT_RUNNABLE, Status.PASSED], records
    names = ["fidelity_loss", "artifact_mb", "time_vs_fp32"]
    for rec in by_status[Status.PASSED]:  # the objectives are the run's own measurements
        assert rec["objective_names"] == names
        run = Path(rec["output_dir"].removesuffix(".partial"))
        report = json.loads((run / "report.json").read_text())
        want = (1 - report["check"]["fidelity"]["embedding_cosine_mean"], report["bench"]["artifact_mb"],
                1 / report["bench"]["speedup_vs_fp32"])
        assert [rec["objectives"][n] for n in names] == pytest.approx(want)
        assert 0 <= want[0] < 0.01 and want[1] > 0 and want[2] > 0
    for rec in by_status[Status.NOT_RUNNABLE]:  # nothing measured: the sweeper got the penalty
        assert rec["objectives"] == dict.fromkeys(names)
        assert "nvfp4 is not runnable on target=ort" in rec["error"]
    # Optuna's front (optimization_results.yaml) is the summary's
    solutions = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))["solutions"]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    front = [r for r in rows if r["pareto"] == "yes"]
    assert len(front) == len(solutions) >= 1
    assert all(r["recipe"] == "int8_dynamic" and r["status"] == "passed" for r in front)
    for sol in solutions:
        assert max(sol["values"]) < PENALTY and sol["params"]["recipe"] == "int8_dynamic"
        assert any([float(x) for x in (dict(kv.split("=") for kv in r["objectives"].split())[n] for n in names)]
                   == pytest.approx(sol["values"]) for r in front)
    md = (sweep / "summary.md").read_text()
    assert "| fidelity_loss | artifact_mb | time_vs_fp32 | Pareto |" in md
    assert "Pareto front over the search's objectives (fidelity_loss, artifact_mb, time_vs_fp32; all minimized): " \
           "int8_dynamic/ort" in md
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((sweep / "summary.json").read_text())["exit_code"] == 0


def test_a_search_whose_objectives_and_directions_disagree_stops_before_any_job(qcompile, tmp_path):
    res = qcompile("-m", "+search=ort_quant", "model=tiny_bert", "hydra.sweeper.direction=[minimize,minimize]")
    assert res.rc == 2, res
    assert res.stderr.strip().splitlines()[-1] == (
        "qcompile: recipe error: hydra.sweeper.direction: 2 direction(s) for 3 objectives (fidelity_loss, "
        "artifact_mb, time_vs_fp32) -- give one per objective: hydra.sweeper.direction=[minimize,minimize,minimize]")
    res = qcompile("-m", "+search=ort_quant", "model=tiny_bert", "search.objectives=[fidelity_loss,size]",
                   "hydra.sweeper.direction=[minimize,minimize]")
    assert res.rc == 2, res
    assert "qcompile: recipe error: search.objectives: unknown objective 'size'" in res.stderr
    assert not (tmp_path / "outputs").exists()  # no job started
    # a single build checks its objectives too (it returns them to whatever sweeper runs it), before loading
    res = qcompile("model=tiny_bert", "search.objectives=[fidelity_loss,size]")
    assert res.rc == 2, res
    assert "qcompile: recipe error: search.objectives: unknown objective 'size'" in res.stderr
    assert not any(p.name == "report.json" for p in (tmp_path / "outputs").rglob("*"))
