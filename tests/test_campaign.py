"""Campaign metrics on a scripted fake target, whose accuracy follows a script step by step."""

import pytest
import torch

from attacker_sim.campaign import AccumulativeCampaign, run_clean_oracle
from attacker_sim.targets import StepOutcome
from service.core.config import AttackConfig, CampaignConfig
from service.core.models import build_model


def _labelled(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first pixel encodes the label (k / 10), so the fake target can grade itself."""
    y = torch.arange(n) % 10
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.25
    x[:, 0, 0, 0] = y.float() / 10
    return x, y


class ScriptedTarget:
    """Accuracy after k submitted batches is script[k]; flags `flags[k]` samples of batch k."""

    def __init__(self, script, flags):
        self.script, self.flags, self.steps = script, flags, 0
        self.model = build_model("digitscnn", num_classes=10, input_shape=(1, 8, 8))

    def step(self, x, y):
        flagged = self.flags[self.steps]
        self.steps += 1
        return StepOutcome(samples=len(x), flagged=flagged, corrected=flagged // 2, threshold=0.5, seconds=0.01)

    def predict(self, x):
        labels = torch.round(x[:, 0, 0, 0] * 10).long()
        wrong = int(round((1 - self.script[self.steps]) * len(x)))
        labels[:wrong] = (labels[:wrong] + 1) % 10
        return labels

    def white_box_model(self):
        return self.model

    def close(self):
        pass


def _batches():
    seed = 100
    while True:
        seed += 1
        yield _labelled(20, seed)


def test_accumulative_campaign_metrics_follow_the_script():
    # start 0.9; the monitor (validation accuracy) falls 0.01, 0.03, then 0.10 > 0.05 at batch 3; trigger -> 0.5
    target = ScriptedTarget(script=[0.9, 0.89, 0.87, 0.80, 0.5], flags=[4, 4, 4, 10])
    campaign = AccumulativeCampaign(AttackConfig(epsilon=0.01, steps=1, step_size=0.01, trigger_steps=1,
                                                 trigger_step_size=0.01),
                                    CampaignConfig(max_batches=10, monitor_drop=0.05))
    run = campaign.run(target, _batches(), _labelled(100, 1), _labelled(100, 2), "dsc", seed=7)
    assert run.batches == 3
    assert run.start_acc == pytest.approx(0.9)
    assert run.poison_acc == pytest.approx(0.80)
    assert run.trigger_acc == pytest.approx(0.5)
    assert run.delta == pytest.approx(-0.30)
    assert run.trace == pytest.approx([0.9, 0.89, 0.87, 0.80, 0.5])
    assert run.flagged_rate == pytest.approx(12 / 60)
    assert run.attack_success_rate == pytest.approx(1 - 12 / 60)
    assert run.corrected_rate == pytest.approx(6 / 60)
    assert run.trigger_flagged_rate == pytest.approx(10 / 20)
    assert target.steps == 4  # three poisoned batches and the trigger


def test_campaign_fires_at_the_batch_cap_when_the_monitor_stays_quiet():
    target = ScriptedTarget(script=[0.9] * 6 + [0.7], flags=[0] * 7)
    campaign = AccumulativeCampaign(AttackConfig(epsilon=0.01, steps=1, step_size=0.01, trigger_steps=1,
                                                 trigger_step_size=0.01),
                                    CampaignConfig(max_batches=5, monitor_drop=0.05))
    run = campaign.run(target, _batches(), _labelled(50, 1), _labelled(50, 2), "st", seed=0)
    assert (run.batches, run.poison_acc, run.trigger_acc) == (5, pytest.approx(0.9), pytest.approx(0.7))
    assert run.attack_success_rate == 1.0


def test_clean_oracle_metrics():
    target = ScriptedTarget(script=[0.9, 0.92, 0.95, 0.94], flags=[1, 2, 3])
    run = run_clean_oracle(target, _batches(), 3, _labelled(100, 1), "dsc", seed=1)
    assert (run.scenario, run.batches) == ("clean", 3)
    assert (run.start_acc, run.final_acc) == (pytest.approx(0.9), pytest.approx(0.94))
    assert run.flagged_rate == pytest.approx(6 / 60)
    assert run.attack_success_rate is None and run.delta is None


def test_campaign_configuration_errors():
    with pytest.raises(ValueError, match="surrogate"):
        AccumulativeCampaign(AttackConfig(setting="black_box"), CampaignConfig())
    with pytest.raises(ValueError, match="auxiliary"):
        AccumulativeCampaign(AttackConfig(beta=0.1), CampaignConfig())
    with pytest.raises(ValueError, match="learning rate"):
        AccumulativeCampaign(AttackConfig(gate_evasion_batches=3), CampaignConfig())


def test_the_gate_evading_attacker_sends_its_triggers_after_the_poisons_and_sums_what_was_flagged():
    # the monitor never fires: 2 poisons, then 3 blended triggers instead of one; accuracy 0.9 -> 0.6 over them
    target = ScriptedTarget(script=[0.9, 0.9, 0.9, 0.8, 0.7, 0.6], flags=[0, 0, 20, 0, 10])
    campaign = AccumulativeCampaign(AttackConfig(epsilon=0.01, steps=1, step_size=0.01, trigger_steps=1,
                                                 trigger_step_size=0.01, gate_evasion_batches=3),
                                    CampaignConfig(max_batches=2, monitor_drop=0.5), stream_lr=0.1, batch_size=20)
    run = campaign.run(target, _batches(), _labelled(50, 1), _labelled(50, 2), "guard", seed=0)
    assert target.steps == 5
    assert (run.batches, run.poison_acc, run.trigger_acc) == (2, pytest.approx(0.9), pytest.approx(0.6))
    assert run.trigger_flagged_rate == pytest.approx(30 / 60)


class RecordingTarget:
    """Keeps every batch it is sent; its white-box model has dropout, so crafting in train mode draws masks."""

    def __init__(self, model):
        self.model, self.sent = model, []

    def step(self, x, y):
        self.sent.append(x.clone())
        return StepOutcome(samples=len(x), flagged=0, corrected=0, threshold=None, seconds=0.0)

    def predict(self, x):
        return torch.zeros(len(x), dtype=torch.long)

    def white_box_model(self):
        return self.model

    def close(self):
        pass


def test_an_attack_run_draws_from_its_seed_whatever_the_process_drew_before_and_leaves_the_global_draws_alone():
    model = build_model("smallcnn", num_classes=10, input_shape=(1, 16, 16))
    campaign = AccumulativeCampaign(AttackConfig(epsilon=0.05, steps=2, step_size=0.02, trigger_steps=2,
                                                 trigger_step_size=0.02, model_mode="train"),
                                    CampaignConfig(max_batches=2, monitor_drop=0.5))

    def batches():
        for seed in range(200, 210):
            generator = torch.Generator().manual_seed(seed)
            yield torch.rand(8, 1, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)

    validation = next(batches())

    def sent(seed: int, global_seed: int) -> list[torch.Tensor]:
        target = RecordingTarget(model)
        torch.manual_seed(global_seed)
        campaign.run(target, batches(), validation, validation, "st", seed=seed)
        return target.sent

    first, again, other = sent(7, global_seed=1), sent(7, global_seed=2), sent(8, global_seed=1)
    assert len(first) == 3  # two poisons and the trigger
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))  # the masks did change the crafting
    torch.manual_seed(3)
    expected = torch.rand(4)
    sent(7, global_seed=3)  # seeds the global generator with 3, then runs: the run must draw nothing from it
    assert torch.equal(torch.rand(4), expected)
