"""PNG plots for reports (matplotlib, headless Agg backend).

Each plot is built by a `*_figure` function that returns the matplotlib Figure (tests inspect it) and
written by the matching `plot_*` function.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from service.core.atomic import atomic_write_bytes  # noqa: E402
from service.core.strategy_registry import REGISTRY  # noqa: E402

COLORS = {name: info.colour for name, info in REGISTRY.items()}
SEED_LINE = {"linewidth": 0.8, "alpha": 0.35}
MEAN_LINE = {"linewidth": 2.5, "alpha": 0.95}
DISCREPANCY_FLOOR = 1e-6  # the histogram's lowest bin edge at most; smaller values are counted in the first bin


def _save(fig: Figure, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def accuracy_figure(evaluation) -> Figure:
    """Test accuracy along the stream per strategy, one panel per scenario, on one shared y-axis.

    Each seed is a thin line; the thick line is the mean over seeds, drawn over the batches every
    seed reached (in the poison panel: the accumulative phase, before the trigger).
    """
    scenarios = evaluation.scenarios
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.4), squeeze=False, sharey=True)
    seed_count = len({run.seed for run in evaluation.runs})
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for strategy in evaluation.strategies:
            color = COLORS.get(strategy)
            traces = [np.asarray(run.trace) * 100 for run in evaluation.runs_for(strategy, scenario)]
            for trace in traces:
                ax.plot(np.arange(len(trace)), trace, color=color, **SEED_LINE)
                if scenario == "poison":
                    ax.scatter([len(trace) - 1], [trace[-1]], color=color, marker="x")
            # poison runs end with the trigger step: the mean covers the accumulative phase only
            phase = [t[:-1] if scenario == "poison" else t for t in traces]
            common = min((len(t) for t in phase), default=0)
            if common:
                mean = np.mean([t[:common] for t in phase], axis=0)
                ax.plot(np.arange(common), mean, color=color, label=strategy.upper(), **MEAN_LINE)
        ax.set_title("clean oracle" if scenario == "clean" else "accumulative poison (x: after the trigger)")
        ax.set_xlabel("stream batch")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="gray", label="each seed", **SEED_LINE),
                    Line2D([], [], color="gray", label=f"mean over {_plural(seed_count, 'seed')}", **MEAN_LINE)]
        ax.legend(handles=handles, fontsize="small")
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle(f"thin: each seed, thick: mean over {_plural(seed_count, 'seed')} (up to the shortest run; "
                 "poison: before the trigger)", fontsize="medium")
    return fig


def plot_accuracy_traces(evaluation, path: Path) -> Path:
    """Write `accuracy_figure` as a PNG."""
    return _save(accuracy_figure(evaluation), path)


def applied_thresholds(evaluation) -> dict[int, tuple[float, float]]:
    """Per seed, DSC's threshold P = mu + tau * m at its first and its last stream batch (m = 0, 1, ...).

    The last batch is that of the seed's longest DSC run (a new learner starts every run at m = 0).
    """
    out = {}
    for seed, cal in sorted(evaluation.calibration.items()):
        steps = max((len(run.trace) - 1 for run in evaluation.runs
                     if run.strategy == "dsc" and run.seed == seed), default=1)
        out[seed] = (cal["mu"], cal["mu"] + cal["tau"] * max(steps - 1, 0))
    return out


def discrepancy_figure(evaluation) -> Figure | None:
    """Memorization Discrepancy of clean vs poisoned samples as DSC received them (paper Fig. 1), with the
    thresholds P that were applied; None without DSC runs of both scenarios."""
    clean = [d for r in evaluation.runs_for("dsc", "clean") for d in r.discrepancy]
    poison = [d for r in evaluation.runs_for("dsc", "poison") for d in r.discrepancy]
    if not clean or not poison:
        return None
    clean, poison = np.concatenate(clean), np.concatenate(poison)
    low = max(min(clean.min(), poison.min()), DISCREPANCY_FLOOR)
    bins = np.logspace(np.log10(low), np.log10(max(clean.max(), poison.max(), low * 10)), 50)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # share of samples per bin (not density: the log-spaced bins have different widths)
    for values, label in ((clean, "clean"), (poison, "poisoned")):
        ax.hist(np.clip(values, low, None), bins=bins, alpha=0.6, label=f"{label} (n={len(values)})",
                weights=np.full(len(values), 1.0 / len(values)))
    labelled = set()
    for first, last in applied_thresholds(evaluation).values():
        ax.axvline(first, color="black", linestyle="--", alpha=0.7,
                   label=None if "first" in labelled else "P at the first batch (= mu), per seed")
        labelled.add("first")
        if not np.isclose(first, last):
            ax.axvspan(first, last, color="black", alpha=0.06)
            ax.axvline(last, color="black", linestyle=":", alpha=0.9,
                       label=None if "last" in labelled else "P at the last batch (mu + tau m), per seed")
            labelled.add("last")
    ax.set_xscale("log")
    clipped = int((clean < low).sum() + (poison < low).sum())
    units = {cal.get("unit", "sample") for cal in evaluation.calibration.values()}
    notes = [f"{clipped} values below {low:.0e} are counted in the first bin"] if clipped else []
    if units == {"batch"}:
        notes.append("DSC compares P with a batch's mean discrepancy")
    ax.set_xlabel("\n".join(["memorization discrepancy KL(p_aux || p_cur)", *notes]))
    ax.set_ylabel("share of samples")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15 - 0.055 * len(notes)), ncol=2)
    ax.set_title("discrepancy of samples as received by DSC, and its threshold P")
    return fig


def plot_discrepancy_histogram(evaluation, path: Path) -> Path | None:
    """Write `discrepancy_figure` as a PNG; None (nothing written) when there is no figure."""
    fig = discrepancy_figure(evaluation)
    return None if fig is None else _save(fig, path)


def backtracking_figure(rows: list[dict]) -> Figure:
    """Mean discrepancy vs backtracking interval k, clean vs poisoned (paper Fig. 2), mean ± std over seeds.

    The y-axis is logarithmic: a lower error bar is cut short of zero (to 0.1 % of the mean) rather than
    leaving the axis.
    """
    ks = [r["k"] for r in rows]
    seed_count = len(rows[0]["clean"]["values"]) if rows else 0
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, label in (("clean", "clean"), ("poisoned", "poisoned")):
        mean = np.array([r[key]["mean"] for r in rows])
        std = np.array([r[key]["std"] for r in rows])
        lower = np.minimum(std, mean * 0.999)
        ax.errorbar(ks, mean, yerr=[lower, std], marker="o", capsize=3, label=f"{label}: mean ± std over seeds")
    ax.set_xlabel("backtracking interval k (stream batches)")
    ax.set_ylabel("mean memorization discrepancy")
    ax.set_yscale("log")
    ax.set_xticks(ks)
    ax.set_xticks([], minor=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"discrepancy vs backtracking interval ({_plural(seed_count, 'seed')}, bars: ± std)")
    return fig


def plot_backtracking(rows: list[dict], path: Path) -> Path:
    """Write `backtracking_figure` as a PNG."""
    return _save(backtracking_figure(rows), path)
