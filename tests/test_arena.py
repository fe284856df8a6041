"""The arena on a tiny budget: every scenario and attacker runs, the leaderboard validates against its
published schema, the baselines are tuned by the rule on tuning seeds, and bad requests are refused."""

import json
from dataclasses import replace
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
import torch

from attacker_sim import scenarios
from attacker_sim.arena import DEFAULT_STRATEGY, VARIANTS, checks, resolve_strategies, run_arena, write_leaderboard
from attacker_sim.attacks.backdoor import stamp
from attacker_sim.evaluation import build_campaign
from attacker_sim.leaderboard import Leaderboard
from attacker_sim.tuning import TUNED, tune_baselines
from service.core.config import StrategyConfig
from tests.profiles import DIGITS_OVERRIDES

TINY_ARENA = {"launch_after": [0, 12], "clean_batches": 4, "fresh_batches": 3, "slow_poison_every": 3,
              "slow_poison_count": 2, "drift_batches": 6, "label_flip_batches": 4, "backdoor_batches": 4,
              "adaptive_betas": [1.0],
              "strategies": ["st", "gc", "at", "dsc", "gc-paper"],
              "tuning": {"seeds": [1], "gc_clip_values": [0.01, 1.0], "gc_norms": ["inf"], "at_epsilons": [0.05],
                         "at_steps": [2]}}


@pytest.fixture(scope="module")
def tiny_config(digits_config):
    arena = digits_config.arena.model_validate(TINY_ARENA)
    return digits_config.model_copy(update={
        "arena": arena, "campaign": digits_config.campaign.model_copy(update={"max_batches": 3}),
        "attack": digits_config.attack.model_copy(update={"surrogate_epochs": 3})})


@pytest.fixture(scope="module")
def board(tiny_config, cache_dir, tmp_path_factory):
    board = run_arena(tiny_config, seeds=[0], cache_dir=cache_dir, progress=False)
    out = tmp_path_factory.mktemp("arena")
    write_leaderboard(board, out)
    return board, out


def test_every_scenario_and_attacker_has_a_row_per_strategy(board):
    board, _ = board
    kinds = ["pixel_shift", "rotation", "brightness_contrast", "label_prior"]
    expected = {"clean", "attack@0", "attack@12", "slow-poison", *(f"drift:{kind}" for kind in kinds),
                *(f"drift:{kind}@12" for kind in kinds),  # again after the longest launch time's clean stretch
                "drift+attack:pixel_shift", "label-flip:3>8", "label-flip:3>*", "label-flip:3>8@drift:pixel_shift",
                "label-flip:3>*@drift:pixel_shift", "backdoor:*>0x0.1", "black-box", "adaptive:beta=1",
                "adaptive:gate"}
    assert set(board.scenarios()) == expected
    long_horizon = {"attack@12", *(f"drift:{kind}@12" for kind in kinds)}  # not run for the *-paper variants
    for scenario in expected:
        paper = set() if scenario in long_horizon else {"gc-paper"}
        assert {r.strategy for r in board.rows if r.scenario == scenario} == {"st", "gc", "at", "dsc", *paper}


def test_leaderboard_json_validates_against_its_published_schema(board):
    _, out = board
    document = json.loads((out / "leaderboard.json").read_text())
    jsonschema.validate(document, json.loads((out / "leaderboard.schema.json").read_text()))
    broken = {**document, "rows": [{**document["rows"][0], "final_acc": {"mean": 0.5}}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads((out / "leaderboard.schema.json").read_text()))
    assert Leaderboard.model_validate(document).seeds == [0]
    markdown = (out / "leaderboard.md").read_text()
    assert "| dsc |" in markdown and "How gc and at were tuned" in markdown
    for png in ("pareto.png", "long_horizon.png", "drift.png"):
        assert (out / png).stat().st_size > 10_000


def test_measures_follow_their_definitions(board):
    board, _ = board
    st, dsc = board.row("attack@0", "st"), board.row("attack@0", "dsc")
    st_loss = st.start_acc.values[0] - st.final_acc.values[0]
    if dsc.recovery is not None:
        assert dsc.recovery.values[0] == pytest.approx((dsc.final_acc.values[0] - st.final_acc.values[0]) / st_loss)
    drift = board.row("drift:pixel_shift", "gc")
    assert drift.drift_gain.values[0] == pytest.approx(drift.final_acc.values[0] - drift.start_acc.values[0])
    st_gain = board.row("drift:pixel_shift", "st").drift_gain.values[0]
    if st_gain >= 0.01:
        assert drift.drift_gain_share.values[0] == pytest.approx(drift.drift_gain.values[0] / st_gain)
    else:  # a drift ST hardly learns gives no share
        assert drift.drift_gain_share is None
    # st never flags; dsc's realised clean false-flag rate is reported beside its target
    assert board.row("clean", "st").clean_flag_rate.mean == 0.0
    assert board.row("clean", "dsc").target_flag_rate == pytest.approx(0.1)
    assert board.row("clean", "dsc").clean_flag_rate is not None


def test_a_backdoor_row_reports_its_attack_success_and_no_recovery_of_clean_accuracy():
    """ST losing clean accuracy to a label flip gives a recovery; to a backdoor it does not: there the attack's aim is
    its success, and a recovery of a point's clean loss read 230% in a development run."""
    from attacker_sim.leaderboard import build_rows
    from attacker_sim.scenarios import Outcome

    def rows(scenario, success):
        runs = [Outcome(scenario, "st", 0, start_acc=0.97, final_acc=0.95, poisons_flagged=0.0,
                        attack_success=success and 0.9),
                Outcome(scenario, "guard", 0, start_acc=0.97, final_acc=0.96, poisons_flagged=0.5,
                        attack_success=success and 0.3)]
        return {r.strategy: r for r in build_rows(runs)}

    flip, backdoor = rows("label-flip:3>8", None), rows("backdoor:*>0x0.1", True)
    assert flip["guard"].recovery.mean == pytest.approx(0.5) and flip["guard"].attack_success is None
    assert backdoor["guard"].recovery is None and backdoor["guard"].attack_success.mean == pytest.approx(0.3)


def test_the_default_is_held_to_the_best_tuned_baseline_and_never_to_itself(board, tiny_config):
    """The attack bar compares the default with the tuned baselines in the run; where none ran, the check says so
    and judges only the recovery (it used to compare the default with itself, a check that could not fail)."""
    board, _ = board
    as_default = [r.model_copy(update={"strategy": DEFAULT_STRATEGY}) if r.strategy == "dsc" else r for r in board.rows]
    launches = [s for s in board.scenarios() if s.startswith("attack@")]

    def attack_checks(rows):
        found = checks(board.model_copy(update={"rows": rows}), tiny_config)
        return {name: found[name] for name in found if name.startswith(f"{DEFAULT_STRATEGY} at attack@")}

    with_baselines = attack_checks(as_default)
    assert len(with_baselines) == len(launches)
    assert all("within 1 point of the best tuned baseline" in name for name in with_baselines)
    alone = attack_checks([r for r in as_default if r.strategy not in TUNED])
    assert len(alone) == len(launches)
    assert all("no tuned baseline in this run" in name and "best tuned" not in check["detail"]
               for name, check in alone.items())


def test_launch_snapshots_are_independent_copies_taken_after_their_batch(digits_experiment):
    data = scenarios.ScenarioData(digits_experiment, digits_experiment.test_tensors,
                                  digits_experiment.splits.attacker_val.tensors())
    learner = digits_experiment.new_learner()
    clean, snapshots = scenarios.clean_prefix(learner, data, "dsc", length=8, clean_batches=3, snapshot_at={0, 5})
    assert learner.batches_applied == 8
    assert {m: s.batches_applied for m, s in snapshots.items()} == {0: 0, 5: 5}
    assert snapshots[5].model is not learner.model
    assert snapshots[0].accuracy(*data.test) == pytest.approx(clean.start_acc)
    assert clean.clean_flag_rate_early is not None and clean.target_flag_rate == pytest.approx(0.1)


def test_late_drift_starts_from_the_learner_after_the_longest_clean_stretch(tiny_config, digits_experiment,
                                                                           monkeypatch):
    """drift:<kind>@<batches> runs on a copy of the long stream's snapshot; the attack still gets the snapshot."""
    from attacker_sim import arena

    seen, real = [], scenarios.drift

    def recording(learner, data, label, kind, batches, on_step=None, after=0):
        seen.append((kind, after, learner.batches_applied))
        return real(learner, data, label, kind, batches, on_step, after)

    monkeypatch.setattr(scenarios, "drift", recording)
    config = tiny_config.model_copy(update={"arena": tiny_config.arena.model_copy(update={
        "drifts": ["pixel_shift"], "launch_after": [0, 7], "drift_attack": None, "adaptive_betas": [],
        "black_box": False, "gate_evasion": False})})
    experiment = replace(digits_experiment, config=config)
    data = scenarios.ScenarioData(experiment, experiment.test_tensors, experiment.splits.attacker_val.tensors())
    outcomes = arena._run_strategy(experiment, data, "st", StrategyConfig(name="st"), True,
                                   {"white": build_campaign(experiment)}, None)
    assert sorted(seen) == [("pixel_shift", 0, 0), ("pixel_shift", 7, 7)]
    names = [o.scenario for o in outcomes]
    assert "drift:pixel_shift@7" in names and "attack@7" in names
    no_late = config.model_copy(update={"arena": config.arena.model_copy(update={"late_drift": False})})
    seen.clear()
    arena._run_strategy(replace(experiment, config=no_late), data, "st", StrategyConfig(name="st"), True,
                        {"white": build_campaign(experiment)}, None)
    assert seen == [("pixel_shift", 0, 0)]


def test_the_fresh_false_flag_rate_judges_fresh_batches_without_learning_them(digits_experiment):
    learner = digits_experiment.new_learner(StrategyConfig(name="guard"))
    before = [p.detach().clone() for p in learner.model.parameters()]
    x, y = digits_experiment.test_tensors
    clean, flipped = scenarios.FreshTally((x, y), 50, seed=0), scenarios.FreshTally((x, (y + 1) % 10), 50, seed=0)
    clean.judge(learner, 20)
    flipped.judge(learner, 20)  # every label wrong
    assert learner.batches_applied == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))
    assert clean.rate <= 0.3 and flipped.rate >= 0.7, (clean.rate, flipped.rate)


def test_a_strategy_that_flags_nothing_has_no_fresh_rate(digits_experiment):
    data = scenarios.ScenarioData(digits_experiment, digits_experiment.test_tensors,
                                  digits_experiment.splits.attacker_val.tensors())
    outcome, _ = scenarios.clean_prefix(digits_experiment.new_learner(StrategyConfig(name="st")), data, "st",
                                        length=2, clean_batches=1, snapshot_at=set(), fresh_batches=2)
    assert outcome.fresh_flag_rate_early is None and outcome.fresh_flag_rate_late is None


class _StateJudge:
    """A stand-in learner for `FreshWindows`: flags a batch when its state (updates applied) is odd, and logs the
    state every copy of it judged at into one shared list."""

    seed = 0

    def __init__(self, log: list[int], applied: int = 0):
        self.log, self.applied = log, applied

    def __deepcopy__(self, memo):
        return _StateJudge(self.log, self.applied)

    def ready(self):
        return self

    def step(self, x, y):
        self.log.append(self.applied)
        return SimpleNamespace(flagged=np.full(len(x), self.applied % 2 == 1))


@pytest.mark.parametrize(("length", "window", "states", "early", "late"), [
    (7, 3, [0, 0, 1, 1, 2, 5, 5, 6, 6, 7], 2 / 5, 3 / 5),  # the first 3 states from 0, the last 3 to 7
    (2, 3, [0, 0, 0, 1, 1, 1, 1, 1, 2, 2], 2 / 5, 3 / 5),  # a stream shorter than the window: the two overlap
])
def test_fresh_batches_are_judged_over_the_states_of_the_first_and_last_windows(length, window, states, early, late):
    log: list[int] = []
    judge = _StateJudge(log)
    windows = scenarios.FreshWindows([(torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))], batch_size=2,
                                     seed=0, batches=5, length=length, window=window)
    for judge.applied in range(length + 1):
        windows.at(judge.applied, judge)
    assert log == states
    assert windows.rates() == ([early], [late])


def test_baselines_are_tuned_on_tuning_seeds_by_the_rule(board):
    board, _ = board
    tuning = board.tuning
    assert tuning["seeds"] == [1]
    gc = [c for c in tuning["candidates"] if c["strategy"]["name"] == "gc"]
    chosen = [c for c in gc if c["chosen"]]
    assert len(chosen) == 1
    admissible = [c for c in gc if c["admissible"]]
    if admissible:  # the rule: the admissible one with the best accuracy after the trigger
        assert chosen[0]["attack_acc"] == max(c["attack_acc"] for c in admissible)
    assert board.strategies["gc"]["clip_value"] == chosen[0]["strategy"]["clip_value"]
    reference = tuning["reference"]
    for c in gc:  # admissibility is exactly the documented bound
        expected = (c["clean_acc"] >= reference["clean_acc"] - 0.02
                    and c["drift_gain"] >= 0.5 * reference["drift_gain"])
        assert c["admissible"] == expected


def test_reporting_seeds_that_are_tuning_seeds_are_refused(tiny_config):
    with pytest.raises(ValueError, match="also tuning seeds"):
        run_arena(tiny_config, seeds=[1], progress=False)


def test_unknown_strategy_label_and_missing_st_are_refused(tiny_config):
    with pytest.raises(ValueError, match="unknown arena strategy nosuch"):
        resolve_strategies(tiny_config, ["st", "nosuch"], None)
    with pytest.raises(ValueError, match="needs 'st'"):
        resolve_strategies(tiny_config, ["dsc"], None)
    assert resolve_strategies(tiny_config, list(VARIANTS), None)["gc-paper"].clip_value == 0.01


def test_slow_poison_spreads_poisons_between_clean_batches(digits_experiment):
    data = scenarios.ScenarioData(digits_experiment, digits_experiment.test_tensors,
                                  digits_experiment.splits.attacker_val.tensors())
    learner = digits_experiment.new_learner(digits_experiment.config.strategy.model_copy(update={"name": "st"}))
    outcome = scenarios.attack(learner, data, "st", build_campaign(digits_experiment), "slow-poison", stream_offset=5,
                               clean_between=2, max_poisons=2)
    # 2 clean before each poison; the monitor may fire after the first poison
    assert learner.batches_applied in (1 * 3 + 1, 2 * 3 + 1)
    assert outcome.clean_flag_rate == 0.0 and outcome.batches == (learner.batches_applied - 1) // 3


def _on_st(experiment, scenario, **arguments):
    """`scenario` (`scenarios.label_flip`, `scenarios.backdoor`) on an ST learner: (the outcome, the (x, y) batches it
    learned, the data, the learner)."""
    data = scenarios.ScenarioData(experiment, experiment.test_tensors, experiment.splits.attacker_val.tensors())
    learner = experiment.new_learner(experiment.config.strategy.model_copy(update={"name": "st"}))
    seen = []
    step = learner.step
    learner.step = lambda bx, by: (seen.append((bx, by)), step(bx, by))[1]
    return scenario(learner, data, "st", **arguments), seen, data, learner


def test_a_label_flip_relabels_only_the_source_class_and_costs_st_that_class(digits_experiment):
    x, y = digits_experiment.test_tensors
    before = digits_experiment.new_learner(digits_experiment.config.strategy.model_copy(update={"name": "st"}))
    before = before.accuracy(x[y == 3], y[y == 3])
    outcome, seen, data, learner = _on_st(digits_experiment, scenarios.label_flip, source=3, target=8, batches=40)
    assert outcome.scenario == "label-flip:3>8" and len(seen) == 40 and outcome.poisons_flagged == 0.0
    stream = data.stream(6)
    for (bx, by), (cx, cy) in zip(seen, (next(stream) for _ in seen), strict=True):
        assert torch.equal(bx, cx)  # the stream's own images, untouched
        assert torch.equal(by, torch.where(cy == 3, 8, cy))  # every 3 labelled 8, every other label kept
    assert learner.accuracy(x[y == 3], y[y == 3]) < before - 0.5  # ST learns the lie: most 3s are now 8s
    assert outcome.final_acc < outcome.start_acc


def _labels_of_the_threes(seen, data):
    """(the labels the flip gave, the stream's own labels, which were 3s) over the batches `seen`."""
    stream = data.stream(6)
    originals = torch.cat([next(stream)[1] for _ in seen])
    return torch.cat([by for _, by in seen]), originals, originals == 3


def test_a_partial_label_flip_relabels_about_its_fraction_of_the_source_class_and_names_it(digits_experiment):
    outcome, seen, data, _ = _on_st(digits_experiment, scenarios.label_flip, source=3, target=8, batches=40,
                                    fraction=0.4)
    assert outcome.scenario == "label-flip:3>8x0.4"
    labels, originals, threes = _labels_of_the_threes(seen, data)
    assert torch.equal(labels[~threes], originals[~threes])  # only 3s are relabelled, and only as 8s
    assert set(labels[threes].tolist()) == {3, 8}
    share = (labels[threes] == 8).float().mean().item()
    assert abs(share - 0.4) < 3 * (0.4 * 0.6 / threes.sum().item()) ** 0.5  # within three binomial std


def test_a_spread_label_flip_labels_each_source_sample_as_some_other_class(digits_experiment):
    outcome, seen, data, _ = _on_st(digits_experiment, scenarios.label_flip, source=3, target=None, batches=40)
    assert outcome.scenario == "label-flip:3>*"
    labels, originals, threes = _labels_of_the_threes(seen, data)
    assert torch.equal(labels[~threes], originals[~threes]) and not (labels[threes] == 3).any()
    counts = torch.bincount(labels[threes], minlength=10)
    assert (counts[torch.arange(10) != 3] > 0).all()  # every other class carries some of the lie
    assert counts.max() < 0.5 * threes.sum()  # and none carries most of it: no pair for a label check's share


def test_a_label_flip_on_drift_lies_on_the_drift_scenarios_batches_and_is_judged_on_its_view(digits_experiment):
    outcome, seen, data, learner = _on_st(digits_experiment, scenarios.label_flip, source=3, target=8, batches=6,
                                          drift="pixel_shift")
    assert outcome.scenario == "label-flip:3>8@drift:pixel_shift" and len(seen) == 6
    stream, test = data.drifted("pixel_shift", offset=3, count=6)  # the drift scenario's own batches
    for (bx, by), (dx, dy) in zip(seen, stream, strict=True):
        assert torch.equal(bx, dx) and torch.equal(by, torch.where(dy == 3, 8, dy))
    assert outcome.final_acc == pytest.approx(learner.accuracy(*test))  # on the drifted view, not the test split


def test_a_label_flip_naming_one_class_twice_or_a_class_the_data_lacks_is_refused(tiny_config):
    with pytest.raises(ValueError, match="label_flip must be"):
        tiny_config.arena.model_validate({**TINY_ARENA, "label_flip": [3, 3]})
    bad = tiny_config.model_copy(update={"arena": tiny_config.arena.model_copy(update={"label_flip": [3, 12]})})
    with pytest.raises(ValueError, match=r"arena.label_flip: \[3, 12\] names a class"):
        run_arena(bad, seeds=[0], strategies=["st"], progress=False)


def test_a_backdoor_stamps_about_its_fraction_of_the_other_classes_as_the_target_and_st_learns_it(digits_experiment):
    x, y = digits_experiment.test_tensors
    triggered = stamp(x[y != 0]), torch.zeros(int((y != 0).sum()), dtype=y.dtype)
    st = digits_experiment.config.strategy.model_copy(update={"name": "st"})
    before = digits_experiment.new_learner(st).accuracy(*triggered)
    outcome, seen, data, learner = _on_st(digits_experiment, scenarios.backdoor, target=0, fraction=0.2, batches=40)
    assert outcome.scenario == "backdoor:*>0x0.2" and len(seen) == 40 and outcome.poisons_flagged == 0.0
    stream = data.stream(7)
    stamped = others = 0
    for (bx, by), (cx, cy) in zip(seen, (next(stream) for _ in seen), strict=True):
        lied = by != cy
        assert (cy[lied] != 0).all() and (by[lied] == 0).all()  # only other classes, all labelled the target
        assert torch.equal(bx[lied], stamp(cx[lied])) and torch.equal(bx[~lied], cx[~lied])
        stamped, others = stamped + int(lied.sum()), others + int((cy != 0).sum())
    assert abs(stamped / others - 0.2) < 3 * (0.2 * 0.8 / others) ** 0.5  # within three binomial std
    # ST learns the square: most stamped test inputs of other classes now go to 0, which they did not before
    assert outcome.attack_success == pytest.approx(learner.accuracy(*triggered))
    assert outcome.attack_success > 0.5 > before
    assert outcome.final_acc == pytest.approx(learner.accuracy(x, y))


def test_a_backdoor_target_the_data_lacks_is_refused_and_null_leaves_it_out(tiny_config):
    with pytest.raises(ValueError, match="backdoor_target"):
        tiny_config.arena.model_validate({**TINY_ARENA, "backdoor_target": -1})
    with pytest.raises(ValueError, match="backdoor_fraction"):
        tiny_config.arena.model_validate({**TINY_ARENA, "backdoor_fraction": 0})
    bad = tiny_config.model_copy(update={"arena": tiny_config.arena.model_copy(update={"backdoor_target": 10})})
    with pytest.raises(ValueError, match=r"arena.backdoor_target: 10 is a class"):
        run_arena(bad, seeds=[0], strategies=["st"], progress=False)


def test_the_backdoor_check_holds_the_default_to_half_of_sts_success_and_its_clean_accuracy(board, tiny_config):
    board, _ = board
    (scenario,) = [s for s in board.scenarios() if s.startswith("backdoor:")]
    st = board.row(scenario, "st")
    st = st.model_copy(update={"attack_success": st.attack_success.model_copy(update={"mean": 0.8})})
    rows = [r for r in board.rows if (r.scenario, r.strategy) != (scenario, "st")] + [st]

    def verdict(success, clean):
        mine = st.model_copy(update={"strategy": DEFAULT_STRATEGY, "attack_success": st.attack_success.model_copy(
            update={"mean": success}), "final_acc": st.final_acc.model_copy(update={"mean": clean})})
        found = checks(board.model_copy(update={"rows": [*rows, mine]}), tiny_config)
        (name,) = [n for n in found if n.startswith(f"{DEFAULT_STRATEGY} at {scenario}")]
        return found[name]["passed"]

    clean = st.final_acc.mean
    found = checks(board.model_copy(update={"rows": rows}), tiny_config)
    assert found[f"{scenario} is real (ST's attack success >= 50%)"]["passed"]  # ST's success is 0.8 here
    weak = st.model_copy(update={"attack_success": st.attack_success.model_copy(update={"mean": 0.3})})
    found = checks(board.model_copy(update={"rows": [*rows[:-1], weak]}), tiny_config)
    assert not found[f"{scenario} is real (ST's attack success >= 50%)"]["passed"]
    assert verdict(0.3, clean) and verdict(0.4, clean - 0.005)
    assert not verdict(0.5, clean)  # more than half of ST's success
    assert not verdict(0.3, clean - 0.02)  # the clean accuracy paid for it


def test_the_drift_check_says_where_each_strategy_starts_and_ends_on_the_drifted_test_set(board, tiny_config):
    """The share compares gains that start where each strategy's stream left it (a defense already better on the
    drifted view has less to gain): the check's detail gives both strategies' accuracies before and after."""
    board, _ = board
    scenario = "drift:pixel_shift"
    gc, st = board.row(scenario, "gc"), board.row(scenario, "st")
    share = (gc.drift_gain_share or gc.drift_gain).model_copy(update={"mean": 0.5})
    mine = gc.model_copy(update={"strategy": DEFAULT_STRATEGY, "drift_gain_share": share})
    found = checks(board.model_copy(update={"rows": [*board.rows, mine]}), tiny_config)
    result = found[f"{DEFAULT_STRATEGY} learns {scenario} (gain >= 80% of ST's)"]
    assert not result["passed"]
    assert result["detail"] == (f"50% of ST's gain; on the drifted test set {gc.start_acc.mean:.1%} -> "
                                f"{gc.final_acc.mean:.1%} vs ST's {st.start_acc.mean:.1%} -> {st.final_acc.mean:.1%}")


def test_tuning_refuses_nothing_silently_when_no_candidate_is_admissible(tiny_config, cache_dir):
    # a drift share no baseline can meet: the closest candidate is taken and the result says so
    strict = tiny_config.model_copy(update={"arena": tiny_config.arena.model_copy(update={
        "tuning": tiny_config.arena.tuning.model_copy(update={"drift_share": 1.0, "clean_bound": 0.0,
                                                               "at_epsilons": [0.2], "at_steps": [10]})})})
    result = tune_baselines(strict, ("at",), cache_dir=cache_dir, progress=False)
    (candidate,) = [c for c in result.candidates]
    assert candidate.chosen
    assert result.fallback == (["at"] if not candidate.admissible else [])


def test_demo_is_the_digits_arena_and_prints_the_leaderboard(cache_dir, tmp_path, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
    burnin = [f"burnin.{field}={value}" for field, value in DIGITS_OVERRIDES["burnin"].items()]  # the session's
    overrides = [*burnin, "campaign.max_batches=2", "arena.launch_after=[0]", "arena.clean_batches=3",
                 "arena.drifts=[]", "arena.drift_attack=null", "arena.black_box=false", "arena.adaptive_betas=[]",
                 "arena.gate_evasion=false", "arena.label_flip=null", "arena.backdoor_target=null",
                 "arena.slow_poison_count=1", "arena.slow_poison_every=2"]
    argv = ["demo", "--seeds", "0", "--strategies", "st", "guard", "--out", str(tmp_path), "--no-progress",
            "--no-plots"]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert "# Arena: digits" in printed and "| guard |" in printed
    assert "guard clean oracle within 1 point of ST" in printed  # the default defense is held to the bar
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert board["profile"] == "digits" and set(board["strategies"]) == {"st", "guard"}
    assert {r["scenario"] for r in board["rows"]} == {"clean", "attack@0", "slow-poison"}
