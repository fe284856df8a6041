"""The arena's plots: what a defense trades (Pareto), how it holds over time, how it learns drift."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attacker_sim.leaderboard import Leaderboard  # noqa: E402
from service.core.atomic import atomic_write_bytes  # noqa: E402
from service.core.strategy_registry import REGISTRY  # noqa: E402

# a strategy's own colour (the registry's), a lighter shade of it for its arena variants
COLORS = {**{name: info.colour for name, info in REGISTRY.items()}, "gc-paper": "navajowhite", "at-paper": "plum",
          "dsc-sample": "lightskyblue", "dsc-rolling": "tab:cyan", "dsc-skip": "powderblue", "dsc-gate": "steelblue",
          "guard-skip": "yellowgreen", "guard-uncapped": "darkseagreen",
          "guard-median": "olivedrab", "guard-following": "darkolivegreen"}


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _attacks(board: Leaderboard) -> list[str]:
    return [s for s in board.scenarios() if s.startswith("attack@")]


def plot_pareto(board: Leaderboard, path: Path) -> Path:
    """x: mean drift-gain share of ST's (adaptation); y: mean accuracy after the trigger over launch times."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    drifts = [s for s in board.scenarios() if s.startswith("drift:")]
    for strategy in board.strategies:
        shares = [board.row(s, strategy).drift_gain_share for s in drifts if board.row(s, strategy)]
        accs = [board.row(s, strategy).final_acc.mean for s in _attacks(board) if board.row(s, strategy)]
        shares = [s.mean for s in shares if s is not None]
        if not shares or not accs:
            continue
        x, y = 100 * float(np.mean(shares)), 100 * float(np.mean(accs))
        # named in the legend with its coordinates: strategies that tie sit on one spot, where labels overlap
        ax.scatter([x], [y], s=80, color=COLORS.get(strategy, "gray"), edgecolor="black", zorder=3,
                   label=f"{strategy}: {x:.0f}%, {y:.1f}")
    ax.axvline(100, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("drift gain, % of ST's (mean over drift kinds): higher = learns honest change")
    ax.set_ylabel("accuracy after the trigger, % (mean over launch times)")
    ax.set_title(f"Arena {board.profile}: adaptation vs robustness (up and right is better)\n"
                 f"mean over seeds {', '.join(map(str, board.seeds))}")
    ax.grid(alpha=0.3)
    ax.legend(title="strategy: drift share, accuracy", fontsize=8, title_fontsize=8, loc="center left",
              bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def plot_long_horizon(board: Leaderboard, path: Path) -> Path:
    """Accuracy after the trigger vs the number of clean batches before the attack, per strategy."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    attacks = _attacks(board)
    for strategy in board.strategies:
        rows = [(int(s.split("@")[1]), board.row(s, strategy)) for s in attacks if board.row(s, strategy)]
        if not rows:
            continue
        launches = [t for t, _ in rows]
        mean = np.array([r.final_acc.mean for _, r in rows]) * 100
        std = np.array([r.final_acc.std for _, r in rows]) * 100
        ax.errorbar(launches, mean, yerr=std, marker="o", capsize=3, color=COLORS.get(strategy, "gray"),
                    label=strategy)
    launches = sorted({int(s.split("@")[1]) for s in attacks})
    ax.set_xticks(launches)
    ax.set_xlabel("clean stream batches before the attack starts")
    ax.set_ylabel("test accuracy after the trigger, %")
    ax.set_title("Does the defense hold over time? (error bars: std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_drift(board: Leaderboard, path: Path) -> Path:
    """Drift gain per kind and strategy, in points on the drifted test set."""
    drifts = [s for s in board.scenarios() if s.startswith("drift:")]
    strategies = [s for s in board.strategies if any(board.row(d, s) for d in drifts)]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(drifts)), 4.5))
    width = 0.8 / max(len(strategies), 1)
    for i, strategy in enumerate(strategies):
        # no bar where the strategy did not run the kind (the *-paper variants skip the late drift)
        gains = [row.drift_gain if row else None for row in (board.row(d, strategy) for d in drifts)]
        ax.bar(np.arange(len(drifts)) + i * width, [100 * g.mean if g else np.nan for g in gains], width,
               yerr=[100 * g.std if g else np.nan for g in gains], color=COLORS.get(strategy, "gray"),
               label=strategy, capsize=2)
    ax.set_xticks(np.arange(len(drifts)) + width * (len(strategies) - 1) / 2)
    ax.set_xticklabels([_drift_label(d) for d in drifts], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("accuracy gain on the drifted test set, points")
    ax.set_title("Benign drift: does the defense let the model learn it? (error bars: std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _drift_label(scenario: str) -> str:
    r"""'drift:pixel_shift@1000' -> 'pixel shift\nafter 1000': kinds on one line, when they drift on another.

    >>> _drift_label("drift:pixel_shift@1000"), _drift_label("drift:rotation")
    ('pixel shift\nafter 1000', 'rotation')
    """
    kind, _, after = scenario.split(":", 1)[1].partition("@")
    return kind.replace("_", " ") + (f"\nafter {after}" if after else "")
