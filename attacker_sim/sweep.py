"""`dscguard sweep`: DSC under one-at-a-time changes of its settings (paper Tables 7 and 9 analogues).

Each `--vary SECTION.FIELD=v1,v2,...` is swept on its own from the base config; every variant runs
the clean oracle and the accumulative attack for DSC over the same seeds, so the rows compare
like with like. Thresholds stay calibrated on the trusted clean split: nothing is tuned on test.
"""

from __future__ import annotations

from collections.abc import Sequence

from attacker_sim.evaluation import evaluate
from attacker_sim.report import plus_minus, rows
from service.core.config import ExperimentConfig, parse_setting, parse_value


def parse_vary(spec: str) -> tuple[str, str, list]:
    """`strategy.early_stop=sample,batch` -> ("strategy", "early_stop", ["sample", "batch"])."""
    form = "SECTION.FIELD=V1,V2,..."
    section, name, raw = parse_setting(spec, "--vary", form)
    if not raw:
        raise ValueError(f"--vary expects {form}, got {spec!r}")
    return section, name, [parse_value(item) for item in raw.split(",")]


def sweep(config: ExperimentConfig, varies: Sequence[str], seeds: Sequence[int] | None = None,
          progress: bool = True) -> list[dict]:
    """One result row per variant: DSC's clean-oracle and poison metrics (mean/std over seeds)."""
    out = []
    for spec in varies:
        section, name, values = parse_vary(spec)
        for value in values:
            variant = config.with_field(section, name, value)
            evaluation = evaluate(variant, strategies=["dsc"], seeds=seeds, progress=progress)
            by_scenario = {r["scenario"]: r for r in rows(evaluation)}
            out.append({"parameter": f"{section}.{name}", "value": value, "clean": by_scenario["clean"],
                        "poison": by_scenario["poison"]})
    return out


def sweep_markdown(results: list[dict]) -> str:
    lines = ["| parameter | value | clean oracle final | batch | +poison | +trigger | poisons flagged "
             "| clean flagged |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, p = r["clean"], r["poison"]
        cells = [plus_minus(c["clean_final_acc"]), plus_minus(p["batches"], 1), plus_minus(p["poison_acc"]),
                 plus_minus(p["trigger_acc"]), plus_minus(p["flagged_rate"], digits=0),
                 plus_minus(c["flagged_rate"], digits=0)]
        lines.append(f"| {r['parameter']} | {r['value']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
