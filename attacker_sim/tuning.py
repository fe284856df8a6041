"""Baselines tuned by a stated rule on the defender's trusted data, never left at research constants.

The research code's GC (inf-norm clip 0.01) does not learn at all and its AT (eps 0.2) wrecks clean
accuracy: comparing against those flatters any defense. Each baseline knob (GC: clip value and norm;
AT: epsilon and steps) is chosen here on the *tuning seeds* (disjoint from the reporting seeds), with
accuracy measured on the trusted calibration split (never the test split), by this rule:

1. Every candidate runs three scenarios per tuning seed: the clean oracle, one benign drift
   (`arena.tuning.drift_kind`) and the white-box accumulative attack launched at once.
2. A candidate is *admissible* when its mean clean-oracle accuracy is at most `clean_bound` below ST's
   and its mean drift gain is at least `drift_share` of ST's (the defense must still learn).
3. The admissible candidate with the highest mean accuracy after the trigger wins (ties: higher clean
   accuracy, then higher drift gain). If none is admissible, the candidate with the largest worst margin
   to the two bounds wins, and the result says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from attacker_sim import scenarios
from attacker_sim.campaign import AccumulativeCampaign
from attacker_sim.evaluation import build_campaign
from service.core.config import ExperimentConfig, StrategyConfig
from service.core.experiment import Experiment

TUNED = ("gc", "at")
RULE = __doc__.split("by this rule:")[1].strip()


@dataclass
class Candidate:
    """One setting of one baseline, measured on the tuning seeds (means over seeds, fractions)."""

    label: str
    strategy: dict
    clean_acc: float
    drift_gain: float
    attack_acc: float
    admissible: bool = False
    chosen: bool = False


@dataclass
class TuningResult:
    """The chosen setting per baseline, every candidate's figures, and ST's reference figures."""

    chosen: dict[str, dict]
    candidates: list[Candidate]
    reference: dict[str, float]
    seeds: list[int]
    rule: str = RULE
    fallback: list[str] = field(default_factory=list)  # baselines for which no candidate was admissible

    def strategy(self, name: str, base: StrategyConfig) -> StrategyConfig:
        return base.model_copy(update=self.chosen[name])

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "candidates": [asdict(c) for c in self.candidates],
                "reference": self.reference, "seeds": self.seeds, "rule": self.rule, "fallback": self.fallback}


def candidate_settings(config: ExperimentConfig) -> dict[str, list[dict]]:
    """The grid of each tuned baseline, as StrategyConfig updates."""
    grid = config.arena.tuning
    gc = [{"name": "gc", "clip_value": c, "clip_norm": n} for n in grid.gc_norms for c in grid.gc_clip_values]
    # step size: 2.5 * eps / steps, the usual PGD choice that lets the steps reach the ball's edge
    at = [{"name": "at", "epsilon": e, "steps": k, "step_size": round(2.5 * e / k, 6)}
          for e in grid.at_epsilons for k in grid.at_steps]
    return {"gc": gc, "at": at}


def _label(setting: dict) -> str:
    if setting["name"] == "gc":
        return f"gc clip {setting['clip_value']:g} ({setting['clip_norm']}-norm)"
    if setting["name"] == "at":
        return f"at eps {setting['epsilon']:g}, {setting['steps']} steps"
    return setting["name"]


def _measure(data: scenarios.ScenarioData, campaign: AccumulativeCampaign, setting: dict, config: ExperimentConfig,
             on_step: Callable[[], None]) -> tuple[float, float, float]:
    experiment = data.experiment
    strategy = config.strategy.model_copy(update=setting)
    clean, _ = scenarios.clean_prefix(experiment.new_learner(strategy), data, "tuning",
                                      config.arena.clean_batches, config.arena.clean_batches, set(), on_step)
    drifted = scenarios.drift(experiment.new_learner(strategy), data, "tuning", config.arena.tuning.drift_kind,
                              config.arena.drift_batches, on_step)
    attacked = scenarios.attack(experiment.new_learner(strategy), data, "tuning", campaign, "attack@0",
                                stream_offset=10, on_step=on_step)
    return clean.final_acc, drifted.final_acc - drifted.start_acc, attacked.final_acc


def tune_baselines(config: ExperimentConfig, names: tuple[str, ...] = TUNED, cache_dir=None,
                   progress: bool = True) -> TuningResult:
    """Choose each baseline's setting by the module's rule on the tuning seeds and trusted data."""
    tuning = config.arena.tuning
    grids = candidate_settings(config)
    settings = [{"name": "st"}] + [s for name in names for s in grids[name]]
    per_step = config.arena.clean_batches + config.arena.drift_batches + config.campaign.max_batches
    bar = tqdm(total=len(tuning.seeds) * len(settings) * per_step, desc="tuning baselines", unit="step",
               disable=not progress)
    figures: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(settings))}
    for seed in tuning.seeds:
        experiment = Experiment.prepare(config.model_copy(update={"seed": seed}), cache_dir=cache_dir,
                                        progress=progress)
        data = scenarios.ScenarioData(experiment, test=experiment.calibration_tensors,
                                      validation=experiment.splits.attacker_val.tensors())
        campaign = build_campaign(experiment)  # one attacker per seed, the same for every candidate
        for index, setting in enumerate(settings):
            done = bar.n
            figures[index].append(_measure(data, campaign, setting, config, bar.update))
            bar.update(done + per_step - bar.n)
    bar.close()
    means = {i: np.mean(np.asarray(v), axis=0) for i, v in figures.items()}
    st_clean, st_gain, st_attack = (float(v) for v in means[0])
    candidates = []
    for index, setting in enumerate(settings[1:], start=1):
        clean, gain, attacked = (float(v) for v in means[index])
        admissible = clean >= st_clean - tuning.clean_bound and gain >= tuning.drift_share * st_gain
        candidates.append(Candidate(_label(setting), setting, clean, gain, attacked, admissible))
    chosen, fallback = {}, []
    for name in names:
        pool = [c for c in candidates if c.strategy["name"] == name]
        admissible = [c for c in pool if c.admissible]
        if admissible:
            best = max(admissible, key=lambda c: (c.attack_acc, c.clean_acc, c.drift_gain))
        else:
            fallback.append(name)

            def margin(c: Candidate) -> float:
                return min(c.clean_acc - (st_clean - tuning.clean_bound),
                           c.drift_gain - tuning.drift_share * st_gain)

            best = max(pool, key=margin)
        best.chosen = True
        chosen[name] = {k: v for k, v in best.strategy.items() if k != "name"}
    reference = {"clean_acc": st_clean, "drift_gain": st_gain, "attack_acc": st_attack}
    return TuningResult(chosen, candidates, reference, list(tuning.seeds), fallback=fallback)
