import copy
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from service.core.checkpoint import CheckpointError
from service.core.config import CampaignConfig, ExperimentConfig, StrategyConfig
from service.core.defense.calibration import Calibration
from service.core.defense.strategies import build_strategy
from service.core.learner import OnlineLearner
from service.core.models import build_model

SPEC = {"name": "smallcnn", "num_classes": 10, "input_shape": [1, 16, 16]}


def _learner(seed: int = 0):
    torch.manual_seed(0)
    model, aux = build_model(**SPEC), build_model(**SPEC)
    cal = Calibration(mu=0.0001, tau=0.0, target_false_flag_rate=0.1, divergence="kl")
    return OnlineLearner(model, aux, build_strategy(StrategyConfig(name="dsc", steps=3), cal), model_spec=SPEC,
                         lr=0.05, momentum=0.9, seed=seed)


def test_save_load_round_trip_gives_identical_predictions_and_next_step(tmp_path):
    learner = _learner(seed=11)
    x, y = torch.rand(20, 1, 16, 16), torch.randint(0, 10, (20,))
    for _ in range(3):
        learner.step(x, y)  # momentum buffers and counters are non-trivial now
    learner.save(tmp_path / "ckpt")
    restored = OnlineLearner.load(tmp_path / "ckpt")
    assert torch.equal(learner.predict_proba(x), restored.predict_proba(x))
    assert (restored.batches_applied, restored.model_version) == (3, 3)
    assert restored.calibration == learner.calibration and restored.seed == 11

    torch.manual_seed(123)  # smallcnn's dropout: its masks come from the seed and the update's number, not from here
    a = learner.step(x, y)
    torch.manual_seed(456)
    b = restored.step(x, y)
    assert a.loss == b.loss
    np.testing.assert_array_equal(a.discrepancy_before, b.discrepancy_before)
    for p, q in zip(learner.model.parameters(), restored.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoint_holds_no_pickle_and_names_its_parts(tmp_path):
    learner = _learner()
    learner.step(torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,)))
    path = learner.save(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "tensors.safetensors"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["strategy"]["name"] == "dsc" and meta["calibration"]["mu"] == pytest.approx(0.0001)
    assert meta["batches_applied"] == 1


def test_corrupt_checkpoint_is_refused_with_a_clear_error(tmp_path):
    path = _learner().save(tmp_path / "ckpt")
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="tensors.safetensors is corrupt"):
        OnlineLearner.load(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        OnlineLearner.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        OnlineLearner.load(tmp_path / "nowhere")


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    learner = _learner()
    learner.save(tmp_path / "ckpt")
    learner.step(torch.rand(4, 1, 16, 16), torch.randint(0, 10, (4,)))
    learner.save(tmp_path / "ckpt")
    assert OnlineLearner.load(tmp_path / "ckpt").batches_applied == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_update_draws_its_dropout_from_the_seed_and_its_number_and_leaves_the_global_draws_alone():
    x, y = torch.rand(20, 1, 16, 16), torch.randint(0, 10, (20,))
    learner = _learner(seed=3)
    twin, later, other = copy.deepcopy(learner), copy.deepcopy(learner), _learner(seed=4)
    later.batches_applied = 5  # the same weights and seed, another update number (dsc's tau is 0: same threshold)
    torch.manual_seed(1)
    expected_global = torch.rand(4)
    torch.manual_seed(1)
    first = learner.step(x, y)
    assert torch.equal(torch.rand(4), expected_global)  # the update drew nothing from the global generator
    _ = torch.rand(100)  # whatever else the process draws between
    assert twin.step(x, y).loss == first.loss
    for p, q in zip(learner.model.parameters(), twin.model.parameters(), strict=True):
        assert torch.equal(p, q)
    # the loss under dropout moves with the masks: another seed, or another update number, draws others
    assert other.step(x, y).loss != first.loss and later.step(x, y).loss != first.loss


def test_a_negative_seed_is_refused_naming_it():
    with pytest.raises(ValueError, match="seed must be >= 0"):
        _learner(seed=-1)
    with pytest.raises(ValidationError, match=r"seed\n.*greater than or equal to 0"):
        ExperimentConfig(seed=-1)
    with pytest.raises(ValidationError, match=r"seeds\.1\n.*greater than or equal to 0"):
        CampaignConfig(seeds=[0, -2])


def test_a_batchnorm_model_refuses_a_batch_of_one_sample_before_anything_changes():
    from tests.bundle_factory import tiny_bn_mlp, tiny_mlp

    spec = {"name": "mlp", "num_classes": 3, "input_shape": [4]}
    plain = OnlineLearner(tiny_mlp(4, 3), None, build_strategy("st"), model_spec=spec)
    learner = OnlineLearner(tiny_bn_mlp(4, 3), None, build_strategy("st"), model_spec=spec)
    assert (plain.min_batch_samples, learner.min_batch_samples) == (1, 2)
    plain.step(torch.rand(1, 4), torch.tensor([0]))  # one sample is a batch for a model without BatchNorm
    before = copy.deepcopy(learner.model.state_dict())
    with pytest.raises(ValueError, match="BatchNorm layers: a batch to learn from must hold at least 2 samples, got 1"):
        learner.step(torch.rand(1, 4), torch.tensor([0]))
    assert learner.batches_applied == 0
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    learner.step(torch.rand(2, 4), torch.tensor([0, 1]))
    assert learner.batches_applied == 1
