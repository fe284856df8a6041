"""`dscguard eval`: every strategy through the clean oracle and the accumulative attack, over seeds.

For each seed the data is split and the model burnt in with that seed (cached); every strategy then
starts from the same burn-in state and sees the same clean batches and the same trigger base.
Thresholds are calibrated on the trusted clean split only; the test split is only ever measured.
With a model bundle (`dscguard eval --bundle DIR --data FILE`), `prepare` gives each seed's experiment instead:
the bundle's models and trusted set, and the user's data split with the seed (`service.core.bundle.serving`).

Where each run's learner lives is the one thing `targets` changes: in this process by default (a fresh
`Experiment.new_learner` per run), or a running service per strategy, reset to the same starting state before each
run (`attacker_sim.http_target.reset_targets`: `dscguard attack --targets`, the compose eval profile). The loop, the
campaigns, their order and their seeds are the same code either way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from attacker_sim.campaign import AccumulativeCampaign, RunResult, run_clean_oracle
from attacker_sim.surrogate import train_surrogate
from attacker_sim.targets import InProcessTarget, Target
from service.core.bundle.architecture import input_box
from service.core.burnin import load_checkpoint_epoch
from service.core.config import ExperimentConfig, StrategyConfig
from service.core.experiment import Experiment

SCENARIOS = ("clean", "poison")
STRATEGY_ORDER = ("st", "gc", "at", "dsc")  # the paper's Table 1 rows; `dscguard arena` compares guard too

# a run's target and the calibration its defense uses (None without one), from the seed's experiment and the
# strategy's config
TargetFactory = Callable[[Experiment, StrategyConfig], tuple[Target, dict | None]]


def in_process(experiment: Experiment, strategy: StrategyConfig) -> tuple[Target, dict | None]:
    """A fresh learner at the end of the seed's burn-in, in this process."""
    learner = experiment.new_learner(strategy)
    return InProcessTarget(learner), learner.calibration.to_dict() if learner.calibration is not None else None


@dataclass
class Evaluation:
    """All runs of one `evaluate` call, with the config and environment that produced them."""

    config: ExperimentConfig
    strategies: list[str]
    scenarios: list[str]
    runs: list[RunResult] = field(default_factory=list)
    burnin: dict[int, dict] = field(default_factory=dict)
    calibration: dict[int, dict] = field(default_factory=dict)
    seconds: float = 0.0
    subject: dict[str, str] = field(default_factory=dict)  # {"dataset", "model"} measured when not the profile's

    def dataset_and_model(self) -> tuple[str, str]:
        """What was measured: a bundle's data and architecture (`subject`), else the profile's dataset and model."""
        return (self.subject.get("dataset", self.config.data.dataset),
                self.subject.get("model", self.config.model.name))

    def runs_for(self, strategy: str, scenario: str) -> list[RunResult]:
        return [r for r in self.runs if r.strategy == strategy and r.scenario == scenario]


def evaluate(config: ExperimentConfig, strategies: Sequence[str] = STRATEGY_ORDER,
             scenarios: Sequence[str] = SCENARIOS, seeds: Sequence[int] | None = None, cache_dir=None,
             progress: bool = True, prepare: Callable[[ExperimentConfig], Experiment] | None = None,
             subject: dict[str, str] | None = None, targets: TargetFactory = in_process) -> Evaluation:
    """Run `scenarios` x `strategies` x `seeds` and collect the results; `prepare` builds a seed's experiment from
    its config (default: `Experiment.prepare`, the profile's data and burn-in), `subject` says what it measures then
    (`Evaluation.subject`), and `targets` gives each run its target at the starting state (default: in process)."""
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; expected {', '.join(SCENARIOS)}")
    seeds = list(config.campaign.seeds if seeds is None else seeds)
    evaluation = Evaluation(config, list(strategies), list(scenarios), subject=dict(subject or {}))
    started = time.perf_counter()
    campaign = config.campaign
    clean_batches = campaign.clean_batches or campaign.max_batches + 1
    steps_per_run = {"clean": clean_batches, "poison": campaign.max_batches}
    total = len(seeds) * len(strategies) * sum(steps_per_run[s] for s in scenarios)
    bar = tqdm(total=total, desc=f"eval {config.profile}", unit="step", disable=not progress)
    if prepare is None:
        def prepare(seed_config: ExperimentConfig) -> Experiment:
            return Experiment.prepare(seed_config, cache_dir=cache_dir, progress=progress)
    for seed in seeds:
        experiment = prepare(config.model_copy(update={"seed": seed}))
        evaluation.burnin[seed] = {"cached": experiment.burnin.cached, "history": experiment.burnin.history}
        test = experiment.test_tensors
        validation = experiment.splits.attacker_val.tensors()
        for strategy in strategies:
            strategy_config = config.strategy.model_copy(update={"name": strategy})
            for scenario in scenarios:
                bar.set_postfix(seed=seed, strategy=strategy, scenario=scenario)
                target, calibration = targets(experiment, strategy_config)
                if calibration is not None:
                    evaluation.calibration[seed] = calibration
                # the same stream seed for every strategy: identical clean batches and trigger base
                batches = campaign_stream(experiment, seed)
                if scenario == "clean":
                    run = run_clean_oracle(target, batches, clean_batches, test, strategy, seed, bar.update)
                else:
                    run = build_campaign(experiment).run(target, batches, test, validation, strategy, seed, bar.update)
                    bar.update(campaign.max_batches - run.batches)
                evaluation.runs.append(run)
    bar.close()
    evaluation.seconds = time.perf_counter() - started
    return evaluation


def campaign_stream(experiment: Experiment, seed: int):
    """The clean stream every strategy sees for `seed`: same batches and trigger base, in any target."""
    return experiment.stream_batches(10_000, seed=seed * 7919 + 1)


def build_campaign(experiment: Experiment) -> AccumulativeCampaign:
    """The attacker configured by the experiment (white- or black-box, adaptive or not)."""
    attack = experiment.config.attack
    surrogate = build_surrogate(experiment) if attack.setting == "black_box" else None
    auxiliary = experiment.burnin.auxiliary if attack.beta > 0 else None
    campaign = AccumulativeCampaign(attack, experiment.config.campaign, surrogate=surrogate, auxiliary=auxiliary)
    box = input_box(experiment.burnin.model_spec)
    if box is not None:  # a bundle's feature bounds: the service refuses poisons and triggers outside them
        for crafter in (campaign.poison, campaign.trigger):
            crafter.budget = dataclasses.replace(crafter.budget, box=box)
    return campaign


def build_surrogate(experiment: Experiment) -> torch.nn.Module:
    """The black-box attacker's model: by default one it trains on its own data (the stream it intercepts and
    its validation split, never the defender's burn-in or trusted data); or a burn-in checkpoint.

    It knows the architecture and the input normalisation (the model spec), not the weights.
    """
    config = experiment.config
    if config.attack.surrogate == "checkpoint":
        return load_checkpoint_epoch(experiment.burnin, config.attack.surrogate_epoch).eval()
    parts = [experiment.splits.stream.tensors(), experiment.splits.attacker_val.tensors()]
    return train_surrogate(experiment.burnin.model_spec, torch.cat([x for x, _ in parts]),
                           torch.cat([y for _, y in parts]), epochs=config.attack.surrogate_epochs,
                           lr=config.burnin.lr, batch_size=config.burnin.batch_size, seed=config.seed + 5003,
                           device=experiment.device)
