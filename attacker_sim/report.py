"""Reports of an evaluation: `results.json` (validated on write; `results.schema.json` its schema), `report.md`,
and PNG plots.

The markdown table follows the paper's Table 1: clean-oracle final accuracy, start, accumulative
batches survived, accuracy after the poison phase, after the trigger, and the trigger's delta,
as mean ± std over seeds, in percent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from attacker_sim.evaluation import Evaluation
from service.core.atomic import atomic_write_text
from service.core.environment import environment
from service.core.strategy_registry import StrategyName

METRICS = ("start_acc", "batches", "poison_acc", "trigger_acc", "delta", "final_acc", "flagged_rate",
           "corrected_rate", "attack_success_rate", "trigger_flagged_rate", "seconds_per_step")

class Stat(BaseModel):
    """One measure over seeds: mean, std and the per-seed values."""

    model_config = ConfigDict(extra="forbid")
    mean: float
    std: float
    values: list[float] = Field(min_length=1)


class FractionStat(Stat):
    mean: float = Field(ge=0, le=1)  # accuracies and rates are fractions, never percentages


class ResultRow(BaseModel):
    """One (strategy, scenario) of an evaluation; None where the scenario does not measure it."""

    model_config = ConfigDict(extra="forbid")
    dataset: str
    model: str
    strategy: StrategyName
    scenario: Literal["clean", "poison"]
    seed_count: int = Field(ge=1)
    start_acc: FractionStat
    batches: Stat | None
    poison_acc: FractionStat | None
    trigger_acc: FractionStat | None
    delta: Stat | None
    clean_final_acc: FractionStat | None
    flagged_rate: FractionStat | None
    corrected_rate: FractionStat | None
    attack_success_rate: FractionStat | None
    trigger_flagged_rate: FractionStat | None
    seconds_per_step: Stat


class EvalResults(BaseModel):
    """`results.json`: validated when written; `results.schema.json` is its published JSON Schema."""

    model_config = ConfigDict(extra="forbid")
    rows: list[ResultRow] = Field(min_length=1)
    config: dict
    seeds: list[int]
    calibration: dict
    burnin: dict
    traces: list[dict]
    environment: dict
    seconds: float


def summarize(values) -> dict | None:
    """Mean, std and the values themselves over seeds (None where no seed measured it)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def rows(evaluation: Evaluation) -> list[dict]:
    """One row per (strategy, scenario), every metric as mean, std and the per-seed values."""
    dataset, model = evaluation.dataset_and_model()
    out = []
    for strategy in evaluation.strategies:
        for scenario in evaluation.scenarios:
            runs = evaluation.runs_for(strategy, scenario)
            if not runs:
                continue
            row = {"dataset": dataset, "model": model, "strategy": strategy, "scenario": scenario,
                   "seed_count": len(runs)}
            for metric in METRICS:
                row[metric] = summarize(getattr(r, metric) for r in runs)
            row["clean_final_acc"] = row.pop("final_acc") if scenario == "clean" else None
            if scenario == "poison":
                row.pop("final_acc")
            out.append(row)
    return out


def results_document(evaluation: Evaluation) -> EvalResults:
    return EvalResults(**{
        "rows": rows(evaluation),
        "config": evaluation.config.model_dump(),
        "seeds": sorted({r.seed for r in evaluation.runs}),
        "calibration": {str(k): v for k, v in evaluation.calibration.items()},
        "burnin": {str(k): v for k, v in evaluation.burnin.items()},
        "traces": [{"strategy": r.strategy, "scenario": r.scenario, "seed": r.seed, "test_acc": r.trace}
                   for r in evaluation.runs],
        "environment": environment(),
        "seconds": evaluation.seconds,
    })


def plus_minus(stat: Stat | dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std' of a `summarize` result or a `Stat`, scaled (100: fractions as percent); '–' where not measured.

    >>> plus_minus({"mean": 0.5, "std": 0.01}), plus_minus(Stat(mean=2.0, std=1.0, values=[1.0, 3.0]), 1.0, 0)
    ('50.0 ± 1.0', '2 ± 1')
    """
    if stat is None:
        return "–"
    mean, std = (stat.mean, stat.std) if isinstance(stat, Stat) else (stat["mean"], stat["std"])
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def table_markdown(evaluation: Evaluation) -> str:
    """The paper's Table 1 layout, one line per strategy."""
    by_key = {(r["strategy"], r["scenario"]): r for r in rows(evaluation)}
    lines = ["| strategy | clean oracle final | start | batch | +poison | +trigger | delta | poisons flagged "
             "| clean flagged | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for strategy in evaluation.strategies:
        clean, poison = by_key.get((strategy, "clean")), by_key.get((strategy, "poison"))
        start = (poison or clean)["start_acc"]
        lines.append("| " + " | ".join([
            strategy.upper(), plus_minus(clean and clean["clean_final_acc"]), plus_minus(start),
            plus_minus(poison and poison["batches"], 1), plus_minus(poison and poison["poison_acc"]),
            plus_minus(poison and poison["trigger_acc"]), plus_minus(poison and poison["delta"]),
            plus_minus(poison and poison["flagged_rate"], digits=0),
            plus_minus(clean and clean["flagged_rate"], digits=0),
            f"{(poison or clean)['seconds_per_step']['mean']:.3f}",
        ]) + " |")
    return "\n".join(lines)


def table_legend(evaluation: Evaluation) -> str:
    """What each column of `table_markdown` means, with this evaluation's numbers (batches, monitor)."""
    campaign = evaluation.config.campaign
    clean_batches = campaign.clean_batches or campaign.max_batches + 1
    columns = {
        "clean oracle final": f"test accuracy after {clean_batches} clean batches through the strategy, no attacker",
        "start": "test accuracy when the stream starts (the burnt-in model)",
        "batch": f"accumulative batches the attacker submitted before its monitor fired (accuracy down "
                 f"{campaign.monitor_drop * 100:g} points on its own validation split), at most "
                 f"{campaign.max_batches}",
        "+poison": "test accuracy after those accumulative batches",
        "+trigger": "test accuracy after the trigger batch that follows them",
        "delta": "+trigger minus +poison: what the trigger itself did (negative: it hurt)",
        "poisons flagged": "share of the submitted poisoned samples the strategy judged suspicious and corrected "
                           "(1 - attack success rate; at corrects every sample, st and gc none)",
        "clean flagged": "the same share on the clean stream: false flags",
        "s/step": "wall-clock seconds per defended update, mean (noisy when other jobs share the machine)",
    }
    return "Columns: " + "; ".join(f"*{name}*: {text}" for name, text in columns.items()) + "."


def bar_checks(evaluation: Evaluation) -> dict | None:
    """The product's bar (issue 3), computed from the means; None when a needed row is missing."""
    by_key = {(r["strategy"], r["scenario"]): r for r in rows(evaluation)}
    need = [("st", "clean"), ("st", "poison"), ("dsc", "clean"), ("dsc", "poison")]
    if any(k not in by_key for k in need):
        return None
    st_clean = by_key["st", "clean"]["clean_final_acc"]["mean"]
    st_trigger = by_key["st", "poison"]["trigger_acc"]["mean"]
    dsc_clean = by_key["dsc", "clean"]["clean_final_acc"]["mean"]
    dsc_trigger = by_key["dsc", "poison"]["trigger_acc"]["mean"]
    checks = {
        "attack_is_real": {"st_clean_final": st_clean, "st_trigger": st_trigger,
                           "drop": st_clean - st_trigger, "passed": st_clean - st_trigger >= 0.10},
        "dsc_keeps_clean_accuracy": {"dsc_clean_final": dsc_clean, "st_clean_final": st_clean,
                                     "gap": st_clean - dsc_clean, "passed": st_clean - dsc_clean <= 0.01},
        "dsc_recovers_half": {"recovered": dsc_trigger - st_trigger, "needed": 0.5 * (st_clean - st_trigger),
                              "passed": dsc_trigger - st_trigger >= 0.5 * (st_clean - st_trigger)},
    }
    for other in ("gc", "at"):
        if (other, "poison") in by_key:
            other_trigger = by_key[other, "poison"]["trigger_acc"]["mean"]
            checks[f"dsc_at_least_{other}"] = {"dsc_trigger": dsc_trigger, f"{other}_trigger": other_trigger,
                                               "passed": dsc_trigger >= other_trigger}
    return checks


def report_markdown(evaluation: Evaluation, plots: list[str]) -> str:
    cfg = evaluation.config
    seeds = sorted({r.seed for r in evaluation.runs})
    dataset, model = evaluation.dataset_and_model()
    lines = [f"# dscguard evaluation: {dataset} / {model} (profile `{cfg.profile}`)", "",
             f"Seeds {seeds}; mean ± std over seeds; accuracies in percent on the test split. "
             f"Attack: {cfg.attack.kind}, eps {cfg.attack.epsilon}, {cfg.attack.steps} steps of "
             f"{cfg.attack.step_size}, {cfg.attack.setting.replace('_', '-')}, beta {cfg.attack.beta}; "
             f"monitor fires at a {cfg.campaign.monitor_drop * 100:g}-point drop on the attacker's validation split, "
             f"at most {cfg.campaign.max_batches} accumulative batches. DSC: early stop per "
             f"{cfg.strategy.early_stop}, divergence {cfg.strategy.divergence}, calibrated for a "
             f"{cfg.calibration.target_false_flag_rate:.0%} false-flag rate on the trusted clean split.", "",
             table_markdown(evaluation), "", table_legend(evaluation), ""]
    checks = bar_checks(evaluation)
    if checks:
        lines += ["## The bar", ""]
        for name, check in checks.items():
            figures = ", ".join(f"{k} {v * 100:.1f}" for k, v in check.items() if k != "passed")
            lines.append(f"- {name}: {'PASS' if check['passed'] else 'FAIL'} ({figures})")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines.append(f"Wall time: {evaluation.seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def write_reports(evaluation: Evaluation, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write results.json, report.md and the plots into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plot_paths: list[str] = []
    if plots:
        from attacker_sim.plots import plot_accuracy_traces, plot_discrepancy_histogram

        written["accuracy"] = plot_accuracy_traces(evaluation, out_dir / "accuracy_along_stream.png")
        histogram = plot_discrepancy_histogram(evaluation, out_dir / "discrepancy_histogram.png")
        if histogram:
            written["histogram"] = histogram
        plot_paths = [str(p) for p in written.values()]
    written["results"] = atomic_write_text(out_dir / "results.json", results_document(evaluation).model_dump_json(
        indent=2))
    written["schema"] = atomic_write_text(out_dir / "results.schema.json",
                                          json.dumps(EvalResults.model_json_schema(), indent=2))
    written["report"] = atomic_write_text(out_dir / "report.md", report_markdown(evaluation, plot_paths))
    return written
