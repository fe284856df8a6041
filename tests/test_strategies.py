import copy

import pytest
import torch
from pydantic import ValidationError

from service.core.config import ExperimentConfig, StrategyConfig
from service.core.defense.calibration import Calibration
from service.core.defense.discrepancy import memorization_discrepancy
from service.core.defense.strategies import build_strategy
from service.core.learner import OnlineLearner
from service.core.models import build_model

SPEC = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}


def _learner(strategy, seed=0):
    torch.manual_seed(seed)
    model = build_model(**SPEC)
    aux = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return OnlineLearner(model, aux, strategy, model_spec=SPEC, lr=0.1)


def test_gc_bounds_the_gradient_norm():
    learner = _learner(build_strategy(StrategyConfig(name="gc", clip_value=0.01, clip_norm="inf")))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    report = learner.step(x, y)
    largest = max(p.grad.abs().max().item() for p in learner.model.parameters())
    assert report.grad_norm > 0.01  # unclipped, the gradient was larger than the bound...
    assert largest <= 0.01 + 1e-6  # ...and clipping brought every entry under it
    learner2 = _learner(build_strategy(StrategyConfig(name="gc", clip_value=0.05, clip_norm="2")))
    learner2.step(x, y)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in learner2.model.parameters()]))
    assert total <= 0.05 + 1e-5


def test_st_learner_step_changes_parameters_and_counts():
    learner = _learner(build_strategy("st"))
    before = [p.detach().clone() for p in learner.model.parameters()]
    report = learner.step(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))
    assert (report.batch_index, learner.batches_applied, learner.model_version) == (0, 1, 1)
    assert report.flagged_count == 0 and report.discrepancy_before is None
    assert report.seconds["total"] >= report.seconds["prepare"]


def test_dsc_threshold_schedule_and_report():
    cal = Calibration(mu=0.0, tau=0.5, target_false_flag_rate=0.1, divergence="kl")
    learner = _learner(build_strategy(StrategyConfig(name="dsc"), cal))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    first = learner.step(x, y)
    assert first.threshold == 0.0
    assert first.flagged_count == int((first.discrepancy_before > 0).sum()) > 0
    assert (first.correction_steps[first.flagged] == 10).all()  # MD never reaches 0, so all K steps run
    assert first.corrected_count == first.flagged_count
    second = learner.step(x, y)
    assert second.threshold == pytest.approx(0.5)


def test_hand_set_mu_tau_override_calibration():
    cal = Calibration(mu=1.0, tau=0.1, target_false_flag_rate=0.1, divergence="kl")
    strategy = build_strategy(StrategyConfig(name="dsc", mu=0.3, tau=0.0), cal)
    assert strategy.threshold(7) == pytest.approx(0.3)


def test_dsc_without_threshold_is_a_clear_error():
    learner = _learner(build_strategy(StrategyConfig(name="dsc")))
    with pytest.raises(RuntimeError, match="calibrate on clean data first or set mu and tau"):
        learner.step(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))


def test_learner_rejects_wrong_shapes():
    learner = _learner(build_strategy("st"))
    with pytest.raises(ValueError, match=r"x must be shaped \[N, 1, 8, 8\]"):
        learner.step(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one label per sample"):
        learner.step(torch.rand(2, 1, 8, 8), torch.tensor([0]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"strategy": {"epsilon": -0.1}}, "strategy.epsilon"),
     ({"strategy": {"name": "magic"}}, "strategy.name"),
     ({"model": {"name": "transformer"}}, "model.name"),
     ({"strategy": {"steps": 0}}, "strategy.steps"),
     ({"calibration": {"target_false_flag_rate": 1.5}}, "calibration.target_false_flag_rate"),
     ({"burnin": {"auxiliary_epoch": 7}}, "not a checkpoint")],
)
def test_bad_configuration_is_a_clear_error(overrides, message):
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.from_profile("digits", **overrides)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown strategy 'magic'; expected one of st, gc, at, dsc"):
        build_strategy("magic")
    with pytest.raises(ValueError, match="unknown model 'transformer'"):
        build_model("transformer", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="unknown profile"):
        ExperimentConfig.from_profile("imagenet")


def test_dsc_shares_the_trunk_forward_without_changing_the_loss():
    spec = {"name": "smallcnn", "num_classes": 10, "input_shape": [3, 16, 16], "dropout": 0.0}
    torch.manual_seed(0)
    model, aux = build_model(**spec), build_model(**spec)
    x, y = torch.rand(12, 3, 16, 16), torch.randint(0, 10, (12,))
    median = float(memorization_discrepancy(aux, model, x).median())
    cal = Calibration(mu=median, tau=0.0, target_false_flag_rate=0.5, divergence="kl")
    strategy = build_strategy(StrategyConfig(name="dsc", steps=2, early_stop="sample"), cal)
    prepared = strategy.prepare(model, aux, x, y, 0)
    assert prepared.features is not None  # smallcnn's conv trunk has no dropout or batch norm
    corrected = int((prepared.correction.steps_taken > 0).sum())
    assert 0 < corrected < 12  # the loss mixes shared-trunk rows and re-run rows
    shared = strategy.loss(model.train(), prepared, x, y)
    plain = torch.nn.functional.cross_entropy(model(prepared.x), y)
    assert shared.item() == pytest.approx(plain.item(), rel=1e-5)


def _flagging_dsc(action, trusted=None):
    """dsc with a threshold every batch is above (mu 0, tau 0) or none is (mu 1e9), and `action` on a flag."""
    calibration = Calibration(mu=0.0, tau=0.0, target_false_flag_rate=0.1, divergence="kl", unit="batch")
    return build_strategy(StrategyConfig(name="dsc", flag_action=action, gate_calibration_updates=8), calibration,
                          trusted=trusted, batch_size=16)


def test_dsc_skip_leaves_a_flagged_batch_out_of_the_update_and_learns_an_unflagged_one():
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    strategy = _flagging_dsc("skip")
    learner = _learner(strategy)
    before = [p.detach().clone() for p in learner.model.parameters()]
    report = learner.step(x, y)
    assert report.flagged.all() and report.corrected_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))
    learner.strategy.config = learner.strategy.config.model_copy(update={"mu": 1e9})
    assert not learner.step(x, y).flagged.any()
    assert not all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))


def test_dsc_gate_judges_only_flagged_updates_and_leaves_samples_uncorrected():
    trusted = (torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    strategy = _flagging_dsc("gate", trusted)
    calm = _learner(strategy)
    calm.strategy.config = calm.strategy.config.model_copy(update={"mu": 1e9})
    report = calm.step(x, y)
    assert not report.flagged.any() and report.update_scale == 1.0 and calm.strategy.gate.threshold is None
    strategy = _flagging_dsc("gate", trusted)
    flagging = _learner(strategy)
    report = flagging.step(x, y)
    assert report.flagged.all() and report.corrected_count == 0
    assert flagging.strategy.gate.threshold is not None  # calibrated and asked, on the flagged batch only
    assert report.threshold == 0.0  # the report keeps dsc's threshold, not the gate's
    with pytest.raises(ValueError, match="trusted split"):
        _flagging_dsc("gate")
