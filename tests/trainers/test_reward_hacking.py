"""Reward hacking, caught: a reward model that fits every preference pair by a shortcut ("the larger number
is better": every rejected answer is smaller than the right one) is 100% right on held-out pairs and still
a proxy a policy can exploit. Without the guards, RL drives the held-out sampled task accuracy far below the
SFT model's; with the defaults and no gold signal, the exported model is the best-rewarded evaluation whose
responses the SFT model still finds about as likely as its own, so it does not fall below the SFT model,
and the run says why (warnings in the eval records and the report's banner). A reward model that is good
but imperfect (about 90% on clean pairs, errors on a few questions) still improves the model with the
defaults."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def shortcut(fixture_dir, tmp_path_factory):
    """The demo's SFT model and a reward model trained on the shortcut pairs (bench_rl_guards' recipe)."""
    sys.path.insert(0, str(BENCH))
    import bench_rl_guards as bench

    work = tmp_path_factory.mktemp("shortcut")
    data = {
        k: bench.write_rows(work / "data" / f"{k}.jsonl", bench.pair_rows(k)) for k in ("demo", "shortcut")
    }
    sft = bench.train_once(
        "sft", "SFTConfig", bench.SFT_SETTINGS, fixture_dir / "llama", data["demo"], work / "sft"
    )
    rm = bench.train_once("rm", "RewardConfig", bench.RM_SETTINGS, sft, data["shortcut"], work / "rm")
    return bench, work, sft, rm, data


@pytest.mark.slow
def test_the_guards_keep_a_shortcut_reward_model_from_wrecking_the_model(shortcut):
    from chatforge.report import build_report

    bench, work, sft, rm, data = shortcut
    assert json.loads((work / "rm" / "DONE").read_text())["accuracy"] > 0.95  # it fits its pairs
    assert bench.true_pair_accuracy(rm, data["demo"]) < 0.8  # but not the task
    base = bench.accuracy(sft)["sampled"]
    hacked = bench.run_rl(work, "shortcut", "none", sft, rm, data["shortcut"])
    guarded = bench.run_rl(work, "shortcut", "defaults", sft, rm, data["shortcut"])
    print(f"sampled accuracy: SFT {base:.3f}, no guards {hacked['final']['sampled']:.3f}, "
          f"defaults {guarded['final']['sampled']:.3f} (KL stop {guarded['kl_stop']}, warnings {guarded['warnings']})")  # fmt: skip
    assert hacked["final"]["sampled"] < base - 0.1  # without the guards the model gets worse
    assert guarded["final"]["sampled"] >= base - 0.03  # with them it does not fall below the SFT model
    assert guarded["warnings"] > 0 or guarded["kl_stop"]  # and the run says so
    html = build_report(work / "runs" / "shortcut-defaults").read_text()
    assert 'class="banner"' in html and "possible reward hacking" in html


@pytest.mark.slow
def test_the_defaults_improve_the_model_with_an_imperfect_reward_model(shortcut):
    bench, work, sft, _, data = shortcut
    noisy = bench.write_rows(work / "data" / "noisy.jsonl", bench.pair_rows("noisy"))
    rm = bench.train_once("rm", "RewardConfig", bench.RM_SETTINGS, sft, noisy, work / "rm-noisy")
    assert 0.85 < bench.true_pair_accuracy(rm, data["demo"]) < 0.97  # good, not perfect
    base = bench.accuracy(sft)["sampled"]
    result = bench.run_rl(work, "noisy", "defaults", sft, rm, noisy)
    print(f"sampled accuracy: SFT {base:.3f}, defaults {result['final']['sampled']:.3f}")
    assert result["final"]["sampled"] > base + 0.05
