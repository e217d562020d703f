"""Which evaluation is exported: the gold signal when there is one, else the held-out reward among the
evaluations whose median response the reference still finds about as likely as its own (hand-made
records)."""

from __future__ import annotations

import pytest

from chatforge.trainers.export_choice import export_score, max_drift, reference_drift

BASE = {"reward_sampled": 0.1, "ref_nll_median_sampled": 8.0, "ref_nll_median_greedy": 3.0}


def test_the_drift_is_the_change_in_the_references_nll_of_the_median_sampled_response():
    assert reference_drift({"ref_nll_median_sampled": 8.75}, BASE) == pytest.approx(0.75)
    assert reference_drift({"ref_nll_median_sampled": 7.5}, BASE) == pytest.approx(-0.5)  # sharper
    # without samples the greedy responses' figure is used; nothing to compare -> None
    assert reference_drift({"ref_nll_median_greedy": 3.25}, {"ref_nll_median_greedy": 3.0}) == pytest.approx(
        0.25
    )
    assert reference_drift({"reward_sampled": 1.0}, BASE) is None
    assert reference_drift({"ref_nll_median_sampled": 1.0}, {}) is None


def test_the_bound_is_half_the_kl_target():
    assert max_drift(1.0) == pytest.approx(0.5)
    assert max_drift(4.0) == pytest.approx(2.0)
    assert max_drift(None) is None


def test_without_gold_only_evaluations_within_the_drift_compete_by_reward():
    within = {"reward_sampled": 0.7, "ref_nll_median_sampled": 8.4}
    past = {"reward_sampled": 2.0, "ref_nll_median_sampled": 8.9}
    assert export_score(within, BASE, None, 0.5) == pytest.approx(0.7)
    assert export_score(past, BASE, None, 0.5) is None
    assert export_score(past, BASE, None, 1.0) == pytest.approx(2.0)
    assert export_score(BASE, BASE, None, 0.0) == pytest.approx(0.1)  # step 0 always competes


def test_greedy_reward_is_used_without_samples():
    base = {"reward_greedy": 0.0, "ref_nll_median_greedy": 3.0}
    assert export_score({"reward_greedy": 0.4, "ref_nll_median_greedy": 3.25}, base, None, 0.5) == 0.4


def test_a_gold_signal_decides_whatever_the_drift():
    record = {"reward_sampled": 5.0, "ref_nll_median_sampled": 30.0, "gold:check_sampled": 0.25}
    assert export_score(record, BASE, "gold:check_sampled", 0.5) == 0.25
    assert export_score(record, BASE, "gold:check_sampled", None) == 0.25


def test_no_choice_when_the_drift_bound_is_off():
    assert export_score({"reward_sampled": 1.0, "ref_nll_median_sampled": 8.0}, BASE, None, None) is None
