import copy
import math

import pytest
import torch

from service.core.defense.discrepancy import DIVERGENCES, divergence_from_logits, memorization_discrepancy
from service.core.models import build_model


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("digitscnn", num_classes=10, input_shape=(1, 8, 8))


def test_zero_when_auxiliary_is_the_current_model():
    model = _model()
    x = torch.rand(32, 1, 8, 8)
    for kind in DIVERGENCES:
        scores = memorization_discrepancy(copy.deepcopy(model), model, x, kind)
        assert torch.allclose(scores, torch.zeros(32), atol=1e-6)


def test_grows_as_the_models_diverge():
    aux = _model()
    x = torch.rand(64, 1, 8, 8)
    means = []
    for scale in (0.01, 0.05, 0.2):
        current = copy.deepcopy(aux)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in current.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))
        means.append(float(memorization_discrepancy(aux, current, x).mean()))
    assert 0 < means[0] < means[1] < means[2]


def test_kl_on_hand_made_distributions():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = divergence_from_logits(p.log(), q.log(), "kl")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert divergence_from_logits(p.log(), q.log(), "reverse_kl").item() == pytest.approx(reverse, rel=1e-5)
    assert got.item() != pytest.approx(reverse, rel=1e-3)  # KL is not symmetric


def test_js_is_symmetric_and_bounded_by_ln2():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]).clamp_min(1e-12)
    q = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.3, 0.2]]).clamp_min(1e-12)
    forward = divergence_from_logits(p.log(), q.log(), "js")
    backward = divergence_from_logits(q.log(), p.log(), "js")
    assert torch.allclose(forward, backward, atol=1e-6)
    assert forward[0].item() == pytest.approx(math.log(2), rel=1e-4)  # disjoint supports
    assert 0 < forward[1].item() < math.log(2)


def test_logit_shift_invariance_and_per_sample_shape():
    logits = torch.randn(5, 4)
    shifted = logits + 3.0
    assert torch.allclose(divergence_from_logits(logits, shifted), torch.zeros(5), atol=1e-6)


def test_unknown_divergence_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="unknown divergence 'hellinger'"):
        memorization_discrepancy(model, model, torch.rand(2, 1, 8, 8), "hellinger")


def test_restores_training_mode():
    aux, model = _model(), _model(1)
    model.train()
    aux.eval()
    memorization_discrepancy(aux, model, torch.rand(3, 1, 8, 8))
    assert model.training
    assert not aux.training
