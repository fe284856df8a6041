"""`dscguard arena`: the evaluation every defense must face, as a leaderboard.

For each reporting seed every strategy starts from the same burn-in and faces (`attacker_sim.scenarios`):
the clean oracle over a long clean stream (with its realised false-flag rate early and late), the
accumulative attack launched after each of `arena.launch_after` clean batches (branching from snapshots
of that one long stream), the slow poison, every benign drift kind from the start and again after the
longest clean stretch (`drift:<kind>@<batches>`, with `arena.late_drift`), drift then attack, the black-box
attacker with a surrogate it trained on its own data, the adaptive attacker (poisons and trigger) for
each beta, and the attacker adaptive to guard's gate (`adaptive:gate`: after the poisons it sends
campaign.max_batches triggers, each blended to stay under its own copy of the gate), the label flips and the
backdoor (`scenarios.label_flip`, `scenarios.backdoor`). The baselines `gc`
and `at` are tuned first by `attacker_sim.tuning`'s rule on the tuning seeds and the trusted split; the
research code's constants stay as `gc-paper` and `at-paper`.

>>> from service.core.config import ExperimentConfig
>>> resolve_strategies(ExperimentConfig(), ["st", "gc-paper", "guard"], None)["gc-paper"].clip_value
0.01
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from attacker_sim import scenarios
from attacker_sim.campaign import AccumulativeCampaign
from attacker_sim.evaluation import build_campaign
from attacker_sim.leaderboard import Leaderboard, build_rows, markdown
from attacker_sim.tuning import TUNED, TuningResult, tune_baselines
from service.core.atomic import atomic_write_text
from service.core.config import ExperimentConfig, StrategyConfig
from service.core.environment import environment
from service.core.experiment import Experiment

# label -> settings over the config's strategy section; "gc" and "at" get the tuned settings on top
VARIANTS: dict[str, dict] = {
    "st": {"name": "st"},
    "gc": {"name": "gc"},
    "gc-paper": {"name": "gc", "clip_value": 0.01, "clip_norm": "inf"},
    "at": {"name": "at"},
    "at-paper": {"name": "at", "epsilon": 0.2, "steps": 10, "step_size": 0.02},
    "dsc": {"name": "dsc"},
    "dsc-sample": {"name": "dsc", "early_stop": "sample"},
    "dsc-rolling": {"name": "dsc", "auxiliary": "rolling"},
    "dsc-skip": {"name": "dsc", "auxiliary": "rolling", "flag_action": "skip"},
    "dsc-gate": {"name": "dsc", "auxiliary": "rolling", "flag_action": "gate"},
    "guard": {"name": "guard"},
    "guard-skip": {"name": "guard", "gate_action": "skip"},
    # a flagged update loses the samples that push the trusted probe uphill most, not its size (2026-11-27: a label
    # flip held better, the drift kept)
    "guard-drop": {"name": "guard", "gate_action": "drop"},
    # a flagged update loses the samples the label check finds lying (a backdoor's stamped samples look like their
    # own class, labelled the target; 2026-11-28)
    "guard-drop-lies": {"name": "guard", "gate_action": "drop_lies"},
    # without the label check (the default until 2026-11-27, when the label flip was the one row every defense lost)
    "guard-nolabels": {"name": "guard", "label_check": False},
    # the label check with lied-about pairs only (the default until 2026-11-28, when a class relabelled at random
    # went through it)
    "guard-pairs": {"name": "guard", "label_check_class_share": None},
    "guard-uncapped": {"name": "guard", "gate_norm_cap": "none"},
    "guard-median": {"name": "guard", "gate_cap_level": 0.5},  # the cap at the median: the default until 2026-11-26
    # the default until the late-drift rows (2026-11-26): the cap at the 0.1 level, recalibrated on the current model
    "guard-following": {"name": "guard", "gate_cap_anchor": "current", "gate_cap_level": 0.1},
    # each probe sample's loss change clamped to the 1%/99% quantiles of clean ones (tried 2026-11-26, within noise)
    "guard-winsor": {"name": "guard", "gate_probe_winsor": 0.01},
    # the threshold at the conformal level 1 - target: the default until the cross-half level (2026-11-26)
    "guard-conformal": {"name": "guard", "gate_level_rule": "conformal"},
    # the cross-half level chosen at every calibration, not the first only: the same rates, 2.5x the step cost
    "guard-cross-half": {"name": "guard", "gate_level_rule": "cross_half"},
    # the threshold over the clean increases of the last 4 calibrations (tried on digits 2026-11-26: within noise;
    # on MNIST it kept thresholds off 0)
    "guard-pooled": {"name": "guard", "gate_calibration_window": 4},
    # the lookahead from the model as it stands, momentum and weight decay left out of both points (MNIST's stream
    # flagged more than its calibration as the momentum buffer's phase moved; 2026-11-27)
    "guard-model": {"name": "guard", "gate_lookahead_from": "model"},
    # a batch under the stream's size judged whole by the threshold of a full batch: the default until a client's
    # batches of 10 were flagged 40% of the time on MNIST (2026-11-28)
    "guard-configured": {"name": "guard", "gate_size_rule": "configured"},
    # each size judged by a threshold calibrated at its own rung: in the target band at every size, but a trigger in
    # batches of 10 then passes unshrunk (MNIST, 2026-11-28)
    "guard-rungs": {"name": "guard", "gate_size_rule": "rungs"},
    "guard-pace": {"name": "guard", "gate_size_rule": "pace"},
}
DEFAULT_STRATEGY = "guard"  # the product's default defense, the one the checks hold to the bar


def resolve_strategies(config: ExperimentConfig, labels: Sequence[str],
                       tuning: TuningResult | None) -> dict[str, StrategyConfig]:
    """The strategy settings behind each label (the tuned ones for gc and at)."""
    unknown = [label for label in labels if label not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown arena strategy {', '.join(unknown)}; expected one of {', '.join(VARIANTS)}")
    if "st" not in labels:
        raise ValueError("the arena needs 'st': recovery and drift-gain shares are measured against it")
    resolved = {}
    for label in labels:
        strategy = config.strategy.model_copy(update=VARIANTS[label])
        if label in TUNED and tuning is not None:
            strategy = tuning.strategy(label, strategy)
        resolved[label] = StrategyConfig(**strategy.model_dump())  # validated
    return resolved


def _steps_per_strategy(config: ExperimentConfig, long_horizon: bool) -> int:
    arena, attack_len = config.arena, config.campaign.max_batches
    launches = arena.launch_after if long_horizon else [t for t in arena.launch_after if t == 0]
    length = max([*launches, arena.clean_batches])
    attackers = len(launches) + int(arena.black_box) + len(arena.adaptive_betas) + 2 * int(arena.gate_evasion)
    drifts = len(arena.drifts) * (1 + int(bool(_late_drift_after(arena, launches))))
    return (length + attackers * attack_len + arena.slow_poison_count * arena.slow_poison_every
            + drifts * arena.drift_batches + (arena.drift_batches + attack_len) * bool(arena.drift_attack)
            + (arena.label_flip_batches + arena.drift_batches * bool(arena.label_flip_drift)) * bool(arena.label_flip)
            * (1 + int(arena.label_flip_spread)) + arena.backdoor_batches * (arena.backdoor_target is not None))


def _late_drift_after(arena, launches: Sequence[int]) -> int:
    """Clean batches before the late drift kinds: the longest launch time (0: no late drift)."""
    return max(launches) if arena.late_drift else 0


def run_arena(config: ExperimentConfig, seeds: Sequence[int] | None = None, strategies: Sequence[str] | None = None,
              cache_dir=None, progress: bool = True) -> Leaderboard:
    """Tune the baselines, run every scenario x strategy x seed, and return the leaderboard."""
    arena = config.arena
    seeds = list(config.campaign.seeds if seeds is None else seeds)
    overlap = set(seeds) & set(arena.tuning.seeds)
    if overlap:
        raise ValueError(f"reporting seeds {sorted(overlap)} are also tuning seeds (arena.tuning.seeds): "
                         "choose disjoint seeds, the baselines must not be tuned on what is reported")
    labels = list(strategies or arena.strategies)
    resolve_strategies(config, labels, None)  # fail on unknown labels before any work
    started = time.perf_counter()
    tuned = [label for label in labels if label in TUNED]
    tuning = tune_baselines(config, tuple(tuned), cache_dir, progress) if tuned else None
    resolved = resolve_strategies(config, labels, tuning)
    long_horizon = set(arena.long_horizon_strategies or [s for s in labels if not s.endswith("-paper")])
    total = len(seeds) * sum(_steps_per_strategy(config, label in long_horizon) for label in labels)
    bar = tqdm(total=total, desc=f"arena {config.profile}", unit="step", disable=not progress)
    outcomes = []
    for seed in seeds:
        experiment = Experiment.prepare(config.model_copy(update={"seed": seed}), cache_dir=cache_dir,
                                        progress=progress)
        classes = experiment.splits.stream.num_classes
        if arena.label_flip and max(arena.label_flip) >= classes:
            raise ValueError(f"arena.label_flip: {arena.label_flip} names a class that {config.data.dataset} does "
                             f"not have (classes 0-{classes - 1})")
        if arena.backdoor_target is not None and arena.backdoor_target >= classes:
            raise ValueError(f"arena.backdoor_target: {arena.backdoor_target} is a class that {config.data.dataset} "
                             f"does not have (classes 0-{classes - 1})")
        data = scenarios.ScenarioData(experiment, experiment.test_tensors, experiment.splits.attacker_val.tensors())
        attackers = _attackers(experiment)
        for label, strategy in resolved.items():
            bar.set_postfix(seed=seed, strategy=label)
            expected = bar.n + _steps_per_strategy(config, label in long_horizon)
            outcomes += _run_strategy(experiment, data, label, strategy, label in long_horizon, attackers, bar.update)
            bar.update(expected - bar.n)  # attacks that stop early leave steps uncounted
    bar.close()
    board = Leaderboard(
        profile=config.profile, dataset=config.data.dataset, model=config.model.name, seeds=seeds,
        strategies={label: _settings(strategy) for label, strategy in resolved.items()},
        tuning=tuning.to_dict() if tuning else None, rows=build_rows(outcomes), config=config.model_dump(),
        environment=environment(), seconds=time.perf_counter() - started)
    board.checks = checks(board, config)
    return board


def _settings(strategy: StrategyConfig) -> dict:
    """The fields that matter for the strategy's kind (so the table does not list AT's epsilon for GC)."""
    relevant = {"st": [], "gc": ["clip_value", "clip_norm"], "at": ["epsilon", "steps", "step_size", "at_kl_weight"],
                "dsc": ["epsilon", "steps", "step_size", "early_stop", "divergence", "mu", "tau"],
                "guard": ["gate_action", "gate_target_false_flag_rate", "gate_calibration_updates",
                          "gate_recalibrate_every", "gate_calibration_window", "gate_norm_cap", "gate_cap_level",
                          "gate_cap_anchor", "gate_cap_updates", "gate_probe_samples", "gate_probe_winsor",
                          "gate_level_rule", "gate_size_rule", "label_check", "label_check_share",
                          "label_check_class_share"]}
    return {"name": strategy.name, **{k: getattr(strategy, k) for k in relevant[strategy.name]}}


def _attackers(experiment: Experiment) -> dict[str, AccumulativeCampaign]:
    """White box, black box (`config.attack`'s surrogate, trained by default), the adaptive betas (to DSC's
    discrepancy) and the attacker adaptive to guard's gate (knowing the config's `strategy.gate_size_rule`)."""
    config = experiment.config
    attackers = {"white": build_campaign(experiment)}
    if config.arena.black_box:
        black = config.model_copy(update={"attack": config.attack.model_copy(update={"setting": "black_box"})})
        attackers["black-box"] = build_campaign(replace(experiment, config=black))
    for beta in config.arena.adaptive_betas:
        attack = config.attack.model_copy(update={"beta": beta})
        attackers[f"adaptive:beta={beta:g}"] = AccumulativeCampaign(attack, config.campaign,
                                                                   auxiliary=experiment.burnin.auxiliary)
    if config.arena.gate_evasion:
        attack = config.attack.model_copy(update={"gate_evasion_batches": config.campaign.max_batches})
        attackers["adaptive:gate"] = AccumulativeCampaign(attack, config.campaign, stream_lr=config.stream.lr,
                                                          batch_size=config.stream.batch_size,
                                                          gate_size_rule=config.strategy.gate_size_rule)
    return attackers


def _run_strategy(experiment: Experiment, data: scenarios.ScenarioData, label: str, strategy: StrategyConfig,
                  long_horizon: bool, attackers: dict[str, AccumulativeCampaign], on_step) -> list:
    arena = experiment.config.arena
    launches = sorted(arena.launch_after if long_horizon else [t for t in arena.launch_after if t == 0])
    length = max([*launches, arena.clean_batches])
    template = experiment.new_learner(strategy).ready()  # guard's first calibration, taken once per seed

    def fresh():
        return copy.deepcopy(template)

    clean, snapshots = scenarios.clean_prefix(fresh(), data, label, length, arena.clean_batches, set(launches),
                                              on_step, fresh_batches=arena.fresh_batches)
    outcomes = [clean]
    late = _late_drift_after(arena, launches)
    late_learner = copy.deepcopy(snapshots[late]) if late else None  # the attack below takes the snapshot as it is
    for launch in launches:
        outcomes.append(scenarios.attack(snapshots.pop(launch), data, label, attackers["white"], f"attack@{launch}",
                                         stream_offset=10 + launch, on_step=on_step))
    outcomes.append(scenarios.attack(fresh(), data, label, attackers["white"],
                                     "slow-poison", stream_offset=5, on_step=on_step,
                                     clean_between=arena.slow_poison_every - 1, max_poisons=arena.slow_poison_count))
    for kind in arena.drifts:
        outcomes.append(scenarios.drift(fresh(), data, label, kind, arena.drift_batches, on_step))
    for kind in arena.drifts if late else []:
        outcomes.append(scenarios.drift(copy.deepcopy(late_learner), data, label, kind, arena.drift_batches, on_step,
                                        after=late))
    if arena.drift_attack:
        outcomes.append(scenarios.drift_attack(fresh(), data, label, arena.drift_attack, arena.drift_batches,
                                               attackers["white"], on_step))
    if arena.label_flip:
        source, target = arena.label_flip
        for lie in [target, None] if arena.label_flip_spread else [target]:
            outcomes.append(scenarios.label_flip(fresh(), data, label, source, lie, arena.label_flip_batches,
                                                 on_step, fraction=arena.label_flip_fraction))
            if arena.label_flip_drift:
                outcomes.append(scenarios.label_flip(fresh(), data, label, source, lie, arena.drift_batches, on_step,
                                                     fraction=arena.label_flip_fraction, drift=arena.label_flip_drift))
    if arena.backdoor_target is not None:
        outcomes.append(scenarios.backdoor(fresh(), data, label, arena.backdoor_target, arena.backdoor_fraction,
                                           arena.backdoor_batches, on_step))
    for name, campaign in attackers.items():
        if name != "white":
            outcomes.append(scenarios.attack(fresh(), data, label, campaign, name, stream_offset=10,
                                             on_step=on_step))
    return outcomes


def checks(board: Leaderboard, config: ExperimentConfig) -> dict[str, dict]:
    """The bars the arena holds strategies to (issue 11's for the baselines, issue 12's for the default)."""
    out: dict[str, dict] = {}

    def check(name: str, passed: bool, detail: str) -> None:
        out[name] = {"passed": bool(passed), "detail": detail}

    drifts = [s for s in board.scenarios() if s.startswith("drift:")]
    shares = [board.row(s, "gc").drift_gain_share for s in drifts if board.row(s, "gc")]
    shares = [share.mean for share in shares if share is not None]  # none where ST itself gained under a point
    if shares:
        check("tuned gc learns drift (gain >= 50% of ST's on every kind)", min(shares) >= 0.5,
              f"worst share {min(shares):.0%}")
    st_clean, at_clean = board.row("clean", "st"), board.row("clean", "at")
    if st_clean and at_clean:
        gap = st_clean.final_acc.mean - at_clean.final_acc.mean
        check("tuned at keeps clean accuracy (within 2 points of ST)", gap <= 0.02, f"ST - AT = {gap * 100:.1f} points")
    black = board.row("black-box", "st")
    if black:
        loss = black.start_acc.mean - black.final_acc.mean
        check("the black box is real (ST loses >= 10 points)", loss >= 0.10, f"ST loses {loss * 100:.1f} points")
    default = DEFAULT_STRATEGY
    for scenario in [s for s in board.scenarios() if s.startswith(("attack@", "label-flip:"))]:
        mine, st = board.row(scenario, default), board.row(scenario, "st")
        if not mine or not st:
            continue
        baselines = [board.row(scenario, b) for b in TUNED if board.row(scenario, b)]
        recovered = mine.recovery.mean if mine.recovery else float("nan")
        if not baselines:  # nothing to be within 1 point of: only the recovery is checked, and the name says so
            check(f"{default} at {scenario}: recovers >= half of ST's loss (no tuned baseline in this run)",
                  recovered >= 0.5, f"{mine.final_acc.mean:.1%}; recovers {recovered:.0%}")
            continue
        best = max(b.final_acc.mean for b in baselines)
        if not mine.recovery:  # ST lost nothing to recover (a lie told on drift ST learns anyway): the first half only
            check(f"{default} at {scenario}: within 1 point of the best tuned baseline (ST lost nothing)",
                  mine.final_acc.mean >= best - 0.01, f"{mine.final_acc.mean:.1%} vs best tuned {best:.1%}")
            continue
        check(f"{default} at {scenario}: within 1 point of the best tuned baseline and recovers >= half of ST's loss",
              mine.final_acc.mean >= best - 0.01 and recovered >= 0.5,
              f"{mine.final_acc.mean:.1%} vs best tuned {best:.1%}; recovers {recovered:.0%}")
    for scenario in [s for s in board.scenarios() if s.startswith("backdoor:")]:
        mine, st = board.row(scenario, default), board.row(scenario, "st")
        if not st or st.attack_success is None:
            continue
        st_success = st.attack_success.mean
        check(f"{scenario} is real (ST's attack success >= 50%)", st_success >= 0.5,
              f"ST's attack success {st_success:.1%}")
        if not mine:
            continue
        success, gap = mine.attack_success.mean, st.final_acc.mean - mine.final_acc.mean
        check(f"{default} at {scenario}: attack success at most half of ST's, clean accuracy within 1 point of ST's",
              success <= 0.5 * st_success and gap <= 0.01,
              f"attack success {success:.1%} vs ST's {st_success:.1%}; clean accuracy {mine.final_acc.mean:.1%} vs "
              f"ST's {st.final_acc.mean:.1%}")
    for scenario in drifts:
        row, st = board.row(scenario, default), board.row(scenario, "st")
        if row and row.drift_gain_share:  # a share is only taken against an ST row
            # the gains start where each strategy's stream left it: the final accuracies say where each ends
            check(f"{default} learns {scenario} (gain >= 80% of ST's)", row.drift_gain_share.mean >= 0.8,
                  f"{row.drift_gain_share.mean:.0%} of ST's gain; on the drifted test set {row.start_acc.mean:.1%} -> "
                  f"{row.final_acc.mean:.1%} vs ST's {st.start_acc.mean:.1%} -> {st.final_acc.mean:.1%}")
    mine = board.row("clean", default)
    if mine and st_clean:
        gap = st_clean.final_acc.mean - mine.final_acc.mean
        check(f"{default} clean oracle within 1 point of ST", gap <= 0.01, f"ST - {default} = {gap * 100:.1f} points")
    if mine and mine.clean_flag_rate is not None and mine.target_flag_rate:
        realised, target = mine.clean_flag_rate.mean, mine.target_flag_rate
        check(f"{default} realised clean false-flag rate on the stream within [0.5x, 1.5x] of its target",
              0.5 * target <= realised <= 1.5 * target, f"{realised:.1%} vs target {target:.0%}")
    if mine and mine.fresh_flag_rate_early is not None and mine.fresh_flag_rate_late is not None:
        early, late, target = mine.fresh_flag_rate_early.mean, mine.fresh_flag_rate_late.mean, mine.target_flag_rate
        check(f"{default} realised false-flag rate on fresh clean batches, early and late, within [0.5x, 1.5x] of "
              "its target", all(0.5 * target <= rate <= 1.5 * target for rate in (early, late)),
              f"{early:.1%} early, {late:.1%} late vs target {target:.0%}")
    return out


def write_leaderboard(board: Leaderboard, out: str | Path, plots: bool = True) -> dict[str, Path]:
    """leaderboard.json, leaderboard.schema.json, leaderboard.md and the plots, under `out`."""
    out = Path(out)
    Leaderboard.model_validate(board.model_dump())  # validated on write
    written = {
        "json": atomic_write_text(out / "leaderboard.json", board.model_dump_json(indent=2)),
        "schema": atomic_write_text(out / "leaderboard.schema.json",
                                    json.dumps(Leaderboard.model_json_schema(), indent=2)),
        "markdown": atomic_write_text(out / "leaderboard.md", markdown(board)),
    }
    if plots:
        from attacker_sim.arena_plots import plot_drift, plot_long_horizon, plot_pareto

        written["pareto"] = plot_pareto(board, out / "pareto.png")
        written["long_horizon"] = plot_long_horizon(board, out / "long_horizon.png")
        written["drift"] = plot_drift(board, out / "drift.png")
    return written
