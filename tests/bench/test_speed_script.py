"""bench/speed.py's arithmetic and parsing (never its timings): variant labels and overrides, the ORT fp32
regression check against the probe's peak, the scaling table's ratios on planted predictors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import speed  # noqa: E402  (bench/ is a folder of scripts, not a package)


def test_variant_label_recipe_target_and_overrides():
    assert speed.parse_variant("fp32:ort") == ("fp32:ort", "fp32", "ort", [])
    assert speed.parse_variant("int8_static:ort:a.b=1") == ("int8_static:ort", "int8_static", "ort", ["a.b=1"])
    assert speed.parse_variant("old=int8_static:ort:x=false|target.disabled_optimizers=[]") == (
        "old", "int8_static", "ort", ["x=false", "target.disabled_optimizers=[]"])
    with pytest.raises(SystemExit, match="is not \\[label=\\]recipe:target"):
        speed.parse_variant("int8_static")


def test_two_variants_with_one_label_stop_before_building():
    # the same recipe:target with and without an override would share a run directory and a table row
    with pytest.raises(SystemExit, match="'fp32:torch' and 'fp32:torch:target.compile=true' are both labelled "
                                         "'fp32:torch'; name one, e.g. 'compiled=fp32:torch:target.compile=true'"):
        speed.parse_variants(["fp32:torch", "fp32:torch:target.compile=true"])
    assert [v[0] for v in speed.parse_variants(["fp32:torch", "c=fp32:torch:target.compile=true"])] == ["fp32:torch", "c"]


def test_peak_regression_flags_only_ort_fp32_below_the_minimum(monkeypatch):
    monkeypatch.setattr(speed, "TARGETS", {"fp32:ort": "ort", "fp32:torch": "torch", "int8_static:ort": "ort",
                                           "sln=fp32:ort": "ort"})
    monkeypatch.setattr(speed, "RECIPES", {"fp32:ort": "fp32", "fp32:torch": "fp32", "int8_static:ort": "int8_static",
                                           "sln=fp32:ort": "fp32"})
    rows = [{"variant": "fp32:ort", "fraction_of_peak": 0.88}, {"variant": "fp32:torch", "fraction_of_peak": 0.5},
            {"variant": "int8_static:ort", "fraction_of_peak": 0.2}, {"variant": "sln=fp32:ort", "fraction_of_peak": 0.84}]
    assert speed.peak_regressions(rows, 0.85) == ["sln=fp32:ort: 0.84 of the probe's fp32 peak, below 0.85"]
    assert speed.peak_regressions(rows, 0.80) == []


def test_scaling_rows_ratios_and_scaling_on_planted_times(monkeypatch):
    """Planted per-call times (no timing): base takes 4 ms a sample, fast 2 ms, on one thread; two threads
    halve the wall clock and leave this thread's CPU time at a tenth of it."""
    import compiler.stages.bench as B

    per_sample = {"base": 0.004, "fast": 0.002}

    def planted(predicts, feeds, rounds, calls):
        batch, threads = feeds[0]["input_ids"].shape[0], predicts["base"].threads
        wall = {v: batch * per_sample[v] / threads for v in predicts}
        return {"wall": {v: [[wall[v]] * calls] * rounds for v in predicts},
                "cpu": {v: [[wall[v] * (1 if threads == 1 else 0.1)] * calls] * rounds for v in predicts}}

    class Predictor:
        def __init__(self, threads):
            self.threads = threads

        def __call__(self, feed):
            return None

    monkeypatch.setattr(B, "interleaved", planted)
    rows = speed.scaling_rows({"base": Predictor, "fast": Predictor}, ["input_ids", "attention_mask"], "base",
                              [1, 32], 8, [1, 2])
    assert [(r["variant"], r["threads"], r["batch"]) for r in rows] == [
        ("base", 1, 1), ("fast", 1, 1), ("base", 1, 32), ("fast", 1, 32),
        ("base", 2, 1), ("fast", 2, 1), ("base", 2, 32), ("fast", 2, 32)]
    for r in rows:
        assert r["clock"] == ("cpu" if r["threads"] == 1 else "wall")
        assert r["speedup"] == pytest.approx(1.0 if r["variant"] == "base" else 2.0)
        assert r["samples_per_s"] == pytest.approx(r["threads"] / per_sample[r["variant"]])
        assert r["scaling_vs_1_thread"] == pytest.approx(float(r["threads"]))
