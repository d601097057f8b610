"""bench.scaling (compiler/stages/bench/scaling.py): which thread counts, the report's structure and its table, on
stand-in predictors; never a timing value. A build with bench.scaling=true is in test_op_profile.py."""

from __future__ import annotations

import pytest
from conftest import compose

from compiler.core.errors import RecipeError
from compiler.stages.bench import interleaved
from compiler.stages.bench.scaling import markdown_lines, run_scaling, thread_counts


def test_thread_counts_double_up_to_every_core():
    assert thread_counts(1) == [1]
    assert thread_counts(2) == [1, 2]
    assert thread_counts(6) == [1, 2, 4, 6]
    assert thread_counts(8) == [1, 2, 4, 8]
    assert thread_counts(None) == [1]


def _maker(made):
    def make(threads):
        made.append(threads)
        return lambda feed: {}
    return make


@pytest.mark.parametrize("with_fp32", [True, False])
def test_scaling_rows_per_thread_count_and_shape(with_fp32):
    made_build, made_fp32 = [], []
    report = run_scaling(_maker(made_build), _maker(made_fp32) if with_fp32 else None, ["input_ids"],
                         [(1, 8), (4, 8)], [1, 2, 4], interleaved, calls={(1, 8): 3}).to_dict()
    assert made_build == [1, 2, 4] and made_fp32 == ([1, 2, 4] if with_fp32 else [])  # one predictor per count
    assert report["threads"] == [1, 2, 4] and report["shapes"] == [[1, 8], [4, 8]]
    rows = report["rows"]
    assert [(r["threads"], r["batch"], r["seq"]) for r in rows] == [(t, b, 8) for t in (1, 2, 4) for b in (1, 4)]
    assert all(r["samples_per_s"] > 0 and r["latency_ms_p50"] > 0 for r in rows)
    assert all(r["scaling_vs_1_thread"] == 1.0 for r in rows if r["threads"] == 1)
    assert all((r["speedup_vs_fp32"] is not None) == with_fp32 for r in rows)
    table = markdown_lines(report)
    assert len([ln for ln in table if ln.startswith("| ") and ln[2].isdigit()]) == 6
    assert markdown_lines({}) == []


def test_scaling_is_opt_in_and_server_batch_validated():
    from compiler.stages.validate import validate

    spec = validate(compose("model=tiny_bert", "recipe=fp32"))
    assert spec.bench.scaling is False and spec.bench.server_batch == 32
    with pytest.raises(RecipeError) as info:
        validate(compose("model=tiny_bert", "recipe=fp32", "bench.server_batch=0"))
    assert str(info.value).startswith("bench.server_batch: must be > 0, got 0")
