"""guard's label check: where most stream samples that look like a trusted class carry one other label (a pair), or
nearly all of them carry other labels (a class), they are learned as the class they look like; honest samples, a
minority of honest confusion and far-out (drifted) ones are kept as labelled."""

import copy

import pytest
import torch
from torch import nn

from attacker_sim.drift import build_drift
from service.core.config import StrategyConfig
from service.core.defense.label_check import NeighbourLabelCheck
from service.core.defense.strategies import build_strategy
from service.core.learner import OnlineLearner
from tests.reproduce import assert_reproduced

CENTERS = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
SPEC = {"name": "blobs", "num_classes": 3, "input_shape": [4]}


def _blobs(n, seed, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=generator)
    return CENTERS[y] + torch.randn(n, 4, generator=generator) + shift, y


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(100):  # a model that has learned the blobs
        x, y = _blobs(32, 100 + step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _learner(label_check=True, **settings):
    config = StrategyConfig(name="guard", label_check=label_check, **settings)
    strategy = build_strategy(config, trusted=_blobs(90, 1), batch_size=32)
    return OnlineLearner(_model(), None, strategy, model_spec=SPEC, lr=0.1, momentum=0.0).ready()


def _flip(y, source=0, target=1):
    return torch.where(y == source, torch.full_like(y, target), y)


def test_a_lied_about_pair_is_learned_as_the_trusted_class_and_honest_labels_are_kept():
    x, y = _blobs(64, 2)
    lies, odd = y == 0, torch.nonzero(y == 2).flatten()[:3]  # every 0 labelled 1; three 2s labelled 1 as well
    labels = _flip(y)
    labels[odd] = 1
    learner = _learner(label_check_class_share=None)  # the pairs alone (the class rule: the next test)
    report = learner.step(x, labels)
    assert learner.strategy.label_check.lied_pairs() == [(0, 1)]  # three of the 2s' lookalikes: no pair of theirs
    assert report.relabelled[lies.numpy()].mean() >= 0.9  # the lies look like the trusted 0s: learned as 0s
    assert report.left_out[odd.numpy()].all()  # labelled as the pair's lie, looking like neither of its classes
    honest = (~lies).numpy()
    honest[odd.numpy()] = False
    assert not (report.relabelled[honest] | report.left_out[honest]).any()  # honest labels are not in the pair
    assert report.flagged[report.left_out | report.relabelled].all()  # both count as flagged
    clean = _learner().step(x, y)
    assert not (clean.left_out.any() or clean.relabelled.any())


def test_a_minority_of_other_labels_among_lookalikes_is_honest_confusion_and_kept():
    x, y = _blobs(200, 3)
    zeros = torch.nonzero(y == 0).flatten()
    y[zeros[: int(0.3 * len(zeros))]] = 1  # under the share: 30% of what looks like 0 labelled 1
    learner = _learner()
    report = learner.step(x, y)
    assert learner.strategy.label_check.lied_pairs() == [] and learner.strategy.label_check.lied_classes() == []
    assert not (report.left_out.any() or report.relabelled.any())


def test_a_class_relabelled_at_random_forms_no_pair_but_is_learned_as_the_class_it_looks_like():
    x, y = _blobs(200, 9)
    draw = torch.rand(len(y), generator=torch.Generator().manual_seed(9))
    lies = (y == 0) & (draw >= 0.04)
    # 96% of the 0s labelled 1 or 2 by turns: each pair under the share (0.5), the class over its bar (0.85 of the way
    # from the trusted 0s' own confusion to all)
    turns = torch.zeros_like(y)
    turns[lies] = 1 + torch.arange(int(lies.sum())) % 2
    labels = torch.where(lies, turns, y)
    learner = _learner()
    report = learner.step(x, labels)
    check = learner.strategy.label_check
    assert check.lied_pairs() == [] and check.lied_classes() == [0]
    assert learner.strategy.health(learner.batches_applied)["label_check_lied_classes"] == [0]  # in /v1/status
    assert report.relabelled[lies.numpy()].mean() >= 0.9
    # honest samples that look like a 0 (the blobs overlap) are learned as 0s too, while the class is lied about
    assert report.relabelled[(~lies).numpy()].mean() < 0.05
    pairs_only = _learner(label_check_class_share=None)
    assert not pairs_only.step(x, labels).relabelled.any()  # the pairs alone let it through
    far_x, far_y = _blobs(64, 10)
    zeros = far_y == 0
    both = torch.cat([x[lies][:10], far_x[zeros] * 4])  # near 0s, and 0s four times further out, labelled 1 or 2
    verdict = check.judge(learner.model, both, 1 + torch.arange(len(both)) % 2)
    assert check.lied_pairs() == [] and check.lied_classes() == [0]
    assert verdict.relabelled[:10].all() and not verdict.relabelled[10:].any()  # only within the radius


def test_the_update_is_the_gradient_of_the_kept_samples_with_the_verdicts_labels():
    x, y = _blobs(32, 4)
    y = _flip(y)
    y[torch.nonzero(y == 2).flatten()[:2]] = 1  # two to leave out
    learner = _learner(gate_norm_cap="none", label_check_min_count=5)
    learner.strategy.gate.threshold = float("inf")  # nothing flagged: the update is applied whole
    expected = copy.deepcopy(learner.model)
    verdict = learner.strategy.label_check.judge(learner.model, x, y)
    learner.strategy.label_check.recent.clear()  # the step judges the batch again, from the same window
    kept = ~verdict.left_out
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.1)
    nn.functional.cross_entropy(expected(x[kept]), verdict.labels[kept]).backward()
    optimizer.step()
    report = learner.step(x, y)
    assert not report.gate.flagged and report.left_out.sum() == 2 and report.relabelled.sum() > 0
    for a, b in zip(learner.model.parameters(), expected.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_samples_far_from_the_trusted_data_count_for_no_pair_whatever_they_look_like():
    learner = _learner()
    far_x, far_y = _blobs(64, 5)
    far_x = far_x * 4  # the blobs, four times further out: each still looks most like its own class's samples
    report = learner.step(far_x, (far_y + 1) % 3)  # every label another class's
    check = learner.strategy.label_check
    assert check.lied_pairs() == [] and check.lied_classes() == []
    assert not (report.left_out.any() or report.relabelled.any())


def _digits_learner(experiment, label_check):
    return experiment.new_learner(StrategyConfig(name="guard", label_check=label_check)).ready()


def test_a_label_flip_is_learned_without_the_check_and_not_with_it(digits_experiment):
    test_x, test_y = digits_experiment.test_tensors
    threes = test_y == 3

    def class_accuracy_after_flip(label_check):
        learner = _digits_learner(digits_experiment, label_check)
        for x, y in digits_experiment.stream_batches(50, seed=11):
            learner.step(x, _flip(y, 3, 8))
        return learner.accuracy(test_x[threes], test_y[threes])

    start = _digits_learner(digits_experiment, False).accuracy(test_x[threes], test_y[threes])
    assert class_accuracy_after_flip(False) < start - 0.5  # guard's gate alone lets most of the lie in
    # the first batch's lies are learned before the pair has its count; the rest are learned as 3s
    assert class_accuracy_after_flip(True) >= start - 0.1


def test_an_honest_drift_is_still_learned_with_the_check(digits_experiment):
    drift = build_drift("pixel_shift")
    test = drift.test_view(*digits_experiment.test_tensors, seed=0)

    def gain(label_check):
        learner = _digits_learner(digits_experiment, label_check)
        before = learner.accuracy(*test)
        for x, y in drift.batches(*digits_experiment.splits.stream.tensors(), 50, 30, seed=12):
            learner.step(x, y)
        return learner.accuracy(*test) - before

    without = gain(False)
    assert without > 0.1  # the shift costs accuracy, and learning it wins much of it back
    assert gain(True) >= 0.8 * without


def test_a_restored_learner_judges_and_steps_as_the_original(digits_experiment, tmp_path):
    learner = _digits_learner(digits_experiment, True)
    batches = [(x, _flip(y, 3, 8)) for x, y in digits_experiment.stream_batches(4, seed=13)]
    for x, y in batches[:3]:  # the window that makes (3, 8) a lied-about pair travels with the checkpoint
        learner.step(x, y)
    learner.save(tmp_path / "ckpt")
    restored = OnlineLearner.load(tmp_path / "ckpt", device=learner.device)
    assert restored.strategy.label_check.lied_pairs() == learner.strategy.label_check.lied_pairs() == [(3, 8)]
    original, again = learner.step(*batches[3]), restored.step(*batches[3])
    assert original.relabelled.any() and (original.relabelled == again.relabelled).all()
    assert (original.left_out == again.left_out).all()
    for a, b in zip(learner.model.parameters(), restored.model.parameters(), strict=True):
        assert_reproduced(a, b, learner.device)


def test_bad_label_check_settings_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="label_check_neighbours"):
        NeighbourLabelCheck(*_blobs(8, 8), neighbours=8)
    with pytest.raises(ValueError, match="label_check_radius_level"):
        NeighbourLabelCheck(*_blobs(8, 8), radius_level=0.0)
    with pytest.raises(ValueError, match="label_check_class_share"):
        NeighbourLabelCheck(*_blobs(8, 8), class_share=1.5)


def test_a_class_the_trusted_split_itself_confuses_needs_more_of_its_lookalikes_mislabelled():
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    grid = torch.tensor([[i * 0.1, j * 0.1] for i in range(3) for j in range(3)])  # nine samples around (0.1, 0.1)
    trusted_x = torch.cat([grid, grid + 5.0])
    confused = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0, 1])  # three corners carry 1 among 0s: class 0's own confusion
    trusted_y = torch.cat([confused, torch.ones(9, dtype=torch.long)])
    check = NeighbourLabelCheck(trusted_x, trusted_y, neighbours=3, radius_level=1.0, min_count=5)
    check.refresh(model)
    own = check.confusion[0]
    assert 0 < own < 0.5 and check.class_bar(0) == pytest.approx(own + check.class_share * (1 - own))
    near = grid[4] + 0.01 * torch.randn(20, 2, generator=torch.Generator().manual_seed(0))  # all look like a 0
    labels = torch.zeros(20, dtype=torch.long)
    labels[:17] = torch.tensor([1, 2] * 8 + [1])  # 85% carry other labels: the class share, under class 0's bar
    check.judge(model, near, labels)
    assert check.class_bar(0) > 0.85 == check.class_share and check.lied_classes() == []
    labels[17:] = 2  # every one: the window (both batches, 37 of 40) is over the bar
    check.judge(model, near, labels)
    assert check.lied_classes() == [0]
