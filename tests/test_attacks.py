import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attacker_sim.attacks import (
    ATTACKS,
    AccumulativePoison,
    Budget,
    CarliniWagnerInf,
    PGDDelusive,
    TradesKL,
    TriggerCrafter,
    build_attack,
)
from attacker_sim.attacks.carlini_wagner import cw_margin
from service.core.data import load_dataset
from service.core.defense.discrepancy import memorization_discrepancy
from service.core.models import build_model

# name -> factory(budget, **adaptive options); covers every generator and every accumulative ablation
FACTORIES = {
    "pgd": lambda b, **kw: PGDDelusive(b, **kw),
    "pgd_random_start": lambda b, **kw: PGDDelusive(b, random_start=True, **kw),
    "trades_kl": lambda b, **kw: TradesKL(b, **kw),
    "cw_inf": lambda b, **kw: CarliniWagnerInf(b, kappa=5.0, **kw),
    "trigger": lambda b, **kw: TriggerCrafter(b, **kw),
    "accumulative_full": lambda b, **kw: AccumulativePoison(b, **kw),
    "accumulative_second_order_only": lambda b, **kw: AccumulativePoison(b, objective="second_order_only", **kw),
    "accumulative_clean_only": lambda b, **kw: AccumulativePoison(b, objective="clean_only", **kw),
}
ADAPTIVE = ["pgd", "trades_kl", "cw_inf", "trigger", "accumulative_full"]


def _attack(attack, model, x, y, reference):
    """Call any generator; `reference` = (x_ref, y_ref) is the validation batch and also the trigger."""
    if isinstance(attack, TriggerCrafter):
        return attack(model, x, y, *reference)
    if isinstance(attack, AccumulativePoison):
        return attack(model, x, y, trigger=reference, validation=reference)
    return attack(model, x, y)


def _batch(n, shape=(1, 8, 8), classes=10):
    return torch.rand(n, *shape), torch.randint(0, classes, (n,))


def _tanh_net():
    # float64 and smooth activations so finite differences of (second) derivatives are accurate
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def digits():
    """A digitscnn trained on sklearn digits (~98% held-out), with its epoch-6 checkpoint as auxiliary."""
    train, _ = load_dataset("digits")
    x, y = train.tensors()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train_idx, test_idx = order[:1297], order[1297:]
    torch.manual_seed(0)
    model = build_model("digitscnn", 10, (1, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    auxiliary = None
    for epoch in range(12):
        for batch in train_idx[torch.randperm(len(train_idx), generator=generator)].split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        if epoch == 5:
            auxiliary = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    return {
        "model": model.eval(),
        "auxiliary": auxiliary.eval(),
        "train": (x[train_idx], y[train_idx]),
        "test": (x[test_idx], y[test_idx]),
    }


@pytest.mark.parametrize("name", FACTORIES)
def test_output_stays_in_the_epsilon_ball_and_unit_box(name):
    torch.manual_seed(1)
    model = build_model("digitscnn", 10, (1, 8, 8))
    x, y = _batch(24)
    x[:8] = 0.0  # pixels on both edges of the box: steps must not leave [0, 1]
    x[8:16] = 1.0
    x_before = x.clone()
    budget = Budget(epsilon=0.15, steps=3, step_size=0.1)  # steps overshoot the radius: projection must act
    x_adv = _attack(FACTORIES[name](budget), model, x, y, _batch(24))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert torch.equal(x, x_before)
    assert (x_adv - x).abs().max() <= 0.15 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert (x_adv - x).abs().max() >= 0.15 - 1e-6  # it did move, to the ball's edge somewhere


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
@pytest.mark.parametrize("name", FACTORIES)
def test_a_cuda_model_takes_cpu_batches_and_the_result_comes_back_to_the_cpu(name):
    """Crafting runs on the model's device whatever device the batches come from (a trigger crafted for a CUDA
    learner from CPU batches failed on an H100 before), and the result goes back where `x` was."""
    torch.manual_seed(1)
    model = build_model("digitscnn", 10, (1, 8, 8)).cuda()
    x, y = _batch(12)
    budget = Budget(epsilon=0.15, steps=2, step_size=0.1)
    x_adv = _attack(FACTORIES[name](budget), model, x, y, _batch(12))
    assert x_adv.device == x.device and (x_adv - x).abs().max() <= 0.15 + 1e-6


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: Budget(epsilon=-0.1), ValueError, "epsilon must be in"),
        (lambda: Budget(steps=0), ValueError, "steps must be >= 1"),
        (lambda: Budget(step_size=0.0), ValueError, "step_size must be > 0"),
        (lambda: PGDDelusive(Budget(), beta=-0.1), ValueError, "beta .* must be a finite number >= 0"),
        (lambda: TradesKL(Budget(), beta=0.1), ValueError, "needs the defender's auxiliary"),
        (lambda: TriggerCrafter(Budget(), beta=0.1), ValueError, "needs the defender's auxiliary"),
        (lambda: AccumulativePoison(Budget(), beta=0.05), ValueError, "needs the defender's auxiliary"),
        (lambda: AccumulativePoison(Budget(), gamma=-1.0), ValueError, "gamma .* >= 0"),
        (lambda: AccumulativePoison(Budget(), objective="both"), ValueError, "objective must be one of"),
        (lambda: PGDDelusive(Budget(), model_mode="training"), ValueError, "model_mode must be one of"),
        (lambda: CarliniWagnerInf(Budget(), kappa=-1.0), ValueError, "kappa .* >= 0"),
        (lambda: PGDDelusive(0.1), TypeError, "budget must be a Budget"),
        (lambda: build_attack("fgsm", Budget()), ValueError, "unknown attack 'fgsm'; expected one of pgd, trades_kl"),
    ],
)
def test_bad_construction_is_a_clear_error(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_accumulative_poison_needs_trigger_and_validation_unless_clean_only():
    model = build_model("digitscnn", 10, (1, 8, 8))
    x, y = _batch(8)
    with pytest.raises(ValueError, match="needs trigger=.* and validation="):
        AccumulativePoison(Budget())(model, x, y, trigger=_batch(8))
    assert AccumulativePoison(Budget(), objective="clean_only")(model, x, y).shape == x.shape


def test_registry_builds_each_simple_attack_with_its_budget_and_options():
    budget = Budget(epsilon=0.1, steps=3, step_size=0.03)
    assert {"pgd": PGDDelusive, "trades_kl": TradesKL, "cw_inf": CarliniWagnerInf} == ATTACKS
    for name, cls in ATTACKS.items():
        attack = build_attack(name, budget, model_mode="train")
        assert type(attack) is cls and attack.budget is budget and attack.model_mode == "train"
    assert build_attack("cw_inf", budget, kappa=2.0).kappa == 2.0


def test_second_order_direction_matches_central_finite_difference():
    torch.manual_seed(2)
    model = _tanh_net()
    trigger = (torch.rand(10, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    validation = (torch.rand(12, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (12,)))
    second_order = AccumulativePoison(Budget()).second_order_direction(model, trigger, validation)
    params = list(model.parameters())
    assert [h.shape for h in second_order] == [p.shape for p in params]

    def similarity():  # C(theta) = sum_l cos(g_l(S_T), g_l(S_val))
        return TriggerCrafter(Budget()).cosine_objective(model, *trigger, *validation)

    direction = [torch.randn_like(p) for p in params]
    h = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p.add_(sign * h * v)
        values.append(similarity())
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p.sub_(sign * h * v)
    finite_difference = (values[0] - values[1]) / (2 * h)
    analytic = sum((hl * v).sum() for hl, v in zip(second_order, direction, strict=True)).item()
    assert abs(analytic) > 1e-2  # a zero H would pass a loose check
    assert analytic == pytest.approx(finite_difference, rel=1e-6)


@pytest.mark.parametrize("objective", ["full", "second_order_only", "clean_only"])
def test_objective_gradient_wrt_input_matches_finite_difference(objective):
    torch.manual_seed(3)
    model = _tanh_net()
    x = torch.rand(10, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    reference = (torch.rand(10, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    attack = AccumulativePoison(Budget(), gamma=0.7, objective=objective)
    second_order = attack.second_order_direction(model, reference, reference)
    x_adv = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)  # away from x, where clean_only peaks
    (gradient,) = torch.autograd.grad(attack.objective_value(model, x_adv, x, y, second_order), x_adv)
    direction = torch.randn_like(x)
    h = 1e-6
    with torch.no_grad():
        plus = attack.objective_value(model, x_adv + h * direction, x, y, second_order).item()
        minus = attack.objective_value(model, x_adv - h * direction, x, y, second_order).item()
    analytic = (gradient * direction).sum().item()
    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx((plus - minus) / (2 * h), rel=1e-6)


def test_accumulative_objective_is_the_sum_of_its_ablations():
    torch.manual_seed(4)
    model = _tanh_net()
    x, y = torch.rand(8, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    reference = (torch.rand(8, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    second_order = AccumulativePoison(Budget()).second_order_direction(model, reference, reference)

    def value(objective, gamma):
        return AccumulativePoison(Budget(), gamma, objective).objective_value(model, x_adv, x, y, second_order).item()

    assert value("full", 2.0) == pytest.approx(value("clean_only", 2.0) + value("second_order_only", 2.0), abs=1e-12)
    assert value("clean_only", 2.0) == pytest.approx(2 * value("clean_only", 1.0), abs=1e-12)
    assert value("second_order_only", 2.0) == value("second_order_only", 1.0)  # gamma weighs only the clean term
    assert value("clean_only", 1.0) != pytest.approx(value("second_order_only", 1.0), abs=1e-3)
    # per-tensor normalisation: a batch's gradient against itself scores one per parameter tensor
    attack = AccumulativePoison(Budget(), objective="clean_only")
    assert attack.objective_value(model, x, x, y).item() == pytest.approx(4.0, abs=1e-9)
    assert TriggerCrafter(Budget()).cosine_objective(model, x, y, x, y) == pytest.approx(4.0, abs=1e-9)


def test_trigger_lowers_the_gradient_cosine_with_validation(digits):
    model = digits["model"]
    x, y = digits["train"][0][:100], digits["train"][1][:100]
    x_val, y_val = digits["test"][0][:200], digits["test"][1][:200]
    crafter = TriggerCrafter(Budget(epsilon=0.1, steps=4, step_size=0.03))
    before = crafter.cosine_objective(model, x, y, x_val, y_val)
    after = crafter.cosine_objective(model, crafter(model, x, y, x_val, y_val), y, x_val, y_val)
    assert after < before - 1.0  # a sum of 8 per-tensor cosines, in [-8, 8]


def test_error_maximising_attacks_raise_their_own_objective(digits):
    model = digits["model"]
    x, y = digits["test"][0][:200], digits["test"][1][:200]
    budget = Budget(epsilon=0.1, steps=5, step_size=0.03)
    with torch.no_grad():
        clean_logits = model(x)
        pgd_logits = model(PGDDelusive(budget)(model, x, y))
        trades_logits = model(TradesKL(budget)(model, x, y))
        cw_logits = model(CarliniWagnerInf(budget, kappa=0.0)(model, x, y))
    assert F.cross_entropy(pgd_logits, y) > F.cross_entropy(clean_logits, y) + 1.0
    assert F.kl_div(trades_logits.log_softmax(1), clean_logits.softmax(1), reduction="batchmean") > 0.5
    clean_cw = cw_margin(clean_logits, y).clamp(max=0).mean()
    assert clean_cw < -1.0  # a trained model: most samples correct by a margin
    assert cw_margin(cw_logits, y).clamp(max=0).mean() > clean_cw / 2


def test_trades_first_step_follows_the_kl_landscape(digits):
    # KL(f(x) || f(x')) is flat at x' = x; from the 1e-3 start one step already raises it about as much
    # as a CE step does (from x itself only rounding noise steers the sign: about a third of that)
    model = digits["model"]
    x, y = digits["test"][0][:200], digits["test"][1][:200]
    budget = Budget(epsilon=0.05, steps=1, step_size=0.05)
    with torch.no_grad():
        p_clean = model(x).softmax(1)
        kl = {name: F.kl_div(model(attack(model, x, y)).log_softmax(1), p_clean, reduction="batchmean").item()
              for name, attack in (("trades", TradesKL(budget)), ("pgd", PGDDelusive(budget)))}
    assert kl["trades"] > 0.5 * kl["pgd"] > 0.01


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_term_lowers_the_memorization_discrepancy(digits, name):
    model, auxiliary = digits["model"], digits["auxiliary"]
    x, y = digits["train"][0][:100], digits["train"][1][:100]
    reference = (digits["test"][0][:100], digits["test"][1][:100])
    budget = Budget(epsilon=0.1, steps=4, step_size=0.03)
    discrepancy = {}
    for beta in (0.0, 0.2, 1.0):
        torch.manual_seed(5)  # TradesKL's start noise: the same for all
        attack = FACTORIES[name](budget, auxiliary=auxiliary, beta=beta)
        discrepancy[beta] = memorization_discrepancy(auxiliary, model, _attack(attack, model, x, y, reference)).mean()
    # scale-free beta: the paper's 0.2 already shows (measured 0.80-0.91x), 1 hides most of it (0.06-0.13x)
    assert discrepancy[0.2] < 0.97 * discrepancy[0.0]
    assert discrepancy[1.0] < 0.3 * discrepancy[0.0]


@pytest.mark.parametrize("name", FACTORIES)
def test_beta_zero_is_the_plain_attack_bit_for_bit(name):
    torch.manual_seed(8)
    model, auxiliary = build_model("digitscnn", 10, (1, 8, 8)), build_model("digitscnn", 10, (1, 8, 8))
    x, y = _batch(16)
    reference = _batch(16)
    budget = Budget(epsilon=0.1, steps=3, step_size=0.04)
    crafted = []
    for options in ({}, {"auxiliary": auxiliary, "beta": 0.0}):
        torch.manual_seed(9)  # random and TRADES starts: the same for both
        crafted.append(_attack(FACTORIES[name](budget, **options), model, x, y, reference))
    assert torch.equal(crafted[0], crafted[1])


def test_beta_zero_pgd_is_the_signed_gradient_ascent_on_the_loss():
    torch.manual_seed(10)
    model, auxiliary = build_model("digitscnn", 10, (1, 8, 8)), build_model("digitscnn", 10, (1, 8, 8))
    x, y = _batch(16)
    budget = Budget(epsilon=0.1, steps=3, step_size=0.04)
    expected = x.clone()
    for _ in range(budget.steps):  # the algorithm written out: ascend CE by signed steps, project
        expected.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(expected), y), expected)
        expected = budget.project(expected.detach() + budget.step_size * grad.sign(), x)
    assert torch.equal(PGDDelusive(budget, auxiliary=auxiliary, beta=0.0)(model, x, y), expected)


class _ScaledPGD(PGDDelusive):
    """PGD with its loss multiplied by a power of two: the same attack on another scale, exactly."""

    def _objective(self, model, x, y):
        objective = super()._objective(model, x, y)

        def scaled(x_adv):
            value, logits = objective(x_adv)
            return 1024.0 * value, logits

        return scaled


def test_beta_does_not_depend_on_the_scale_of_the_objective(digits):
    model, auxiliary = digits["model"], digits["auxiliary"]
    x, y = digits["train"][0][:64], digits["train"][1][:64]
    budget = Budget(epsilon=0.1, steps=3, step_size=0.03)
    crafted = {cls: cls(budget, auxiliary=auxiliary, beta=1.0)(model, x, y) for cls in (PGDDelusive, _ScaledPGD)}
    assert torch.equal(crafted[PGDDelusive], crafted[_ScaledPGD])
    assert not torch.equal(crafted[PGDDelusive], PGDDelusive(budget)(model, x, y))  # the MD term did steer


def test_adaptive_trigger_hides_from_the_auxiliary_and_still_opposes_validation(digits):
    model, auxiliary = digits["model"], digits["auxiliary"]
    x, y = digits["train"][0][:100], digits["train"][1][:100]
    x_val, y_val = digits["test"][0][:200], digits["test"][1][:200]
    budget = Budget(epsilon=0.1, steps=4, step_size=0.03)
    plain = TriggerCrafter(budget)
    adaptive = TriggerCrafter(budget, auxiliary=auxiliary, beta=1.0)
    assert adaptive.auxiliary is auxiliary and adaptive.beta == 1.0
    triggers = {crafter: crafter(model, x, y, x_val, y_val) for crafter in (plain, adaptive)}
    discrepancy = {c: memorization_discrepancy(auxiliary, model, t).mean() for c, t in triggers.items()}
    cosine = {c: plain.cosine_objective(model, t, y, x_val, y_val) for c, t in triggers.items()}
    clean_cosine = plain.cosine_objective(model, x, y, x_val, y_val)
    assert discrepancy[adaptive] < 0.5 * discrepancy[plain]  # measured 0.13x
    # hiding costs some of the trigger's strength (measured -2.9 clean, -6.8 plain, -5.8 adaptive), not all
    assert cosine[adaptive] < clean_cosine - 1.5
    assert cosine[plain] < cosine[adaptive]


def test_poisoned_sgd_step_costs_more_accuracy_than_the_clean_step(digits):
    model = digits["model"]
    (x_train, y_train), (x_test, y_test) = digits["train"], digits["test"]
    attack = PGDDelusive(Budget(epsilon=0.1, steps=5, step_size=0.03))
    differences = []
    for seed in range(10):
        batch = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))[:100]
        x, y = x_train[batch], y_train[batch]
        accuracies = []
        for inputs in (x, attack(model, x, y)):
            learner = copy.deepcopy(model).train()
            optimizer = torch.optim.SGD(learner.parameters(), lr=0.3)
            F.cross_entropy(learner(inputs), y).backward()
            optimizer.step()
            accuracies.append(_accuracy(learner.eval(), x_test, y_test))
        differences.append(accuracies[0] - accuracies[1])
    differences = torch.tensor(differences)
    assert _accuracy(model, x_test, y_test) > 0.9
    assert differences.mean() > 0.1
    assert (differences > 0).sum() >= 8


def _bn_dropout_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(64, 10)
    )


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("crafting_mode", ["eval", "train"])
def test_attacks_restore_mode_and_leave_grads_and_buffers_alone(name, crafting_mode):
    torch.manual_seed(6)
    model, auxiliary = _bn_dropout_net(), _bn_dropout_net()
    model[1].eval()  # a frozen BatchNorm inside a training model: per-module modes must survive
    auxiliary.train()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 7.0) if i % 2 else None
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    modes_before = [m.training for m in model.modules()]
    states_before = [copy.deepcopy(net.state_dict()) for net in (model, auxiliary)]
    attack = FACTORIES[name](Budget(epsilon=0.1, steps=2, step_size=0.05), model_mode=crafting_mode,
                             auxiliary=auxiliary, beta=0.1)
    x, y = _batch(16, shape=(1, 4, 4))
    with torch.no_grad():  # callers may hold no_grad; attacks still need gradients
        _attack(attack, model, x, y, _batch(16, shape=(1, 4, 4)))
    assert [m.training for m in model.modules()] == modes_before
    assert auxiliary.training and all(m.training for m in auxiliary.modules())
    for p, before in zip(params, grads_before, strict=True):
        assert (p.grad is None) if before is None else torch.equal(p.grad, before)
    assert all(p.grad is None for p in auxiliary.parameters())
    for net, before in zip((model, auxiliary), states_before, strict=True):
        after = net.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_model_mode_is_a_real_choice_for_batchnorm():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    x, y = _batch(32, shape=(1, 4, 4))
    x = 0.5 * x + 0.5  # batch statistics far from the fresh running statistics (mean 0, var 1)
    budget = Budget(epsilon=0.1, steps=3, step_size=0.05)
    crafted = {mode: PGDDelusive(budget, model_mode=mode)(model, x, y) for mode in ("eval", "train")}
    assert not torch.equal(crafted["eval"], crafted["train"])
    with torch.no_grad():  # each raises the loss of the forward it was crafted against
        model.train()
        model[1].track_running_stats = False  # batch statistics, without moving the running ones
        assert F.cross_entropy(model(crafted["train"]), y) > F.cross_entropy(model(crafted["eval"]), y)


def test_a_gate_evading_trigger_is_blended_under_the_attackers_own_threshold():
    """Its copy of the gate flags the full trigger; the blend it sends is under that threshold, and moved
    toward the trigger as far as the bisection allows."""
    import torch.nn.functional as F

    from attacker_sim.attacks import Budget, TriggerCrafter
    from attacker_sim.attacks.gate_evasion import GateEvasion
    from service.core.config import StrategyConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=generator) * 2
    y_all = torch.randint(0, 4, (400,), generator=generator)
    x_all = (centers[y_all] + torch.randn(400, 16, generator=generator)).view(400, 1, 4, 4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for start in range(0, 300, 20):  # a model that has learned the task
        optimizer.zero_grad()
        F.cross_entropy(net(x_all[start:start + 20]), y_all[start:start + 20]).backward()
        optimizer.step()
    x_val, y_val, x, y = x_all[300:380], y_all[300:380], x_all[380:], y_all[380:]
    evasion = GateEvasion(x_val, y_val, lr=1.0, batch_size=20, calibration_updates=16, seed=0)
    threshold = evasion.calibrate(net)
    x_trigger = TriggerCrafter(Budget(1.0, 5, 0.5))(net, x, y, x_val, y_val)
    full = evasion._increase(net, x_trigger, y)
    blended, alpha = evasion.blend(net, x, x_trigger, y)
    assert full > threshold, (full, threshold)  # the whole trigger would be flagged
    assert 0.0 < alpha < 1.0
    assert evasion._increase(net, blended, y) <= threshold
    # Kerckhoffs: the attacker's copy chooses its threshold's level as the shipped gate does
    assert evasion.gate.level_rule == StrategyConfig().gate_level_rule
    # a batch under the stream's size: under 'pace' the gate applies it at its share (15/20) and the attacker's
    # lookahead measures it so, where one that looked ahead at a whole step would blend less in than the gate lets pass
    assert evasion.gate.size_rule == StrategyConfig().gate_size_rule
    paced, whole = (GateEvasion(x_val, y_val, lr=1.0, batch_size=20, calibration_updates=16, size_rule=rule, seed=0)
                    for rule in ("pace", "configured"))
    assert paced.calibrate(net) == whole.calibrate(net) == threshold
    x_few, y_few, x_few_trigger = x[:15], y[:15], x_trigger[:15]
    assert whole._increase(net, x_few_trigger, y_few) > whole.gate.threshold  # flagged judged as a whole step
    assert paced._increase(net, x_few_trigger, y_few) < whole._increase(net, x_few_trigger, y_few)
    assert paced.blend(net, x_few, x_few_trigger, y_few)[1] > whole.blend(net, x_few, x_few_trigger, y_few)[1]
    # under 'pace_rungs' (the default) the blend stays under the threshold of the batch's rung (calibrated on paced
    # clean batches of that size on first use; set here between the clean batch's increase and the trigger's)
    rungs = GateEvasion(x_val, y_val, lr=1.0, batch_size=20, calibration_updates=16, size_rule="pace_rungs", seed=0)
    rungs.calibrate(net)
    assert rungs.blend(net, x_few, x_few_trigger, y_few)[1] == 1.0 and rungs.gate.sized  # the rung's gate, made
    clean, trigger = rungs._increase(net, x_few, y_few), rungs._increase(net, x_few_trigger, y_few)
    sized = rungs.gate.for_size(15)
    sized.threshold = (clean + trigger) / 2
    blended, alpha = rungs.blend(net, x_few, x_few_trigger, y_few)
    assert 0.0 < alpha < 1.0 and rungs._increase(net, blended, y_few) <= sized.threshold < rungs.gate.threshold


class _RowAttention(nn.Module):
    """A user's transformer in miniature: the image's 8 rows as tokens, one encoder layer (attention through
    torch's scaled_dot_product_attention, whose fused CPU kernel has no second derivative)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.encoder(x.flatten(1, 2)).mean(1))


@pytest.mark.parametrize("name", ["trigger", "accumulative_full", "accumulative_second_order_only"])
def test_second_order_attacks_craft_against_a_network_with_attention(name):
    torch.manual_seed(0)
    model = _RowAttention()
    (x, y), reference = _batch(6), _batch(6)
    budget = Budget(epsilon=0.1, steps=2, step_size=0.05)
    x_adv = _attack(FACTORIES[name](budget), model, x, y, reference)
    assert (x_adv - x).abs().max() <= budget.epsilon + 1e-6 and (x_adv != x).any()


def test_an_operation_without_a_second_derivative_is_named_in_the_attacks_terms():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Hardsigmoid(), nn.Linear(16, 10))  # as MobileNetV3
    (x, y), reference = _batch(6), _batch(6)
    budget = Budget(epsilon=0.1, steps=2, step_size=0.05)
    with pytest.raises(RuntimeError, match=r"^TriggerCrafter differentiates the model's parameter gradient .*"
                                           r"hardsigmoid_backward.*the first-order attacks"):
        _attack(FACTORIES["trigger"](budget), model, x, y, reference)
    x_adv = _attack(FACTORIES["pgd"](budget), model, x, y, reference)  # a first-order attack crafts as ever
    assert (x_adv - x).abs().max() <= budget.epsilon + 1e-6 and (x_adv != x).any()
