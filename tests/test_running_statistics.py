"""BatchNorm's running statistics are part of what guard acts on: a skipped batch moves none of them, a learned one
moves them as BatchNorm does, a shrunk one part of the way, and none further than clean batches at the cap's level;
what the cap cuts is made up by a clean trusted batch's move, so the statistics keep up with the weights."""

import copy

import torch
from torch import nn

from service.core.config import StrategyConfig
from service.core.defense.eval_mode import training_mode_frozen_stats
from service.core.defense.running_statistics import after_batch, move_size, snapshot
from service.core.defense.strategies import build_strategy
from service.core.learner import OnlineLearner


def _blobs(n, generator):
    centers = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    y = torch.randint(0, 3, (n,), generator=generator)
    return centers[y] + torch.randn(n, 4, generator=generator), y


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):  # a model that has learned the blobs, statistics included
        x, y = _blobs(32, generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _learner(action="shrink", cap="inf"):
    trusted = _blobs(64, torch.Generator().manual_seed(2))
    strategy = build_strategy(StrategyConfig(name="guard", gate_action=action, gate_norm_cap=cap), trusted=trusted,
                              batch_size=32)
    spec = {"name": "blobs", "num_classes": 3, "input_shape": [4]}
    return OnlineLearner(_model(), None, strategy, model_spec=spec, lr=0.1, momentum=0.0).ready()


def _means(model):
    return [mean for mean, _ in snapshot(model)]


def test_the_move_a_frozen_forward_reports_is_the_move_batchnorm_makes():
    model, x = _model(), _blobs(32, torch.Generator().manual_seed(3))[0]
    with training_mode_frozen_stats(model):
        _, reported = after_batch(model, lambda: model(x))
    model.train()
    model(x)  # BatchNorm's own update
    for (mean, var), (own_mean, own_var) in zip(reported, snapshot(model), strict=True):
        assert torch.allclose(mean, own_mean, atol=1e-6) and torch.allclose(var, own_var, atol=1e-6)


def test_a_learned_batch_moves_the_statistics_as_batchnorm_does_and_a_skipped_one_moves_none():
    x, y = _blobs(32, torch.Generator().manual_seed(4))
    learned = _learner("skip", cap="none")  # no cap: the statistics' move is left whole too
    expected = copy.deepcopy(learned.model).train()
    expected(x)
    report = learned.step(x, y)
    assert not report.gate.flagged
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_means(learned.model), _means(expected), strict=True))
    skipped = _learner("skip")
    before = _means(skipped.model)
    skipped.strategy.gate.threshold = -1.0  # every update over it (no recalibration is due)
    report = skipped.step(x, y)
    assert report.gate.flagged and report.update_scale == 0.0
    assert all(torch.equal(a, b) for a, b in zip(_means(skipped.model), before, strict=True))


def test_a_shrunk_batch_moves_the_statistics_part_of_the_way():
    x, y = _blobs(32, torch.Generator().manual_seed(5))
    y = (y + 1) % 3  # wrong labels: the update raises the probe's loss
    learner = _learner("shrink", cap="none")
    before = _means(learner.model)
    full = copy.deepcopy(learner.model).train()
    full(x)
    learner.strategy.gate.threshold = 1e-6  # just above nothing: the update is shrunk, not dropped
    report = learner.step(x, y)
    assert report.gate.flagged and 0.0 < report.update_scale < 1.0
    for now, old, whole in zip(_means(learner.model), before, _means(full), strict=True):
        share = ((now - old) / (whole - old))[(whole - old).abs() > 1e-6]
        # every channel the same share of its move: the update's own (no cap here)
        assert torch.allclose(share, torch.full_like(share, report.update_scale), atol=1e-4)


def _trusted_reference(learner):
    """Where a clean trusted batch (the gate's first probe batch) moves the statistics from where they stand."""
    gate, model = learner.strategy.gate, learner.model
    with training_mode_frozen_stats(model), torch.no_grad():
        _, reference = after_batch(model, lambda: model(gate.trusted[0][gate.probe[: gate.batch_size]]))
    return reference


def _judged(learner, x, y, tell: bool):
    """The gate's verdict on the batch's update, on copies (the learner is left as it was); `tell`: the gate is told
    where the running statistics were before the batch's forward."""
    model, gate = copy.deepcopy(learner.model), copy.deepcopy(learner.strategy.gate)
    optimizer = torch.optim.SGD(model.parameters(), lr=learner.optimizer.param_groups[0]["lr"])
    before = snapshot(model)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    return gate.judge(model, optimizer, statistics=before if tell else None)


def test_the_verdict_is_on_the_weights_alone_as_the_threshold_was_calibrated():
    """Told where the statistics were or not, the gate flags and scales the same update the same way: the move
    of the statistics is scaled and capped, not judged (judging it flagged half the clean batches of a briefly trained
    ResNet-18, whose clean trusted moves all lowered the probe's loss)."""
    learner = _learner("shrink")
    x, y = _blobs(32, torch.Generator().manual_seed(6))
    told = _judged(learner, x, torch.roll(y, 1), tell=True)
    blind = _judged(learner, x, torch.roll(y, 1), tell=False)
    assert (told.increase, told.flagged, told.scale) == (blind.increase, blind.flagged, blind.scale)


def _blend(before, after, own, reference, rest):
    """The statistics before + own * (after - before) + rest * (reference - before), as flat means and variances."""
    return [(m0 + own * (m1 - m0) + rest * (m2 - m0), v0 + own * (v1 - v0) + rest * (v2 - v0))
            for (m0, v0), (m1, v1), (m2, v2) in zip(before, after, reference, strict=True)]


def _assert_statistics(model, expected):
    for (mean, var), (want_mean, want_var) in zip(snapshot(model), expected, strict=True):
        assert torch.allclose(mean, want_mean, atol=1e-5) and torch.allclose(var, want_var, atol=1e-5)


def test_no_batch_moves_the_statistics_further_than_clean_batches_at_the_caps_level():
    """A batch's own move goes no further than the cap; what the cap cuts is a clean trusted batch's move."""
    learner = _learner("cap")  # the action leaves every update whole: only the cap acts on the statistics
    gate = learner.strategy.gate
    assert gate.statistics_cap is not None and gate.statistics_cap > 0
    before, reference = snapshot(learner.model), _trusted_reference(learner)
    far = copy.deepcopy(learner.model).train()
    x, y = torch.full((32, 4), 8.0), torch.zeros(32, dtype=torch.long)
    far(x)
    size = move_size(before, snapshot(far))
    assert size > 10 * gate.statistics_cap  # what BatchNorm alone would do
    learner.step(x, y)
    own = gate.statistics_cap / size
    _assert_statistics(learner.model, _blend(before, snapshot(far), own, reference, 1.0 - own))
    assert move_size(before, snapshot(learner.model)) < 0.2 * size
    restored = _learner("shrink").strategy.gate
    restored.restore(gate.state())  # the cap travels with the checkpoint
    assert restored.statistics_cap == gate.statistics_cap


def test_where_the_weights_have_moved_on_the_statistics_keep_up_with_them():
    """The cap was measured with the weights as they were. Where they have moved on (here the first layer's weights
    tripled), what the statistics should be has moved with them, and every clean move looks long against the lagging
    statistics: held at the cap alone, a ResNet-18's statistics stayed where its weights had left them and its clean
    accuracy fell from 78% to 13% in 30 clean batches (CIFAR-10, stream lr 0.1). With a trusted batch's move in
    what the cap cuts, they go as far as BatchNorm would take them on clean data."""
    learner = _learner("cap")
    gate = learner.strategy.gate
    with torch.no_grad():
        learner.model[0].weight.mul_(3.0)
        learner.model[0].bias.mul_(3.0)
    x, y = _blobs(32, torch.Generator().manual_seed(7))
    before, reference, free = snapshot(learner.model), _trusted_reference(learner), copy.deepcopy(learner.model)
    free.train()(x)
    size = move_size(before, snapshot(free))
    assert size > 2 * gate.statistics_cap  # a clean move the cap alone would cut to half or less
    learner.step(x, y)
    own = gate.statistics_cap / size
    _assert_statistics(learner.model, _blend(before, snapshot(free), own, reference, 1.0 - own))
    assert move_size(before, snapshot(learner.model)) > 0.5 * min(size, move_size(before, reference))


def test_a_model_without_batchnorm_is_judged_as_before():
    trusted = _blobs(64, torch.Generator().manual_seed(2))
    strategy = build_strategy(StrategyConfig(name="guard"), trusted=trusted, batch_size=32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    learner = OnlineLearner(model, None, strategy, model_spec={"name": "blobs", "num_classes": 3, "input_shape": [4]},
                            lr=0.1, momentum=0.0).ready()
    assert snapshot(model) == []  # what the strategy hands the gate: nothing to move
    x, y = _blobs(32, torch.Generator().manual_seed(4))
    assert _judged(learner, x, y, tell=True) == _judged(learner, x, y, tell=False)
