"""Task metrics against gold labels and fidelity metrics, on inputs whose answers are computed by hand."""

import numpy as np
import pytest
from scipy import stats

from compiler.numerics.metrics import (
    TaskLabels,
    classifier_fidelity,
    compare_task,
    embedding_fidelity,
    task_metric,
    task_metrics,
)


def test_classification_accuracy_and_macro_f1_by_hand():
    gold = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3)[pred] * 5.0 - 1.0
    m = task_metrics(TaskLabels("classification", labels=gold), logits)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1 = 2tp / (2tp + fp + fn): class 0: 4/(4+0+1); class 1: 2/(2+1+1); class 2: 2/(2+1+0)
    assert m["macro_f1"] == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)


def test_macro_f1_ignores_classes_absent_from_gold_and_predictions():
    gold, pred = np.array([0, 1, 0, 1]), np.array([0, 1, 1, 1])
    m = task_metrics(TaskLabels("classification", labels=gold), np.eye(5)[pred])  # 5 logits, classes 2-4 unused
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_sts_spearman_and_pearson_match_scipy():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8))
    pairs = np.arange(40).reshape(20, 2)
    gold = rng.uniform(0, 5, size=20)
    gold[3] = gold[4]  # a tie: Spearman uses average ranks
    m = task_metrics(TaskLabels("sts", pairs=pairs, scores=gold), emb)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)
    assert m["spearman"] == pytest.approx(stats.spearmanr(cos, gold).statistic, abs=1e-12)
    assert m["pearson"] == pytest.approx(stats.pearsonr(cos, gold).statistic, abs=1e-12)


def _paired_labels(n_pairs):
    idx = np.arange(2 * n_pairs)
    return TaskLabels("retrieval", queries=idx, candidates=idx, gold=idx ^ 1)


def test_retrieval_ranks_the_gold_partner_and_never_the_query_itself():
    # 3 pairs (0,1) (2,3) (4,5) as angles on a circle: 2 and 3 are each other's nearest; 0, 1 and 4 crowd
    # together, so 4 is nearer to 0 and 1 than to its own partner 5 (at 3.0, nearest to 3 and 2)
    angles = np.array([0.0, 0.1, 2.0, 2.1, 0.05, 3.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = _paired_labels(3)
    ranks = labels.example_stats(emb)
    # 0: 4 (0.05 away) before partner 1 (0.1); 1: 4 (0.05) before 0 (0.1); 4: 0, 1, 2, 3 before 5 (2.95);
    # 5: 3 (0.9), 2 (1.0), 1 (2.9) before 4 (2.95). Each query's own row is never a candidate (else rank 1+1).
    np.testing.assert_array_equal(ranks, [2, 2, 1, 1, 5, 4])
    m = task_metrics(labels, emb)
    assert m["accuracy_at_1"] == pytest.approx(2 / 6)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1 + 1 + 1 / 5 + 1 / 4) / 6)


def test_query_positive_retrieval_searches_only_the_positives():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[0.0, 1.0], [1.0, 0.1]])  # query 0's positive is p0 but p1 is nearer
    emb = np.stack([q[0], p[0], q[1], p[1]])
    labels = TaskLabels("retrieval", queries=np.array([0, 2]), candidates=np.array([1, 3]), gold=np.array([0, 1]))
    np.testing.assert_array_equal(labels.example_stats(emb), [2, 2])
    assert task_metric(labels, emb, "mrr") == pytest.approx(0.5)


def test_collapsed_embeddings_rank_the_partner_last():
    labels = _paired_labels(4)
    assert task_metric(labels, np.ones((8, 4)), "accuracy_at_1") == 0.0
    assert task_metric(labels, np.full((8, 4), np.nan), "mrr") == pytest.approx(1 / 8)


def test_paired_bootstrap_drop_and_interval():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, size=200)
    ref = np.eye(2)[gold] * 4.0  # fp32 right everywhere
    labels = TaskLabels("classification", labels=gold)
    same = compare_task(labels, ref, ref)
    assert same["accuracy"] == {"fp32": 1.0, "target": 1.0, "drop": 0.0, "drop_ci95": [0.0, 0.0]}
    tgt = ref.copy()
    flipped = rng.choice(200, size=10, replace=False)  # planted: 10 of 200 labels flipped on the target
    tgt[flipped] = tgt[flipped][:, ::-1]
    res = compare_task(labels, ref, tgt)
    assert res["accuracy"]["target"] == pytest.approx(0.95) and res["accuracy"]["drop"] == pytest.approx(0.05)
    lo, hi = res["accuracy"]["drop_ci95"]
    # binomial standard error of 10/200 is 0.0154: the 95% interval is about +-0.03 around 0.05
    assert 0.015 <= lo < 0.05 < hi <= 0.085
    assert compare_task(labels, ref, tgt) == res  # fixed seed: the same interval every time


def test_classifier_fidelity_kl_direction_and_logit_diff():
    ref = np.array([[2.0, 0.0], [0.0, 1.0]])
    tgt = np.array([[1.0, 0.0], [0.5, 0.0]])
    f = classifier_fidelity(ref, tgt)
    assert f["label_agreement"] == 0.5
    assert f["max_abs_logit_diff"] == pytest.approx(1.0)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    kl = [np.sum(softmax(t) * np.log(softmax(t) / softmax(r))) for r, t in zip(ref, tgt)]  # KL(target || ref)
    assert f["kl_target_reference_mean"] == pytest.approx(np.mean(kl))
    reverse = [np.sum(softmax(r) * np.log(softmax(r) / softmax(t))) for r, t in zip(ref, tgt)]
    assert abs(np.mean(reverse) - np.mean(kl)) > 1e-3  # the direction matters, and it is the one stated


def test_embedding_fidelity_on_known_values():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 16))
    flipped = ref.copy()
    flipped[0] *= -1
    m = embedding_fidelity(ref, flipped)
    assert m["embedding_cosine_min"] == pytest.approx(-1.0)
    assert m["embedding_cosine_mean"] == pytest.approx(19 / 20 - 1 / 20)


def test_subset_keeps_whole_examples_and_reindexes_retrieval_gold():
    """The repair's ranking subset: only rows [0, n); a retrieval query whose partner is cut off is dropped,
    and the kept gold indices point into the kept candidates."""
    paired = _paired_labels(3).subset(4)  # rows 0-3: pairs (0,1) and (2,3)
    np.testing.assert_array_equal(paired.queries, [0, 1, 2, 3])
    np.testing.assert_array_equal(paired.candidates, [0, 1, 2, 3])
    np.testing.assert_array_equal(paired.gold, [1, 0, 3, 2])
    qp = TaskLabels("retrieval", queries=np.array([0, 2, 4]), candidates=np.array([1, 3, 5]),
                    gold=np.array([0, 1, 2])).subset(4)
    np.testing.assert_array_equal(qp.queries, [0, 2])
    np.testing.assert_array_equal(qp.candidates, [1, 3])
    np.testing.assert_array_equal(qp.gold, [0, 1])
    # the query at row 4 is in, its positive (row 5) is not: dropped
    assert len(TaskLabels("retrieval", queries=np.array([0, 2, 4]), candidates=np.array([1, 3, 5]),
                          gold=np.array([0, 1, 2])).subset(5)) == 2
    # scored on the subset's own rows, as if the other rows had never been run
    angles = np.array([0.0, 0.1, 2.0, 2.1, 0.05, 3.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert task_metric(paired, emb[:4], "accuracy_at_1") == 1.0  # row 4 (the crowding one) is gone
    sts = TaskLabels("sts", pairs=np.array([[0, 1], [2, 3], [4, 5]]), scores=np.array([1.0, 2.0, 3.0])).subset(5)
    np.testing.assert_array_equal(sts.scores, [1.0, 2.0])
    cls = TaskLabels("classification", labels=np.array([1, 0, 1]), label_names=("a", "b")).subset(2)
    np.testing.assert_array_equal(cls.labels, [1, 0])
    assert cls.label_names == ("a", "b")
