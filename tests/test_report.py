"""report.md and the plots, on a hand-made evaluation (no training): what they show, not only that they exist."""

import numpy as np
import pytest

from attacker_sim.campaign import RunResult
from attacker_sim.evaluation import Evaluation
from attacker_sim.plots import (
    MEAN_LINE,
    SEED_LINE,
    accuracy_figure,
    backtracking_figure,
    discrepancy_figure,
    plot_accuracy_traces,
)
from attacker_sim.report import report_markdown, table_legend, table_markdown
from service.core.config import ExperimentConfig

SEEDS = (0, 1, 2)
CALIBRATION = {0: {"mu": 0.5, "tau": 0.01, "unit": "sample"}, 1: {"mu": 0.4, "tau": 0.0, "unit": "sample"},
               2: {"mu": 0.6, "tau": 0.02, "unit": "sample"}}


def _run(strategy: str, scenario: str, seed: int, tiny: float = 1e-3) -> RunResult:
    rng = np.random.default_rng(seed)
    if scenario == "clean":
        trace = list(0.9 + 0.01 * seed + 0.005 * np.arange(6))  # 5 steps
        poison = trigger = None
    else:
        accumulative = 2 + seed  # seeds stop at different batches
        trace = list(0.9 - 0.02 * np.arange(accumulative + 1)) + [0.5 + 0.1 * seed]  # then the trigger
        poison, trigger = trace[-2], trace[-1]
    discrepancy = [np.concatenate([rng.uniform(tiny, 1.0, 20), [tiny]]) for _ in range(len(trace) - 1)]
    return RunResult(scenario, strategy, seed, start_acc=trace[0], batches=len(trace) - 1, final_acc=trace[-1],
                     poison_acc=poison, trigger_acc=trigger, flagged_rate=0.3, trace=trace,
                     discrepancy=discrepancy if strategy == "dsc" else [])


def _evaluation(tiny: float = 1e-3) -> Evaluation:
    evaluation = Evaluation(ExperimentConfig(), ["st", "dsc"], ["clean", "poison"], calibration=dict(CALIBRATION))
    evaluation.runs = [_run(s, c, seed, tiny) for seed in SEEDS for s in ("st", "dsc") for c in ("clean", "poison")]
    return evaluation


def test_the_report_explains_every_column_of_its_table():
    evaluation = _evaluation()
    header = table_markdown(evaluation).splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")][1:]  # all but "strategy"
    legend = table_legend(evaluation)
    assert len(columns) >= 9
    for column in columns:
        assert f"*{column}*: " in legend, column
    assert "at most 20" in legend and "after 21 clean batches" in legend  # the config's numbers
    report = report_markdown(evaluation, [])
    assert report.index(header) < report.index("Columns: *clean oracle final*")


def test_accuracy_panels_share_the_y_axis_and_draw_the_mean_thick():
    evaluation = _evaluation()
    fig = accuracy_figure(evaluation)
    clean_ax, poison_ax = fig.axes
    assert clean_ax.get_shared_y_axes().joined(clean_ax, poison_ax)
    assert clean_ax.get_ylim() == poison_ax.get_ylim()
    for ax, scenario in ((clean_ax, "clean"), (poison_ax, "poison")):
        thick = {line.get_label(): line for line in ax.lines if line.get_linewidth() == MEAN_LINE["linewidth"]}
        thin = [line for line in ax.lines if line.get_linewidth() == SEED_LINE["linewidth"]]
        assert sorted(thick) == ["DSC", "ST"] and len(thin) == 2 * len(SEEDS)
        traces = [np.asarray(r.trace) * 100 for r in evaluation.runs_for("dsc", scenario)]
        if scenario == "poison":
            traces = [t[:-1] for t in traces]  # the mean leaves out the trigger step
        common = min(len(t) for t in traces)
        assert np.allclose(thick["DSC"].get_ydata(), np.mean([t[:common] for t in traces], axis=0))
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert "each seed" in legend and "mean over 3 seeds" in legend
    assert "thin: each seed, thick: mean over 3 seeds" in fig._suptitle.get_text()


def test_the_histogram_draws_the_applied_thresholds_per_seed():
    evaluation = _evaluation()
    ax = discrepancy_figure(evaluation).axes[0]
    vertical = sorted(round(line.get_xdata()[0], 9) for line in ax.lines)
    # 6 DSC steps in the longest run of each seed (clean: 5, poison: up to 2 + seed + trigger): m = 0 .. steps - 1
    steps = {seed: max(5, 2 + seed + 1) for seed in SEEDS}
    expected = [CALIBRATION[s]["mu"] for s in SEEDS] + [CALIBRATION[s]["mu"] + CALIBRATION[s]["tau"] * (steps[s] - 1)
                                                        for s in SEEDS if CALIBRATION[s]["tau"]]
    assert vertical == sorted(round(v, 9) for v in expected)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("P at the first batch" in t for t in legend) and any("P at the last batch" in t for t in legend)
    assert "first bin" not in ax.get_xlabel()


def test_the_histogram_says_how_many_values_fell_below_its_first_bin():
    evaluation = _evaluation(tiny=1e-9)
    values = np.concatenate([d for r in evaluation.runs if r.strategy == "dsc" for d in r.discrepancy])
    ax = discrepancy_figure(evaluation).axes[0]
    assert f"{int((values < 1e-6).sum())} values below 1e-06 are counted in the first bin" in ax.get_xlabel()


def test_backtracking_bars_stay_on_the_log_axis_and_ticks_are_the_ks():
    rows = [{"k": k, "clean": {"mean": 0.01, "std": 0.03, "values": [0.0, 0.0, 0.03]},
             "poisoned": {"mean": 0.2, "std": 0.05, "values": [0.15, 0.2, 0.25]}} for k in (1, 2, 5, 10, 20)]
    ax = backtracking_figure(rows).axes[0]
    assert list(ax.get_xticks()) == [1, 2, 5, 10, 20] and len(ax.get_xticks(minor=True)) == 0
    for container in ax.containers:
        segments = container.lines[2][0].get_segments()
        assert all(low > 0 for (_, low), _ in segments)  # std 0.03 > mean 0.01: cut short of zero
    assert "± std" in ax.get_title() and "3 seeds" in ax.get_title()
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["clean: mean ± std over seeds", "poisoned: mean ± std over seeds"]


def test_plots_are_written_as_png(tmp_path):
    path = plot_accuracy_traces(_evaluation(), tmp_path / "accuracy.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")
