"""DSC's rolling auxiliary: the threshold stays bounded over a long clean stream, the health gate promotes
healthy windows and refuses (with its reason) a canary drop or a flag-rate spike, promotions recalibrate mu,
the state survives a checkpoint with the same next decision, a late attack is still flagged, bad settings
are refused naming the field."""

import copy

import pydantic
import pytest
import torch

from attacker_sim import scenarios
from attacker_sim.evaluation import build_campaign
from service.core.config import StrategyConfig
from service.core.defense.calibration import Calibration, threshold_statistic
from service.core.defense.discrepancy import divergence_from_logits
from service.core.defense.rolling_auxiliary import RollingAuxiliary
from service.core.defense.strategies import build_strategy
from service.core.learner import OnlineLearner

SPEC = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}
CENTERS = torch.rand(3, 4, generator=torch.Generator().manual_seed(5)) * 4


def _blobs(n, generator):
    y = torch.randint(0, 3, (n,), generator=generator)
    return CENTERS[y] + torch.randn(n, 4, generator=generator), y


def _trained_mlp(generator, steps=150):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = _blobs(32, generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _ring(trusted, **overrides):
    settings = {"window": 4, "every": 2, "ring": 2, "target_false_flag_rate": 0.1, "batch_size": 16, **overrides}
    return RollingAuxiliary(*trusted, **settings)


def test_a_healthy_window_is_promoted_and_recalibrates_mu_on_the_new_pair():
    generator = torch.Generator().manual_seed(0)
    model, trusted = _trained_mlp(generator), _blobs(200, generator)
    auxiliary = copy.deepcopy(model)
    ring = _ring(trusted)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    decisions = []
    for applied in range(1, 9):
        x, y = _blobs(32, generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if applied == 2:
            at_two = copy.deepcopy(model.state_dict())
        decisions.append(ring.observe(model, auxiliary, applied, flagged_share=0.0))
        if applied == 6:
            current = model(trusted[0]).detach()
            assert all(torch.equal(auxiliary.state_dict()[k], v) for k, v in at_two.items())
            scores = divergence_from_logits(auxiliary(trusted[0]).detach(), current)
            assert ring.mu == pytest.approx(threshold_statistic(scores, 0.9, "batch", 16, seed=6))
            first_mu = ring.mu
    made = [d for d in decisions if d is not None]
    assert [(d.batch, d.candidate, d.promoted, d.reason) for d in made] == [(6, 2, True, "healthy"),
                                                                             (8, 4, True, "healthy")]
    assert first_mu > 0 and ring.mu != first_mu and ring.promoted_at == 8


def test_a_canary_drop_is_refused_with_its_reason_and_the_old_auxiliary_stays():
    generator = torch.Generator().manual_seed(1)
    model, trusted = _trained_mlp(generator), _blobs(200, generator)
    auxiliary = copy.deepcopy(model)
    before = copy.deepcopy(auxiliary.state_dict())
    ring = _ring(trusted)
    ring.observe(model, auxiliary, 1, 0.0)
    with torch.no_grad():  # what a trigger does to the trusted canary
        model[2].weight.mul_(-1.0)
    decisions = [ring.observe(model, auxiliary, applied, 0.0) for applied in range(2, 7)]
    made = [d for d in decisions if d is not None]
    assert [(d.candidate, d.promoted, d.reason) for d in made] == [(2, False, "canary")]
    assert made[0].canary < made[0].canary_best - made[0].canary_bound and made[0].canary_bound > ring.canary_drop
    assert all(torch.equal(auxiliary.state_dict()[k], v) for k, v in before.items())
    assert ring.mu is None and ring.promoted_at == 0 and ring.counts["canary"] == 1


def test_a_flag_rate_spike_is_refused_and_a_clean_window_after_it_is_promoted_later():
    """The ring's own flag-rate dilution: max_age is set out of reach here (it has its own test)."""
    generator = torch.Generator().manual_seed(2)
    model, trusted = _trained_mlp(generator), _blobs(200, generator)
    auxiliary = copy.deepcopy(model)
    ring = _ring(trusted, window=10, every=10, ring=1, max_age=1000)
    reasons = []
    for applied in range(1, 101):
        share = 1.0 if applied <= 10 else 0.0  # ten flagged batches, then a long clean stretch
        decision = ring.observe(model, auxiliary, applied, share)
        if decision is not None:
            reasons.append(decision.reason)
            assert decision.flag_bound > 0.1
    assert reasons[0] == "flag_rate"
    assert "healthy" in reasons  # the poisoned stretch dilutes: the auxiliary ages, it is not stuck for ever


def test_an_auxiliary_refused_for_max_age_batches_is_promoted_if_its_canary_is_healthy():
    generator = torch.Generator().manual_seed(2)
    model, trusted = _trained_mlp(generator), _blobs(200, generator)
    ring = _ring(trusted, window=10, every=10, ring=1, max_age=40)
    reasons = [d.reason for d in (ring.observe(model, copy.deepcopy(model), a, 1.0) for a in range(1, 61)) if d]
    assert reasons == ["flag_rate", "flag_rate", "max_age", "flag_rate", "flag_rate"]  # decided at 20, 30, ..., 60


def test_the_threshold_stays_bounded_over_thousands_of_clean_steps():
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    spec = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}
    rule = torch.randn(64, 10, generator=generator)  # a learnable task: the label is a fixed linear rule of x

    def batch(n):
        x = torch.rand(n, 1, 8, 8, generator=generator)
        return x, (x.flatten(1) @ rule).argmax(1)

    trusted = batch(100)
    calibration = Calibration(mu=0.01, tau=0.001, target_false_flag_rate=0.1, divergence="kl", unit="batch")
    thresholds = {}
    for auxiliary in ("frozen", "rolling"):
        config = StrategyConfig(name="dsc", steps=1, auxiliary=auxiliary, auxiliary_window=20, auxiliary_every=10,
                                auxiliary_ring=2)
        strategy = build_strategy(config, calibration, trusted=trusted, batch_size=8)
        learner = OnlineLearner(copy.deepcopy(model), copy.deepcopy(model), strategy, model_spec=spec,
                                lr=0.05)
        values = []
        for _ in range(2000):
            values.append(learner.step(*batch(8)).threshold)
        thresholds[auxiliary] = values
    assert thresholds["frozen"][-1] == pytest.approx(0.01 + 0.001 * 1999)  # the paper's P grows without bound
    rolling = learner.strategy.rolling
    # promoted at least once per max_age (4 x 20 batches) + a snapshot interval: the auxiliary never freezes
    assert rolling.counts["healthy"] + rolling.counts["max_age"] >= 2000 // 90, rolling.counts
    bound = max(d.mu for d in rolling.decisions if d.mu is not None) + 0.001 * 20
    assert max(thresholds["rolling"][-500:]) <= bound < thresholds["frozen"][-1] / 4


def test_state_round_trips_through_a_checkpoint_and_the_next_decision_is_the_same(tmp_path):
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    from service.core.models import build_model

    model = build_model(**SPEC)
    trusted = (torch.rand(60, 1, 8, 8, generator=generator), torch.randint(0, 10, (60,), generator=generator))
    calibration = Calibration(mu=0.001, tau=0.0, target_false_flag_rate=0.1, divergence="kl", unit="batch")
    config = StrategyConfig(name="dsc", steps=2, auxiliary="rolling", auxiliary_window=4, auxiliary_every=2,
                            auxiliary_ring=3)
    learner = OnlineLearner(model, copy.deepcopy(model), build_strategy(config, calibration, trusted=trusted,
                                                                        batch_size=8),
                            model_spec=SPEC, lr=0.2)
    batches = [(torch.rand(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(16)]
    for x, y in batches[:9]:
        learner.step(x, y)
    assert learner.strategy.rolling.snapshots and learner.strategy.rolling.decisions
    learner.save(tmp_path / "ckpt")
    restored = OnlineLearner.load(tmp_path / "ckpt")
    assert restored.strategy.health(restored.batches_applied) == learner.strategy.health(learner.batches_applied)
    for x, y in batches[9:]:
        a, b = learner.step(x, y), restored.step(x, y)
        assert a.threshold == b.threshold and a.flagged_count == b.flagged_count
        assert (a.promotion is None) == (b.promotion is None)
        if a.promotion is not None:
            assert a.promotion == b.promotion
    for key, value in learner.auxiliary.state_dict().items():
        assert torch.equal(value, restored.auxiliary.state_dict()[key])


def test_a_late_attack_is_flagged_by_the_rolling_auxiliary_in_a_short_run(digits_experiment):
    data = scenarios.ScenarioData(digits_experiment, digits_experiment.test_tensors,
                                  digits_experiment.splits.attacker_val.tensors())
    flagged = {}
    for auxiliary in ("frozen", "rolling"):
        config = digits_experiment.config.strategy.model_copy(update={
            "name": "dsc", "auxiliary": auxiliary, "auxiliary_window": 20, "auxiliary_every": 10,
            "auxiliary_ring": 2})
        learner = digits_experiment.new_learner(config)
        clean, _ = scenarios.clean_prefix(learner, data, "dsc", length=150, clean_batches=150, snapshot_at=set())
        outcome = scenarios.attack(learner, data, "dsc", build_campaign(digits_experiment), "attack@150",
                                   stream_offset=1)
        flagged[auxiliary] = outcome.poisons_flagged
    assert flagged["rolling"] >= 0.5 and flagged["rolling"] > flagged["frozen"] + 0.3, flagged


@pytest.mark.parametrize(("fields", "named"), [
    ({"auxiliary_window": 100, "auxiliary_ring": 2, "auxiliary_every": 10}, "auxiliary_window"),
    ({"promotion_canary_drop": -0.1}, "promotion_canary_drop"),
    ({"auxiliary_max_age": 10}, "auxiliary_max_age"),
    ({"promotion_z": -1.0}, "promotion_z"),
    ({"auxiliary_every": 0}, "auxiliary_every"),
])
def test_bad_settings_are_refused_naming_the_field(fields, named):
    with pytest.raises(pydantic.ValidationError, match=named):
        StrategyConfig(name="dsc", auxiliary="rolling", **fields)


def test_rolling_needs_the_trusted_split_and_the_calibration():
    with pytest.raises(ValueError, match="trusted split and the calibration"):
        build_strategy(StrategyConfig(name="dsc", auxiliary="rolling"))


def test_a_refusal_reaches_the_metrics_by_its_reason_and_the_audit_summary():
    from prometheus_client import generate_latest

    from service.core.defense.rolling_auxiliary import PromotionDecision
    from service.core.learner import StepReport
    from service.deployment.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    refusal = PromotionDecision(batch=60, candidate=10, promoted=False, reason="canary", canary=0.7, canary_best=0.95,
                                canary_bound=0.05, flag_rate=0.1, flag_bound=0.2, mu=None)
    report = StepReport(batch_index=59, samples=4, strategy="dsc", loss=0.1, grad_norm=1.0, promotion=refusal)
    metrics.observe_step(report, 0.5, {"auxiliary_age": 60, "target_false_flag_rate": 0.1})
    text = generate_latest(metrics.registry).decode()
    assert 'dscguard_auxiliary_promotions_total{decision="canary"} 1.0' in text
    assert 'dscguard_auxiliary_promotions_total{decision="healthy"} 0.0' in text
    assert "dscguard_auxiliary_age_batches 60.0" in text and "dscguard_target_false_flag_ratio 0.1" in text
    assert report.summary()["promotion"]["reason"] == "canary"


def test_a_snapshot_costs_a_bounded_forward_whatever_the_size_of_the_trusted_split():
    generator = torch.Generator().manual_seed(6)
    ring = _ring(_blobs(1000, generator), canary_samples=256)
    small = _ring(_blobs(100, generator), canary_samples=256)
    assert len(ring.trusted[0]) == 256 == len(set(map(tuple, ring.trusted[0].tolist())))
    assert len(small.trusted[0]) == 100


def test_the_state_stays_bounded_while_promotions_are_refused():
    """A long stretch of refusals (every batch flagged, max_age out of reach) must not grow what each checkpoint
    saves: the flagged shares are kept as sums, not one entry per batch."""
    import json

    generator = torch.Generator().manual_seed(7)
    model, trusted = _trained_mlp(generator), _blobs(100, generator)
    auxiliary = copy.deepcopy(model)
    ring = _ring(trusted, window=10, every=10, ring=1, max_age=10**9)
    sizes = {}
    for applied in range(1, 2001):
        ring.observe(model, auxiliary, applied, 1.0)
        if applied in (100, 2000):
            sizes[applied] = len(json.dumps({k: v for k, v in ring.state().items() if k != "decisions"}))
    assert ring.counts["flag_rate"] == 199 and ring.promoted_at == 0
    assert sizes[2000] <= sizes[100] + 16, sizes  # a few more digits in the sums and counts, nothing per batch
