"""The experiment subcommands of `dscguard`: burn-in, stream, eval, arena, demo, false-flags, sweep, analyze-md.

The only layer, with `service/cli/services.py`, that imports both the core and the adversary (`attacker_sim`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from pydantic import ValidationError

from service.cli.options import (
    STRATEGY_HELP,
    CommandLineError,
    build_config,
    bundle_options,
    check_field,
    count,
    experiment_options,
    invalid_message,
    validation_lines,
    writable_output,
)
from service.core.config import ExperimentConfig, StrategyConfig
from service.core.strategy_registry import STRATEGY_NAMES


def cmd_burn_in(args: argparse.Namespace) -> int:
    from service.core.experiment import Experiment

    experiment = Experiment.prepare(build_config(args), progress=not args.no_progress)
    result = experiment.burnin
    print(f"burn-in {'loaded from cache' if result.cached else 'trained'}: {result.directory}")
    for record in result.history:
        print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    print(f"test accuracy at the start of the stream: {experiment.test_accuracy(experiment.new_learner()):.4f}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    import numpy as np

    from service.core.experiment import Experiment

    extra = {"strategy": {"name": args.strategy}}
    if args.dataset:
        extra["data"] = {"dataset": args.dataset}
    config = build_config(args, **extra)
    experiment = Experiment.prepare(config, progress=not args.no_progress)
    learner = experiment.new_learner()
    batches = args.batches or max(1, len(experiment.splits.stream) // config.stream.batch_size)
    if learner.calibration is not None:
        cal = learner.calibration
        print(f"calibration: mu={cal.mu:.4f} tau={cal.tau:.5f} (target false-flag rate "
              f"{cal.target_false_flag_rate:.0%}, {cal.samples} clean samples, {cal.warmup_batches} warm-up batches)")
    print(f"{'batch':>5}  {'test_acc':>8}  {'flagged':>7}  {'md_mean':>8}  {'threshold':>9}  {'ms/step':>7}")
    print(f"{'start':>5}  {experiment.test_accuracy(learner):8.4f}")
    scores, flagged, seconds = [], 0, []
    for index, (x, y) in enumerate(experiment.stream_batches(batches), start=1):
        report = learner.step(x, y)
        seconds.append(report.seconds["total"])
        flagged += report.flagged_count
        if report.discrepancy_before is not None:
            scores.append(report.discrepancy_before)
        if index % args.eval_every == 0 or index == batches:
            md = f"{report.discrepancy_before.mean():8.4f}" if report.discrepancy_before is not None else f"{'-':>8}"
            thr = f"{report.threshold:9.4f}" if report.threshold is not None else f"{'-':>9}"
            print(f"{index:5d}  {experiment.test_accuracy(learner):8.4f}  {report.flagged_count:7d}  {md}  {thr}  "
                  f"{1000 * report.seconds['total']:7.1f}")
    samples = batches * config.stream.batch_size
    print(f"strategy {args.strategy}: {batches} clean batches, {flagged}/{samples} samples flagged "
          f"({flagged / samples:.1%}), {1000 * float(np.mean(seconds)):.1f} ms per step")
    if scores:
        md = np.concatenate(scores)
        q = np.quantile(md, [0.5, 0.9, 0.99])
        print(f"memorization discrepancy of clean stream samples: mean {md.mean():.4f}, median {q[0]:.4f}, "
              f"p90 {q[1]:.4f}, p99 {q[2]:.4f}, max {md.max():.4f}")
    return 0


def _evaluate_and_report(config: ExperimentConfig, args: argparse.Namespace, out: str) -> int:
    from attacker_sim.evaluation import evaluate
    from attacker_sim.report import bar_checks, table_markdown, write_reports
    from service.cli.bundles import bundle_experiments

    config, prepare, subject = bundle_experiments(args, config)
    writable_output(out)
    evaluation = evaluate(config, strategies=args.strategies, scenarios=args.scenarios, seeds=args.seeds,
                          progress=not args.no_progress, prepare=prepare, subject=subject)
    written = write_reports(evaluation, out, plots=not args.no_plots)
    print(table_markdown(evaluation))
    for name, check in (bar_checks(evaluation) or {}).items():
        print(f"{name}: {'PASS' if check['passed'] else 'FAIL'}")
    print(f"wrote {', '.join(str(p) for p in written.values())} ({evaluation.seconds:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    return _evaluate_and_report(build_config(args), args, args.out)


def cmd_arena(args: argparse.Namespace) -> int:
    from attacker_sim.arena import run_arena, write_leaderboard
    from attacker_sim.leaderboard import markdown

    config = build_config(args)
    writable_output(args.out)
    board = run_arena(config, seeds=args.seeds, strategies=args.strategies, progress=not args.no_progress)
    written = write_leaderboard(board, args.out, plots=not args.no_plots)
    summary = markdown(board)
    print(summary[: summary.index("## Every row")].rstrip())
    for name, check in board.checks.items():
        print(f"{'PASS' if check['passed'] else 'FAIL'} {name}: {check['detail']}")
    print(f"wrote {', '.join(str(p) for p in written.values())} ({board.seconds:.0f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return cmd_arena(args)  # the digits arena: args.profile is digits (set_defaults)


def cmd_analyze_md(args: argparse.Namespace) -> int:
    from attacker_sim.analysis import backtracking_rows, poisoned_ratio, suggested_window
    from attacker_sim.plots import plot_backtracking
    from service.core.atomic import atomic_write_text

    config = build_config(args)
    out = writable_output(args.out)
    rows = backtracking_rows(config, ks=args.k, seeds=args.seeds, progress=not args.no_progress, on=args.on)
    print(f"{'k':>4}  {'clean MD':>18}  {'poisoned MD':>18}  ratio")
    for row in rows:
        clean, poisoned = row["clean"], row["poisoned"]
        print(f"{row['k']:4d}  {clean['mean']:9.4f} ± {clean['std']:6.4f}  {poisoned['mean']:9.4f} ± "
              f"{poisoned['std']:6.4f}  {poisoned_ratio(row):5.1f}x")
    window = suggested_window(rows)
    print(f"suggested strategy.auxiliary_window: {window} (largest poisoned/clean ratio, on the {args.on} split)")
    atomic_write_text(out / "backtracking.json", json.dumps({"rows": rows, "on": args.on,
                                                             "suggested_window": window}, indent=2))
    print(f"wrote {plot_backtracking(rows, out / 'backtracking.png')} and {out / 'backtracking.json'}")
    return 0


def cmd_false_flags(args: argparse.Namespace) -> int:
    from attacker_sim.false_flags import check_request, false_flag_check, markdown

    config = build_config(args)
    batches, fresh = max(config.arena.launch_after), config.arena.fresh_batches
    try:
        check_request(args.seeds, batches, fresh)
    except ValueError as exc:
        raise CommandLineError(str(exc)) from exc
    out = writable_output(args.out)
    result = false_flag_check(config, seeds=args.seeds, batches=batches, fresh_batches=fresh,
                              progress=not args.no_progress)
    _write_table(out, "false_flags", result, markdown(result))
    return 0


def _write_table(out, name: str, result, table: str) -> None:
    """Print a report's table and write it to `out` as `name`.md, with its data as `name`.json."""
    from service.core.atomic import atomic_write_text

    print(table)
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2))
    atomic_write_text(out / f"{name}.md", table + "\n")
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")


def _check_varies(config: ExperimentConfig, varies: Sequence[str]) -> None:
    """Every --vary names a field and every value is valid: refused before hours of runs, not midway."""
    from attacker_sim.sweep import parse_vary

    for spec in varies:
        try:
            section, name, values = parse_vary(spec)
        except ValueError as exc:
            raise CommandLineError(str(exc)) from exc
        check_field("--vary", section, name)
        for value in values:
            try:
                config.with_field(section, name, value)
            except ValidationError as exc:
                raise CommandLineError(invalid_message(f"--vary {spec}", validation_lines(exc))) from exc


def cmd_sweep(args: argparse.Namespace) -> int:
    from attacker_sim.sweep import sweep, sweep_markdown

    config = build_config(args)
    _check_varies(config, args.vary)
    out = writable_output(args.out)
    results = sweep(config, args.vary, seeds=args.seeds, progress=not args.no_progress)
    _write_table(out, "sweep", results, sweep_markdown(results))
    return 0


def _eval_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, help="report directory: results.json, report.md, PNG plots")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="seeds, each a burn-in and a run of everything (default: the profile's, 0 1 2)")
    parser.add_argument("--strategies", nargs="+", default=["st", "gc", "at", "dsc"],
                        choices=STRATEGY_NAMES, help=f"strategies to compare ({STRATEGY_HELP})")
    parser.add_argument("--scenarios", nargs="+", default=["clean", "poison"], choices=("clean", "poison"),
                        help="clean: the clean oracle (no attacker); poison: the accumulative attack and its trigger")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _arena_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    from attacker_sim.arena import VARIANTS

    parser.add_argument("--out", default=default_out,
                        help="report directory: leaderboard.json (+ schema), leaderboard.md, PNG plots")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="reporting seeds, disjoint from arena.tuning.seeds (default: the profile's, 0 1 2)")
    parser.add_argument("--strategies", nargs="+", choices=list(VARIANTS),
                        help="strategies to compare; gc and at are tuned, *-paper are the research code's constants, "
                             "dsc-sample judges each sample (default: the profile's arena.strategies)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def add_experiment_commands(sub) -> None:
    """Add the experiment commands to the `dscguard` subcommands."""
    p = sub.add_parser("burn-in", help="train (or load from cache) the burn-in model and its checkpoints")
    experiment_options(p)
    p.set_defaults(func=cmd_burn_in)

    p = sub.add_parser("stream", help="stream clean batches through a strategy; print accuracy and discrepancy")
    experiment_options(p)
    p.add_argument("--strategy", default=StrategyConfig().name, choices=STRATEGY_NAMES, help=STRATEGY_HELP)
    p.add_argument("--dataset", choices=("digits", "mnist", "cifar10", "cifar100", "svhn"),
                   help="dataset (default: the profile's)")
    p.add_argument("--batches", type=count(0), default=0,
                   help="stream batches; 0: one pass over the stream split")
    p.add_argument("--eval-every", type=count(1), default=5, help="print test accuracy every N batches")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("eval", help="every strategy vs the clean oracle and the accumulative attack, over seeds "
                                    "(a profile's burn-in, or your model: --bundle DIR --data FILE)")
    experiment_options(p, seed=False)
    bundle_options(p)
    _eval_options(p, "reports/eval")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("arena", help="the arena: every strategy vs long-horizon, slow, black-box and adaptive "
                                      "attacks and benign drift, baselines tuned; leaderboard.json/md and plots")
    experiment_options(p, seed=False)
    _arena_options(p, "reports/arena")
    p.set_defaults(func=cmd_arena)

    p = sub.add_parser("demo", help="the digits arena (about 17 min on 2 cores): the leaderboard, its JSON and plots")
    experiment_options(p, profile=False, seed=False)
    _arena_options(p, "reports/demo")
    p.set_defaults(func=cmd_demo, profile="digits")

    p = sub.add_parser("false-flags", help="the strategy's realised false-flag rate on fresh clean batches over "
                                            "many seeds, before and after the arena's long clean stream, with each "
                                            "seed's pool noise")
    experiment_options(p, seed=False)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(20)),
                   help="seeds, each a burn-in, a clean stream of max(arena.launch_after) batches and "
                        "arena.fresh_batches fresh batches judged before and after it (at least 2)")
    p.add_argument("--out", default="reports/false-flags", help="directory of false_flags.json and false_flags.md")
    p.set_defaults(func=cmd_false_flags)

    p = sub.add_parser("sweep", help="DSC under one-at-a-time changes of its settings (threshold, early stop, ...)")
    experiment_options(p, seed=False)
    p.add_argument("--vary", action="append", required=True, metavar="SECTION.FIELD=V1,V2",
                   help="one setting and the values to try, e.g. --vary strategy.early_stop=sample,batch "
                        "--vary calibration.target_false_flag_rate=0.05,0.2 (repeatable; each swept on its own)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of every variant (default: the profile's, 0 1 2)")
    p.add_argument("--out", default="reports/sweep", help="directory of sweep.json and sweep.md")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze-md", help="mean discrepancy vs backtracking interval k, clean vs poisoned")
    experiment_options(p, seed=False)
    p.add_argument("--k", type=count(1), nargs="+", default=[1, 2, 5, 10, 20],
                   help="backtracking intervals k, in stream batches")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to average over (default: the profile's, 0 1 2)")
    p.add_argument("--on", choices=["trusted", "stream"], default="trusted",
                   help="data: the defender's trusted split (to choose DSC's rolling window) or the stream split")
    p.add_argument("--out", default="reports/analyze-md", help="directory of backtracking.json and backtracking.png")
    p.set_defaults(func=cmd_analyze_md)
