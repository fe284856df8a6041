"""Campaigns: the clean oracle and the accumulative poisoning run, against any `Target`.

Accumulative poison (Pang et al. 2021): the attacker crafts a trigger batch once, then perturbs each
incoming clean batch so that learning from it makes the model fragile to the trigger, while its
own monitor (accuracy on the attacker's validation split, never the test set) stays within
`monitor_drop` of the start. When the monitor fires, or after `max_batches`, it re-crafts the
trigger against the current model and submits it. Test accuracy is measured by the harness, for
reporting only. With `attack.gate_evasion_batches` > 0 the one trigger is replaced by that many, each
blended to stay under the attacker's own copy of guard's gate (`attacker_sim/attacks/gate_evasion.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attacker_sim.attacks import AccumulativePoison, Budget, TriggerCrafter, build_attack
from attacker_sim.attacks.gate_evasion import GateEvasion
from attacker_sim.targets import StepOutcome, Target
from service.core.config import AttackConfig, CampaignConfig, StrategyConfig
from service.core.device import model_device
from service.core.randomness import ATTACK, key_seed, seeded_draws

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RunResult:
    """One scenario of one strategy with one seed. Accuracies are fractions in [0, 1]."""

    scenario: str
    strategy: str
    seed: int
    start_acc: float
    batches: int
    final_acc: float
    poison_acc: float | None = None
    trigger_acc: float | None = None
    flagged_rate: float = 0.0
    corrected_rate: float = 0.0
    trigger_flagged_rate: float | None = None
    clean_flagged_rate: float | None = None  # clean batches submitted between poisons (slow poison)
    seconds_per_step: float = 0.0
    trace: list[float] = field(default_factory=list)  # test accuracy at the start and after every step
    discrepancy: list[np.ndarray] = field(default_factory=list, repr=False)  # per submitted batch, if exposed

    @property
    def delta(self) -> float | None:
        return None if self.trigger_acc is None else self.trigger_acc - self.poison_acc

    @property
    def attack_success_rate(self) -> float | None:
        """Share of poisoned samples the defense did not flag (paper Table 8)."""
        return 1.0 - self.flagged_rate if self.scenario == "poison" else None


def accuracy(target: Target, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((target.predict(x) == y).float().mean())


class _Tally:
    """Counts of what the defense did over the submitted batches of one run."""

    def __init__(self):
        self.samples = self.flagged = self.corrected = 0
        self.seconds: list[float] = []
        self.discrepancy: list[np.ndarray] = []

    def add(self, outcome: StepOutcome) -> None:
        self.samples += outcome.samples
        self.flagged += outcome.flagged
        self.corrected += outcome.corrected
        self.seconds.append(outcome.seconds)
        if outcome.discrepancy is not None:
            self.discrepancy.append(outcome.discrepancy)

    def fill(self, result: RunResult) -> RunResult:
        result.flagged_rate = self.flagged / max(self.samples, 1)
        result.corrected_rate = self.corrected / max(self.samples, 1)
        result.seconds_per_step = float(np.mean(self.seconds)) if self.seconds else 0.0
        result.discrepancy = self.discrepancy
        return result


def run_clean_oracle(target: Target, batches: Batches, count: int, test: tuple[torch.Tensor, torch.Tensor],
                     strategy: str, seed: int, on_step: Callable[[], None] | None = None) -> RunResult:
    """`count` clean batches through the target's defense; the accuracy it would have without an attacker."""
    trace = [accuracy(target, *test)]
    tally = _Tally()
    for _ in range(count):
        tally.add(target.step(*next(batches)))
        trace.append(accuracy(target, *test))
        if on_step:
            on_step()
    result = RunResult("clean", strategy, seed, start_acc=trace[0], batches=count, final_acc=trace[-1], trace=trace)
    return tally.fill(result)


class AccumulativeCampaign:
    """The attacker of Pang et al., configured once, run against a target with `run`."""

    def __init__(self, attack: AttackConfig, campaign: CampaignConfig, surrogate: nn.Module | None = None,
                 auxiliary: nn.Module | None = None, stream_lr: float | None = None, batch_size: int | None = None,
                 gate_size_rule: str = StrategyConfig().gate_size_rule):
        if attack.setting == "black_box" and surrogate is None:
            raise ValueError("a black-box attack needs a surrogate model")
        if attack.gate_evasion_batches and (stream_lr is None or batch_size is None):
            raise ValueError("the gate-evading attacker (gate_evasion_batches > 0) needs the stream's learning rate "
                             "and batch size (its copy of the gate looks ahead with them)")
        if attack.beta > 0 and auxiliary is None:
            raise ValueError("the adaptive attacker (beta > 0) needs the defender's auxiliary model")
        self.attack, self.campaign = attack, campaign
        self.surrogate, self.auxiliary = surrogate, auxiliary
        budget = Budget(attack.epsilon, attack.steps, attack.step_size)
        # the adaptive attacker keeps the discrepancy small on the poisons and on the trigger alike
        adaptive = {"auxiliary": auxiliary, "beta": attack.beta} if attack.beta > 0 else {}
        if attack.kind == "accumulative":
            self.poison = AccumulativePoison(budget, gamma=attack.gamma, objective=attack.objective,
                                             model_mode=attack.model_mode, **adaptive)
        else:
            self.poison = build_attack(attack.kind, budget, model_mode=attack.model_mode, **adaptive)
        self.trigger = TriggerCrafter(Budget(attack.epsilon, attack.trigger_steps, attack.trigger_step_size),
                                      model_mode=attack.model_mode, **adaptive)
        self.stream_lr, self.batch_size, self.gate_size_rule = stream_lr, batch_size, gate_size_rule

    def _attacker_model(self, target: Target) -> nn.Module:
        return self.surrogate if self.attack.setting == "black_box" else target.white_box_model()

    def craft(self, model: nn.Module, x, y, trigger, validation) -> torch.Tensor:
        """Poison one clean batch against `model` (the trigger and validation feed the accumulative objective)."""
        if isinstance(self.poison, AccumulativePoison):
            return self.poison(model, x, y, trigger=trigger, validation=validation)
        return self.poison(model, x, y)

    def run(self, target: Target, batches: Batches, test: tuple[torch.Tensor, torch.Tensor],
            validation: tuple[torch.Tensor, torch.Tensor], strategy: str, seed: int,
            on_step: Callable[[], None] | None = None, clean_between: int = 0,
            max_poisons: int | None = None, trace: bool = True) -> RunResult:
        """Poison until the monitor fires (or `max_poisons`, default `campaign.max_batches`), then trigger.

        `clean_between` > 0 is the slow poison: that many clean batches go in before each poisoned one,
        so the poison is spread thin over a long stretch of honest traffic. `trace=False` measures test
        accuracy only at the start, before and after the trigger (the attacker's monitor runs regardless).
        """
        def measure(accuracies: list[float]) -> None:
            if trace:
                accuracies.append(accuracy(target, *test))

        first = self._attacker_model(target)  # the trigger is crafted on it first; the draws follow its device
        # the attacker's random draws (random starts, dropout in its lookaheads) come from the run's seed, not from
        # whatever the process drew before: a run repeats beside any other, in any order
        with seeded_draws(model_device(first), key_seed(seed, ATTACK)):
            x_val, y_val = validation
            accuracies = [accuracy(target, *test)]
            monitor_start = accuracy(target, x_val, y_val)
            x_base, y_trigger = next(batches)
            x_trigger = self.trigger(first, x_base, y_trigger, x_val, y_val)
            tally, clean = _Tally(), _Tally()
            for _ in range(self.campaign.max_batches if max_poisons is None else max_poisons):
                for _ in range(clean_between):
                    clean.add(target.step(*next(batches)))
                    measure(accuracies)
                    if on_step:
                        on_step()
                x, y = next(batches)
                x_poison = self.craft(self._attacker_model(target), x, y, (x_trigger, y_trigger), validation)
                tally.add(target.step(x_poison, y))
                measure(accuracies)
                if on_step:
                    on_step()
                if monitor_start - accuracy(target, x_val, y_val) > self.campaign.monitor_drop:
                    break
            batches_survived = len(tally.seconds)
            if not trace:
                accuracies.append(accuracy(target, *test))
            poison_acc = accuracies[-1]
            if self.attack.gate_evasion_batches:
                fired = self._evade(target, batches, validation, seed)
            else:
                x_trigger = self.trigger(self._attacker_model(target), x_base, y_trigger, x_val, y_val)
                fired = target.step(x_trigger, y_trigger)
            accuracies.append(accuracy(target, *test))
            result = RunResult("poison", strategy, seed, start_acc=accuracies[0], batches=batches_survived,
                               final_acc=accuracies[-1], poison_acc=poison_acc, trigger_acc=accuracies[-1],
                               trace=accuracies,
                               trigger_flagged_rate=fired.flagged / fired.samples,
                               clean_flagged_rate=clean.flagged / clean.samples if clean.samples else None)
            return tally.fill(result)

    def _evade(self, target: Target, batches: Batches, validation: tuple[torch.Tensor, torch.Tensor],
               seed: int) -> StepOutcome:
        """`gate_evasion_batches` triggers, each crafted on a fresh stream batch against the model as it stands and
        blended to stay under the attacker's copy of guard's gate; returns their outcomes summed."""
        evasion = GateEvasion(*validation, lr=self.stream_lr, batch_size=self.batch_size,
                              size_rule=self.gate_size_rule, seed=seed)
        evasion.calibrate(self._attacker_model(target))
        total = StepOutcome(samples=0, flagged=0, corrected=0, threshold=None, seconds=0.0)
        for _ in range(self.attack.gate_evasion_batches):
            x, y = next(batches)
            model = self._attacker_model(target)
            x_sent, _ = evasion.blend(model, x, self.trigger(model, x, y, *validation), y)
            outcome = target.step(x_sent, y)
            total = StepOutcome(total.samples + outcome.samples, total.flagged + outcome.flagged,
                                total.corrected + outcome.corrected, outcome.threshold, total.seconds + outcome.seconds)
        return total
