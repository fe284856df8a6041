"""PNG plots for reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from service.atomic import atomic_write_bytes  # noqa: E402

COLORS = {"st": "tab:red", "gc": "tab:orange", "at": "tab:purple", "dsc": "tab:blue"}


def _save(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_accuracy_traces(evaluation, path: Path) -> Path:
    """Test accuracy along the stream per strategy, one panel per scenario, one line per seed."""
    fig, axes = plt.subplots(1, len(evaluation.scenarios), figsize=(6 * len(evaluation.scenarios), 4), squeeze=False)
    for ax, scenario in zip(axes[0], evaluation.scenarios, strict=True):
        for strategy in evaluation.strategies:
            for i, run in enumerate(evaluation.runs_for(strategy, scenario)):
                ax.plot(np.arange(len(run.trace)), np.asarray(run.trace) * 100, color=COLORS.get(strategy),
                        alpha=0.8 if i == 0 else 0.35, label=strategy.upper() if i == 0 else None)
                if scenario == "poison":
                    ax.scatter([len(run.trace) - 1], [run.trace[-1] * 100], color=COLORS.get(strategy), marker="x")
        ax.set_title("clean oracle" if scenario == "clean" else "accumulative poison (x: after the trigger)")
        ax.set_xlabel("stream batch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_discrepancy_histogram(evaluation, path: Path) -> Path | None:
    """Memorization Discrepancy of clean vs poisoned samples as DSC received them (paper Fig. 1)."""
    clean = [d for r in evaluation.runs_for("dsc", "clean") for d in r.discrepancy]
    poison = [d for r in evaluation.runs_for("dsc", "poison") for d in r.discrepancy]
    if not clean or not poison:
        return None
    clean, poison = np.concatenate(clean), np.concatenate(poison)
    low = max(min(clean.min(), poison.min()), 1e-6)
    bins = np.logspace(np.log10(low), np.log10(max(clean.max(), poison.max(), low * 10)), 50)
    fig, ax = plt.subplots(figsize=(6, 4))
    # share of samples per bin (not density: the log-spaced bins have different widths)
    for values, label in ((clean, "clean"), (poison, "poisoned")):
        ax.hist(np.clip(values, low, None), bins=bins, alpha=0.6, label=f"{label} (n={len(values)})",
                weights=np.full(len(values), 1.0 / len(values)))
    for seed, cal in evaluation.calibration.items():
        ax.axvline(cal["mu"], color="black", linestyle="--", alpha=0.6, label="mu (calibrated)" if seed == min(
            evaluation.calibration) else None)
    ax.set_xscale("log")
    ax.set_xlabel("memorization discrepancy KL(p_aux || p_cur)")
    ax.set_ylabel("share of samples")
    ax.legend()
    ax.set_title("discrepancy of samples as received by DSC")
    return _save(fig, path)


def plot_backtracking(rows: list[dict], path: Path) -> Path:
    """Mean discrepancy vs backtracking interval k, clean vs poisoned (paper Fig. 2)."""
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("clean", "clean"), ("poisoned", "poisoned")):
        mean = np.array([r[key]["mean"] for r in rows])
        std = np.array([r[key]["std"] for r in rows])
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xlabel("backtracking interval k (stream batches)")
    ax.set_ylabel("mean memorization discrepancy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
