"""Which evaluation is exported: the gold signal when there is one, else the held-out reward among the
evaluations whose median response the reference still finds about as likely as its own; the latest within
one standard error of the best (hand-made records)."""

from __future__ import annotations

import pytest

from chatforge.trainers.export_choice import choose, export_key, max_drift, may_compete, reference_drift

BASE = {"reward_sampled": 0.1, "ref_nll_median_sampled": 8.0, "ref_nll_median_greedy": 3.0}


def test_the_drift_is_the_change_in_the_references_nll_of_the_median_sampled_response():
    assert reference_drift({"ref_nll_median_sampled": 8.75}, BASE) == pytest.approx(0.75)
    assert reference_drift({"ref_nll_median_sampled": 7.5}, BASE) == pytest.approx(-0.5)  # sharper
    # without samples the greedy responses' figure is used; nothing to compare -> None
    greedy = reference_drift({"ref_nll_median_greedy": 3.25}, {"ref_nll_median_greedy": 3.0})
    assert greedy == pytest.approx(0.25)
    assert reference_drift({"reward_sampled": 1.0}, BASE) is None
    assert reference_drift({"ref_nll_median_sampled": 1.0}, {}) is None


def test_the_bound_is_half_the_kl_target():
    assert max_drift(1.0) == pytest.approx(0.5)
    assert max_drift(4.0) == pytest.approx(2.0)
    assert max_drift(None) is None


def test_with_a_reward_model_only_evaluations_within_the_drift_compete():
    within = {"reward_sampled": 0.7, "ref_nll_median_sampled": 8.4}
    past = {"reward_sampled": 2.0, "ref_nll_median_sampled": 8.9}
    assert may_compete(within, BASE, None, 0.5, learned_reward=True)
    assert not may_compete(past, BASE, None, 0.5, learned_reward=True)
    assert may_compete(past, BASE, None, 1.0, learned_reward=True)
    assert may_compete(BASE, BASE, None, 0.0, learned_reward=True)  # step 0 always competes
    assert not may_compete(within, BASE, None, None, learned_reward=True)  # no bound: no choice
    assert not may_compete({"reward_sampled": 0.7}, BASE, None, 0.5, learned_reward=True)  # no figure


def test_a_gold_signal_or_a_rule_reward_competes_whatever_the_drift():
    record = {"reward_sampled": 5.0, "ref_nll_median_sampled": 30.0, "gold:check_sampled": 0.25}
    assert may_compete(record, BASE, "gold:check_sampled", 0.5, learned_reward=True)
    assert may_compete(record, BASE, "gold:check_sampled", None, learned_reward=True)
    assert may_compete(record, BASE, None, 0.5, learned_reward=False)
    assert export_key(record, "gold:check_sampled") == "gold:check_sampled"
    assert export_key(record, None) == "reward_sampled"
    assert export_key({"reward_greedy": 0.4}, None) == "reward_greedy"  # eval.samples = 0


def test_the_latest_evaluation_within_one_standard_error_of_the_best_is_chosen():
    best = choose({}, 0, 0.55, 0.03)  # step 0: the first evaluation is always chosen
    assert best == {"step": 0, "score": 0.55, "stderr": 0.03, "top": 0.55, "top_stderr": 0.03}
    # 0.50 vs 0.55: the difference's SE is hypot(0.03, 0.03) = 0.0424 < 0.05: told apart, not chosen
    assert choose(best, 20, 0.50, 0.03) is None
    # 0.52: within 0.0424 of the top, and later: chosen, the top stays step 0's
    later = choose(best, 40, 0.52, 0.03)
    assert later["step"] == 40 and later["top"] == 0.55 and later["top_stderr"] == 0.03
    # a new top is always chosen
    assert choose(later, 60, 0.7, 0.04) == {
        "step": 60, "score": 0.7, "stderr": 0.04, "top": 0.7, "top_stderr": 0.04
    }  # fmt: skip
    # without standard errors (records of an older run) the rule is "the best, ties to the later"
    assert choose({"step": 0, "score": 0.5}, 20, 0.5, 0.0)["step"] == 20
    assert choose({"step": 0, "score": 0.5}, 20, 0.49, 0.0) is None
