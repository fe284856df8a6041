"""The trusted-update gate: judge each proposed update by what it would do to trusted data, before it lands.

A trigger batch exists to cost accuracy in one step; its gradient points against the gradient of clean
data. Honest batches, drifted ones included, are learned without hurting what the model already knows.
So the gate looks ahead: for the update the optimizer is about to take, it measures the increase of the
cross-entropy on a trusted *probe* set (at most 256 samples of the defender's trusted split) that the
batch's own gradient g causes,

    delta(s) = CE_probe(theta - lr * (momentum * buffer + decay * theta + s * g))
             - CE_probe(theta - lr * (momentum * buffer + decay * theta)),

(the mean over probe samples of each one's loss change; with `probe_winsor` = q > 0 each change is first clamped to
the q and 1 - q quantiles of the changes the last calibration's clean updates caused, so that no hard trusted
sample decides a verdict alone: tried at 0.01 against the false flags late in a memorised stream, within noise),
the second term being where the step goes without the batch (momentum and weight decay are the optimizer's,
the same whatever the batch: judging them too would flag every update of a model whose momentum points
uphill, and calibrations taken with an empty buffer would not fit the stream's; `lookahead_from="model"` leaves
them out of both points instead, so that delta measures the batch's own step from the model as it stands, whatever
the buffer's phase: tried on MNIST, docs/results.md). It judges the batch against
a threshold calibrated on that split: `threshold` is the finite-sample (conformal) upper quantile, at level
(1 - target_false_flag_rate), of delta(1) over updates on clean batches drawn from the trusted split the way
the stream draws them (same batch size, with replacement: a fresh population, not a reshuffle of a couple of
hundred samples), each measured on the trusted samples *not* in its batch (cross-fitting: a stream batch is
never in the probe either), from the current model. With `level_rule="cross_half_first"` (the strategy's default)
the level is chosen at the first calibration instead, and kept (`"cross_half"`: at every calibration, 2.5x the step
cost on digits for the same rates), at least (1 - target_false_flag_rate): a few hundred trusted images
set a threshold that another draw of images would set elsewhere, and the realised rate, bounded below by 0,
averages above the target over such draws (digits, 20 development seeds: 17% late in a stream, for 10%). So the
split is halved `level_splits` times; a threshold from one half's updates is judged on the other half's; the level is
the lowest whose rate, extrapolated from a half to the whole split, meets the target (`_level_for`; 20 development
seeds: 6% early, 12% late). An update above the threshold is *flagged*, and the
action shrinks it (`shrink`), drops it (`skip`) or leaves it to the norm cap like any update (`cap`: the
flag is reported, not acted on; on digits' development seeds within noise of `shrink`, docs/results.md).
Shrinking measures one more point, s0 = threshold /
delta(1), and takes the largest s that the chords through (0, 0), (s0, delta(s0)) and (1, delta(1)) keep under
the threshold: where the probe loss curves upward along the update (as around a trained model, and more so
around one an accumulative attack has made fragile) a chord lies above the curve, so the shrunk update stays
under the threshold without a search (one forward, where halving took up to six). An update under the
threshold is not shrunk (only capped, below), so honest drift is learned at a clean batch's pace. The threshold
is recalibrated every
`recalibrate_every` updates, since clean updates change size as the model converges or drifts. With momentum,
sooner at the start: the stream's optimizer is fresh and its buffer fills over about 1 / (1 - momentum)
updates, while the model leaves the burn-in's state, so the first recalibration comes after
ceil(1 / (1 - momentum)) updates and the interval doubles after each one up to `recalibrate_every` (a
threshold kept from the first update for 100 flagged 35% of clean CIFAR-10 batches against a 10% target;
recalibrated after 40, 5%). Without momentum every interval is `recalibrate_every`, unless `first_interval` is set:
then the schedule starts at that many updates and doubles, with momentum or without. A stream's optimizer moves a
model from the state its own training left it in whatever its momentum (a user's MLP with dropout, its threshold 0
at the deployed state where every clean update lowered the probe loss, flagged 65% of clean batches over the next 60
updates without momentum, 12% recalibrated every 10; 49% and 22% of its eval's clean batches without and with
`first_interval=10`); on the digits profile's converged models the early recalibrations raised the fresh false flags
from 6.6% / 8.6% to 14.5% / 12.8%, so it is not the default (docs/results.md, eighteenth session). A calibration
whose threshold is 0, though, is always followed by the next within `recalibrate_after_zero` updates (10 by
default), the interval doubling from there: a threshold of 0 says that nearly every clean trusted update lowered the
probe loss, a state of the model the stream soon ends, and until it is measured again every update that raises the
probe loss at all is flagged (a user's CNN: 71% of 100 clean batches; 12% recalibrated after 10).

Every update is also capped (`norm_cap`, default the inf-norm in the strategy's settings): its gradient is scaled
down to at most the `cap_level` quantile (0.2 by default) of the norms of clean trusted gradients, measured once
over `cap_updates` (256) of them at the first calibration, on the model as deployed (`cap_anchor="first"`), or over
each calibration's updates on the current model (`"current"`); where the update is also flagged, the smaller of
the two scales is applied. Anchored, because clean trusted updates shrink as the model memorises its stream: on
digits (development seed 2000) the following cap fell from 0.036 to 0.004-0.009 over 3,000 batches, and a
one-pixel shift arriving then was learnt at 25% of ST's gain (79% anchored). Over 256 gradients, because a low
quantile of a calibration's 32 moved up to 4x between draws on the same model, and an anchored cap keeps its draw.
The cap is not a verdict (it flags nothing): it says that no batch moves the model further than the smaller
clean batches do, which is what a gradient clip does, with its bound measured on trusted data instead of tuned.
An accumulative poison moves the model 3-10x further than a clean batch (digits, development seeds 2000-2001:
inf-norm median 0.40-0.53 against 0.04-0.11), and learns little under the cap; an honest drifted batch is
learned slower (median 0.13-0.21), and so is a fresh clean one. The level trades the two; on digits' development
seeds 2000-2003, 0.2 is the lowest level that learns every drift kind, early and after 1,000 clean batches, at
>= 80% of ST's gain (0.1 learnt the late pixel shift at 79.x%; docs/results.md). The lookahead still judges the
whole update, so its verdict and its false-flag rate are the ones it was calibrated for.

A batch of another size than `batch_size` (clients send what the API accepts): its clean updates spread wider the
smaller it is (a mean over fewer samples), so judged whole by the threshold of `batch_size` a small batch is flagged far
more often than the target (MNIST, stream size 100: clean batches of 10 flagged 40-43%), and each of its samples moves
the model further than one of a full batch. Under `size_rule="pace"` a batch of n < `batch_size` samples is applied at
n / batch_size of its mean gradient, so that no sample moves the model further than one of a full batch, and the gate
judges that update against the threshold of `batch_size` (clean batches of 10: 2-7% flagged; a trigger sent in batches
of 10 left 93.5% accuracy, 90.7% judged whole). That threshold is loose for a paced update (digits: 0.169, where paced
clean batches of 10 put their quantile at 0.034), and an attacker who knows the gate blends its small triggers up to
it. Under `"pace_rungs"` (the strategy's default) the paced update is judged instead by the threshold of its rung
(`rung`), calibrated on clean trusted batches of that size applied at the same share (`clean_scale`) on first use,
sharing the cap and the level of the first calibration: clean batches of 10 and 3 flagged 7-12% (digits), the
gate-aware attacker of batches of 10 held at 95.7% where `pace` held it at 94.4% (digits, development seeds;
docs/results.md, twentieth session). `"rungs"` calibrates a threshold for each size on whole steps: clean batches of
10 were flagged 13-17%, but a trigger of batches of 10 passed unshrunk (87.4%): a small batch's whole step is as noisy
as its threshold is loose. A batch of `batch_size` or more is judged as under `"configured"` by every rule but
`"rungs"`.

A model with BatchNorm also learns through its running statistics, which the batch's forward moves before any
verdict. The gate is handed them as they were before (`judge(statistics=...)`), moves them only as far as the action
lets the update go (a skipped batch moves none), and caps the move as it caps the gradient: no further than clean
trusted batches' moves at the cap's level, measured with the cap; what the cap cuts is made up by a clean trusted
batch's move, so the statistics keep up with the weights (`running_statistics`, `_move_statistics`). The verdict
stays on the weights: judging the move too put the threshold of a briefly trained ResNet-18 at 0 (a clean trusted
batch's move towards fresh statistics lowers the probe's loss) and flagged half its clean batches. Without the cap,
30 batches of white images, never flagged, took a BatchNorm digits CNN from 98% to 42% under guard; with it, to 67%:
capped moves in one direction still add up (docs/results.md, thirteenth session).

>>> import torch
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
>>> x, y = torch.rand(40, 1, 2, 2), torch.randint(0, 3, (40,))
>>> gate = UpdateGate(x, y, batch_size=8, target_false_flag_rate=0.1, seed=0)
>>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
>>> threshold = gate.calibrate(net, opt)
>>> threshold == gate.threshold, len(gate.history), gate.history[0]["updates"]
(True, 1, 32)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from service.core.defense.calibration import conformal_quantile
from service.core.defense.eval_mode import eval_mode, training_mode_frozen_stats
from service.core.defense.running_statistics import (
    Statistics,
    after_batch,
    move_size,
    moved,
    put,
    snapshot,
    tracking_norms,
)
from service.core.device import model_device
from service.core.randomness import CALIBRATION, SIZE_RUNG, key_seed, seeded_draws

ACTIONS = ("shrink", "skip", "cap", "drop", "drop_lies")
NORMS = {"2": 2.0, "inf": float("inf")}  # the update norms the cap can bound
CAP_ANCHORS = ("current", "first")  # the cap follows every calibration, or stays at the first one's
# the threshold's level: 1 - target; chosen across halves of the split at every calibration; or at the first only
LEVEL_RULES = ("conformal", "cross_half", "cross_half_first")
# where the lookahead starts: the optimizer's step without the batch (momentum and decay), or the model itself
LOOKAHEAD_FROM = ("momentum_step", "model")
# a batch of another size than `batch_size`: judged by the threshold calibrated at `batch_size` ('configured'); by one
# calibrated at its own size, rounded to a rung of batch_size * 2 ** (k / 2) ('rungs'); or, under `batch_size`, applied
# at size / batch_size of its mean gradient, so that no sample moves the model further than one of a full batch, and
# judged so by the threshold of `batch_size` ('pace'), or by one calibrated on clean batches of its rung applied at the
# same share ('pace_rungs')
SIZE_RULES = ("configured", "rungs", "pace", "pace_rungs")
PACED = ("pace", "pace_rungs")  # the rules that apply a small batch at its share of a full one


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided about one update: the statistic, the threshold, and the scale applied."""

    increase: float  # delta(1): increase of the probe cross-entropy the whole update would cause
    threshold: float
    flagged: bool  # above the threshold
    scale: float  # the share of the batch's gradient that was applied
    norm: float | None = None  # the gradient's norm, when the gate caps norms
    cap: float | None = None
    dropped: tuple[int, ...] = ()  # action 'drop': the batch's samples left out of the update (indices)


class UpdateGate:
    """Calibrated from the trusted split once (`calibrate`), then asked about every update (`judge`)."""

    def __init__(self, trusted_x: torch.Tensor, trusted_y: torch.Tensor, *, batch_size: int,
                 target_false_flag_rate: float = 0.1, calibration_updates: int = 32, recalibrate_every: int = 100,
                 action: str = "shrink", probe_samples: int = 256, norm_cap: str | None = None,
                 cap_level: float = 0.2, cap_anchor: str = "first", cap_updates: int = 256, calibration_window: int = 1,
                 probe_winsor: float = 0.0, level_rule: str = "conformal", level_splits: int = 4,
                 lookahead_from: str = "momentum_step", first_interval: int | None = None,
                 recalibrate_after_zero: int | None = 10, size_rule: str = "pace_rungs", seed: int = 0):
        if len(trusted_x) < 4 or len(trusted_x) != len(trusted_y):
            raise ValueError(f"the gate needs at least 4 labelled trusted samples, got {len(trusted_x)} inputs "
                             f"and {len(trusted_y)} labels")
        if not 0 < target_false_flag_rate < 1:
            raise ValueError(f"target_false_flag_rate must be in (0, 1), got {target_false_flag_rate}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
        counts = {"calibration_updates": calibration_updates, "recalibrate_every": recalibrate_every,
                  "batch_size": batch_size, "cap_updates": cap_updates, "calibration_window": calibration_window,
                  "level_splits": level_splits, "first_interval": 1 if first_interval is None else first_interval,
                  "recalibrate_after_zero": 1 if recalibrate_after_zero is None else recalibrate_after_zero}
        for name, count in counts.items():
            if count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        if probe_samples < 4:
            raise ValueError(f"probe_samples must be >= 4, got {probe_samples}")
        if norm_cap is not None and norm_cap not in NORMS:
            raise ValueError(f"norm_cap must be one of {', '.join(NORMS)} or None, got {norm_cap!r}")
        if action == "cap" and norm_cap is None:
            raise ValueError("action 'cap' bounds a flagged update by the norm cap alone: it needs norm_cap")
        if not 0 < cap_level <= 1:
            raise ValueError(f"cap_level must be in (0, 1], got {cap_level}")
        if not 0 <= probe_winsor < 0.5:
            raise ValueError(f"probe_winsor must be in [0, 0.5), got {probe_winsor}")
        if level_rule not in LEVEL_RULES:
            raise ValueError(f"level_rule must be one of {', '.join(LEVEL_RULES)}, got {level_rule!r}")
        if lookahead_from not in LOOKAHEAD_FROM:
            raise ValueError(f"lookahead_from must be one of {', '.join(LOOKAHEAD_FROM)}, got {lookahead_from!r}")
        if cap_anchor not in CAP_ANCHORS:
            raise ValueError(f"cap_anchor must be one of {', '.join(CAP_ANCHORS)}, got {cap_anchor!r}")
        if size_rule not in SIZE_RULES:
            raise ValueError(f"size_rule must be one of {', '.join(SIZE_RULES)}, got {size_rule!r}")
        self.trusted = (trusted_x, trusted_y)
        # the probe: at most `probe_samples` trusted samples, fixed once, so that a lookahead costs a bounded
        # forward whatever the size of the trusted split (1,000 MNIST images made a step 23x ST's)
        if len(trusted_x) <= probe_samples:
            self.probe = torch.arange(len(trusted_x))
        else:
            self.probe = torch.randperm(len(trusted_x), generator=torch.Generator().manual_seed(seed))[:probe_samples]
        self.batch_size = batch_size
        self.norm_cap, self.cap_level, self.cap_anchor, self.cap_updates = norm_cap, cap_level, cap_anchor, cap_updates
        self.target = target_false_flag_rate
        self.level = 1.0 - target_false_flag_rate  # the conformal level of the threshold (cross_half: the last chosen)
        self.level_rule, self.level_splits = level_rule, level_splits
        self.calibration_updates, self.recalibrate_every = calibration_updates, recalibrate_every
        self.first_interval, self.recalibrate_after_zero = first_interval, recalibrate_after_zero
        self.calibration_window = calibration_window
        self.probe_winsor = probe_winsor
        self.bounds: tuple[float, float] | None = None  # where a probe sample's loss change is clamped (winsor)
        self.increases: list[list[float]] = []  # the clean increases of the last `calibration_window` calibrations
        self.action = action
        self.lookahead_from = lookahead_from
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.threshold: float | None = None
        self.cap: float | None = None
        self.statistics_cap: float | None = None  # the cap on a batch's move of BatchNorm's running statistics
        self.updates_since_calibration = 0
        self.calibrations = 0
        self.history: list[dict] = []  # one entry per calibration: when, the threshold, the clean increases seen
        self.size_rule = size_rule
        self.sized: dict[int, UpdateGate] = {}  # size_rule 'rungs', 'pace_rungs': the gates of the other rungs
        self.clean_scale = 1.0  # the share of their gradient the calibration's clean updates take ('pace_rungs')

    def _probe_losses(self, model: nn.Module) -> torch.Tensor:
        """Per-sample cross-entropy on the probe, as predictions are made (eval mode)."""
        device = model_device(model)
        x, y = self.trusted[0][self.probe].to(device), self.trusted[1][self.probe].to(device)
        with torch.no_grad(), eval_mode(model):
            return F.cross_entropy(model(x), y, reduction="none").cpu()

    def _losses_after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, params, grads,
                           scale: float) -> torch.Tensor:
        """Per-sample probe losses after the optimizer's step with the gradient scaled by `scale` (0: the step
        without the batch: momentum and weight decay only; with `lookahead_from="model"` both are left out, and
        scale 0 is the model as it stands); the parameters are put back."""
        saved = [p.detach().clone() for p in params]
        group = optimizer.param_groups[0]
        lr, momentum, decay = group["lr"], group.get("momentum", 0.0), group.get("weight_decay", 0.0)
        if self.lookahead_from == "model":
            momentum = decay = 0.0
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                step = scale * g + decay * p
                buffer = optimizer.state.get(p, {}).get("momentum_buffer")
                if momentum and buffer is not None:
                    step = momentum * buffer + step
                p.sub_(lr * step)
        try:
            return self._probe_losses(model)
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved, strict=True):
                    p.copy_(value)

    def calibrate(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """Set the threshold (and the cap) from updates on clean trusted batches, taken from the current model.

        The clean gradients are taken with dropout on, as the stream's are; their masks come from a generator
        seeded by the gate's seed and the calibration's number, not from torch's global one, so that a calibration
        is the same whatever ran before it (three learners made ready from one MNIST burn-in measured three caps)
        and the stream's own draws are left as they were."""
        with seeded_draws(model_device(model), key_seed(self.seed, CALIBRATION, self.calibrations)):
            return self._calibrate(model, optimizer)

    def _calibrate(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        # the step without any batch is the same for every calibration update: its probe losses are measured once
        base = self._losses_after_step(model, optimizer, params, [torch.zeros_like(p) for p in params], 0.0)
        norms: list[float] = []
        moves: list[float] = []
        changes = self._clean_changes(model, optimizer, params, base, self.calibration_updates, norms=norms,
                                      moves=moves)
        if self.probe_winsor:
            every = torch.cat(changes)
            self.bounds = (float(torch.quantile(every, self.probe_winsor)),
                           float(torch.quantile(every, 1.0 - self.probe_winsor)))
        increases = [self._statistic(change) for change in changes]
        if self.norm_cap and self.cap is None and self.cap_anchor == "first":
            # the anchored cap is measured once and kept: a low quantile of a few dozen norms moved 4x between draws
            # of the same model's clean batches (digits), so it takes `cap_updates` gradients (norms only, no lookahead)
            before = snapshot(model)
            for _, grads, after in self._clean_gradients(model, params, max(self.cap_updates - len(norms), 0)):
                norms.append(self._norm(grads))
                moves.append(move_size(before, after))
        measured = float(torch.quantile(torch.tensor(norms), self.cap_level)) if self.norm_cap else None
        if self.cap is None or self.cap_anchor == "current":
            self.cap = measured
            # BatchNorm's running statistics, capped as the gradient is: no batch moves them further than the clean
            # trusted batches at the cap's level do (30 batches of white images, never flagged, took the statistics,
            # and a BatchNorm digits model with them, from 98% to 42%; docs/results.md)
            self.statistics_cap = (float(torch.quantile(torch.tensor(moves), self.cap_level))
                                   if self.norm_cap and tracking_norms(model) else None)
        self.increases = [*self.increases, increases][-self.calibration_window:]
        values = torch.tensor([value for calibration in self.increases for value in calibration])
        if self.level_rule == "cross_half" or (self.level_rule == "cross_half_first" and not self.calibrations):
            self.level = self._cross_half_level(model, optimizer, params, base)
        # never below zero: an update that does not raise the probe loss is never suspicious
        self.threshold = max(conformal_quantile(values, self.level), 0.0)
        self.updates_since_calibration = 0
        self.calibrations += 1
        self.history.append({"threshold": self.threshold, "increase_median": float(values.median()),
                             "increase_max": float(values.max()), "cap": self.cap, "cap_measured": measured,
                             "updates": self.calibration_updates, "pooled": len(values), "cap_updates": len(norms),
                             "level": self.level})
        return self.threshold

    def _clean_changes(self, model: nn.Module, optimizer: torch.optim.Optimizer, params, base: torch.Tensor,
                       count: int, pool: torch.Tensor | None = None, norms: list[float] | None = None,
                       moves: list[float] | None = None):
        """The probe's per-sample loss changes of `count` updates on clean trusted batches (drawn from `pool`, by
        default the whole split), each on the probe samples not in its batch (cross-fitting: a stream batch is
        never in the probe either); their gradients' norms are appended to `norms` when the gate caps norms."""
        changes = []
        before = snapshot(model) if moves is not None else None  # only where the moves' sizes are asked for
        for pick, grads, after in self._clean_gradients(model, params, count, pool):
            keep = torch.ones(len(self.trusted[0]), dtype=torch.bool)
            keep[pick] = False
            changes.append((self._losses_after_step(model, optimizer, params, grads, self.clean_scale)
                            - base)[keep[self.probe]])
            if self.norm_cap and norms is not None:
                norms.append(self.clean_scale * self._norm(grads))
            if moves is not None:
                moves.append(move_size(before, after))
        return changes

    def _cross_half_level(self, model: nn.Module, optimizer: torch.optim.Optimizer, params,
                          base: torch.Tensor) -> float:
        """The conformal level for the whole split, from `level_splits` random halvings: a threshold over
        `calibration_updates` batches of one half is judged on as many batches of the other half, both ways, and
        `_level_for` extrapolates those rates from a half to the whole split (never below 1 - target; 1.0, the largest
        increase, if no level meets the target).

        The threshold a few hundred trusted images set is a draw: another split of the same population sets another,
        and the realised rate, bounded below by 0, averages above the target over draws. A half-split threshold
        judged on the other half shows how far above, on the defender's own data."""
        count, trusted = self.calibration_updates, len(self.trusted[0])
        rates = torch.zeros(count)
        for _ in range(self.level_splits):
            order = torch.randperm(trusted, generator=self.generator)
            halves = [torch.tensor([self._statistic(change) for change in
                                    self._clean_changes(model, optimizer, params, base, count, pool=half)])
                      for half in (order[: trusted // 2], order[trusted // 2:])]
            for calibrated, judged in (halves, halves[::-1]):
                # the share of the other half's updates above each order statistic of this half's
                rates += (judged[None, :] > calibrated.sort().values[:, None]).float().mean(1)
        return _level_for(rates / (2 * self.level_splits), self.target)

    def _clean_gradients(self, model: nn.Module, params, count: int, pool: torch.Tensor | None = None):
        """`count` (batch indices, gradient, running statistics moved) of clean trusted batches, each drawn the way
        the stream draws them (with replacement: a batch of the stream comes from a far larger population than the
        trusted split; drawing without replacement from a few hundred samples would shrink the spread of updates),
        the statistics where the batch would have moved BatchNorm's (none moved: a simulation, not an update)."""
        x_ref, y_ref = self.trusted
        device = model_device(model)
        pool = torch.arange(len(x_ref)) if pool is None else pool
        for _ in range(count):
            pick = pool[torch.randint(len(pool), (self.batch_size,), generator=self.generator)]
            # the gradient as the stream's update computes it (dropout on, BatchNorm on batch statistics: eval
            # mode gave a gentler gradient, and the 3x-target clean flag rate of SmallCNN's dropout), recording
            # nothing: a simulation, not an update
            with training_mode_frozen_stats(model):
                logits, after = after_batch(model, lambda: model(x_ref[pick].to(device)))  # noqa: B023 (called here)
                loss = F.cross_entropy(logits, y_ref[pick].to(device))
            yield pick, torch.autograd.grad(loss, params, materialize_grads=True), after

    def interval(self, optimizer: torch.optim.Optimizer) -> int:
        """Updates between the last calibration and the next: with momentum, ceil(1 / (1 - momentum)) after the
        first, doubling after each calibration, at most `recalibrate_every`; without, `recalibrate_every`. With
        `first_interval` set, the first interval is at least that, with momentum or without, and doubles the same way.
        After a calibration whose threshold is 0, at most `recalibrate_after_zero`, doubling after each calibration
        since (a model still learning is measured again soon, and less often as it settles).

        >>> gate = UpdateGate(torch.rand(8, 2), torch.randint(0, 2, (8,)), batch_size=2)
        >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        >>> schedule = []
        >>> for gate.calibrations in range(1, 6):
        ...     schedule.append(gate.interval(optimizer))
        >>> schedule
        [10, 20, 40, 80, 100]
        >>> gate.first_interval = 4
        >>> [gate.interval(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) for gate.calibrations
        ...  in range(1, 7)]
        [4, 8, 16, 32, 64, 100]
        >>> gate.history = [{"threshold": 0.0}]
        >>> gate.interval(optimizer)
        10
        >>> gate.history += [{"threshold": 0.01}, {"threshold": 0.02}]
        >>> gate.interval(optimizer)
        40
        """
        momentum = optimizer.param_groups[0].get("momentum", 0.0)
        interval = self.recalibrate_every
        if momentum or self.first_interval is not None:
            first = max(self.first_interval or 1, math.ceil(1.0 / (1.0 - momentum) - 1e-9))
            interval = min(interval, first * 2 ** max(self.calibrations - 1, 0))
        if self.recalibrate_after_zero is not None:
            # calibrations since the last that set a threshold of 0 (none among those the history keeps: no limit)
            since = next((k for k, entry in enumerate(reversed(self.history)) if entry["threshold"] == 0.0), None)
            if since is not None:
                interval = min(interval, self.recalibrate_after_zero * 2 ** since)
        return interval

    def due(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the next update is judged after a new calibration (the first, or one at the interval's end)."""
        return self.threshold is None or self.updates_since_calibration >= self.interval(optimizer)

    def _norm(self, grads) -> float:
        """The norm the cap bounds, of the whole update (all parameters as one vector)."""
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, NORMS[self.norm_cap])
                                                            for g in grads]), NORMS[self.norm_cap]))

    def _lookahead(self, model: nn.Module, optimizer: torch.optim.Optimizer, scale: float = 1.0):
        """The update in the parameters' `.grad` as (params, grads, base, delta(scale)): `base` holds the per-sample
        probe losses where the step goes without the batch."""
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad.detach() for p in params]
        base = self._losses_after_step(model, optimizer, params, grads, 0.0)
        increase = self._statistic(self._losses_after_step(model, optimizer, params, grads, scale) - base)
        return params, grads, base, increase

    def _statistic(self, changes: torch.Tensor) -> float:
        """What the verdict judges: the mean change of the probe samples' losses, each clamped to the bounds of
        the last calibration's clean changes when winsorised (`probe_winsor`), so that no single hard sample
        decides the verdict."""
        if self.bounds is not None:
            changes = changes.clamp(*self.bounds)
        return float(changes.mean())

    def _cap_scale(self, model: nn.Module) -> tuple[float | None, float]:
        """(the update's norm, the scale that brings it under the cap): (None, 1.0) without a cap."""
        if not self.norm_cap or self.cap is None:
            return None, 1.0
        norm = self._norm([p.grad.detach() for p in model.parameters() if p.grad is not None])
        return norm, (min(1.0, self.cap / norm) if norm > 0 else 1.0)

    def pace(self, size: int) -> float:
        """The share of its mean gradient a batch of `size` samples is applied at: size / batch_size under the paced
        rules ('pace', 'pace_rungs') for a batch under `batch_size`, else 1."""
        return size / self.batch_size if self.size_rule in PACED and size < self.batch_size else 1.0

    def increase(self, model: nn.Module, optimizer: torch.optim.Optimizer, size: int | None = None) -> float:
        """delta of the update in the parameters' `.grad` as `judge` would measure it for a batch of `size` samples
        (default `batch_size`: delta(1); a smaller batch under a paced rule: delta at its pace), judged by nothing
        (what an attacker who knows the gate can measure on its own data; the threshold it is judged by:
        `for_size(size)`'s)."""
        return self._lookahead(model, optimizer, self.pace(self.batch_size if size is None else size))[3]

    def judge(self, model: nn.Module, optimizer: torch.optim.Optimizer,
              batch: tuple[torch.Tensor, torch.Tensor] | None = None,
              statistics: Statistics | None = None, lies: torch.Tensor | None = None,
              size: int | None = None) -> GateVerdict:
        """Judge the update in the parameters' `.grad` and scale it in place: onto the norm cap (when the gate has
        one), and, if the update is above the threshold, by the action's choice (the smaller scale wins). The
        actions `drop` and `drop_lies` need the `batch` (x, y) the gradient was taken on: they take it again without
        the samples they drop (`drop`: those that push the probe uphill most, `_drop_uphill`; `drop_lies`: the
        `lies`, a mask over the batch from the label check), and judge what is left as `shrink` would.
        `statistics`: BatchNorm's running statistics as they were before the batch's forward moved them; their move
        is scaled as the action scales the update (a skipped batch moves none, action 'cap' leaves it whole) and
        capped at `statistics_cap` whatever the verdict. The verdict is on the weights' update alone, as the
        threshold was calibrated. `size`: the samples the batch was received with (default: the `batch`'s, else
        `batch_size`); with `size_rule="rungs"` a batch of another rung is judged by that rung's gate (`for_size`); with
        `size_rule="pace"` a batch under `batch_size` is judged and applied at size / batch_size of its gradient (the
        verdict's scale includes that share); with `"pace_rungs"` it is applied so and judged by its rung's gate."""
        moves = (statistics, snapshot(model)) if statistics else None
        size = size if size is not None else (len(batch[1]) if batch is not None else self.batch_size)
        pace = self.pace(size)
        if pace < 1.0:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(pace)
        if self.rung(size) != self.batch_size and self.threshold is None:
            self._calibrate_before(model, optimizer, moves)  # it measures the cap and the level every rung shares
        verdict = self.for_size(size)._judge(model, optimizer, batch, moves, lies, pace)
        return verdict if pace == 1.0 else dataclasses.replace(verdict, scale=verdict.scale * pace)

    def _calibrate_before(self, model: nn.Module, optimizer: torch.optim.Optimizer, moves) -> None:
        """Calibrate from the model as it was before the batch (BatchNorm's statistics put back for it)."""
        with moved(model, *(moves or (None, None)), 0.0):
            self.calibrate(model, optimizer)  # autograd.grad: the batch's .grad is left as it is

    def _judge(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch, moves, lies,
               pace: float = 1.0) -> GateVerdict:
        if self.due(optimizer):
            self._calibrate_before(model, optimizer, moves)
        self.updates_since_calibration += 1
        params, grads, base, increase = self._lookahead(model, optimizer)
        flagged, judged, dropped = increase > self.threshold, increase, ()
        if flagged and self.action in ("drop", "drop_lies"):
            if batch is None:
                raise ValueError(f"the gate's action {self.action!r} needs the batch the update was taken on")
            if self.action == "drop":
                keep = self._drop_uphill(model, params, *batch, increase, pace)
            else:
                keep = torch.ones(len(batch[1]), dtype=torch.bool) if lies is None else ~lies.cpu()
                if not keep.all():
                    keep = self._take_again(model, params, *batch, keep, pace)
            dropped = tuple(torch.nonzero(~keep).flatten().tolist())
            if dropped or self.action == "drop":  # 'drop' took the gradient again whatever it left out
                params, grads, base, judged = self._lookahead(model, optimizer)
        norm, scale = self._cap_scale(model)
        acted = 1.0  # the action's own scale, without the cap's
        if judged > self.threshold and self.action != "cap":
            acted = 0.0
            if self.action in ("shrink", "drop", "drop_lies"):
                probe_scale = self.threshold / judged
                at_probe = self._statistic(self._losses_after_step(model, optimizer, params, grads, probe_scale)
                                           - base)
                acted = _chord_scale(self.threshold, probe_scale, at_probe, judged)
            scale = min(scale, acted)
        if scale != 1.0:
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(scale)
        if moves:  # the move of the statistics: as far as the action lets the update go, and no further than the cap
            self._move_statistics(model, *moves, acted * pace)
        return GateVerdict(increase, self.threshold, flagged, scale, norm, self.cap, dropped)

    def rung(self, size: int) -> int:
        """The batch size whose threshold judges a batch of `size` samples: `batch_size` under the size rules
        'configured' and 'pace'; under 'rungs' (and under 'pace_rungs' for a batch under `batch_size`), `size` rounded
        to the nearest rung of batch_size * 2 ** (k / 2), k an integer (within a factor of 2 ** (1 / 4) of it: a clean
        update's spread goes with 1 / sqrt(size), so about 9%), and never under 2 for a batch of 2 or more
        (BatchNorm's least).

        >>> gate = UpdateGate(torch.rand(8, 2), torch.randint(0, 2, (8,)), batch_size=50, size_rule="rungs")
        >>> [gate.rung(size) for size in (1, 2, 10, 25, 44, 50, 58, 100, 1024)]
        [1, 2, 9, 25, 50, 50, 50, 100, 1131]
        >>> gate.size_rule = "pace_rungs"
        >>> [gate.rung(size) for size in (1, 2, 10, 25, 44, 50, 58, 100, 1024)]
        [1, 2, 9, 25, 50, 50, 50, 50, 50]
        """
        if self.size_rule == "rungs" or (self.size_rule == "pace_rungs" and size < self.batch_size):
            k = round(2 * math.log2(size / self.batch_size))
            return self.batch_size if k == 0 else max(min(size, 2), round(self.batch_size * 2 ** (k / 2)))
        return self.batch_size

    def for_size(self, size: int) -> UpdateGate:
        """The gate that judges a batch of `size` samples: this one at its own rung, else that rung's (`_child`)."""
        rung = self.rung(size)
        return self if rung == self.batch_size else self._child(rung)

    def _child(self, rung: int) -> UpdateGate:
        """The gate of batches of `rung` samples, made on first use: this gate's settings, trusted split and probe, and
        the cap, BatchNorm statistics' cap and level its first calibration measured (one speed limit for every update,
        whatever its size); its own threshold, calibrated on clean trusted batches of `rung` samples, and its own
        schedule, counted in the updates it judges."""
        if rung not in self.sized:
            child = copy.copy(self)
            child.batch_size, child.size_rule, child.sized = rung, "configured", {}
            # 'pace_rungs': the rung's batches are applied at rung / batch_size, and calibrated so
            child.clean_scale = rung / self.batch_size if self.size_rule == "pace_rungs" else 1.0
            if self.level_rule == "cross_half_first":  # the level chosen once, at this gate's first calibration
                child.level_rule = "conformal"
            child.generator = torch.Generator().manual_seed(key_seed(self.seed, SIZE_RUNG, rung))
            child.threshold, child.bounds, child.increases, child.history = None, None, [], []
            child.updates_since_calibration = child.calibrations = 0
            self.sized[rung] = child
        return self.sized[rung]

    def _move_statistics(self, model: nn.Module, before: Statistics, after: Statistics, acted: float) -> None:
        """Move BatchNorm's running statistics `acted` of the way the batch's forward moved them (the action's share
        of the update), no further than `statistics_cap`; what the cap cuts of that share is made up by the move a
        clean trusted batch makes from the same statistics with the same weights. The weights move what the
        statistics should be: held at the cap alone, a ResNet-18's statistics stayed where its moving weights had
        left them, every clean move then looked long against them and was cut again, and clean accuracy fell from
        78% to 13% in 30 clean batches (CIFAR-10, stream lr 0.1, an H200; ST 52%). With the trusted batch's move in
        the cut's place they keep up with the weights at BatchNorm's own pace, and no stream batch moves them further
        than the cap (a cap at a trusted batch's move instead let white images push them ever further: the
        further they went, the longer the trusted move back)."""
        size = move_size(before, after)
        own = min(acted, self.statistics_cap / size) if self.statistics_cap is not None and size > 0 else acted
        if acted - own <= 1e-12:
            put(model, before, after, own)
            return
        trusted = self.trusted[0][self.probe[: self.batch_size]].to(model_device(model))
        with moved(model, before, after, 0.0), training_mode_frozen_stats(model), torch.no_grad():
            _, reference = after_batch(model, lambda: model(trusted))
        put(model, before, after, own, also=(reference, acted - own))

    def _drop_uphill(self, model: nn.Module, params, x: torch.Tensor, y: torch.Tensor,
                     increase: float, pace: float = 1.0) -> torch.Tensor:
        """Take the batch's gradient again without the samples whose own descent raises the probe loss most, until
        the rest's first-order increase is at the threshold; returns which samples were kept.

        Sample i's share of the probe's first-order increase is -lr * <g_i, u> / N, u the gradient of the probe's
        loss; <g_i, u> is the derivative of sample i's loss along u, taken by one finite difference (two forwards of
        the batch, no per-sample gradients). The shares are scaled to sum to the measured increase, and the largest
        go first. Honest drift raises the probe loss across a batch and keeps most of it; a batch that carries a
        few lies (labels flipped, say) carries them in its largest shares."""
        device = model_device(model)
        x, y = x.to(device), y.to(device)
        probe_x, probe_y = self.trusted[0][self.probe].to(device), self.trusted[1][self.probe].to(device)
        with eval_mode(model):
            uphill = torch.autograd.grad(F.cross_entropy(model(probe_x), probe_y), params,
                                         materialize_grads=True)
            length = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u) for u in uphill])))
            step = 1e-3 / max(length, 1e-12)
            with torch.no_grad():
                before = F.cross_entropy(model(x), y, reduction="none")
                for p, u in zip(params, uphill, strict=True):
                    p.add_(step * u)
                after = F.cross_entropy(model(x), y, reduction="none")
                for p, u in zip(params, uphill, strict=True):
                    p.sub_(step * u)
        shares = (before - after).cpu()  # proportional to each sample's share of the increase; > 0: uphill
        keep = torch.ones(len(x), dtype=torch.bool)
        total = float(shares.sum())
        if total > 0:
            excess = total * (1.0 - self.threshold / increase)  # what the largest shares must take away
            for i in shares.argsort(descending=True).tolist():
                if excess <= 0 or shares[i] <= 0:
                    break
                keep[i], excess = False, excess - float(shares[i])
        return self._take_again(model, params, x, y, keep, pace)

    @staticmethod
    def _take_again(model: nn.Module, params, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor,
                    pace: float = 1.0) -> torch.Tensor:
        """Put the gradient of the batch's `keep` samples (over the whole batch's size, as the update was, times the
        `pace` of a batch under the gate's size) in the parameters' `.grad`, with BatchNorm's statistics as the
        update's forward left them; returns what was kept (all False, and a zero gradient, where fewer than 2 samples
        would be)."""
        device = model_device(model)
        x, y = x.to(device), y.to(device)
        if int(keep.sum()) < 2:  # a batch of one has no batch statistics to normalise with: nothing is kept
            for p in params:
                p.grad.zero_()
            return torch.zeros(len(x), dtype=torch.bool)
        with training_mode_frozen_stats(model):  # the update's own forward already moved the running statistics
            losses = F.cross_entropy(model(x[keep.to(device)]), y[keep.to(device)], reduction="none")
            grads = torch.autograd.grad(losses.sum() * pace / len(x), params)
        for p, g in zip(params, grads, strict=True):
            p.grad.copy_(g)
        return keep

    # -- persistence: the calibration state travels with the learner's checkpoint ---------------------
    def state(self) -> dict:
        return {"threshold": self.threshold, "cap": self.cap, "statistics_cap": self.statistics_cap,
                "bounds": self.bounds, "level": self.level,
                "updates_since_calibration": self.updates_since_calibration,
                "calibrations": self.calibrations,
                "history": self.history[-20:], "increases": self.increases,
                "generator": self.generator.get_state().tolist(), "batch_size": self.batch_size,
                "probe": self.probe.tolist(), "seed": self.seed,
                **({"sized": {str(rung): gate.state() for rung, gate in self.sized.items()}} if self.sized else {})}

    def restore(self, state: dict) -> None:
        self.batch_size = int(state["batch_size"])
        self.seed = int(state.get("seed", self.seed))  # a restored gate is built without its deployment's seed
        self.probe = torch.tensor(state["probe"], dtype=torch.long)
        self.threshold = state["threshold"]
        self.cap = state.get("cap")
        self.statistics_cap = state.get("statistics_cap")
        self.level = float(state.get("level", 1.0 - self.target))
        self.bounds = tuple(state["bounds"]) if state.get("bounds") else None
        self.updates_since_calibration = int(state["updates_since_calibration"])
        self.calibrations = int(state.get("calibrations", len(state["history"])))
        self.history = list(state["history"])
        self.increases = [list(values) for values in state.get("increases", [])]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.sized = {}
        for rung, sized in state.get("sized", {}).items():
            self._child(int(rung)).restore(sized)


def _level_for(half_rates: torch.Tensor, target: float) -> float:
    """The lowest conformal level, at least 1 - target, whose threshold is expected to flag at most `target` of
    clean updates, from `half_rates[k - 1]`: the rate a half-split threshold at its k-th smallest increase put on
    the other half (the k-th smallest of n is the conformal quantile at k / (n + 1)). A half's threshold varies about
    twice as much between draws of its images as the whole split's, and the rate's excess over the nominal 1 - level
    grows with that variance: for the whole split it is taken as half the half-split's. 1.0 (the largest increase)
    when no level gets there.

    >>> rates = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.2])  # at levels 0.1, 0.2, ..., 0.9
    >>> _level_for(rates, target=0.3)  # 0.7: (0.3 + 0.4) / 2 > 0.3; 0.8: (0.2 + 0.35) / 2 <= 0.3
    0.8
    >>> _level_for(torch.zeros(9), target=0.3)  # never below 1 - target
    0.7
    >>> _level_for(torch.ones(9), target=0.1)
    1.0
    """
    count = len(half_rates)
    for rank in range(1, count + 1):
        level = rank / (count + 1)
        if level >= 1.0 - target - 1e-9 and ((1.0 - level) + float(half_rates[rank - 1])) / 2 <= target:
            return level
    return 1.0


def _chord_scale(threshold: float, s0: float, at_s0: float, at_one: float) -> float:
    """The largest s in [0, 1] that the chords through (0, 0), (s0, at_s0), (1, at_one) keep at `threshold`.

    >>> round(_chord_scale(1.0, 0.25, 0.5, 4.0), 3)   # under the threshold at s0: between s0 and 1
    0.357
    >>> _chord_scale(1.0, 0.25, 2.0, 4.0)   # above it at s0: interpolate between 0 and s0
    0.125
    """
    if at_s0 <= threshold:
        return s0 + (1.0 - s0) * (threshold - at_s0) / (at_one - at_s0)
    return s0 * max(threshold, 0.0) / at_s0
