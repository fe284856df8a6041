"""`dscguard false-flags`: the realised false-flag rate on fresh clean batches over many seeds."""

from __future__ import annotations

import json

import pytest

from attacker_sim.false_flags import SeedRates, mean_interval, seed_rates, summarise
from attacker_sim.scenarios import ScenarioData, clean_prefix
from service.cli import main
from service.core.config import StrategyConfig
from tests.profiles import DIGITS_OVERRIDES

BURNIN = [item for field, value in DIGITS_OVERRIDES["burnin"].items()
          for item in ("--set", f"burnin.{field}={value}")]


def _row(seed, early, late, early_halves=(0.0, 0.0), late_halves=(0.0, 0.0)):
    return SeedRates(seed, 0.1, early, late, early_halves, late_halves, 0.01, 0.02)


def test_the_verdict_reads_the_mean_over_seeds_against_the_band():
    rows = [_row(0, 0.02, 0.10, late_halves=(0.0, 0.3)), _row(1, 0.06, 0.16, late_halves=(0.1, 0.1))]
    summary = summarise(rows)
    assert summary["early"]["mean"] == pytest.approx(0.04) and not summary["early"]["in_band"]  # below 0.5 x 10%
    assert summary["late"]["mean"] == pytest.approx(0.13) and summary["late"]["in_band"]
    assert summary["late"]["halves_gap"]["values"] == pytest.approx([0.3, 0.0])
    low, high = summary["late"]["interval"]
    assert low < 0.13 < high
    assert not summarise([_row(0, 0.1, 0.2), _row(1, 0.1, 0.2)])["late"]["in_band"]  # above 1.5 x 10%


def test_the_spread_over_seeds_is_split_into_the_test_pools_part_and_the_seeds_own():
    """Halves that disagree as much as the seeds do: the pool explains the spread; halves that agree: the seeds do."""
    pool_noise = summarise([_row(0, 0.1, 0.1, early_halves=(0.0, 0.2)), _row(1, 0.3, 0.3, early_halves=(0.2, 0.4))])
    assert pool_noise["early"]["spread"] == pytest.approx({"pool": 0.1, "beyond_pool": 0.0})
    assert pool_noise["late"]["spread"] == pytest.approx({"pool": 0.0, "beyond_pool": 0.1})  # halves agree
    partly = summarise([_row(0, 0.0, 0.0, early_halves=(0.0, 0.2)), _row(1, 0.4, 0.4, early_halves=(0.3, 0.5))])
    split = partly["early"]["spread"]
    assert split["pool"] == pytest.approx(0.1)
    assert split["beyond_pool"] == pytest.approx((0.2 ** 2 - 0.1 ** 2) ** 0.5, abs=1e-4)  # the variances add up


def test_the_interval_of_the_mean_narrows_with_more_seeds():
    few, many = mean_interval([0.05, 0.15] * 2), mean_interval([0.05, 0.15] * 10)
    assert few[0] < many[0] < 0.1 < many[1] < few[1]


def test_the_check_measures_what_the_arena_measures(digits_experiment):
    """The check's whole-pool rates are the arena's clean scenario's fresh rates, seed for seed."""
    strategy = StrategyConfig(name="guard", gate_recalibrate_every=3)
    rates = seed_rates(digits_experiment, strategy, batches=6, fresh_batches=5)
    data = ScenarioData(digits_experiment, digits_experiment.test_tensors,
                        digits_experiment.splits.attacker_val.tensors())
    outcome, _ = clean_prefix(digits_experiment.new_learner(strategy).ready(), data, "guard", length=6,
                              clean_batches=1, snapshot_at=set(), fresh_batches=5)
    assert (rates.early, rates.late) == (outcome.fresh_flag_rate_early, outcome.fresh_flag_rate_late)
    assert rates.threshold_late != rates.threshold_early  # measured after the stream's recalibrations
    assert all(0 <= rate <= 1 for rate in (*rates.early_halves, *rates.late_halves))


def test_a_strategy_that_flags_nothing_has_no_rate_to_check(digits_experiment):
    with pytest.raises(ValueError, match="strategy 'st' flags nothing"):
        seed_rates(digits_experiment, StrategyConfig(name="st"), batches=1, fresh_batches=1)


@pytest.mark.parametrize(("argv", "message"), [
    (["--seeds", "0"], "the check summarises over seeds: it needs at least 2, got 1"),
    (["--set", "arena.fresh_batches=0"], "arena.fresh_batches must be >= 1 for the check, got 0")])
def test_a_check_that_cannot_be_summarised_is_refused_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["false-flags", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"dscguard: error: {message}\n"
    assert not out.exists()


def test_the_command_writes_the_table_and_its_json(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
    out = tmp_path / "report"
    assert main(["false-flags", "--seeds", "0", "1", "--no-progress", "--out", str(out), *BURNIN,
                 "--set", "arena.launch_after=[4]", "--set", "arena.fresh_batches=3"]) == 0
    result = json.loads((out / "false_flags.json").read_text())
    assert [row["seed"] for row in result["seeds"]] == [0, 1] and result["batches"] == 4
    table = (out / "false_flags.md").read_text()
    assert table.strip() in capsys.readouterr().out
    for when, part in result["summary"].items():
        assert f"- {'PASS' if part['in_band'] else 'FAIL'} {when}: mean {part['mean']:.1%}" in table
