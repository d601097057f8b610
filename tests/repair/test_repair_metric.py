"""Which metric the repair budgets (compiler/repair/budget.py, metric.py): the task metric against the ranking rows'
gold labels when labels and a task budget are there, else the fidelity metric; the budget's sources; the
ranking rows keep whole pairs; bad combinations are recipe errors (exit 2) before any weights load."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.core.schema import GateConfig, RepairConfig
from compiler.numerics.metrics import TaskLabels
from compiler.repair.budget import resolve_budget
from compiler.repair.metric import ranking_rows
from compiler.repair.metric import repair_metric as _repair_metric
from tests.conftest import FAST


def repair_metric(rep, gate, task, labels, ref, order=None):
    return _repair_metric(resolve_budget(rep, gate, task, labels is not None), gate, task, labels, ref, order=order)


def _rep(**kw):
    return RepairConfig(**{"enabled": True, **kw})


def _gate(**kw):
    return GateConfig(**kw)


def _paired(n_pairs):
    idx = np.arange(2 * n_pairs)
    return TaskLabels("retrieval", queries=idx, candidates=idx, gold=idx ^ 1)


def _pairs_embedding(n_pairs, swap=()):
    """Pair k on its own axis (row 2k exactly on it, row 2k+1 slightly off); a pair in swap has its second row
    replaced by a copy of the next pair's first row."""
    e = np.zeros((2 * n_pairs, n_pairs + 1))
    for k in range(n_pairs):
        e[2 * k, k] = e[2 * k + 1, k] = 1.0
        e[2 * k + 1, n_pairs] = 0.01 * (k + 1)
    for k in swap:
        e[2 * k + 1] = 0.0
        e[2 * k + 1, (k + 1) % n_pairs] = 1.0
    return e


def test_task_budget_on_labeled_data_scores_accuracy_against_gold():
    labels = _paired(8)
    ref = _pairs_embedding(8)
    m = repair_metric(_rep(max_task_drop=0.05), _gate(), "embedding", labels, ref)
    assert m.kind == "task" and m.name == "retrieval accuracy_at_1" and m.max_drop == 0.05
    assert m.budget.source == "recipe.repair.max_task_drop=0.05"
    assert m.reference == 1.0
    # row 7 becomes a copy of row 8: queries 6 and 7 miss their partners, and 8 and 9 each tie their partner
    # with row 7 (ties count against the gold partner): 4 of 16 queries miss
    hurt = _pairs_embedding(8, swap=[3])
    np.testing.assert_array_equal(_paired(8).example_stats(hurt)[6:10], [15, 15, 2, 2])
    assert m.fn(hurt) == pytest.approx(12 / 16)
    assert m.reference - m.fn(hurt) == pytest.approx(4 / 16)


def test_gate_task_budget_and_task_metric_apply_when_repair_states_none():
    m = repair_metric(_rep(), _gate(max_task_drop=0.02, task_metric="mrr"), "embedding", _paired(4),
                      _pairs_embedding(4))
    assert (m.kind, m.name, m.max_drop, m.reference) == ("task", "retrieval mrr", 0.02, 1.0)
    assert m.budget.source == "recipe.gate.max_task_drop=0.02"


def test_no_task_budget_or_no_labels_or_forced_fidelity_budget_the_fidelity_metric():
    ref = _pairs_embedding(4)
    q = ref + 0.3 * np.eye(8, 5)
    cos = np.mean(np.sum(ref / np.linalg.norm(ref, axis=1, keepdims=True) * q / np.linalg.norm(q, axis=1,
                                                                                               keepdims=True), 1))
    for rep, gate, labels, budget in [
        (_rep(), _gate(min_embedding_cosine=0.995), _paired(4), 0.005),  # labels, no task budget: the gate's
        (_rep(max_fidelity_drop=0.02), _gate(), None, 0.02),  # a fidelity budget, no labels
        (_rep(max_fidelity_drop=0.02), _gate(max_task_drop=0.1), _paired(4), 0.02),  # its own key wins on labels
        (_rep(max_fidelity_drop=0.02, metric="fidelity"), _gate(max_task_drop=0.1), _paired(4), 0.02),
    ]:
        m = repair_metric(rep, gate, "embedding", labels, ref)
        assert (m.kind, m.name, m.reference) == ("fidelity", "embedding_cosine_mean", 1.0)
        assert m.max_drop == pytest.approx(budget) and m.fn(q) == pytest.approx(cos)


def test_classifier_accuracy_drop_against_gold():
    labels = TaskLabels("classification", labels=np.array([0, 1, 1, 0, 1]), label_names=("neg", "pos"))
    ref = np.eye(2)[[0, 1, 1, 1, 1]]  # fp32: 4 of 5 right
    m = repair_metric(_rep(max_task_drop=0.01), _gate(), "classification", labels, ref)
    assert (m.name, m.reference) == ("classification accuracy", pytest.approx(0.8))
    assert m.fn(np.eye(2)[[0, 1, 0, 1, 1]]) == pytest.approx(0.6)  # one right label flipped: drop 0.2
    fid = repair_metric(_rep(), _gate(min_top1_agreement=0.95), "classification", labels, ref)
    assert (fid.name, fid.max_drop) == ("label_agreement", pytest.approx(0.05))
    assert fid.budget.source == "recipe.gate.min_top1_agreement=0.95"
    assert fid.fn(np.eye(2)[[0, 1, 0, 1, 1]]) == pytest.approx(0.8)


def test_ranking_rows_take_whole_pairs():
    assert ranking_rows(33, 128, _paired(64)) == 32
    assert ranking_rows(32, 31, _paired(64)) == 30
    assert ranking_rows(33, 128, TaskLabels("classification", labels=np.zeros(128, np.int64))) == 33
    assert ranking_rows(33, 128, None) == 33


@pytest.mark.parametrize("args,text", [
    (["recipe.repair.metric=task", "data.format=text"],
     "recipe.repair.metric: task needs gold labels but"),
    (["recipe.repair.metric=task"], "recipe.repair.metric: task has no budget"),
    (["recipe.repair.metric=cosine"], "recipe.repair.metric: unknown choice 'cosine'"),
    (["recipe.repair.max_task_drop=0.01", "recipe.gate.task_metric=spearman"],
     "recipe.gate.task_metric: 'spearman' does not fit the retrieval task"),
    (["recipe.gate.max_task_drop=-0.5"], "recipe.gate.max_task_drop: -0.5 is below 0"),
    (["recipe.gate.max_task_drop=nan"], "recipe.gate.max_task_drop: nan is below 0"),
    (["recipe.repair.max_task_drop=nan"], "recipe.repair.max_task_drop: nan is below zero"),
    # one budget key per metric: the wrong one for the metric is named, with the right one
    (["recipe.repair.metric=fidelity", "recipe.repair.max_task_drop=0.01"],
     "recipe.repair.max_task_drop: 0.01 budgets the task metric, but recipe.repair.metric=fidelity budgets the "
     "fidelity metric (embedding cosine / label agreement) -- use recipe.repair.max_fidelity_drop=0.01"),
    (["recipe.repair.metric=task", "recipe.repair.max_fidelity_drop=0.01"],
     "recipe.repair.max_fidelity_drop: 0.01 budgets the fidelity metric, but recipe.repair.metric=task"),
    (["recipe.repair.max_task_drop=0.01", "recipe.repair.max_fidelity_drop=0.02"],
     "recipe.repair.max_fidelity_drop: 0.02 given together with recipe.repair.max_task_drop=0.01"),
    (["recipe.repair.max_task_drop=0.01", "data.format=text"],
     "recipe.repair.max_task_drop: 0.01 needs gold labels but"),
    (["recipe.repair.max_fidelity_drop=-1"], "recipe.repair.max_fidelity_drop: -1.0 is below zero"),
    (["recipe.repair.max_task_drop=0.01", "recipe.repair.ranking_samples=1"],
     "recipe.repair.ranking_samples: 1 row holds no retrieval pair"),
])
def test_bad_metric_combinations_are_recipe_errors(args, text):
    from compiler.core.errors import RecipeError
    from compiler.stages.validate import validate
    from tests.conftest import compose

    with pytest.raises(RecipeError) as e:
        validate(compose("model=tiny_bert", "recipe=int8", "target=torch", "recipe.repair.enabled=true", *args))
    assert text in str(e.value), str(e.value)


def test_task_metric_without_labels_exits_2_before_loading(qcompile):
    res = qcompile("model=tiny_bert", "recipe=int8", "target=torch", "recipe.repair.enabled=true",
                   "recipe.repair.metric=task", "recipe.repair.max_task_drop=0.01", "data.format=text", *FAST,
                   timeout=300)
    assert res.rc == 2, res
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("qcompile:"))
    assert "recipe.repair.metric: task needs gold labels" in line and "plain text" in line, line
    assert "Traceback" not in res.stderr and not res.run_dirs()


def test_rows_measured_in_another_order_score_against_the_right_labels():
    """A measurer that runs the ranking rows sorted by length gives outputs in that order: with `order` the
    task metric puts them back before scoring against the gold labels."""
    labels = _paired(8)
    ref, hurt = _pairs_embedding(8), _pairs_embedding(8, swap=[3])
    order = np.random.default_rng(0).permutation(16)
    m = repair_metric(_rep(max_task_drop=0.05), _gate(), "embedding", labels, ref[order], order=order)
    assert m.reference == 1.0 and m.fn(hurt[order]) == pytest.approx(12 / 16)
    plain = repair_metric(_rep(max_task_drop=0.05), _gate(), "embedding", labels, ref[order])
    assert plain.reference < 1.0  # scored in the wrong order, the gold partners are the wrong rows
    with pytest.raises(ValueError, match="permutation"):
        repair_metric(_rep(max_task_drop=0.05), _gate(), "embedding", labels, ref, order=np.zeros(16, int))


def test_weight_bytes_know_every_primary_format_a_step_declares():
    """The size estimate covers every precision a quantizing step declares (int4_weight_only's int4 made a
    repair build fail with KeyError: 'int4')."""
    from compiler.core.formats import FORMATS
    from compiler.repair.budget import fallback_formats, weight_bytes
    from compiler.steps.base import STEP_REGISTRY, load_all_steps

    load_all_steps()
    declared = {f for cls in STEP_REGISTRY.values() if cls.quantizes_compute for f in cls.precision}
    assert declared <= set(FORMATS), declared - set(FORMATS)
    assert fallback_formats() == ("fp32", "fp16", "fp8", "int8")
    assert weight_bytes({"a": 64, "b": 64}, {"a": "int4", "b": "fp32"}) == 64 * 5 // 8 + 64 * 4
