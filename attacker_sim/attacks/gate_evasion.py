"""An attacker that knows guard's update gate and keeps every batch it sends under the gate's threshold.

Kerckhoffs: it knows the algorithm (`service/core/defense/update_gate.py`, with the threshold level's rule the
product ships: `StrategyConfig().gate_level_rule`, and the rule for batches of another size the defender runs,
`gate_size_rule`: a batch under the stream's size is looked ahead at its pace, as the gate applies it), its false-flag
target and the stream's learning rate, not the defender's trusted split. So it runs the same gate on its own
validation split: calibrates a threshold there, and before sending a trigger batch it blends the trigger with the clean
batch it came from, x = x_clean + alpha * (x_trigger - x_clean), taking the largest alpha (by bisection)
whose update its own lookahead puts under its own threshold. A gate that judges one update at a time then
lets every such batch through whole; the attacker sends many of them, each re-crafted against the model
as it now stands, to add up the damage one gate-sized step at a time.

>>> import torch
>>> from attacker_sim.attacks import Budget, TriggerCrafter
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> x_val, y_val = torch.rand(40, 1, 2, 2), torch.randint(0, 3, (40,))
>>> evasion = GateEvasion(x_val, y_val, lr=0.5, batch_size=6, target_false_flag_rate=0.1, calibration_updates=8)
>>> x, y = torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,))
>>> x_trigger = TriggerCrafter(Budget(0.2, 2, 0.2))(net, x, y, x_val, y_val)
>>> blended, alpha = evasion.blend(net, x, x_trigger, y)
>>> 0.0 <= alpha <= 1.0, bool(((blended - x).abs() <= (x_trigger - x).abs() + 1e-6).all())
(True, True)
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from service.core.config import StrategyConfig
from service.core.defense.update_gate import UpdateGate
from service.core.device import model_device


class GateEvasion:
    """The attacker's copy of the gate, on its own data, and the blend that stays under it."""

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, *, lr: float, batch_size: int,
                 target_false_flag_rate: float = 0.1, calibration_updates: int = 32, bisections: int = 6,
                 level_rule: str = StrategyConfig().gate_level_rule,
                 size_rule: str = StrategyConfig().gate_size_rule, seed: int = 0):
        if lr <= 0 or bisections < 1:
            raise ValueError(f"lr must be > 0 and bisections >= 1, got lr={lr}, bisections={bisections}")
        self.gate = UpdateGate(x_val, y_val, batch_size=batch_size, target_false_flag_rate=target_false_flag_rate,
                               calibration_updates=calibration_updates, level_rule=level_rule, size_rule=size_rule,
                               seed=seed)
        self.lr, self.bisections = lr, bisections

    def calibrate(self, model: nn.Module) -> float:
        """The attacker's estimate of the defender's threshold, from the model as it stands."""
        return self.gate.calibrate(model, torch.optim.SGD(model.parameters(), lr=self.lr))

    def _increase(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The lookahead of one SGD step on (x, y), measured on the attacker's probe."""
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        optimizer.zero_grad(set_to_none=True)
        device = model_device(model)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        try:
            return self.gate.increase(model, optimizer, size=len(y))
        finally:
            optimizer.zero_grad(set_to_none=True)

    def blend(self, model: nn.Module, x_clean: torch.Tensor, x_trigger: torch.Tensor,
              y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The trigger blended into its clean batch as far as the attacker's gate lets through, and alpha."""
        if self.gate.threshold is None:
            self.calibrate(model)
        sized = self.gate.for_size(len(y))  # the gate of the batch's size (itself, but under the rung size rules)
        if sized.threshold is None:
            sized.calibrate(model, torch.optim.SGD(model.parameters(), lr=self.lr))
        model = copy.deepcopy(model).train()  # lookaheads on a copy: the attacker's model is left as it is
        low, high = 0.0, 1.0
        if self._increase(model, x_trigger, y) <= sized.threshold:
            return x_trigger, 1.0
        for _ in range(self.bisections):
            mid = (low + high) / 2
            if self._increase(model, x_clean + mid * (x_trigger - x_clean), y) <= sized.threshold:
                low = mid
            else:
                high = mid
        return x_clean + low * (x_trigger - x_clean), low
