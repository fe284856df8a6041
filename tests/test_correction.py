import copy

import pytest
import torch

from service.core.config import StrategyConfig
from service.core.defense.correction import ReversePGD
from service.core.defense.discrepancy import memorization_discrepancy
from service.core.defense.strategies import build_strategy
from service.core.models import build_model


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    aux = build_model("digitscnn", num_classes=10, input_shape=(1, 8, 8))
    model = copy.deepcopy(aux)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return aux, model


def test_correction_stays_in_the_epsilon_ball_and_unit_box(pair):
    aux, model = pair
    x = torch.rand(40, 1, 8, 8)
    x[:5] = 0.0
    x[5:10] = 1.0
    y = torch.randint(0, 10, (40,))
    for early_stop in ("none", "sample", "batch"):
        pgd = ReversePGD(steps=8, step_size=0.05, epsilon=0.1, early_stop=early_stop)
        out = pgd(model, x, y, auxiliary=aux, threshold=0.0)
        assert (out.x - x).abs().max() <= 0.1 + 1e-6
        assert out.x.min() >= 0.0 and out.x.max() <= 1.0
        assert out.steps_taken.max() <= 8


def test_correction_lowers_the_training_loss(pair):
    _, model = pair
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))
    out = ReversePGD(steps=10, step_size=0.02, epsilon=0.2, early_stop="none")(model, x, y)
    model.eval()
    before = torch.nn.functional.cross_entropy(model(x), y)
    after = torch.nn.functional.cross_entropy(model(out.x), y)
    assert after < before - 0.05


def test_per_sample_early_stop_leaves_unflagged_samples_bit_identical(pair):
    aux, model = pair
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    scores = memorization_discrepancy(aux, model, x)
    threshold = float(scores.median())
    out = ReversePGD(steps=10, step_size=0.02, epsilon=0.2, early_stop="sample")(model, x, y, aux, threshold)
    unflagged = scores <= threshold
    assert unflagged.sum() >= 20 and (~unflagged).sum() >= 20
    assert torch.equal(out.x[unflagged], x[unflagged])
    assert torch.equal(out.flagged, ~unflagged)
    assert (out.steps_taken[unflagged] == 0).all()
    assert (out.steps_taken[~unflagged] >= 1).all()
    assert torch.allclose(out.discrepancy_before, scores, atol=1e-6)
    # where a sample stopped early, it stopped because it fell under the threshold
    stopped_early = (out.steps_taken > 0) & (out.steps_taken < 10)
    assert (out.discrepancy_after[stopped_early] <= threshold).all()
    # the reported discrepancy after correction is the one of the corrected samples
    assert torch.allclose(out.discrepancy_after, memorization_discrepancy(aux, model, out.x), atol=1e-5)


def test_batch_early_stop_moves_every_sample_together(pair):
    aux, model = pair
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    scores = memorization_discrepancy(aux, model, x)
    pgd = ReversePGD(steps=10, step_size=0.02, epsilon=0.2, early_stop="batch")
    out = pgd(model, x, y, aux, float(scores.mean()) * 0.5)
    assert out.flagged.all()
    assert len(set(out.steps_taken.tolist())) == 1
    quiet = ReversePGD(early_stop="batch")(model, x, y, aux, float(scores.mean()) * 2)
    assert not quiet.flagged.any() and torch.equal(quiet.x, x)


def test_at_corrects_every_sample(pair):
    _, model = pair
    strategy = build_strategy(StrategyConfig(name="at", steps=5))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    prepared = strategy.prepare(model, None, x, y, 0)
    assert prepared.correction.flagged.all()
    assert (prepared.correction.steps_taken == 5).all()
    assert ((prepared.x - x).abs().flatten(1).max(1).values > 0).all()


def test_early_stop_needs_the_auxiliary_and_threshold(pair):
    _, model = pair
    with pytest.raises(ValueError, match="auxiliary model and a threshold"):
        ReversePGD(early_stop="sample")(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"epsilon": -0.1}, "epsilon"), ({"steps": 0}, "steps"), ({"step_size": 0}, "step_size"),
     ({"early_stop": "never"}, "early_stop")],
)
def test_budgets_are_validated_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReversePGD(**kwargs)
