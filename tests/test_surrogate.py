import pytest
import torch
from sklearn.datasets import load_digits

from attacker_sim.surrogate import surrogate_accuracy, train_surrogate
from service.core.models import build_model

SPEC = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}
TRAINING = {"epochs": 10, "lr": 0.05, "batch_size": 32}


@pytest.fixture(scope="module")
def digits():
    """The attacker's own 300 digits and 1,497 held-out ones (8x8, scaled to [0, 1])."""
    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[order[:300]], y[order[:300]]), (x[order[300:]], y[order[300:]])


def test_surrogate_learns_the_task_from_the_attackers_data_alone(digits):
    (x, y), (x_test, y_test) = digits
    surrogate = train_surrogate(SPEC, x, y, seed=0, **TRAINING)
    torch.manual_seed(0)
    untrained = build_model(**SPEC)  # what the old default (burn-in epoch 0) amounted to
    assert surrogate_accuracy(untrained, x_test, y_test) < 0.3
    assert surrogate_accuracy(surrogate, x_test, y_test) > 0.85  # measured 0.94-0.95 over seeds 0-3
    assert not surrogate.training
    assert all(p.requires_grad and p.grad is None for p in surrogate.parameters())


def test_surrogate_is_deterministic_under_its_seed_and_leaves_the_global_rng_alone(digits):
    (x, y), _ = digits
    rng_before = torch.get_rng_state()
    weights = [train_surrogate(SPEC, x, y, seed=seed, **TRAINING).state_dict() for seed in (1, 1, 2)]
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_surrogate_accuracy_counts_correct_predictions_and_restores_the_mode():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        net[1].bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]]).view(4, 1, 2, 2)
    net.train()
    assert surrogate_accuracy(net, x, torch.tensor([0, 1, 1, 1]), batch_size=3) == 0.75
    assert net.training


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be an integer >= 1"),
        ({"lr": 0.0}, r"lr \(learning rate\) must be a finite number > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"x": torch.rand(0, 1, 8, 8), "y": torch.zeros(0, dtype=torch.long)}, "data is empty"),
        ({"x": torch.rand(10, 1, 6, 6)}, r"images are \(1, 6, 6\) but the model_spec's input_shape is \(1, 8, 8\)"),
        ({"y": torch.full((10,), 10)}, r"labels must be in \[0, 9\]"),
        ({"y": torch.zeros(9, dtype=torch.long)}, "one label per image"),
        ({"model_spec": {"name": "digitscnn"}}, "model_spec must be a dict with name, num_classes and input_shape"),
    ],
)
def test_bad_training_requests_are_refused_with_a_clear_message(change, message):
    arguments = {"model_spec": SPEC, "x": torch.rand(10, 1, 8, 8), "y": torch.zeros(10, dtype=torch.long),
                 "seed": 0, **TRAINING, **change}
    with pytest.raises(ValueError, match=message):
        train_surrogate(arguments.pop("model_spec"), arguments.pop("x"), arguments.pop("y"), **arguments)
