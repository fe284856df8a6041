"""Stream labels against the trusted split's: when most of the stream samples that look like trusted class a carry
label b, the pair (a, b) is lied about, and while the evidence lasts its samples are learned as a, what the trusted
samples they look like say they are.

A label flip (every 3 of the stream labelled 8) sends images as clean as the stream's, so nothing on the input side
sees it, and the update gate sees each batch's share of the lie only: a shrunk update still carries a threshold's worth
of it, and once the model has partly learned the lie the later batches no longer raise the trusted probe's loss
(docs/results.md, thirteenth session). The labels themselves are what a lie changes, and the trusted split's labels
are the defender's own. So each sample is placed among the trusted samples in the feature space of the model as it
stood at the last refresh (the input of its last linear layer; the model's output where it has none): it *looks like*
class a when most of its `neighbours` nearest trusted samples carry a. Samples whose nearest trusted sample lies within
`radius` (the `radius_level` quantile of the trusted samples' distances to their nearest other trusted sample) are
counted over the last `window` batches by (looks like, labelled). A pair (a, b != a) is lied about when at least
`min_count` of them, and at least `share` of all counted samples looking like a, carry b. Then every sample of the
batch labelled b that looks like a is learned as a, wherever it lies, and one labelled b that looks like neither a nor
b is left out of the update. Relabelled, not left out: a flip that is only left out takes the class out of the stream,
and the model forgets it (MNIST, development runs: class 3 at 67% after 50 flipped batches with every lie left out,
97% relabelled).

A lie spread over many labels (each 3 labelled some other class, drawn at random) forms no pair. So a class a is lied
about too when at least `min_count` of the counted samples looking like it carry other labels, whichever, and their
share reaches `class_bar(a)`: `class_share` of the way from the class's own confusion (the share of the trusted
samples that look like a, each judged by its nearest other trusted samples, that carry other labels) to all of them.
Then every sample that looks like a and is counted (within the radius) is learned as a; none is left out (which label
would be the lie's?). Within the radius only, unlike the pair's: with honest drift under way, shifted digits of other
classes that look like the lied-about one are mostly further out (development seeds, a one-pixel shift with every 3
relabelled at random: 8.4% of the honest samples relabelled, 4.1% within the radius only). On the
development seeds honest streams reached at most 0.64 of the way on digits (a one-pixel shift), 0.10 on MNIST and 0.75
on cifar10-small (brightness/contrast), whose SmallCNN confuses up to 0.79 of a class's trusted lookalikes; a lie about
a whole class goes all the way, whatever the model's confusion, so on cifar10-small the class rule acts on the plain
flip that forms no pair there (docs/results.md, fifteenth session).

Why pairs and not single samples: judged one by one (left out when its nearest trusted samples all carry another label),
a rule tried first held the flip on three of four development seeds but left out the hard cases of honest drift too
(a rotated digit placed among another class), and rotation was learned at 77% of ST's gain against guard's 93%. Honest
drift and honest label noise put a minority of other labels among the samples that look like a class; a flip puts a
majority. Far-out samples (a shifted digit the model no longer places near anything trusted) count for no pair. The
trusted features and the model that places samples are taken again every `refresh_every` updates.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from service.core.defense.eval_mode import eval_mode
from service.core.device import model_device

_CHUNK = 1024  # rows of a distance matrix at a time: memory bounded for a large trusted split


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of `model`'s last linear layer for `x` (its output where it has no linear layer), in eval mode."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    captured: list[torch.Tensor] = []
    hook = linears[-1].register_forward_hook(lambda _m, args, _out: captured.append(args[0])) if linears else None
    try:
        with eval_mode(model), torch.no_grad():
            output = model(x.to(model_device(model)))
    finally:
        if hook is not None:
            hook.remove()
    return (captured[-1] if captured else output).flatten(1).float()


def _nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, skip_self: bool = False):
    """(distances, indices) of each query's `k` nearest keys, chunked; `skip_self`: queries are keys, row i skips i."""
    distances, indices = [], []
    for start in range(0, len(queries), _CHUNK):
        d = torch.cdist(queries[start:start + _CHUNK], keys)
        if skip_self:
            rows = torch.arange(len(d), device=d.device)
            d[rows, rows + start] = float("inf")
        found = d.topk(k, dim=1, largest=False)
        distances.append(found.values)
        indices.append(found.indices)
    return torch.cat(distances), torch.cat(indices)


@dataclass(frozen=True)
class LabelVerdict:
    """What the label check made of one batch: the labels the update learns, which of them it changed (to the class
    the sample looks like), the samples it leaves out (labelled as a lied-about pair's b, looking like no class
    of the pair), and the samples that lie still: within the radius, they look like a class other than the label
    the update learns them with (the gate's action `drop_lies` leaves them out of a flagged update)."""

    labels: torch.Tensor
    relabelled: torch.Tensor
    left_out: torch.Tensor
    lies: torch.Tensor


class NeighbourLabelCheck:
    """The trusted split's labels as the judge of each stream sample's label (see the module's docstring).

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.copy_(torch.eye(2)), model[1].bias.zero_()
    >>> x = torch.tensor([[0., 0.], [0.1, 0.], [0., 0.1], [5., 5.], [5.1, 5.], [5., 5.1]])
    >>> check = NeighbourLabelCheck(x, torch.tensor([0, 0, 0, 1, 1, 1]), neighbours=2, radius_level=1.0,
    ...                             min_count=2)
    >>> check.refresh(model)
    >>> lie = torch.tensor([[0.05, 0.05], [0.02, 0.]])  # two samples like the trusted 0s, labelled 1
    >>> verdict = check.judge(model, lie, torch.tensor([1, 1]))  # most samples like 0s are labelled 1: a lie
    >>> check.lied_pairs(), verdict.labels.tolist(), verdict.relabelled.tolist()
    ([(0, 1)], [0, 0], [True, True])
    >>> check.judge(model, torch.tensor([[5.05, 5.05], [0.05, 0.]]), torch.tensor([1, 0])).labels.tolist()  # honest
    [1, 0]
    """

    def __init__(self, trusted_x: torch.Tensor, trusted_y: torch.Tensor, *, neighbours: int = 3,
                 radius_level: float = 0.95, refresh_every: int = 100, window: int = 20, share: float = 0.5,
                 class_share: float | None = 0.85, min_count: int = 10):
        if not 1 <= neighbours < len(trusted_x):
            raise ValueError(f"label_check_neighbours must be in [1, {len(trusted_x) - 1}] for a trusted split of "
                             f"{len(trusted_x)} samples, got {neighbours}")
        if not 0 < radius_level <= 1:
            raise ValueError(f"label_check_radius_level must be in (0, 1], got {radius_level}")
        if not 0 < share <= 1:
            raise ValueError(f"label_check_share must be in (0, 1], got {share}")
        if class_share is not None and not 0 < class_share <= 1:
            raise ValueError(f"label_check_class_share must be in (0, 1], got {class_share}")
        if window < 1 or min_count < 1:
            raise ValueError(f"label_check_window and label_check_min_count must be >= 1, got {window} and "
                             f"{min_count}")
        self.trusted_x, self.trusted_y = trusted_x, trusted_y
        self.neighbours, self.radius_level, self.refresh_every = neighbours, radius_level, refresh_every
        self.window, self.share, self.class_share, self.min_count = window, share, class_share, min_count
        self.trusted_features: torch.Tensor | None = None
        self.model: nn.Module | None = None  # the model as it stood at the refresh: both sides are placed by it
        self._saved: dict[str, torch.Tensor] | None = None  # its weights from a checkpoint, until a model is at hand
        self.radius: float | None = None
        self.confusion: dict[int, float] = {}  # class -> share of its trusted lookalikes carrying other labels
        self.refreshed_at: int | None = None  # the update whose model the trusted features were taken from
        # per judged batch of the window: (looks like, labelled, count) of its samples within the radius
        self.recent: deque[list[tuple[int, int, int]]] = deque(maxlen=window)

    def ready(self, model: nn.Module, applied: int) -> None:
        """Refresh from `model` when `refresh_every` updates have passed since the last refresh (or there was none)."""
        if self.refreshed_at is None or applied - self.refreshed_at >= self.refresh_every:
            self.refresh(model, applied)

    def refresh(self, model: nn.Module, applied: int = 0) -> None:
        """Place the trusted split in the feature space of `model` as it stands, and measure the radius there."""
        self.model, self._saved = copy.deepcopy(model).eval(), None
        self.trusted_features = features(self.model, self.trusted_x)
        self._measure_trusted()
        self.refreshed_at = applied

    def _measure_trusted(self) -> None:
        """The radius, and each class's own confusion: the share of the trusted samples that look like class a (each
        judged by its nearest *other* trusted samples, within the radius) that carry another label."""
        own, indices = _nearest(self.trusted_features, self.trusted_features, self.neighbours, skip_self=True)
        self.radius = float(torch.quantile(own[:, 0], self.radius_level))
        looks = self._looks(indices)
        counted = (looks >= 0) & (own[:, 0] <= self.radius)
        looks, labels = looks[counted].cpu(), self.trusted_y[counted.cpu()]
        self.confusion = {int(a): float((labels[looks == a] != a).float().mean()) for a in looks.unique()}

    def _looks(self, indices: torch.Tensor) -> torch.Tensor:
        """The class each row of nearest trusted samples' `indices` looks like: their majority label (-1: none)."""
        labels = self.trusted_y.to(indices.device)[indices]
        looks = labels.mode(dim=1).values
        return torch.where(2 * (labels == looks[:, None]).sum(dim=1) > self.neighbours, looks, -1)

    def judge(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LabelVerdict:
        """The labels the update learns (x, y) with, and the samples it leaves out. The batch joins the window first;
        then, for each lied-about pair (a, b), a sample labelled b that looks like a is relabelled a, and one labelled
        b that looks like neither a nor b is left out; for each lied-about class a, a sample labelled anything else
        that looks like a, within the radius, is relabelled a."""
        if self.trusted_features is None:
            raise RuntimeError("the label check judges after refresh(model)")
        if self.model is None:  # restored from a checkpoint: the refresh's model, rebuilt from its saved weights
            self.model = copy.deepcopy(model).eval()
            self.model.load_state_dict(self._saved)
            self._saved = None
            self.trusted_features = self.trusted_features.to(model_device(model))  # a checkpoint's are on the CPU
        distances, indices = _nearest(features(self.model, x), self.trusted_features, self.neighbours)
        looks = self._looks(indices)
        y = y.to(looks.device)
        counted = (looks >= 0) & (distances[:, 0] <= self.radius)
        pairs, counts = torch.stack([looks[counted], y[counted]], dim=1).unique(dim=0, return_counts=True)
        self.recent.append([(int(a), int(b), int(n)) for (a, b), n in zip(pairs.tolist(), counts, strict=True)])
        labels, relabelled = y.clone(), torch.zeros(len(y), dtype=torch.bool, device=looks.device)
        left_out = torch.zeros_like(relabelled)
        pairs, classes = self.lies()
        for a, b in pairs:
            lookalikes = (y == b) & (looks == a)
            labels[lookalikes], relabelled = a, relabelled | lookalikes
            left_out |= (y == b) & (looks != b) & (looks != a)
        for a in classes:
            lookalikes = (y != a) & (looks == a) & counted  # near enough to be sure: honest drift lies further out
            labels[lookalikes], relabelled = a, relabelled | lookalikes
        left_out &= ~relabelled
        return LabelVerdict(labels, relabelled, left_out, counted & (looks != labels) & ~left_out)

    def lies(self) -> tuple[list[tuple[int, int]], list[int]]:
        """The lied-about pairs and classes, from one count of the window (`lied_pairs`, `lied_classes`)."""
        looked: dict[int, int] = {}  # counted samples that look like class a
        labelled: dict[tuple[int, int], int] = {}  # of them, labelled b
        for batch in self.recent:
            for a, b, n in batch:
                looked[a] = looked.get(a, 0) + n
                labelled[(a, b)] = labelled.get((a, b), 0) + n
        pairs = sorted((a, b) for (a, b), n in labelled.items()
                       if a != b and n >= self.min_count and n >= self.share * looked[a])
        others = {a: n - labelled.get((a, a), 0) for a, n in looked.items()}
        classes = [] if self.class_share is None else sorted(
            a for a, n in others.items() if n >= self.min_count and n >= self.class_bar(a) * looked[a])
        return pairs, classes

    def lied_pairs(self) -> list[tuple[int, int]]:
        """(a, b), a != b: over the window, at least `min_count` samples within the radius that look like trusted
        class a were labelled b, and they are at least `share` of the samples looking like a."""
        return self.lies()[0]

    def lied_classes(self) -> list[int]:
        """Classes a whose counted lookalikes over the window carry other labels, whichever, in at least
        `class_bar(a)` of them (and at least `min_count`): a lie spread over many labels, each under the pair's
        share."""
        return self.lies()[1]

    def class_bar(self, a: int) -> float:
        """The share of class a's counted lookalikes carrying other labels at which a is lied about: `class_share` of
        the way from the trusted split's own confusion of a (its lookalikes among the trusted samples that carry
        other labels) to all of them."""
        own = self.confusion.get(a, 0.0)
        return own + self.class_share * (1.0 - own)

    def state(self) -> dict:
        # the radius and the confusion are not kept: they are measured again from the saved trusted features
        return {"refreshed_at": self.refreshed_at, "recent": [list(map(list, batch)) for batch in self.recent]}

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.trusted_features is None:
            return {}
        weights = self._saved if self.model is None else self.model.state_dict()
        return {"label_check_features": self.trusted_features.cpu(),
                **{f"label_check_model.{name}": value.detach().cpu().clone() for name, value in weights.items()}}

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.refreshed_at = state.get("refreshed_at")
        self.recent = deque((list(map(tuple, batch)) for batch in state.get("recent", [])), maxlen=self.window)
        self.trusted_features = tensors.get("label_check_features")
        if self.trusted_features is not None:
            self._measure_trusted()  # the radius and the confusion, as the refresh measured them from these features
        prefix = "label_check_model."
        self._saved = {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}
        self.model = None
