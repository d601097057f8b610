"""The repair search (compiler/repair/search.py) on its own: lazy greedy against a fixed single-gain order on a
planted non-additive metric (two layers that share one error), the unmet answer, and the speed-ups of the torch
measurer kept exact: folded weight quantizers and length-sorted batches without padding give the same numbers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compiler.repair.budget import Budget
from compiler.repair.metric import fidelity_metric
from compiler.repair.modules import MixedModel, fold_weights
from compiler.repair.outputs import report_markdown, unmet_message
from compiler.repair.search import search, search_fallbacks, sensitivity_unless_met
from compiler.repair.torch_measure import _outputs, _ranking_feeds, measure_sensitivity, torch_measure

# A planted metric: base 0.85, reference 1.0. Layers a and b carry the SAME error (a in the fallback removes it:
# +0.05, b alone +0.049, both together still +0.05); c and d are independent (+0.04 each); e is nearly harmless.
# Budget 0.02 needs +0.13: a (or b), c and d. The single-gain order a, b, c, d wastes a pick on b.
GAIN = {"a": 0.05, "b": 0.05, "c": 0.04, "d": 0.04, "e": 0.001}
NAMES = ["e", "d", "c", "b", "a"]  # forward order, deliberately not the sensitivity order


def planted(layers) -> float:
    s = set(layers)
    shared = 0.05 if "a" in s else 0.049 if "b" in s else 0.0
    return 0.85 + shared + sum(GAIN[n] for n in s - {"a", "b"})


def counting(fn):
    calls = []

    def measure(layers):
        calls.append(frozenset(layers))
        return fn(layers)

    return measure, calls


def test_lazy_greedy_beats_the_fixed_order_on_non_additive_gains():
    measure, calls = counting(planted)
    greedy = search_fallbacks(measure, NAMES, 1.0, 0.02, allowed=5, strategy="greedy")
    assert greedy.met and sorted(greedy.chosen) == ["a", "c", "d"], greedy
    assert greedy.chosen[0] == "a"  # the largest single gain first
    assert len(set(calls)) == len(calls)  # memoized: no set measured twice
    assert len(calls) <= 1 + len(NAMES) + 6  # base + singles + a few re-measured gains
    path = [p for p in greedy.probes if p.accepted]
    assert [p.fallback_layers for p in path] == [0, 1, 2, 3]
    assert [round(p.metric, 6) for p in path] == [0.85, 0.9, 0.94, 0.98]
    rejected = [p for p in greedy.probes if not p.accepted]
    assert any(p.added == "b" and p.fallback_layers == 2 and round(p.metric, 6) == 0.9 for p in rejected), rejected

    fixed = search_fallbacks(planted, NAMES, 1.0, 0.02, allowed=5, strategy="binary")
    assert fixed.met and sorted(fixed.chosen) == ["a", "b", "c", "d"]  # one fallback more for the same budget


def test_unmet_within_allowed_says_what_it_would_take():
    out = search_fallbacks(planted, NAMES, 1.0, 0.02, allowed=1)
    assert not out.met and out.chosen == []
    assert out.needed == 3  # greedy past `allowed` meets it with a, c, d
    binary = search_fallbacks(planted, NAMES, 1.0, 0.02, allowed=1, strategy="binary")
    assert not binary.met and binary.needed == 4  # a, then b, c, d of the single-gain order: an upper bound
    assert max(p.fallback_layers for p in out.probes if p.accepted and p.added in ("a", None)) <= 1
    never = search_fallbacks(planted, NAMES, 1.0, 0.0001, allowed=1)
    assert not never.met and never.needed is None


def tight_budget_search():
    """Two layers of 1e-6 each against a 5e-7 budget from 3e-6 below: unmet even with both."""
    out = search(lambda s: 1.0 - 3e-6 + 1e-6 * len(s), {"base_metric": 1.0 - 3e-6, "layers": [
        {"name": n, "role": "", "proxy_error": None, "gain": 1e-6} for n in ("a", "b")]},
        "cosine", Budget("fidelity", 5e-7, "recipe.repair.max_fidelity_drop=5e-07"), "fp8", 2, "nvfp4",
        {"a": 1, "b": 1})
    out.fraction = 1.0
    return out


def test_after_a_training_the_unmet_message_names_the_map_first_alternative():
    out = tight_budget_search()
    plain, trained = unmet_message(out), unmet_message(out, after_training=True)
    assert "recipe.repair.layers" not in plain
    assert trained == plain + ("; or give the first layers of the search in sensitivity.json as recipe.repair.layers "
                               "with recipe.repair.enabled=false: the training then runs on that map, which needed "
                               "fewer layers (docs/repair.md)")


# Planted redundancy: p removes error X (0.10) alone; q and r each remove half of X plus an error of their own
# (0.04 each); s removes 0.04. Base 0.80; a budget of 0.02 needs +0.18. Forward selection takes p (largest single),
# then q and r (0.98: met with 3); with q and r in, p adds nothing, so the backward pass drops it: {q, r}.
def redundant(layers) -> float:
    s = set(layers)
    x = 0.10 if "p" in s else 0.05 * len(s & {"q", "r"})
    return 0.80 + x + 0.04 * len(s & {"q", "r", "s"})


def test_backward_pass_drops_a_pick_that_later_picks_made_redundant():
    measure, calls = counting(redundant)
    out = search_fallbacks(measure, ["s", "r", "q", "p"], 1.0, 0.02, allowed=2)
    assert out.met and sorted(out.chosen) == ["q", "r"], out
    path = [(p.fallback_layers, p.change, round(p.metric, 6)) for p in out.probes if p.accepted]
    assert path == [(0, "-", 0.8), (1, "+p", 0.9), (2, "+r", 0.94), (3, "+q", 0.98), (2, "-p", 0.98)]
    assert len(set(calls)) == len(calls)
    # forward selection alone, stopped at allowed=2, would have missed the budget (p, q: 0.94)
    assert redundant(["p", "q"]) < 0.98


def test_unmet_message_shows_a_tiny_drop_against_a_tight_budget():
    """Drops print to 6 significant digits: with 5 decimals a 3e-7 drop read "drop 0.00000 > 1e-06"."""
    out = tight_budget_search()
    assert not out.met and out.needed is None
    msg = unmet_message(out)
    assert "budget not met even with all 2 layers in fp8" in msg
    assert "cosine 0.999999, drop 1e-06 > max_fidelity_drop 5e-07 with 2 layers" in msg, msg


def test_reference_is_the_metrics_own_fp32_value():
    """A task metric whose fp32 value is not 1.0 (e.g. an accuracy of 0.73): the drop is against it."""
    out = search_fallbacks(lambda s: planted(s) - 0.27, NAMES, 0.73, 0.02, allowed=5)
    assert out.met and sorted(out.chosen) == ["a", "c", "d"]
    assert abs(out.probes[0].drop - 0.15) < 1e-9


def test_unmeasured_layers_are_measured_before_they_are_picked():
    """A layer known only by a proxy bound (beyond confirm_top) is never accepted on its bound."""
    measure, calls = counting(planted)
    singles = {n: planted([n]) for n in ("a", "b", "c", "e")}
    out = search_fallbacks(measure, NAMES, 1.0, 0.02, allowed=5, singles=singles, base=0.85,
                           bounds={"d": 0.85 + 0.03})
    assert out.met and sorted(out.chosen) == ["a", "c", "d"]
    assert frozenset() not in calls and frozenset(["a"]) not in calls  # given, not re-measured
    assert any("d" in c for c in calls)


def test_no_sensitivity_pass_when_the_quantized_build_meets_the_budget(tmp_path):
    """The all-quantized point (0.85) meets a budget of 0.2: one forward, no layer measured alone, the map
    empty and the result saying why; a budget it misses (0.02) runs the sensitivity pass."""
    measure, calls = counting(planted)
    computed = []

    def compute():
        computed.append(1)
        return {"base_metric": 0.85, "layers": [{"name": n, "role": "", "proxy_error": None,
                                                 "gain": round(planted([n]) - 0.85, 6)} for n in NAMES]}

    met = sensitivity_unless_met(measure, NAMES, {}, 1.0, 0.2, None, {}, compute)
    assert calls == [frozenset()] and not computed
    assert "meets the budget (drop 0.15 <= 0.2)" in met["skipped"]
    result = search(measure, met, "cosine", Budget("fidelity", 0.2, "recipe.repair.max_fidelity_drop=0.2"), "fp8", 5,
                    "nvfp4", {n: 10 for n in NAMES})
    assert result.met and result.chosen == [] and calls == [frozenset()]
    assert "no layer needs measuring" in result.as_dict()["sensitivity_skipped"]
    assert "No per-layer sensitivity" in report_markdown(result)

    missed = sensitivity_unless_met(measure, NAMES, {}, 1.0, 0.02, None, {}, compute)
    assert computed == [1] and "skipped" not in missed


def test_related_layers_are_re_measured_after_a_pick():
    """A gain that grows with the set (x helps only once y fell back): its stale bound hides it unless the
    pick's related layers are re-measured."""
    def metric(layers):
        s = set(layers)
        return 0.9 + 0.03 * ("y" in s) + 0.02 * ("z" in s) + (0.05 if {"x", "y"} <= s else 0.0)

    plain = search_fallbacks(metric, ["x", "y", "z"], 1.0, 0.02, allowed=3)
    # x's bound (0) kept it last: forward selection took y, z, x; the backward pass then dropped z
    assert [p.change for p in plain.probes if p.accepted] == ["-", "+y", "+z", "+x", "-z"]
    assert plain.chosen == ["y", "x"]
    near = search_fallbacks(metric, ["x", "y", "z"], 1.0, 0.02, allowed=3, related=lambda n: {"x"} if n == "y" else ())
    assert [p.change for p in near.probes if p.accepted] == ["-", "+y", "+x"] and near.chosen == ["y", "x"]


# ---- the torch measurer's speed-ups are exact ----------------------------------------------------------------


def _quantized(loaded, data, recipe: str):
    from compiler.steps.base import StepContext
    from compiler.steps.int8 import Int8Step
    from compiler.steps.int8 import Params as Int8Params
    from compiler.steps.nvfp4 import NVFP4Params, NVFP4Step
    from compiler.steps.rotate import RotateParams, RotateStep
    from tests.conftest import model_exclude

    from targets.base import get_target

    module = copy.deepcopy(loaded.module)
    ctx = StepContext(target=get_target("torch").capabilities, model_info=loaded.info, calibration=data.calibration,
                      exclude=model_exclude(loaded))
    if recipe == "nvfp4_rotate":
        module = RotateStep(RotateParams(block_size=16)).apply_torch(module, ctx)
    step = Int8Step(Int8Params()) if recipe == "int8" else NVFP4Step(NVFP4Params())
    return step.apply_torch(module, ctx)


@pytest.mark.parametrize("recipe", ["nvfp4_rotate", "int8"])
def test_folded_weights_give_the_same_outputs(tiny_bert, tiny_data, recipe):
    module = _quantized(tiny_bert, tiny_data, recipe)
    feeds = _ranking_feeds(tiny_data, 32, 8)
    before = _outputs(module, feeds, 1)
    layer = next(m for m in module.modules() if getattr(m, "weight_quantizer", None) is not None
                 and m.weight_quantizer.is_enabled)
    w = layer.weight.detach().clone()
    fold_weights(module)
    after = _outputs(module, feeds, 1)
    assert np.array_equal(before, after)
    assert not torch.equal(w, layer.weight)  # the weight now holds its quantized values ...
    assert not layer.weight_quantizer.is_enabled  # ... computed once
    assert layer.input_quantizer.is_enabled  # the activations are still quantized on every forward


def test_batches_without_padding_measure_the_same(tiny_bert, tiny_data):
    module = _quantized(tiny_bert, tiny_data, "nvfp4_rotate")
    trimmed = _ranking_feeds(tiny_data, 32, 8)
    ev = tiny_data.evaluation
    padded = [[torch.from_numpy(np.ascontiguousarray(v[i:i + 8])) for v in ev.arrays.values()] for i in range(0, 32, 8)]
    assert sum(f[0].numel() for f in trimmed) < 0.8 * sum(f[0].numel() for f in padded)
    assert all(int(f[1][:, -1].sum()) > 0 for f in trimmed)  # each batch cut at its longest real token
    _, cosine = fidelity_metric("embedding")
    ref_t, ref_p = _outputs(tiny_bert.module, trimmed, 1), _outputs(tiny_bert.module, padded, 1)
    q_t, q_p = _outputs(module, trimmed, 1), _outputs(module, padded, 1)
    assert abs(cosine(ref_t, q_t) - cosine(ref_p, q_p)) < 1e-6
    # the same sentences, reordered by length: every embedding equal to its padded self
    lengths = (ev.arrays["attention_mask"][:32] != 0).sum(1)
    rows = np.argsort(-lengths, kind="stable")
    np.testing.assert_allclose(q_t, q_p[rows], atol=2e-6)


def test_block_cache_measures_what_a_full_forward_measures(tiny_bert, tiny_data):
    """Probes that reuse the outputs of unchanged blocks give exactly the full forward's metric, and reuse some."""
    a = _quantized(tiny_bert, tiny_data, "nvfp4_rotate")
    b = _quantized(tiny_bert, tiny_data, "int8")
    names = [n for n in tiny_bert.roles.role if n.startswith("inner.encoder.")]
    feeds = _ranking_feeds(tiny_data, 32, 8)
    reference = _outputs(tiny_bert.module, feeds, 1)
    _, cosine = fidelity_metric("embedding")
    plain = MixedModel(copy.deepcopy(a), copy.deepcopy(b), names)  # copied before the cache wraps a's blocks
    cached = MixedModel(a, b, names, cache_bytes=64 << 20)
    assert len(set(cached.blocks.index.values())) == 2  # tiny_bert's two encoder blocks
    names_out = tiny_bert.output_names

    def score(batches):
        return cosine(reference, np.concatenate([b["sentence_embedding"] for b in batches]))
    m_cached = torch_measure(cached, feeds, score, names_out)
    m_plain = torch_measure(plain, feeds, score, names_out)
    last, first = names[-1], names[0]
    sets = [set(), {last}, {first}, {first, last}, {last}, set(), {names[1], last}]
    values = [m_cached(s) for s in sets]
    assert values == [m_plain(s) for s in sets]
    assert len(set(values)) > 3  # the sets do measure differently
    assert cached.blocks.hits >= 2 * len(feeds)  # {last}: block 0 read back; the repeats: both blocks

    # a model with more layers than confirm_top: the proxy pass orders them, the top ones are measured, and the
    # search still measures any layer it picks
    sens = measure_sensitivity(cached, names, tiny_bert.roles.role, feeds, m_cached, confirm_top=3)
    measured = [x for x in sens["layers"] if x["gain"] is not None]
    assert len(measured) == 3 and sens["layers"][:3] == measured
    assert all(x["proxy_error"] > 0 for x in sens["layers"])
    assert sens["base_metric"] == values[0]
    budget = 1.0 - m_cached(frozenset(names)) + 1e-9  # what every layer in the fallback reaches
    result = search(m_cached, sens, "embedding_cosine_mean", Budget("fidelity", budget, "test"), "int8", len(names),
                    "nvfp4", {n: 1 for n in names})
    assert result.met and result.curve[-1].drop <= budget and result.chosen
    assert abs(m_plain(set(result.chosen)) - result.curve[-1].metric) < 1e-12


# ---- gate thresholds are conditions of the search (issue 17 item 2) ------------------------------------------


def test_a_gate_condition_the_budget_leaves_unmet_decides_the_map():
    """The budget (0.2) holds with no fallback, but a gate threshold (out >= 0.95) needs layer c: the search goes on
    until the map meets both, and says which constraint decided it. Without the condition it stops at once."""
    from compiler.repair.metric import Condition

    def measure(layers):
        s = set(layers)
        return {"metric": planted(s), "out": 0.9 + 0.06 * ("c" in s) + 0.001 * ("e" in s)}

    cond = Condition("out", 0.95, "recipe.gate.min_output_cosine=0.95")
    assert search_fallbacks(measure, NAMES, 1.0, 0.2, allowed=5).chosen == []
    # binary: the smallest prefix of the single-gain order a, b, d, c that holds c
    for strategy, chosen in (("greedy", ["c"]), ("binary", ["a", "b", "c", "d"])):
        out = search_fallbacks(measure, NAMES, 1.0, 0.2, allowed=5, conditions=[cond], strategy=strategy)
        assert out.met and sorted(out.chosen) == chosen, (strategy, out)
    sens = {"base_metric": 0.85, "layers": [{"name": n, "role": "", "proxy_error": None, "gain": None,
                                            "metric": None} for n in NAMES]}
    result = search(measure, sens, "cosine", Budget("fidelity", 0.2, "recipe.repair.max_fidelity_drop=0.2"), "fp8",
                    5, "nvfp4", {n: 10 for n in NAMES}, conditions=[cond])
    assert result.met and result.chosen == ["c"]
    assert result.curve[0].unmet == ["out"] and result.curve[-1].unmet == []
    assert result.decided_by == ["out >= 0.95 (recipe.gate.min_output_cosine=0.95)"]
    md = report_markdown(result)
    assert "Decided by: out >= 0.95 (recipe.gate.min_output_cosine=0.95)" in md
    assert "Repair budget: cosine drop <= 0.2, set by recipe.repair.max_fidelity_drop=0.2." in md


def test_the_budget_first_then_the_condition():
    """The budget (0.02) needs a, c, d; the condition then needs e too: its gains take over once the budget holds."""
    from compiler.repair.metric import Condition

    def measure(layers):
        s = set(layers)
        return {"metric": planted(s), "out": 0.9 + 0.06 * ("e" in s)}

    cond = Condition("out", 0.95, "recipe.gate.min_embedding_cosine=0.95")
    out = search_fallbacks(measure, NAMES, 1.0, 0.02, allowed=5, conditions=[cond])
    assert out.met and sorted(out.chosen) == ["a", "c", "d", "e"]
    path = [(p.change, p.unmet) for p in out.probes if p.accepted]
    assert path == [("-", ["metric", "out"]), ("+a", ["metric", "out"]), ("+d", ["metric", "out"]),
                    ("+c", ["out"]), ("+e", [])]
    unmet = search_fallbacks(measure, NAMES, 1.0, 0.02, allowed=3, conditions=[cond])
    assert not unmet.met and unmet.needed == 4


def test_no_budget_given_the_note_says_where_it_came_from():
    """recipe=nvfp4 with repair on and no budget: the fidelity budget comes from the recipe's loose gate
    (min_embedding_cosine=0.9); report.json's repair.budget_note and REPORT.md say so and name the key for a
    tighter one (issue 17 item 7)."""
    from compiler.repair.budget import resolve_budget
    from compiler.repair.result import searched_section
    from compiler.stages.validate import validate
    from tests.conftest import compose

    spec = validate(compose("model=tiny_bert", "recipe=nvfp4", "target=torch", "recipe.repair.enabled=true"))
    budget = resolve_budget(spec.repair, spec.gate, "embedding", labeled=True)
    assert (budget.kind, budget.key, budget.source) == ("fidelity", "max_fidelity_drop",
                                                        "recipe.gate.min_embedding_cosine=0.9")
    assert budget.max_drop == pytest.approx(0.1)
    note = ("Repair budget: embedding_cosine_mean drop <= 0.1, from recipe.gate.min_embedding_cosine=0.9 "
            "(recipe.repair.max_fidelity_drop not given); set recipe.repair.max_fidelity_drop (e.g. "
            "recipe.repair.max_fidelity_drop=0.01) for a tighter one.")
    sens = {"base_metric": 0.95, "layers": [{"name": "a", "role": "", "proxy_error": None, "gain": None,
                                            "metric": None}]}
    result = search(lambda s: 0.95, sens, "embedding_cosine_mean", budget, "fp8", 1, "nvfp4", {"a": 1})
    section = searched_section(result, {}).to_dict()
    assert section["budget_note"] == note and section["max_fidelity_drop"] == budget.max_drop
    assert section["budget_source"] == "recipe.gate.min_embedding_cosine=0.9" and "max_task_drop" not in section
    assert note in report_markdown(result)


def test_a_condition_the_checks_padded_batches_miss_is_raised_and_searched_again():
    """The measurers see a per-output cosine on the ranking rows without padding; the check sees it on padded
    batches. When the check's value at the chosen map misses the gate, the condition's floor rises by the gap and
    the search runs again: here the padded value is 0.02 lower, so c alone (0.96, padded 0.94) is not enough and
    the map grows to c + e (0.99, padded 0.97)."""
    from compiler.repair.metric import Condition
    from compiler.repair.run import confirmed

    def approx(layers):
        s = set(layers)
        return {"metric": planted(s), "output last_hidden_state cosine": 0.9 + 0.06 * ("c" in s) + 0.03 * ("e" in s)}

    cond = Condition("output last_hidden_state cosine", 0.95, "recipe.gate.min_output_cosine=0.95")
    sens = {"base_metric": 0.85, "layers": [{"name": n, "role": "", "proxy_error": None, "gain": None,
                                            "metric": None} for n in NAMES]}
    budget = Budget("fidelity", 0.2, "recipe.repair.max_fidelity_drop=0.2")
    checked = []

    def exact(chosen, conditions):
        checked.append(sorted(chosen))
        return {cond.name: approx(chosen)[cond.name] - 0.02}

    def run_search(conditions):
        return search(approx, sens, "cosine", budget, "fp8", 5, "nvfp4", {n: 1 for n in NAMES}, conditions=conditions)

    result = confirmed(run_search, exact, lambda chosen: approx(chosen), [cond])
    assert checked == [["c"], ["c", "e"]]
    assert result.met and sorted(result.chosen) == ["c", "e"]
    (raised,) = result.conditions
    assert raised.floor == pytest.approx(0.97 + 1e-6)
    assert "raised by 0.02: the check's padded batches gave 0.94 at the map of 1 layers" in raised.source
    assert result.decided_by == [raised.label()]
    # a map the check confirms is searched once
    checked.clear()
    once = confirmed(run_search, lambda chosen, conditions: {cond.name: 0.99}, approx, [cond])
    assert once.chosen == ["c"] and checked == []
