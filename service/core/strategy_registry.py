"""The one list of defense strategies: names, what each does, and the colour plots draw it in.

The config's `StrategyName`, the CLI's choices, the results schema's enum and the plot colours are all
derived from `REGISTRY`; `service/core/defense/strategies.py` maps each name to its class and checks at import
that the two agree. (It lives outside `service.core.defense` so that the config can import it without
importing the strategies, which import the config.)

>>> STRATEGY_NAMES
('st', 'gc', 'at', 'dsc', 'guard')
>>> REGISTRY["guard"].colour
'tab:green'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    summary: str
    colour: str  # a matplotlib colour


REGISTRY: dict[str, StrategyInfo] = {info.name: info for info in (
    StrategyInfo("st", "plain SGD: learn from the batch as received (no defense)", "tab:red"),
    StrategyInfo("gc", "gradient clipping before each step", "tab:orange"),
    StrategyInfo("at", "adversarial training: reverse-PGD on every sample, plus a KL term", "tab:purple"),
    StrategyInfo("dsc", "the paper's discrepancy-aware correction (Zhu et al. 2023)", "tab:blue"),
    StrategyInfo("guard", "the trusted update gate: updates that would hurt trusted data are shrunk (default)",
                 "tab:green"),
)}
STRATEGY_NAMES: tuple[str, ...] = tuple(REGISTRY)
StrategyName = Literal[STRATEGY_NAMES]  # type: ignore[valid-type]  # the registry's names, for pydantic
