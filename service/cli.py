"""The `dscguard` command line: burn-in, stream, demo, eval, analyze-md."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
from pydantic import ValidationError

from service.commands import add_service_commands
from service.config import PROFILES, ExperimentConfig


def _parse_overrides(pairs: Sequence[str]) -> dict:
    """`--set strategy.mu=0.5` -> {"strategy": {"mu": 0.5}}; values are read as JSON when they parse."""
    overrides: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set expects SECTION.FIELD=VALUE, got {pair!r}")
        section, name = key.split(".", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(section, {})[name] = value
    return overrides


def _experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="digits", choices=sorted(PROFILES), help="preset (default: digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="where datasets live (default: $DSCGUARD_DATA_DIR, ./data, ../shared/data)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set strategy.early_stop=batch (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_config(args: argparse.Namespace, **extra: dict) -> ExperimentConfig:
    overrides = _parse_overrides(args.set)
    for section, fields in extra.items():
        overrides.setdefault(section, {}).update(fields)
    if args.data_dir:
        overrides.setdefault("data", {})["data_dir"] = args.data_dir
    try:
        return ExperimentConfig.from_profile(args.profile, seed=args.seed, device=args.device, **overrides)
    except ValidationError as exc:
        raise SystemExit(f"invalid configuration:\n{exc}") from exc


def cmd_burn_in(args: argparse.Namespace) -> int:
    from service.experiment import Experiment

    experiment = Experiment.prepare(build_config(args), progress=not args.no_progress)
    result = experiment.burnin
    print(f"burn-in {'loaded from cache' if result.cached else 'trained'}: {result.directory}")
    for record in result.history:
        print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    print(f"test accuracy at the start of the stream: {experiment.test_accuracy(experiment.new_learner()):.4f}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from service.experiment import Experiment

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

    evaluation = evaluate(config, strategies=args.strategies, scenarios=args.scenarios, seeds=args.seeds,
                          progress=not args.no_progress)
    written = write_reports(evaluation, out, plots=not args.no_plots)
    print(table_markdown(evaluation))
    for name, check in (bar_checks(evaluation) or {}).items():
        print(f"{name}: {'PASS' if check['passed'] else 'FAIL'}")
    print(f"wrote {', '.join(str(p) for p in written.values())} ({evaluation.seconds:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    return _evaluate_and_report(build_config(args), args, args.out)


def cmd_demo(args: argparse.Namespace) -> int:
    args.profile = "digits"
    return _evaluate_and_report(build_config(args), args, args.out)


def cmd_analyze_md(args: argparse.Namespace) -> int:
    from attacker_sim.analysis import backtracking_rows
    from attacker_sim.plots import plot_backtracking
    from service.atomic import atomic_write_text

    rows = backtracking_rows(build_config(args), ks=args.k, seeds=args.seeds, progress=not args.no_progress)
    print(f"{'k':>4}  {'clean MD':>18}  {'poisoned MD':>18}  ratio")
    for row in rows:
        clean, poisoned = row["clean"], row["poisoned"]
        print(f"{row['k']:4d}  {clean['mean']:9.4f} ± {clean['std']:6.4f}  {poisoned['mean']:9.4f} ± "
              f"{poisoned['std']:6.4f}  {poisoned['mean'] / max(clean['mean'], 1e-12):5.1f}x")
    from pathlib import Path

    out = Path(args.out)
    atomic_write_text(out / "backtracking.json", json.dumps({"rows": rows}, indent=2))
    print(f"wrote {plot_backtracking(rows, out / 'backtracking.png')} and {out / 'backtracking.json'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attacker_sim.sweep import sweep, sweep_markdown
    from service.atomic import atomic_write_text

    try:
        results = sweep(build_config(args), args.vary, seeds=args.seeds, progress=not args.no_progress)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    table = sweep_markdown(results)
    print(table)
    out = Path(args.out)
    atomic_write_text(out / "sweep.json", json.dumps(results, indent=2))
    atomic_write_text(out / "sweep.md", table + "\n")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}")
    return 0


def _eval_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, help=f"report directory (default: {default_out})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the profile's, 0 1 2)")
    parser.add_argument("--strategies", nargs="+", default=["st", "gc", "at", "dsc"],
                        choices=("st", "gc", "at", "dsc"))
    parser.add_argument("--scenarios", nargs="+", default=["clean", "poison"], choices=("clean", "poison"))
    parser.add_argument("--no-plots", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dscguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("burn-in", help="train (or load from cache) the burn-in model and its checkpoints")
    _experiment_options(p)
    p.set_defaults(func=cmd_burn_in)

    p = sub.add_parser("stream", help="stream clean batches through a strategy; print accuracy and discrepancy")
    _experiment_options(p)
    p.add_argument("--strategy", default="dsc", choices=("st", "gc", "at", "dsc"))
    p.add_argument("--dataset", choices=("digits", "mnist", "cifar10", "cifar100", "svhn"),
                   help="dataset (default: the profile's)")
    p.add_argument("--batches", type=int, default=0, help="stream batches (default: one pass over the stream split)")
    p.add_argument("--eval-every", type=int, default=5, help="print test accuracy every N batches")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("eval", help="every strategy vs the clean oracle and the accumulative attack, over seeds")
    _experiment_options(p)
    _eval_options(p, "reports/eval")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the attack-vs-defense demo on digits: table, results.json, report.md, plots")
    _experiment_options(p)
    _eval_options(p, "reports/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="DSC under one-at-a-time changes of its settings (threshold, early stop, ...)")
    _experiment_options(p)
    p.add_argument("--vary", action="append", required=True, metavar="SECTION.FIELD=V1,V2",
                   help="e.g. --vary strategy.early_stop=sample,batch "
                        "--vary calibration.target_false_flag_rate=0.05,0.2")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--out", default="reports/sweep")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze-md", help="mean discrepancy vs backtracking interval k, clean vs poisoned")
    _experiment_options(p)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 5, 10, 20], help="backtracking intervals")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--out", default="reports/analyze-md")
    p.set_defaults(func=cmd_analyze_md)
    add_service_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batches", 1) < 0 or getattr(args, "eval_every", 1) < 1:
        raise SystemExit("--batches must be >= 0 and --eval-every >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
