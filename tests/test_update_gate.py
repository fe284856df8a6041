"""The trusted-update gate and the `guard` strategy: calibration meets its false-flag target on fresh
clean batches, a trigger's update is flagged and shrunk, the state survives a checkpoint, bad input is refused."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from attacker_sim.arena import VARIANTS
from attacker_sim.evaluation import build_campaign
from attacker_sim.scenarios import ScenarioData
from service.core.config import StrategyConfig
from service.core.defense.calibration import conformal_quantile
from service.core.defense.eval_mode import training_mode_frozen_stats
from service.core.defense.strategies import build_strategy
from service.core.defense.update_gate import UpdateGate
from service.core.learner import OnlineLearner
from tests.reproduce import assert_reproduced


def _guard_learner(experiment, **fields):
    return experiment.new_learner(StrategyConfig(name="guard", **fields))


def _judge_only(learner, x, y):
    """The gate's verdict on the update this batch would cause, without taking the step."""
    model = learner.model
    model.train()
    learner.optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x.to(learner.device)), y.to(learner.device)).backward()
    return learner.strategy.gate.judge(model, learner.optimizer, batch=(x, y))  # the batch: for action 'drop'


def _blobs(n, generator):
    centers = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    y = torch.randint(0, 3, (n,), generator=generator)
    return centers[y] + torch.randn(n, 4, generator=generator), y


def _burnt_in(model, generator, momentum=0.0):
    """`model` after 100 SGD steps on blobs (a model that has learned something, as after burn-in)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for _ in range(100):
        x, y = _blobs(32, generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _blob_model(momentum: float = 0.0):
    """(model, optimizer, generator): a small classifier burnt in on blobs (torch seeded 0; the burn-in's SGD at
    `momentum`), its stream optimizer (SGD at lr 0.1, no momentum), and the generator that drew its batches, which the
    test draws its trusted split from next."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _burnt_in(torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)), generator,
                      momentum)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), generator


def _blob_gate(trusted, **settings) -> UpdateGate:
    """The gate the blob tests calibrate: batches of 32, a 10% target, 400 calibration updates, no recalibration."""
    return UpdateGate(*trusted, batch_size=32, target_false_flag_rate=0.1, calibration_updates=400,
                      recalibrate_every=10_000, **settings)


def _flagged_share(model, optimizer, gate, generator, learn=False, batches=300, size=32):
    """Share of fresh clean blob batches of `size` whose update the gate flags (each then learned when `learn`)."""
    flagged = []
    for _ in range(batches):
        x, y = _blobs(size, generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        flagged.append(gate.judge(model, optimizer, size=size).flagged)
        if learn:
            optimizer.step()
    return float(np.mean(flagged))


@pytest.mark.parametrize("norm_cap", [None, "2", "inf"])
def test_realised_false_flag_rate_of_a_seeded_synthetic_stream_lands_in_the_band(norm_cap):
    """With a norm cap the lookahead judges the capped update, calibrated on capped clean updates: the rate holds."""
    model, optimizer, generator = _blob_model()
    gate = _blob_gate(_blobs(1000, generator), norm_cap=norm_cap, seed=1)
    gate.calibrate(model, optimizer)
    # fresh clean batches from the same distribution, judged against that calibration
    rate = _flagged_share(model, optimizer, gate, generator)
    assert 0.05 <= rate <= 0.15, f"realised clean false-flag rate {rate:.1%} against a 10% target"


def test_a_batch_of_another_size_is_judged_by_a_threshold_calibrated_at_its_size():
    """Clean batches of 4 samples, against a gate calibrated on batches of 32: their updates spread wider, and the
    threshold of 32 flags far more than its target of them; calibrated at their own rung, the rate holds, and batches
    of 128 are flagged as often as those of 32. The gate of 32 is left as it was (its threshold, its schedule), and
    every rung shares its cap."""
    model, optimizer, generator = _blob_model()
    trusted = _blobs(1000, generator)
    rates = {}
    for rule in ("configured", "rungs"):
        for size in (4, 32, 128):
            gate = _blob_gate(trusted, norm_cap="inf", size_rule=rule, seed=1)
            threshold = gate.calibrate(model, optimizer)
            rates[rule, size] = _flagged_share(model, optimizer, gate, torch.Generator().manual_seed(2), size=size)
            own = rule == "configured" or size == 32  # judged by the gate of 32
            assert gate.threshold == threshold and gate.updates_since_calibration == (300 if own else 0)
            assert list(gate.sized) == ([] if own else [gate.rung(size)])
            for sized in gate.sized.values():
                assert sized.batch_size == gate.rung(size) and sized.cap == gate.cap
                assert sized.threshold != threshold and sized.calibrations == 1
    assert rates["configured", 32] == rates["rungs", 32]
    assert rates["configured", 4] > 0.25, f"{rates['configured', 4]:.1%} of clean batches of 4 flagged at the " \
                                          "threshold of 32 (expected far above its target)"
    assert 0.05 <= rates["rungs", 4] <= 0.15, f"{rates['rungs', 4]:.1%} of clean batches of 4 flagged at their rung"
    assert abs(rates["rungs", 128] - rates["rungs", 32]) <= 0.05, rates


def test_a_client_of_small_batches_moves_the_model_at_a_full_batchs_pace_per_sample(digits_experiment):
    """`campaign.client_batch_size`: the simulated clients send batches of 10 to a learner configured for 50; guard
    (default `gate_size_rule`, 'pace_rungs') applies each at 10/50 of its gradient, as the step report says, while ST
    takes the whole step. The drifted batches come at the clients' size too. A size under 1 is refused, naming the
    field."""
    client = dataclasses.replace(digits_experiment, config=digits_experiment.config.with_field(
        "campaign", "client_batch_size", 10))
    assert client.config.stream.batch_size == 50
    x, y = next(client.stream_batches(1, seed=3))
    assert len(x) == len(y) == 10
    data = ScenarioData(client, client.test_tensors, client.splits.attacker_val.tensors())
    drifted, _ = data.drifted("pixel_shift", offset=3, count=2)
    assert [len(xb) for xb, _ in drifted] == [10, 10]
    report = client.new_learner(StrategyConfig(name="guard")).ready().step(x, y)
    assert 0 < report.update_scale <= 10 / 50
    with pytest.raises(ValueError, match="client_batch_size"):
        digits_experiment.config.with_field("campaign", "client_batch_size", 0)


def test_a_batch_under_the_gates_size_is_applied_at_its_share_of_a_full_batch_under_pace():
    """gate_size_rule 'pace': a batch of 4 under a gate of 32 moves the model 4/32 as far as its mean gradient would
    (no sample further than one of a full batch), is judged so against the threshold of 32, and its verdict's scale
    says so; clean batches of 4 are then flagged no more than the target, where the threshold of 32 flagged far more
    of their whole updates. A batch of 32 or more is judged as under 'configured'."""
    model, optimizer, generator = _blob_model()
    gate = _blob_gate(_blobs(1000, generator), norm_cap="inf", size_rule="pace", seed=1)
    gate.calibrate(model, optimizer)
    x, y = _blobs(4, torch.Generator().manual_seed(3))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    ahead = gate.increase(model, optimizer, size=4)  # what an attacker who knows the gate measures: the same delta
    assert ahead != pytest.approx(gate.increase(model, optimizer))  # ... and not the whole step's
    verdict = gate.judge(model, optimizer, size=4)
    assert verdict.increase == pytest.approx(ahead)
    assert verdict.scale <= 4 / 32
    for p, g in zip(model.parameters(), whole, strict=True):
        torch.testing.assert_close(p.grad, g * verdict.scale)
    assert not gate.sized
    rate = _flagged_share(model, optimizer, gate, torch.Generator().manual_seed(2), size=4)
    assert rate <= 0.15, f"{rate:.1%} of clean batches of 4 flagged at their pace"
    same = _blob_gate(gate.trusted, norm_cap="inf", size_rule="configured", seed=1)
    same.calibrate(model, optimizer)
    assert same.threshold == gate.threshold
    for size in (32, 128):
        assert _flagged_share(model, optimizer, gate, torch.Generator().manual_seed(4), size=size, batches=50) == \
            _flagged_share(model, optimizer, same, torch.Generator().manual_seed(4), size=size, batches=50)


def test_a_small_batch_under_pace_rungs_is_judged_by_its_rungs_threshold_of_paced_clean_updates():
    """gate_size_rule 'pace_rungs': a batch of 4 under a gate of 32 is applied at 4/32, as under 'pace', but judged by
    a threshold calibrated on clean trusted batches of its rung applied at the same share: tighter than the full
    batch's (a gate-aware attacker of small batches blended its triggers up to that one), and clean batches of 4 are
    flagged near the target, where the full batch's threshold flagged few. Batches of 32 and more are judged as under
    'pace', and every rung shares the cap."""
    model, optimizer, generator = _blob_model()
    trusted = _blobs(1000, generator)
    gate = _blob_gate(trusted, norm_cap="inf", size_rule="pace_rungs", seed=1)
    paced = _blob_gate(trusted, norm_cap="inf", size_rule="pace", seed=1)
    assert gate.calibrate(model, optimizer) == paced.calibrate(model, optimizer)
    rate = _flagged_share(model, optimizer, gate, torch.Generator().manual_seed(2), size=4)
    assert list(gate.sized) == [4]
    small = gate.sized[4]
    assert small.clean_scale == 4 / 32 and small.cap == gate.cap and small.threshold < gate.threshold
    assert 0.05 <= rate <= 0.15, f"{rate:.1%} of clean batches of 4 flagged at their rung's paced threshold"
    x, y = _blobs(4, torch.Generator().manual_seed(3))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert gate.judge(model, optimizer, size=4).scale <= 4 / 32
    for size in (32, 128):
        assert _flagged_share(model, optimizer, gate, torch.Generator().manual_seed(4), size=size, batches=50) == \
            _flagged_share(model, optimizer, paced, torch.Generator().manual_seed(4), size=size, batches=50)
    assert list(gate.sized) == [4]


def test_the_threshold_is_measured_again_soon_after_the_deployed_state():
    """A model trained with momentum, streamed without: the stream's optimizer moves it from the state its training
    left it in, and the first threshold, measured there, is stale within a few dozen updates. Recalibrated after
    `first_interval` updates (then doubling), the first 50 updates are flagged near the target; after 100 (the
    schedule without momentum when `first_interval` is unset), not."""
    rates = {}
    for first in (10, None):
        model, optimizer, generator = _blob_model(momentum=0.9)
        gate = UpdateGate(*_blobs(400, generator), batch_size=32, calibration_updates=64, first_interval=first,
                          seed=1)
        gate.calibrate(model, optimizer)
        rates[first] = _flagged_share(model, optimizer, gate, generator, learn=True, batches=50)
        assert gate.calibrations == (1 + 2 if first == 10 else 1)  # after 10 and 30 updates; or none before 100
    assert rates[10] <= 0.15 < rates[None], rates

def test_a_threshold_of_zero_is_measured_again_within_ten_updates_then_less_often():
    """An untrained model lowers the probe loss on nearly every clean update, so its threshold is 0, which flags
    every update that raises the probe loss at all once the stream has moved the model on. The gate measures again
    after 10 updates while the threshold is 0, then at doubling intervals: no stretch of 50 updates is flagged
    far above the target, where the plain schedule (100 updates without momentum) flagged 28% of one."""
    worst, thresholds = {}, {}
    for after_zero in (None, 10):
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))  # untrained
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gate = UpdateGate(*_blobs(400, generator), batch_size=32, calibration_updates=64,
                          recalibrate_after_zero=after_zero, seed=1)
        gate.calibrate(model, optimizer)
        assert gate.threshold == 0.0
        flagged = [_flagged_share(model, optimizer, gate, generator, learn=True, batches=50) for _ in range(6)]
        worst[after_zero] = max(flagged)
        thresholds[after_zero] = [entry["threshold"] for entry in gate.history]
    zeros = thresholds[10].index(next(t for t in thresholds[10] if t > 0))
    assert zeros > 1 and all(t == 0.0 for t in thresholds[10][:zeros])  # measured again every 10 updates while 0
    assert len(thresholds[10]) > len(thresholds[None])
    assert worst[10] <= 0.2 < worst[None], worst

@pytest.mark.parametrize("norm_cap", ["2", "inf"])
def test_an_update_larger_than_clean_ones_is_capped_at_the_calibrated_norm(norm_cap):
    model, optimizer, generator = _blob_model()
    gate = UpdateGate(*_blobs(400, generator), batch_size=32, calibration_updates=64, norm_cap=norm_cap, seed=1)
    gate.calibrate(model, optimizer)
    x, y = _blobs(32, generator)
    optimizer.zero_grad()
    (10.0 * torch.nn.functional.cross_entropy(model(x), y)).backward()  # a clean batch's gradient, ten times over
    verdict = gate.judge(model, optimizer)
    applied = gate._norm([p.grad for p in model.parameters()])
    assert verdict.norm > verdict.cap > 0
    assert applied <= verdict.cap * (1 + 1e-5), (applied, verdict.cap)
    assert verdict.scale <= verdict.cap / verdict.norm + 1e-6


@pytest.mark.parametrize("anchor", ["current", "first"])
def test_the_cap_follows_the_model_or_stays_at_the_first_calibration(anchor):
    """Clean updates change size as the model changes (on digits they shrink as the stream is memorised, and a cap
    that follows them stiffens the model against drift too); anchored, the cap stays where the deployed model's
    first calibration put it."""
    model, optimizer, generator = _blob_model()
    gate = UpdateGate(*_blobs(400, generator), batch_size=32, calibration_updates=64, norm_cap="inf",
                      cap_anchor=anchor, seed=1)
    gate.calibrate(model, optimizer)
    first = gate.cap
    # anchored, the one cap is measured over cap_updates (256) gradients; following, over each calibration's 64
    assert gate.history[0]["cap_updates"] == (256 if anchor == "first" else 64)
    with torch.no_grad():
        model[-1].weight.mul_(3.0)  # a sharper model: its clean updates are of another size
    gate.calibrate(model, optimizer)
    measured = gate.history[-1]["cap_measured"]
    assert abs(measured / first - 1) > 0.5  # the clean updates did change size
    assert gate.cap == (measured if anchor == "current" else first)


def test_the_threshold_pools_the_clean_increases_of_the_last_calibrations():
    """With calibration_window=3 the threshold is the conformal quantile over the last three calibrations' clean
    increases (96 values, not 32), the pool never holds more, and it travels with the state: a gate restored
    mid-stream sets the same next threshold."""
    model, optimizer, generator = _blob_model()
    trusted = _blobs(400, generator)
    gate = UpdateGate(*trusted, batch_size=32, calibration_window=3, seed=1)
    single = UpdateGate(*trusted, batch_size=32, seed=1)  # the same draws, the latest calibration only
    for calibration in range(5):
        if calibration == 3:
            restored = UpdateGate(*trusted, batch_size=32, calibration_window=3, seed=1)
            restored.restore(copy.deepcopy(gate.state()))
            assert restored.calibrate(model, optimizer) == gate.calibrate(model, optimizer)
            single.calibrate(model, optimizer)
            continue
        gate.calibrate(model, optimizer)
        single.calibrate(model, optimizer)
    assert [len(values) for values in gate.increases] == [32, 32, 32]
    assert gate.history[-1]["pooled"] == 96 and single.history[-1]["pooled"] == 32
    pooled = torch.tensor([value for values in gate.increases for value in values])
    assert gate.threshold == max(conformal_quantile(pooled, 0.9), 0.0)
    assert single.increases == gate.increases[-1:]  # the same latest draw, pooled or not
    assert gate.threshold != single.threshold


@pytest.mark.parametrize("winsor", [0.0, 0.01])
def test_one_hard_probe_sample_moves_the_verdict_no_further_than_clean_updates_move_one(winsor):
    """The statistic is the mean change of the probe's losses; winsorised (`probe_winsor`), each sample's change is
    clamped to the 1% and 99% quantiles of the clean changes the calibration saw, so a sample whose loss jumps (a
    hard or mislabelled trusted sample, or one a trigger targets alone) adds at most what clean updates add."""
    model, optimizer, generator = _blob_model()
    gate = UpdateGate(*_blobs(400, generator), batch_size=32, probe_samples=100, probe_winsor=winsor, seed=1)
    gate.calibrate(model, optimizer)
    changes = torch.zeros(100)
    changes[0] = 100.0  # one probe sample's loss jumps
    if winsor:
        low, high = gate.bounds
        assert low < 0 < high < 100.0
        assert gate._statistic(changes) == pytest.approx(high / 100)
        assert gate.state()["bounds"] == (low, high)
    else:
        assert gate.bounds is None and gate._statistic(changes) == pytest.approx(1.0)


def test_metrics_count_the_gate_flagging_apart_from_the_cap():
    from prometheus_client import generate_latest

    from service.core.defense.update_gate import GateVerdict
    from service.core.learner import StepReport
    from service.deployment.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    verdicts = [GateVerdict(0.5, 0.1, True, 0.2, 3.0, 1.0, dropped=(0, 2)),  # flagged: two samples dropped, shrunk
                GateVerdict(0.05, 0.1, False, 0.5, 2.0, 1.0),  # not flagged, capped
                GateVerdict(0.05, 0.1, False, 1.0, 0.5, 1.0),  # applied whole
                GateVerdict(0.05, 0.1, False, 0.4, 0.5, 1.0)]  # a small batch at its pace: neither flagged nor capped
    left_out = [None, None, np.array([True, False, False, False]), None]  # the label check left one sample out
    relabelled = [None, None, np.array([False, True, True, False]), None]  # and relabelled two
    for i, (verdict, before, changed) in enumerate(zip(verdicts, left_out, relabelled, strict=True)):
        report = StepReport(batch_index=i, samples=4, strategy="guard", loss=0.1, grad_norm=1.0, gate=verdict,
                            update_scale=verdict.scale, left_out=before, relabelled=changed)
        metrics.observe_step(report, verdict.threshold, {})
    text = generate_latest(metrics.registry).decode()
    assert "dscguard_updates_shrunk_total 1.0" in text and "dscguard_updates_capped_total 1.0" in text
    assert "dscguard_samples_left_out_total 3.0" in text and "dscguard_samples_relabelled_total 2.0" in text
    assert "dscguard_gate_cap 1.0" in text


def test_a_trigger_update_is_flagged_and_shrunk_while_the_model_keeps_learning(digits_experiment):
    learner = _guard_learner(digits_experiment)
    campaign = build_campaign(digits_experiment)
    validation = digits_experiment.splits.attacker_val.tensors()
    x, y = next(digits_experiment.stream_batches(1, seed=5))
    trigger = campaign.trigger(copy.deepcopy(learner.model).eval(), x, y, *validation)
    verdict = _judge_only(learner, trigger, y)
    assert verdict.flagged and verdict.scale < 1.0 and verdict.increase > verdict.threshold
    # the report carries the verdict: every sample of the batch flagged, the scale applied
    report = learner.step(trigger, y)
    assert report.flagged.all() and report.update_scale < 1.0 and report.threshold == pytest.approx(verdict.threshold)


def test_skip_drops_a_flagged_update_entirely(digits_experiment):
    learner = _guard_learner(digits_experiment, gate_action="skip")
    campaign = build_campaign(digits_experiment)
    x, y = next(digits_experiment.stream_batches(1, seed=5))
    validation = digits_experiment.splits.attacker_val.tensors()
    trigger = campaign.trigger(copy.deepcopy(learner.model).eval(), x, y, *validation)
    before = [p.detach().clone() for p in learner.model.parameters()]
    report = learner.step(trigger, y)
    assert report.update_scale == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))


def _flipped_batch(experiment, source=3, target=8, size=50):
    """A stream batch half of whose samples are `source` images labelled `target` (and which are they)."""
    x, y = experiment.splits.stream.tensors()
    liars = torch.nonzero(y == source).flatten()[: size // 2]
    honest = torch.nonzero(y != source).flatten()[: size - len(liars)]
    pick = torch.cat([liars, honest])
    return x[pick], torch.where(y[pick] == source, target, y[pick]), torch.arange(len(pick)) < len(liars)


def test_drop_leaves_the_relabelled_samples_out_of_a_flagged_update_and_keeps_the_rest(digits_experiment):
    learner = _guard_learner(digits_experiment, gate_action="drop", gate_norm_cap="none")
    x, y, lies = _flipped_batch(digits_experiment)
    model = learner.model
    verdict = _judge_only(learner, x, y)
    assert verdict.flagged and verdict.dropped
    dropped = torch.zeros(len(x), dtype=torch.bool)
    dropped[list(verdict.dropped)] = True
    # what it leaves out are mostly the lies (half the batch lies): 12 of 14 from a burn-in trained on an H200
    assert (dropped & lies).sum() >= 0.8 * dropped.sum()
    assert (dropped & ~lies).sum() <= 0.1 * (~lies).sum()  # and it keeps the honest samples
    # the update applied is the gradient of the kept samples (over the whole batch's size), scaled by the verdict
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        applied = [p.grad.clone() for p in params]
    with training_mode_frozen_stats(model):
        kept_x, kept_y = x[~dropped].to(learner.device), y[~dropped].to(learner.device)
        kept = torch.autograd.grad(torch.nn.functional.cross_entropy(model(kept_x), kept_y, reduction="sum") / len(x),
                                   params)
    for a, k in zip(applied, kept, strict=True):
        assert torch.allclose(a, verdict.scale * k, atol=1e-6)
    # the learner hands guard its batch: a step takes the same decision (the label check, which would relabel this
    # batch's lies before the gate sees them, off)
    report = _guard_learner(digits_experiment, gate_action="drop", gate_norm_cap="none", label_check=False).step(x, y)
    assert report.gate.dropped == verdict.dropped and report.update_scale == pytest.approx(verdict.scale)


def test_drop_applies_more_of_a_flagged_batchs_honest_samples_than_shrink(digits_experiment):
    """On the same flagged batch: shrink scales every sample's part down to bring the probe's increase to the
    threshold; drop leaves out the samples that push the probe uphill most (the lies) and applies more of the honest
    part, its own increase judged again."""
    x, y, lies = _flipped_batch(digits_experiment)
    verdicts = {}
    for action in ("shrink", "drop"):
        learner = _guard_learner(digits_experiment, gate_action=action, gate_norm_cap="none")
        verdicts[action] = _judge_only(learner, x, y)
    shrink, drop = verdicts["shrink"], verdicts["drop"]
    assert shrink.flagged and drop.flagged and shrink.increase == pytest.approx(drop.increase)
    honest_kept = int((~lies).sum()) - sum(not lies[i] for i in drop.dropped)
    assert drop.scale * honest_kept > 2 * shrink.scale * int((~lies).sum())


def test_drop_lies_leaves_what_the_label_check_finds_lying_out_of_a_flagged_update(digits_experiment):
    """A backdoor's batch (half of it stamped with a square and labelled 0): the label check finds most stamped
    samples lying (they look like their own class) and few honest ones; a flagged update is taken again without
    exactly those, and the rest judged as shrink would."""
    from attacker_sim.attacks.backdoor import stamp

    x, y = digits_experiment.splits.stream.tensors()
    stamped = torch.nonzero(y != 0).flatten()[:25]
    honest = torch.nonzero(y == 0).flatten()[:5].tolist() + torch.nonzero(y != 0).flatten()[25:45].tolist()
    bx = torch.cat([stamp(x[stamped]), x[honest]])
    by = torch.cat([torch.zeros(len(stamped), dtype=y.dtype), y[honest]])
    poisoned = torch.arange(len(by)) < len(stamped)
    learner = _guard_learner(digits_experiment, gate_action="drop_lies", gate_norm_cap="none")
    learner.ready()
    check = copy.deepcopy(learner.strategy.label_check)
    lies = check.judge(learner.model, bx, by).lies.cpu()
    assert (lies & poisoned).sum() >= 0.3 * poisoned.sum() and (lies & ~poisoned).sum() <= 0.1 * (~poisoned).sum()
    report = learner.step(bx, by)
    assert report.gate.flagged and report.gate.dropped == tuple(torch.nonzero(lies).flatten().tolist())
    # shrink on the same batch applies less of the honest samples: its scale covers the lies too
    shrink = _guard_learner(digits_experiment, gate_action="shrink", gate_norm_cap="none").step(bx, by)
    assert shrink.gate.flagged and not shrink.gate.dropped
    assert report.update_scale > shrink.update_scale


def test_drop_lies_needs_guard_and_its_label_check():
    with pytest.raises(ValueError, match="needs label_check"):
        StrategyConfig(name="guard", gate_action="drop_lies", label_check=False)
    with pytest.raises(ValueError, match="'drop_lies' is guard's"):
        StrategyConfig(name="dsc", gate_action="drop_lies")


def test_cap_leaves_a_flagged_update_to_the_norm_cap_alone(digits_experiment):
    """gate_action=cap: the trigger is still flagged (and reported), and scaled exactly as the cap scales any update,
    where shrink takes it further down."""
    campaign = build_campaign(digits_experiment)
    x, y = next(digits_experiment.stream_batches(1, seed=5))
    validation = digits_experiment.splits.attacker_val.tensors()
    verdicts = {}
    for action in ("cap", "shrink"):
        # the loosest cap (the largest clean norm), so that shrinking onto the threshold is the smaller scale
        learner = _guard_learner(digits_experiment, gate_action=action, gate_cap_level=1.0)
        trigger = campaign.trigger(copy.deepcopy(learner.model).eval(), x, y, *validation)
        verdicts[action] = _judge_only(learner, trigger, y)
    capped = verdicts["cap"]
    assert capped.flagged and capped.scale == pytest.approx(min(1.0, capped.cap / capped.norm))
    assert verdicts["shrink"].flagged and verdicts["shrink"].scale < capped.scale


@pytest.mark.parametrize(("winsor", "rule"), [(0.0, "conformal"), (0.01, "conformal"), (0.0, "cross_half")])
def test_gate_state_round_trips_through_a_checkpoint(digits_experiment, tmp_path, winsor, rule):
    # recalibrated every 5 updates: the first decision after the restore takes a calibration, from the saved draws
    learner = _guard_learner(digits_experiment, gate_probe_winsor=winsor, gate_level_rule=rule,
                             gate_recalibrate_every=5, gate_level_splits=1)
    # settings a rebuilt gate would not guess from the trusted split alone: they must travel with the state
    learner.strategy.gate.batch_size, learner.strategy.gate.probe = 13, torch.arange(0, 200, 2)
    learner.strategy.gate.seed = 17  # not the 0 a restored strategy is built with: the seed of its dropout masks
    batches = list(digits_experiment.stream_batches(6, seed=9))
    for x, y in batches[:5]:
        learner.step(x, y)
    learner.save(tmp_path / "ckpt")
    restored = OnlineLearner.load(tmp_path / "ckpt")
    gate, back = learner.strategy.gate, restored.strategy.gate
    assert (back.threshold, back.batch_size, back.bounds, back.level) == (gate.threshold, gate.batch_size,
                                                                           gate.bounds, gate.level)
    assert (back.bounds is None) == (winsor == 0.0)
    assert torch.equal(back.probe, gate.probe) and back.seed == gate.seed == 17
    a, b = learner.step(*batches[5]), restored.step(*batches[5])
    assert_reproduced((a.threshold, a.update_scale, a.loss), (b.threshold, b.update_scale, b.loss), learner.device,
                      cpu_relative=1e-6)


@pytest.mark.parametrize("rule", ["rungs", "pace_rungs"])
def test_the_gates_of_other_batch_sizes_round_trip_through_a_checkpoint(digits_experiment, tmp_path, rule):
    """A worker restarted after batches of two sizes judges the next small batch as the original would: the rung's
    gate, its threshold, schedule and draws travel with the checkpoint."""
    learner = _guard_learner(digits_experiment, gate_size_rule=rule, gate_recalibrate_every=3,
                             gate_level_splits=1)
    batches = list(digits_experiment.stream_batches(7, seed=9))
    for k, (x, y) in enumerate(batches[:6]):
        learner.step(*((x[:10], y[:10]) if k % 2 else (x, y)))
    learner.save(tmp_path / "ckpt")
    restored = OnlineLearner.load(tmp_path / "ckpt")
    gate, back = learner.strategy.gate, restored.strategy.gate
    assert list(back.sized) == list(gate.sized) == [gate.rung(10)]
    sized, sized_back = gate.sized[gate.rung(10)], back.sized[gate.rung(10)]
    assert (sized_back.threshold, sized_back.batch_size, sized_back.cap, sized_back.updates_since_calibration,
            sized_back.clean_scale) == (sized.threshold, sized.batch_size, sized.cap, sized.updates_since_calibration,
                                        sized.clean_scale)
    shown = restored.strategy.health(restored.batches_applied)["gate_thresholds_by_batch_size"]  # in /v1/status
    assert shown == {str(gate.rung(10)): sized.threshold}
    x, y = batches[6]
    a, b = learner.step(x[:10], y[:10]), restored.step(x[:10], y[:10])  # the rung's second calibration is due
    assert a.gate.threshold != gate.threshold
    assert_reproduced((a.threshold, a.update_scale, a.loss), (b.threshold, b.update_scale, b.loss), learner.device,
                      cpu_relative=1e-6)


def test_a_learner_made_ready_then_copied_steps_exactly_as_a_fresh_one(digits_experiment):
    """The arena makes one guard learner ready (its first calibration, 256 gradients for the anchored cap) and
    copies it for every scenario: each copy must step as a learner that calibrated at its own first update."""
    fresh = _guard_learner(digits_experiment)
    ready = _guard_learner(digits_experiment).ready()
    assert ready.strategy.gate.threshold is not None and fresh.strategy.gate.threshold is None
    copied = copy.deepcopy(ready)
    for x, y in digits_experiment.stream_batches(12, seed=4):
        a, b = fresh.step(x, y), copied.step(x, y)
        assert_reproduced((a.threshold, a.update_scale, a.loss), (b.threshold, b.update_scale, b.loss), fresh.device)
    assert_reproduced(fresh.strategy.gate.history, copied.strategy.gate.history, fresh.device)
    assert ready.batches_applied == 0  # the template learned nothing


def test_a_learner_made_ready_when_a_recalibration_is_due_takes_it_once_and_steps_as_before(digits_experiment):
    """Judging many fresh batches with copies of a learner whose next update recalibrates (the arena's false-flag
    measurement after 1,000 batches) must take that calibration once, in the learner, and decide the same."""
    batches = list(digits_experiment.stream_batches(8, seed=5))
    plain = _guard_learner(digits_experiment, gate_recalibrate_every=3)
    for x, y in batches[:3]:
        plain.step(x, y)
    ready = copy.deepcopy(plain)
    assert ready.strategy.gate.due(ready.optimizer)
    ready.ready()
    assert ready.strategy.gate.calibrations == plain.strategy.gate.calibrations + 1
    assert not ready.strategy.gate.due(ready.optimizer)
    ready.ready()  # nothing more is due: a second call calibrates nothing
    assert ready.strategy.gate.calibrations == plain.strategy.gate.calibrations + 1
    for x, y in batches[3:]:
        a, b = plain.step(x, y), copy.deepcopy(ready).step(x, y)
        ready.step(x, y)
        assert_reproduced((a.threshold, a.update_scale, a.loss), (b.threshold, b.update_scale, b.loss), plain.device)
    assert_reproduced(plain.strategy.gate.history, ready.strategy.gate.history, plain.device)


def test_the_cross_half_level_is_recorded_and_only_raises_the_threshold(digits_experiment):
    """cross_half takes its halvings after the calibration's own draws: the same increases, judged at a level no
    lower than the conformal one, and the level is shown in the history."""
    gates = {}
    for rule in ("conformal", "cross_half"):
        learner = _guard_learner(digits_experiment, gate_level_rule=rule, gate_level_splits=2).ready()
        gates[rule] = learner.strategy.gate
        assert learner.strategy.health(0)["gate_level"] == learner.strategy.gate.level  # shown in /v1/status
    plain, chosen = gates["conformal"], gates["cross_half"]
    assert_reproduced(plain.increases, chosen.increases, digits_experiment.device)
    assert plain.level == pytest.approx(0.9)
    assert chosen.level >= plain.level and chosen.history[-1]["level"] == chosen.level
    assert chosen.threshold == max(conformal_quantile(torch.tensor(chosen.increases[-1]), chosen.level), 0.0)
    assert chosen.threshold >= plain.threshold


@pytest.mark.parametrize(("rule", "choices"), [("cross_half", 3), ("cross_half_first", 1), ("conformal", 0)])
def test_the_level_is_chosen_as_often_as_its_rule_says(digits_experiment, monkeypatch, rule, choices):
    """cross_half pays its halvings at every calibration, cross_half_first at the first only (then keeps the level),
    conformal never."""
    calls = []
    real = UpdateGate._cross_half_level

    def counted(self, *args):
        calls.append(real(self, *args))
        return calls[-1]

    monkeypatch.setattr(UpdateGate, "_cross_half_level", counted)
    learner = _guard_learner(digits_experiment, gate_level_rule=rule, gate_recalibrate_every=3, gate_level_splits=1)
    for x, y in digits_experiment.stream_batches(7, seed=3):
        learner.step(x, y)
    history = learner.strategy.gate.history
    assert len(history) == 3 and len(calls) == choices
    if rule == "cross_half_first":
        assert [entry["level"] for entry in history] == [calls[0]] * 3


def test_recalibration_follows_the_model(digits_experiment):
    learner = _guard_learner(digits_experiment, gate_recalibrate_every=3)
    for x, y in digits_experiment.stream_batches(7, seed=3):
        learner.step(x, y)
    history = learner.strategy.gate.history
    assert len(history) == 3  # at the first update, then after every 3
    assert history[0]["threshold"] != history[-1]["threshold"]


def test_bad_gate_settings_and_missing_trusted_data_are_refused():
    x, y = torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="at least 4 labelled trusted samples"):
        UpdateGate(x[:3], y[:3], batch_size=2)
    with pytest.raises(ValueError, match="action must be one of shrink, skip"):
        UpdateGate(x, y, batch_size=2, action="clip")
    with pytest.raises(ValueError, match="target_false_flag_rate"):
        UpdateGate(x, y, batch_size=2, target_false_flag_rate=1.5)
    with pytest.raises(ValueError, match="needs the trusted split"):
        build_strategy(StrategyConfig(name="guard"))
    with pytest.raises(ValueError, match="gate_action"):
        StrategyConfig(name="guard", gate_action="clip")
    with pytest.raises(ValueError, match="norm_cap must be one of 2, inf"):
        UpdateGate(x, y, batch_size=2, norm_cap="1")
    with pytest.raises(ValueError, match="gate_norm_cap"):
        StrategyConfig(name="guard", gate_norm_cap="1")
    with pytest.raises(ValueError, match="action 'cap' .* needs norm_cap"):
        UpdateGate(x, y, batch_size=2, action="cap", norm_cap=None)
    for count in ("cap_updates", "first_interval", "recalibrate_after_zero", "calibration_window"):
        with pytest.raises(ValueError, match=f"{count} must be >= 1, got 0"):
            UpdateGate(x, y, batch_size=2, **{count: 0})
        with pytest.raises(ValueError, match=f"gate_{count}"):
            StrategyConfig(name="guard", **{f"gate_{count}": 0})
    with pytest.raises(ValueError, match="probe_winsor must be in \\[0, 0.5\\), got 0.5"):
        UpdateGate(x, y, batch_size=2, probe_winsor=0.5)
    with pytest.raises(ValueError, match="gate_probe_winsor"):
        StrategyConfig(name="guard", gate_probe_winsor=-0.1)
    with pytest.raises(ValueError, match="level_rule must be one of conformal, cross_half, cross_half_first, "
                                         "got 'median'"):
        UpdateGate(x, y, batch_size=2, level_rule="median")
    with pytest.raises(ValueError, match="level_splits must be >= 1, got 0"):
        UpdateGate(x, y, batch_size=2, level_splits=0)
    with pytest.raises(ValueError, match="gate_level_splits"):
        StrategyConfig(name="guard", gate_level_splits=0)
    with pytest.raises(ValueError, match="cap_anchor must be one of current, first"):
        UpdateGate(x, y, batch_size=2, cap_anchor="burnin")
    with pytest.raises(ValueError, match="gate_cap_anchor"):
        StrategyConfig(name="guard", gate_cap_anchor="burnin")
    with pytest.raises(ValueError, match="lookahead_from must be one of momentum_step, model, got 'buffer'"):
        UpdateGate(x, y, batch_size=2, lookahead_from="buffer")
    with pytest.raises(ValueError, match="gate_lookahead_from"):
        StrategyConfig(name="guard", gate_lookahead_from="buffer")
    with pytest.raises(ValueError, match="size_rule must be one of configured, rungs, pace, pace_rungs, got 'each'"):
        UpdateGate(x, y, batch_size=2, size_rule="each")
    with pytest.raises(ValueError, match="gate_size_rule"):
        StrategyConfig(name="guard", gate_size_rule="each")
    with pytest.raises(ValueError, match="gate_action 'drop' is guard's"):
        StrategyConfig(name="dsc", flag_action="gate", gate_action="drop")
    gate = UpdateGate(x, y, batch_size=2, action="drop")
    gate.threshold, gate.calibrations = -1.0, 1  # every update over it, no calibration due
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="action 'drop' needs the batch"):
        gate.judge(model, optimizer)


def test_conformal_quantile_is_finite_sample_valid():
    values = torch.arange(1.0, 20.0)  # 19 values: rank ceil(20 * 0.9) = 18
    assert conformal_quantile(values, 0.9) == 18.0
    assert conformal_quantile(torch.tensor([3.0]), 0.9) == 3.0
    with pytest.raises(ValueError):
        conformal_quantile(torch.tensor([]), 0.9)


def test_the_probe_is_bounded_so_a_lookahead_costs_the_same_on_any_trusted_split():
    small = UpdateGate(torch.rand(200, 1, 2, 2), torch.randint(0, 3, (200,)), batch_size=8)
    large = UpdateGate(torch.rand(1000, 1, 2, 2), torch.randint(0, 3, (1000,)), batch_size=8, seed=3)
    assert torch.equal(small.probe, torch.arange(200))  # all of a small split, in order
    assert len(large.probe) == 256 and len(set(large.probe.tolist())) == 256
    with pytest.raises(ValueError, match="probe_samples"):
        UpdateGate(torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,)), batch_size=2, probe_samples=2)


def test_an_honestly_drifted_stream_is_learned_nearly_as_fast_as_without_a_defense(digits_experiment):
    """The one-pixel shift: every sample moves and DSC flags all of them; guard's cap slows each update to the size
    of a clean one, its lookahead shrinks the few that hurt trusted data, and the drift is still learned."""
    from attacker_sim.drift import build_drift

    drift = build_drift("pixel_shift")
    x, y = digits_experiment.splits.stream.tensors()
    test_x, test_y = drift.test_view(*digits_experiment.test_tensors, seed=0)
    gains, scales = {}, []
    for name in ("st", "guard"):
        learner = digits_experiment.new_learner(StrategyConfig(name=name))
        start = learner.accuracy(test_x, test_y)
        for xb, yb in drift.batches(x, y, batch_size=50, count=30, seed=0):
            scales.append(learner.step(xb, yb).update_scale)
        gains[name] = learner.accuracy(test_x, test_y) - start
    assert gains["st"] >= 0.1  # the drift is there to learn
    assert gains["guard"] >= 0.8 * gains["st"], gains  # the arena's bar for the default defense
    assert min(scales) > 0.0  # never dropped: shrunk at most


def test_a_drift_late_in_a_long_stream_is_still_learned(digits_experiment):
    """After a long clean stream the model has memorised its 500 stream images; a cap that followed the clean updates
    shrank with them and slowed every later update, drift included. The default cap stays at the deployed model's."""
    from attacker_sim.drift import build_drift

    drift = build_drift("pixel_shift")
    x, y = digits_experiment.splits.stream.tensors()
    test_x, test_y = drift.test_view(*digits_experiment.test_tensors, seed=0)
    gains, caps = {}, {}
    for name in ("st", "guard", "guard-following"):  # following: the cap the default had before it was anchored
        learner = digits_experiment.new_learner(StrategyConfig(**VARIANTS[name]))
        for xb, yb in digits_experiment.stream_batches(1000, seed=5):
            learner.step(xb, yb)
        start = learner.accuracy(test_x, test_y)
        for xb, yb in drift.batches(x, y, batch_size=50, count=30, seed=0):
            learner.step(xb, yb)
        gains[name] = learner.accuracy(test_x, test_y) - start
        caps[name] = getattr(learner.strategy, "gate", None) and learner.strategy.gate.cap
    assert gains["st"] >= 0.1, gains  # the drift is there to learn
    # the arena's bar is 80% of ST's gain over its seeds; this one seed measured 83% anchored and 30% following
    assert gains["guard"] >= 0.65 * gains["st"], gains
    assert caps["guard-following"] < caps["guard"]  # what the anchor prevents: the cap shrank as the stream was learnt
    assert gains["guard-following"] < gains["guard"], gains


@pytest.mark.parametrize(("momentum", "lookahead_from"), [(0.0, "momentum_step"), (0.9, "momentum_step"),
                                                          (0.9, "model")])
def test_the_false_flag_rate_holds_on_a_stream_that_learns_with_momentum(momentum, lookahead_from):
    """The stream's optimizer is fresh (empty momentum buffer) when the gate first calibrates; judged on the
    batch's own contribution, from the momentum step or from the model, the realised rate still lands in the band
    (judging the momentum carry-over too gave 39% at momentum 0.9)."""
    model, _, generator = _blob_model(momentum)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)  # the stream's own, fresh
    gate = _blob_gate(_blobs(1000, generator), lookahead_from=lookahead_from, seed=1)
    rate = _flagged_share(model, optimizer, gate, generator, learn=True)
    assert 0.05 <= rate <= 0.15, f"realised clean false-flag rate {rate:.1%} against a 10% target"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_lookahead_from_the_model_differs_only_where_the_optimizer_carries_momentum(momentum):
    """Without momentum and weight decay both starting points are the model itself, so the two settings judge alike
    (digits' stream); with a filled momentum buffer they measure from different points."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for _ in range(5):  # fill the buffer
        x, y = _blobs(32, generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    trusted = _blobs(200, generator)
    x, y = _blobs(32, generator)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    increases = {start: UpdateGate(*trusted, batch_size=32, lookahead_from=start).increase(model, optimizer)
                 for start in ("momentum_step", "model")}
    assert (increases["momentum_step"] == increases["model"]) == (momentum == 0.0), increases


def _dropout_false_flag_rate(seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = (torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    model = _burnt_in(torch.nn.Sequential(*layers), generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = _blob_gate(_blobs(1000, generator), seed=seed + 1)
    gate.calibrate(model, optimizer)
    return _flagged_share(model, optimizer, gate, generator)


def test_the_calibration_sees_updates_as_the_stream_makes_them_dropout_included():
    """A model with dropout: the stream's gradients are taken in training mode, so are the calibration's. Taken in
    eval mode they were gentler, and this stream flagged 32% of clean batches against a 10% target (SmallCNN: 38%
    of clean CIFAR-10 batches)."""
    rates = [_dropout_false_flag_rate(seed) for seed in range(4)]
    assert 0.05 <= np.mean(rates) <= 0.15, f"realised clean false-flag rates {rates} against a 10% target"


def test_a_calibration_with_dropout_is_the_same_whatever_ran_before_it_and_leaves_the_global_draws_alone():
    """Dropout's masks in a calibration come from the gate's seed, not torch's global generator: two learners made
    ready from one model at different global states calibrate alike (they measured different caps on MNIST), and
    the stream's own draws after a calibration are the ones it would have made without it."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers = (torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    model = _burnt_in(torch.nn.Sequential(*layers), generator)
    trusted = _blobs(300, generator)
    calibrated = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        expected_next = torch.rand(3)
        torch.manual_seed(global_seed)
        gate = UpdateGate(*trusted, batch_size=16, calibration_updates=16, norm_cap="inf", cap_updates=32, seed=5)
        copy_ = copy.deepcopy(model)
        gate.calibrate(copy_, torch.optim.SGD(copy_.parameters(), lr=0.1))
        assert torch.equal(torch.rand(3), expected_next)
        calibrated.append((gate.threshold, gate.cap, gate.history[0]["increase_median"]))
    assert calibrated[0] == calibrated[1]
    # a different gate seed draws other masks: the equality above is not a model without randomness
    gate = UpdateGate(*trusted, batch_size=16, calibration_updates=16, norm_cap="inf", cap_updates=32, seed=5)
    gate.seed = 6  # the same probe and batches as above (drawn from seed 5); only the masks' seed differs
    copy_ = copy.deepcopy(model)
    gate.calibrate(copy_, torch.optim.SGD(copy_.parameters(), lr=0.1))
    assert (gate.threshold, gate.cap, gate.history[0]["increase_median"]) != calibrated[0]


def test_a_calibration_leaves_batchnorm_statistics_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    gate = UpdateGate(*_blobs(200, torch.Generator().manual_seed(0)), batch_size=16, calibration_updates=4)
    before = model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked)
    gate.calibrate(model, torch.optim.SGD(model.parameters(), lr=0.1))
    after = model[1].running_mean, model[1].running_var, int(model[1].num_batches_tracked)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]
    assert model.training and model[1].track_running_stats  # the modes are put back
