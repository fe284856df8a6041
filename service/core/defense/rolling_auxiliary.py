"""The rolling auxiliary: DSC's earlier checkpoint kept `window` applied batches behind, promoted only from
healthy windows, with the threshold recalibrated at every promotion.

The paper's auxiliary is one checkpoint frozen for ever, and its threshold P = mu + tau * m grows with the
batches m counted since deployment: after a few hundred clean batches the clean discrepancy of the aged
auxiliary and the grown threshold let every poison through (issue 11's arena: 0% flagged after 300
batches). Here the auxiliary is the online model as it was `window` batches ago (the paper's backtracking
interval), taken from a ring of snapshots, one every `every` batches:

- **Snapshot.** Every `every` applied batches the online weights are copied (CPU) with their logits on the
  trusted split (at most `canary_samples` of it, drawn once): one forward, reused twice (canary accuracy
  now, recalibration if the snapshot is promoted).
- **Health gate.** A snapshot `window` batches old is a *candidate*. Promoting it launders every update
  since the current auxiliary into the reference, so it is promoted only if (1) its trusted-canary accuracy
  is not below the recent best (the current auxiliary's, or an earlier candidate's since) by more than
  `canary_drop` plus the sampling noise of two accuracies on n trusted samples, `z * sqrt(2 p (1 - p) / n)`,
  and (2) the share of flagged samples over the batches it closes is within the binomial band of the
  false-flag target, `target + z * sqrt(target * (1 - target) / batches)`. Otherwise the candidate is dropped, the
  old auxiliary stays (it ages), and the refusal is recorded with its reason. The flag-rate check alone cannot
  tell a long honest drift (every sample flagged) from poison, and refusing for ever would freeze the
  auxiliary; so once it is `max_age` batches old, a candidate with a healthy canary is promoted anyway
  (reason `max_age`). Poison must then hide for `max_age` batches before it reaches the reference, while an
  accumulative attacker fires its trigger within its budget of batches.
- **Recalibration.** At a promotion mu is recalibrated for the new (auxiliary, current) pair on the trusted
  split from the cached logits (one forward of the current model, no loop over samples), and m restarts at
  0. m is capped at `window`, so the threshold is bounded even while promotions are refused.

>>> import copy, torch
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
>>> aux = copy.deepcopy(net)
>>> x, y = torch.rand(40, 1, 2, 2), torch.randint(0, 3, (40,))
>>> ring = RollingAuxiliary(x, y, window=4, every=2, ring=2, target_false_flag_rate=0.1)
>>> decisions = [ring.observe(net, aux, applied, flagged_share=0.0) for applied in range(1, 9)]
>>> [(d.batch, d.candidate, d.promoted, d.reason) for d in decisions if d is not None]
[(6, 2, True, 'healthy'), (8, 4, True, 'healthy')]
>>> ring.promoted_at, ring.batches_since_promotion(100)
(8, 4)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import nn

from service.core.defense.detector import DiscrepancyDetector
from service.core.defense.eval_mode import eval_mode
from service.core.device import model_device

REASONS = ("healthy", "max_age", "canary", "flag_rate")  # the first two promote


@dataclass(frozen=True)
class PromotionDecision:
    """One health-gate decision: which snapshot, promoted or why not, and what it was judged on."""

    batch: int  # applied batches when decided
    candidate: int  # applied batches when the candidate snapshot was taken
    promoted: bool
    reason: str  # "healthy" or "max_age" when promoted, else the first failed check: "canary" or "flag_rate"
    canary: float  # the candidate's accuracy on the trusted split
    canary_best: float  # recent best: the current auxiliary's, or an earlier candidate's since its promotion
    canary_bound: float  # the drop allowed: canary_drop plus the sampling noise
    flag_rate: float  # share of samples flagged over the batches the candidate closes
    flag_bound: float
    mu: float | None  # the threshold base after the decision (recalibrated on a promotion)

    def to_dict(self) -> dict:
        return asdict(self)


class RollingAuxiliary:
    """The ring of snapshots, the health gate and the threshold base mu of one DSC learner."""

    def __init__(self, trusted_x: torch.Tensor, trusted_y: torch.Tensor, *, window: int, every: int, ring: int,
                 target_false_flag_rate: float, max_age: int | None = None, canary_drop: float = 0.02, z: float = 3.0,
                 divergence: str = "kl", unit: str = "batch", batch_size: int = 50, canary_samples: int = 256,
                 seed: int = 0):
        if len(trusted_x) < 2 or len(trusted_x) != len(trusted_y):
            raise ValueError(f"the rolling auxiliary needs at least 2 labelled trusted samples, got {len(trusted_x)} "
                             f"inputs and {len(trusted_y)} labels")
        if min(window, every, ring) < 1 or window > ring * every:
            raise ValueError(f"auxiliary_window ({window}) must be >= 1 and fit the ring of auxiliary_ring ({ring}) "
                             f"snapshots every auxiliary_every ({every}) batches")
        max_age = 4 * window if max_age is None else max_age
        if max_age < window:
            raise ValueError(f"auxiliary_max_age ({max_age}) must be >= auxiliary_window ({window})")
        if canary_drop < 0 or z < 0:
            raise ValueError(f"promotion_canary_drop ({canary_drop}) and promotion_z ({z}) must be >= 0")
        # at most `canary_samples` of the trusted split, fixed once: a snapshot costs one bounded forward
        keep = torch.randperm(len(trusted_x), generator=torch.Generator().manual_seed(seed))[:canary_samples]
        keep = keep.sort().values if len(trusted_x) > canary_samples else torch.arange(len(trusted_x))
        self.trusted = (trusted_x.detach().cpu().float()[keep], trusted_y.detach().cpu().long()[keep])
        self.window, self.every, self.ring_size, self.max_age = window, every, ring, max_age
        self.target, self.canary_drop, self.z = target_false_flag_rate, canary_drop, z
        self.detector = DiscrepancyDetector(divergence, unit)  # its threshold is recalibrated at each promotion
        self.batch_size, self.seed = batch_size, seed
        self.mu: float | None = None  # recalibrated at each promotion (None: the first calibration still holds)
        self.promoted_at = 0  # applied batches when the current auxiliary was promoted (0: the given checkpoint)
        self.canary_best: float | None = None  # best trusted accuracy of the auxiliary and the candidates since
        self.snapshots: list[dict] = []  # {"batch", "canary", "segment", "weights", "logits"}, oldest first
        # flagged shares as (sum, batches), bounded however long promotions are refused: of the batches since the
        # last snapshot (`open_segment`; each snapshot keeps its own `segment`), and of the segments of the
        # candidates refused since the current auxiliary (`refused_segments`)
        self.open_segment: tuple[float, int] = (0.0, 0)
        self.refused_segments: tuple[float, int] = (0.0, 0)
        self.decisions: list[PromotionDecision] = []
        self.counts: Counter[str] = Counter()

    def batches_since_promotion(self, batch_index: int) -> int:
        """m of the threshold P = mu + tau * m: batches since the last promotion, at most `window`."""
        return min(max(batch_index - self.promoted_at, 0), self.window)

    @torch.no_grad()
    def _logits(self, model: nn.Module) -> torch.Tensor:
        device = model_device(model)
        with eval_mode(model):
            return model(self.trusted[0].to(device)).float().cpu()

    def observe(self, model: nn.Module, auxiliary: nn.Module, applied: int,
                flagged_share: float) -> PromotionDecision | None:
        """After the `applied`-th batch: record its flagged share, snapshot, and decide on a due candidate.

        A promotion loads the candidate's weights into `auxiliary` in place and returns the decision.
        """
        self.open_segment = (self.open_segment[0] + float(flagged_share), self.open_segment[1] + 1)
        if applied % self.every:
            return None
        if self.canary_best is None:
            self.canary_best = _accuracy(self._logits(auxiliary), self.trusted[1])
        logits = self._logits(model)
        canary = _accuracy(logits, self.trusted[1])
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.snapshots.append({"batch": applied, "canary": canary, "segment": self.open_segment, "weights": weights,
                               "logits": logits})
        self.open_segment = (0.0, 0)
        if self.snapshots[0]["batch"] > applied - self.window:
            return None
        candidate = self.snapshots.pop(0)
        decision = self._decide(candidate, applied, logits)
        if decision.promoted:
            auxiliary.load_state_dict(candidate["weights"])
            self.promoted_at, self.canary_best = applied, candidate["canary"]
            self.refused_segments = (0.0, 0)  # the new auxiliary's window starts after the candidate's batches
        else:
            self.refused_segments = _add(self.refused_segments, candidate["segment"])
        self.decisions = (self.decisions + [decision])[-50:]
        self.counts[decision.reason] += 1
        return decision

    def _decide(self, candidate: dict, applied: int, current_logits: torch.Tensor) -> PromotionDecision:
        # the batches the candidate closes: from the current auxiliary's up to the candidate's own
        flagged, batches = _add(self.refused_segments, candidate["segment"])
        flag_rate = flagged / batches if batches else 0.0
        flag_bound = self.target + self.z * math.sqrt(self.target * (1 - self.target) / max(batches, 1))
        best = max(candidate["canary"], self.canary_best)
        self.canary_best = best
        canary_bound = self.canary_drop + self.z * math.sqrt(2 * best * (1 - best) / len(self.trusted[1]))
        reason = "healthy"
        if candidate["canary"] < best - canary_bound:
            reason = "canary"
        elif flag_rate > flag_bound:
            reason = "max_age" if applied - self.promoted_at >= self.max_age else "flag_rate"
        promoted = reason in ("healthy", "max_age")
        if promoted:
            scores = self.detector.score_logits(candidate["logits"], current_logits)
            self.mu = self.detector.threshold(scores, self.target, self.batch_size, self.seed + applied)
        return PromotionDecision(batch=applied, candidate=candidate["batch"], promoted=promoted,
                                 reason=reason, canary=candidate["canary"], canary_best=best,
                                 canary_bound=canary_bound, flag_rate=flag_rate,
                                 flag_bound=flag_bound, mu=self.mu)

    # -- persistence: snapshots as tensors, the rest as JSON ---------------------------------------------
    def state(self) -> dict:
        return {"mu": self.mu, "promoted_at": self.promoted_at, "canary_best": self.canary_best,
                "open_segment": list(self.open_segment), "refused_segments": list(self.refused_segments),
                "snapshots": [{"batch": s["batch"], "canary": s["canary"], "segment": list(s["segment"])}
                              for s in self.snapshots],
                "decisions": [d.to_dict() for d in self.decisions], "counts": dict(self.counts)}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for index, snapshot in enumerate(self.snapshots):
            out[f"ring.{index}.logits"] = snapshot["logits"]
            out.update({f"ring.{index}.weights.{k}": v for k, v in snapshot["weights"].items()})
        return out

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.mu, self.promoted_at = state["mu"], int(state["promoted_at"])
        self.canary_best = state["canary_best"]
        self.open_segment, self.refused_segments = _segment(state["open_segment"]), _segment(state["refused_segments"])
        self.decisions = [PromotionDecision(**d) for d in state["decisions"]]
        self.counts = Counter(state["counts"])
        self.snapshots = []
        for index, meta in enumerate(state["snapshots"]):
            prefix = f"ring.{index}.weights."
            weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.snapshots.append({**meta, "segment": _segment(meta["segment"]), "weights": weights,
                                   "logits": tensors[f"ring.{index}.logits"]})


def _add(a: tuple[float, int], b: tuple[float, int]) -> tuple[float, int]:
    return a[0] + b[0], a[1] + b[1]


def _segment(saved: list) -> tuple[float, int]:
    return float(saved[0]), int(saved[1])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())
