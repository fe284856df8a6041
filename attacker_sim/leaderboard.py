"""The arena's leaderboard: one row per (scenario, strategy), mean ± std over seeds, validated on write.

`Leaderboard` is a pydantic model: `leaderboard.json` is its dump and `leaderboard.schema.json` its
published JSON Schema, so a reader can validate a file without our code. Measures (fractions in [0, 1]
unless said otherwise):

- `final_acc`: accuracy at the end of the scenario: after the trigger (attacks), after the drift (drift,
  on the drifted test view), after the relabelled batches (label flip), after `clean_batches` (clean oracle).
- `recovery`: share of ST's loss the strategy recovers in the same scenario and seed,
  (acc - acc_ST) / (start_ST - acc_ST); only where ST lost at least `MIN_ST_LOSS`, and not for the backdoor (its
  `attack_success` says what it took).
- `drift_gain`: final - start on the drifted test view; `drift_gain_share`: that over ST's gain, only
  where ST gained at least `MIN_ST_LOSS` (a drift ST hardly learns says nothing about a defense).
- `poisons_flagged`: share of poisoned samples flagged (label flip: of the relabelled ones); `clean_flag_rate`:
  share of clean samples flagged (the realised false-flag rate, to compare with `target_flag_rate`), also over the first
  (`_early`) and last (`_late`) 100 batches of the long clean stream; `fresh_flag_rate_early`/`_late`: the
  share flagged of fresh clean batches (test-view data the model never learned) judged over the model states of
  those first and last 100 batches (`scenarios.FreshWindows`), nothing learned from them.
- `attack_success` (backdoor): the share of the test split's inputs of other classes that, stamped with the
  backdoor's square, the model classifies as the attacker's target; `final_acc` there is clean accuracy.
- `batches`: accumulative batches before the trigger; `seconds_per_step`: wall time of one step.
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel, ConfigDict, Field

from attacker_sim.report import Stat, plus_minus, summarize
from attacker_sim.scenarios import Outcome

MIN_ST_LOSS = 0.01  # recovery (and drift-gain share) are undefined where ST itself moved less than a point
SCHEMA_VERSION = 5  # 2: promotions_refused; 3: fresh_flag_rate_early/late; 4: those over windows, not at one state;
# 5: attack_success (the backdoor)


class Row(BaseModel):
    """One scenario x strategy, every measure as mean, std and the per-seed values (None: not measured)."""

    model_config = ConfigDict(extra="forbid")
    scenario: str
    strategy: str
    seed_count: int = Field(ge=1)
    start_acc: Stat
    final_acc: Stat
    poison_acc: Stat | None = None
    batches: Stat | None = None
    recovery: Stat | None = None
    drift_gain: Stat | None = None
    drift_gain_share: Stat | None = None
    poisons_flagged: Stat | None = None
    attack_success: Stat | None = None
    clean_flag_rate: Stat | None = None
    clean_flag_rate_early: Stat | None = None
    clean_flag_rate_late: Stat | None = None
    fresh_flag_rate_early: Stat | None = None
    fresh_flag_rate_late: Stat | None = None
    target_flag_rate: float | None = None
    promotions_refused: Stat | None = None
    seconds_per_step: Stat


class Leaderboard(BaseModel):
    """Everything one arena run measured, with the settings and environment that produced it."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    profile: str
    dataset: str
    model: str
    seeds: list[int]
    strategies: dict[str, dict] = Field(description="label -> the strategy settings it ran with")
    tuning: dict | None = Field(None, description="how the tuned baselines were chosen (rule, candidates)")
    rows: list[Row] = Field(min_length=1)
    checks: dict[str, dict] = Field(default_factory=dict)
    config: dict
    environment: dict
    seconds: float

    def row(self, scenario: str, strategy: str) -> Row | None:
        return next((r for r in self.rows if r.scenario == scenario and r.strategy == strategy), None)

    def scenarios(self) -> list[str]:
        return list(dict.fromkeys(r.scenario for r in self.rows))


def _stat(values) -> Stat | None:
    summary = summarize(values)
    return Stat(**summary) if summary else None


def build_rows(outcomes: list[Outcome]) -> list[Row]:
    """Aggregate outcomes over seeds; recovery and drift-gain share are taken against ST per seed."""
    st = {(o.scenario, o.seed): o for o in outcomes if o.strategy == "st"}
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[(outcome.scenario, outcome.strategy)].append(outcome)
    rows = []
    for (scenario, strategy), runs in groups.items():
        recovery, gain, share = [], [], []
        for run in runs:
            ref = st.get((scenario, run.seed))
            # campaigns and label flips; not a backdoor, whose clean accuracy is not what it attacks
            attacked = (run.poison_acc is not None or run.poisons_flagged is not None) and run.attack_success is None
            if ref is not None and attacked and ref.start_acc - ref.final_acc >= MIN_ST_LOSS:
                recovery.append((run.final_acc - ref.final_acc) / (ref.start_acc - ref.final_acc))
            if scenario.startswith("drift:"):
                gain.append(run.final_acc - run.start_acc)
                ref_gain = ref.final_acc - ref.start_acc if ref is not None else 0.0
                share.append(gain[-1] / ref_gain if ref_gain >= MIN_ST_LOSS else None)
        targets = [r.target_flag_rate for r in runs if r.target_flag_rate is not None]
        rows.append(Row(
            scenario=scenario, strategy=strategy, seed_count=len(runs),
            start_acc=_stat(r.start_acc for r in runs), final_acc=_stat(r.final_acc for r in runs),
            poison_acc=_stat(r.poison_acc for r in runs), batches=_stat(r.batches for r in runs),
            recovery=_stat(recovery), drift_gain=_stat(gain), drift_gain_share=_stat(share),
            poisons_flagged=_stat(r.poisons_flagged for r in runs),
            attack_success=_stat(r.attack_success for r in runs),
            clean_flag_rate=_stat(r.clean_flag_rate for r in runs),
            clean_flag_rate_early=_stat(r.clean_flag_rate_early for r in runs),
            clean_flag_rate_late=_stat(r.clean_flag_rate_late for r in runs),
            fresh_flag_rate_early=_stat(r.fresh_flag_rate_early for r in runs),
            fresh_flag_rate_late=_stat(r.fresh_flag_rate_late for r in runs),
            target_flag_rate=targets[0] if targets else None,
            promotions_refused=_stat(r.promotions_refused for r in runs),
            seconds_per_step=_stat(r.seconds_per_step for r in runs),
        ))
    return rows


def _early_late(early: Stat | None, late: Stat | None) -> str:
    """'early / late' rates in percent, or '–' where they were not measured."""
    return f"{plus_minus(early, digits=0)} / {plus_minus(late, digits=0)}" if early is not None else "–"


def summary_columns(board: Leaderboard) -> list[tuple[str, str]]:
    """(scenario, header) of the summary table: the clean oracle, each attack, the drift kinds."""
    columns = []
    for scenario in board.scenarios():
        if scenario == "clean":
            columns.append((scenario, "clean oracle"))
        elif scenario.startswith("drift:"):
            columns.append((scenario, f"drift gain {scenario.split(':', 1)[1]}"))
        elif scenario.startswith("backdoor:"):
            columns.append((scenario, f"{scenario}: clean / attack success"))
        else:
            columns.append((scenario, scenario))
    return columns


def _summary_cell(scenario: str, row: Row | None) -> str:
    """A summary cell: the drift gain (drift), clean accuracy / attack success (backdoor), else final accuracy."""
    if row is None:
        return "–"
    if scenario.startswith("drift:"):
        return plus_minus(row.drift_gain)
    if row.attack_success is not None:
        return f"{plus_minus(row.final_acc)} / {plus_minus(row.attack_success)}"
    return plus_minus(row.final_acc)


def markdown(board: Leaderboard) -> str:
    """leaderboard.md: the summary, the per-scenario details, the tuning, the checks and a legend."""
    seeds = ", ".join(map(str, board.seeds))
    lines = [f"# Arena: {board.profile} ({board.dataset}, {board.model}), seeds {seeds}", "",
             "Accuracy after each scenario in percent on the test split (attacks: after the trigger; "
             "drift columns: the gain in points on the drifted test set), mean ± std over seeds. "
             "'–': not run for that strategy.", ""]
    columns = summary_columns(board)
    lines.append("| strategy | " + " | ".join(h for _, h in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for strategy in board.strategies:
        cells = []
        for scenario, _ in columns:
            row = board.row(scenario, strategy)
            cells.append(_summary_cell(scenario, row))
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "## Every row", "",
              "| scenario | strategy | start | final | batch | recovery of ST's loss | drift gain share | "
              "poisons flagged | attack success | clean flagged (target) | early / late | fresh early / late | "
              "promotions refused | ms/step |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in board.rows:
        target = f" ({row.target_flag_rate:.0%})" if row.target_flag_rate is not None else ""
        lines.append("| " + " | ".join([
            row.scenario, row.strategy, plus_minus(row.start_acc), plus_minus(row.final_acc),
            plus_minus(row.batches, 1.0), plus_minus(row.recovery, 100, 0), plus_minus(row.drift_gain_share, 100, 0),
            plus_minus(row.poisons_flagged, 100, 0), plus_minus(row.attack_success),
            plus_minus(row.clean_flag_rate, 100, 0) + target,
            _early_late(row.clean_flag_rate_early, row.clean_flag_rate_late),
            _early_late(row.fresh_flag_rate_early, row.fresh_flag_rate_late),
            plus_minus(row.promotions_refused, 1.0, 1), plus_minus(row.seconds_per_step, 1000, 1)]) + " |")
    lines += ["", "## Strategies", ""]
    for label, settings in board.strategies.items():
        lines.append(f"- **{label}**: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if board.tuning:
        tuning = board.tuning
        lines += ["", f"## How gc and at were tuned (seeds {', '.join(map(str, tuning['seeds']))}, "
                      "trusted calibration split)", "", tuning["rule"], "",
                  "ST on the tuning seeds: clean oracle {clean_acc:.1%}, drift gain {drift_gain:+.1%}, after the "
                  "trigger {attack_acc:.1%}.".format(**tuning["reference"]),
                  "", "| candidate | clean oracle | drift gain | after the trigger | admissible | chosen |",
                  "|---|---|---|---|---|---|"]
        for c in tuning["candidates"]:
            lines.append(f"| {c['label']} | {c['clean_acc']:.1%} | {c['drift_gain']:+.1%} | {c['attack_acc']:.1%} | "
                         f"{'yes' if c['admissible'] else 'no'} | {'**chosen**' if c['chosen'] else ''} |")
        if tuning["fallback"]:
            lines.append(f"\nNo admissible candidate for {', '.join(tuning['fallback'])}: the closest was taken.")
    if board.checks:
        lines += ["", "## Checks", ""]
        for name, check in board.checks.items():
            lines.append(f"- {'PASS' if check['passed'] else 'FAIL'} {name}: {check['detail']}")
    lines += ["", "## Columns", "",
              "*start*: accuracy when the scenario begins (attacks: at launch). *final*: after the trigger "
              "(attacks), after the drift (drift kinds, on the drifted test set), after the clean batches "
              "(clean oracle). *batch*: accumulative batches before the attacker's monitor fired. *recovery of "
              "ST's loss*: (final - final_ST) / (start_ST - final_ST), where ST lost at least a point. *drift "
              "gain share*: the drift gain over ST's. *poisons flagged*: share of poisoned samples flagged (label "
              "flips: of the relabelled ones; backdoor: of the stamped ones). *attack success* (backdoor): share of "
              "the other classes' test inputs that, stamped, are classified as the target; its *final* is clean "
              "accuracy. "
              "*clean flagged*: share of clean samples flagged (realised false-flag rate; target in brackets); "
              "*early / late*: over the first and last 100 batches of the long clean stream; *fresh early / late*: "
              "fresh clean test batches judged, not learned, over the model states of those batches. "
              "*promotions refused*: "
              "snapshots DSC's rolling auxiliary did not promote, by its health gate. *ms/step*: wall "
              "time per step on this machine, other work included.",
              "", f"Run time {board.seconds:.0f} s on {board.environment.get('machine')} "
                  f"({board.environment.get('cpu_threads')} threads, torch {board.environment.get('torch')})."]
    return "\n".join(lines) + "\n"
