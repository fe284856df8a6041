"""The `dscguard` command line: the experiments (burn-in, stream, demo, arena, eval, sweep, analyze-md) and the
service (serve, worker, attack, stack); `build_parser` lists them all.

Errors are one short message on stderr, `dscguard: error: ...`, naming the problem and the fix:
exit status 2 for a problem with the command line itself (as argparse's own errors), 1 for a
failure while running (a dataset not found, a file that cannot be written, ...), 130 on Ctrl-C.
`dscguard --debug COMMAND ...` lets the exception through, traceback and all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence

from pydantic import BaseModel, ValidationError

from service.commands import add_service_commands
from service.config import PROFILES, ExperimentConfig, StrategyConfig
from service.strategy_registry import REGISTRY, STRATEGY_NAMES

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
STRATEGY_HELP = "; ".join(f"{name}: {info.summary}" for name, info in REGISTRY.items())


class CommandLineError(Exception):
    """Something wrong with the command line itself (a bad --set, --device, ...): exit status 2."""


def passive_openmp() -> None:
    """OpenMP threads that sleep when idle instead of spinning (unless OMP_WAIT_POLICY says otherwise).

    The API, the worker and Redis often share a machine: spinning threads of one process starve the
    others, and a worker whose threads are descheduled mid-step slows down many times over. Set
    before torch is imported (libgomp reads it when it loads), for every command: a single process
    loses nothing by it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _config_sections() -> dict[str, type[BaseModel]]:
    """The sections `--set SECTION.FIELD=VALUE` can reach: the config's sub-models, by name."""
    return {name: field.annotation for name, field in ExperimentConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def _check_field(flag: str, section: str, name: str) -> None:
    """A CommandLineError unless `section.name` is a field of the config, listing what exists."""
    sections = _config_sections()
    if section not in sections:
        raise CommandLineError(f"{flag} {section}.{name}: no section {section!r}; the sections are "
                               f"{', '.join(sections)}")
    fields = sections[section].model_fields
    if name not in fields:
        raise CommandLineError(f"{flag} {section}.{name}: section {section!r} has no field {name!r}; its fields are "
                               f"{', '.join(fields)}")


def _parse_overrides(pairs: Sequence[str]) -> dict:
    """`--set strategy.mu=0.5` -> {"strategy": {"mu": 0.5}}; values are read as JSON when they parse.

    >>> _parse_overrides(["strategy.early_stop=batch", "campaign.max_batches=3"])
    {'strategy': {'early_stop': 'batch'}, 'campaign': {'max_batches': 3}}
    """
    overrides: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise CommandLineError(f"--set expects SECTION.FIELD=VALUE, got {pair!r}")
        section, name = key.split(".", 1)
        _check_field("--set", section, name)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(section, {})[name] = value
    return overrides


def validation_lines(exc: ValidationError, name=lambda loc: ".".join(str(part) for part in loc)) -> list[str]:
    """One short line per error of `exc`: `strategy.epsilon: Input should be ... (got 3)`.

    `name` turns an error's location into the name the user knows the field by.
    """
    lines = []
    for error in exc.errors():
        got = error.get("input")
        shown = "" if isinstance(got, dict) or "input" not in error else f" (got {got!r})"
        lines.append(f"{name(error['loc'])}: {error['msg']}{shown}")
    return lines


def _invalid(what: str, lines: list[str]) -> str:
    return f"{what}: {lines[0]}" if len(lines) == 1 else f"{what}:\n" + "\n".join(f"  {line}" for line in lines)


def _check_device(name: str) -> None:
    from service.device import resolve_device

    try:
        resolve_device(name)
    except ValueError as exc:
        raise CommandLineError(f"--device {name}: {exc}") from exc


def _experiment_options(parser: argparse.ArgumentParser, *, profile: bool = True, seed: bool = True) -> None:
    if profile:
        parser.add_argument("--profile", default="digits", choices=sorted(PROFILES),
                            help="preset of every setting: digits (seconds on a CPU), mnist, cifar10-small, "
                                 "paper (for a GPU)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of the data split, the burn-in and the stream")
    parser.add_argument("--data-dir", help="where the datasets live; when given, the only place searched "
                                           "(default: $DSCGUARD_DATA_DIR, ./data, ../shared/data)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set strategy.early_stop=batch (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_config(args: argparse.Namespace, **extra: dict) -> ExperimentConfig:
    """The one config of a command: its profile, then --seed, --device, --data-dir and every --set."""
    overrides = _parse_overrides(args.set)
    for section, fields in extra.items():
        overrides.setdefault(section, {}).update(fields)
    if args.data_dir:
        overrides.setdefault("data", {})["data_dir"] = args.data_dir
    _check_device(args.device)
    try:
        return ExperimentConfig.from_profile(args.profile, seed=getattr(args, "seed", 0), device=args.device,
                                             **overrides)
    except ValidationError as exc:
        raise CommandLineError(_invalid("invalid configuration", validation_lines(exc))) from exc


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
    import numpy as np

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


def cmd_arena(args: argparse.Namespace) -> int:
    from attacker_sim.arena import run_arena, write_leaderboard
    from attacker_sim.leaderboard import markdown

    board = run_arena(build_config(args), seeds=args.seeds, strategies=args.strategies, progress=not args.no_progress)
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


def _check_varies(config: ExperimentConfig, varies: Sequence[str]) -> None:
    """Every --vary names a field and every value is valid: refused before hours of runs, not midway."""
    from attacker_sim.sweep import parse_vary

    for spec in varies:
        try:
            section, name, values = parse_vary(spec)
        except ValueError as exc:
            raise CommandLineError(str(exc)) from exc
        _check_field("--vary", section, name)
        for value in values:
            base = config.model_dump()
            base[section][name] = value
            try:
                ExperimentConfig(**base)
            except ValidationError as exc:
                raise CommandLineError(_invalid(f"--vary {spec}", validation_lines(exc))) from exc


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attacker_sim.sweep import sweep, sweep_markdown
    from service.atomic import atomic_write_text

    config = build_config(args)
    _check_varies(config, args.vary)
    results = sweep(config, args.vary, seeds=args.seeds, progress=not args.no_progress)
    table = sweep_markdown(results)
    print(table)
    out = Path(args.out)
    atomic_write_text(out / "sweep.json", json.dumps(results, indent=2))
    atomic_write_text(out / "sweep.md", table + "\n")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}")
    return 0


def _count(minimum: int):
    """An argparse type: an integer >= `minimum`, refused by argparse itself (exit 2) otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, when it has one worth showing (not for flags, not
    None: an option without a value says in its help what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or default is None or default is argparse.SUPPRESS
                or default == [] or "%(default)" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """`dscguard`'s parsers, subcommands included (argparse makes them of the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every subcommand below `parser`, nested ones as `stack up`, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield prefix + name, subparser
                yield from subcommands(subparser, f"{prefix}{name} ")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dscguard")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the exception and its traceback instead of one message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("burn-in", help="train (or load from cache) the burn-in model and its checkpoints")
    _experiment_options(p)
    p.set_defaults(func=cmd_burn_in)

    p = sub.add_parser("stream", help="stream clean batches through a strategy; print accuracy and discrepancy")
    _experiment_options(p)
    p.add_argument("--strategy", default=StrategyConfig().name, choices=STRATEGY_NAMES, help=STRATEGY_HELP)
    p.add_argument("--dataset", choices=("digits", "mnist", "cifar10", "cifar100", "svhn"),
                   help="dataset (default: the profile's)")
    p.add_argument("--batches", type=_count(0), default=0,
                   help="stream batches; 0: one pass over the stream split")
    p.add_argument("--eval-every", type=_count(1), default=5, help="print test accuracy every N batches")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("eval", help="every strategy vs the clean oracle and the accumulative attack, over seeds")
    _experiment_options(p, seed=False)
    _eval_options(p, "reports/eval")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("arena", help="the arena: every strategy vs long-horizon, slow, black-box and adaptive "
                                      "attacks and benign drift, baselines tuned; leaderboard.json/md and plots")
    _experiment_options(p, seed=False)
    _arena_options(p, "reports/arena")
    p.set_defaults(func=cmd_arena)

    p = sub.add_parser("demo", help="the digits arena (about 10 min on 2 cores): the leaderboard, its JSON and plots")
    _experiment_options(p, profile=False, seed=False)
    _arena_options(p, "reports/demo")
    p.set_defaults(func=cmd_demo, profile="digits")

    p = sub.add_parser("sweep", help="DSC under one-at-a-time changes of its settings (threshold, early stop, ...)")
    _experiment_options(p, seed=False)
    p.add_argument("--vary", action="append", required=True, metavar="SECTION.FIELD=V1,V2",
                   help="one setting and the values to try, e.g. --vary strategy.early_stop=sample,batch "
                        "--vary calibration.target_false_flag_rate=0.05,0.2 (repeatable; each swept on its own)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of every variant (default: the profile's, 0 1 2)")
    p.add_argument("--out", default="reports/sweep", help="directory of sweep.json and sweep.md")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze-md", help="mean discrepancy vs backtracking interval k, clean vs poisoned")
    _experiment_options(p, seed=False)
    p.add_argument("--k", type=_count(1), nargs="+", default=[1, 2, 5, 10, 20],
                   help="backtracking intervals k, in stream batches")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to average over (default: the profile's, 0 1 2)")
    p.add_argument("--out", default="reports/analyze-md", help="directory of backtracking.json and backtracking.png")
    p.set_defaults(func=cmd_analyze_md)
    add_service_commands(sub)

    commands = [name for name, _ in subcommands(parser) if " " not in name]
    parser.description = (f"dscguard: a poisoning defense for online learning, and its evaluation.\n\n"
                          f"commands: {', '.join(commands)}; `dscguard COMMAND --help` describes one.")
    _summaries_as_descriptions(parser)
    return parser


def _summaries_as_descriptions(parser: argparse.ArgumentParser) -> None:
    """Each subcommand's own --help opens with the one-line summary its parent lists."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                subparser = action.choices[choice.dest]
                subparser.description = subparser.description or choice.help
                _summaries_as_descriptions(subparser)


def _dataset_message(exc, args: argparse.Namespace) -> str:
    """A dataset not found, in the CLI's terms: every place searched, and the flags that fix it."""
    def place(label: str, path) -> str:
        label = "--data-dir" if label == "data_dir" else label
        return f"{label} = {path}{'' if path.is_dir() else ' (missing)'}"

    from service.data.loading import default_search_places

    lines = [f"dataset {exc.dataset!r} not found.", "  searched: " + ", ".join(place(*p) for p in exc.searched)]
    fixes = list(exc.remedies)
    if exc.explicit:
        skipped = [label for label, _ in default_search_places()]
        if not any(label.startswith("$") for label in skipped):
            skipped.insert(0, "$DSCGUARD_DATA_DIR")
        lines.append(f"  not searched, as --data-dir was given: {', '.join(skipped)}")
        fixes.append("add --set data.download=true to download it there, where the network allows")
        fixes.append("leave out --data-dir to search the places above")
    else:
        if not any(label.startswith("$") for label, _ in exc.searched):
            lines[-1] += ", $DSCGUARD_DATA_DIR (unset)"
        fixes.append("add --set data.download=true to download it, where the network allows")
        fixes.append("pass --data-dir DIR or set DSCGUARD_DATA_DIR to a directory that holds these files")
    return "\n".join([*lines, "  to fix: " + ";\n    or ".join(fixes)])


def _message(exc: BaseException, args: argparse.Namespace) -> str:
    from service.data.errors import DatasetNotFoundError

    if isinstance(exc, DatasetNotFoundError) and exc.dataset:
        return _dataset_message(exc, args)
    if isinstance(exc, ValidationError):
        return _invalid("invalid configuration", validation_lines(exc))
    return str(exc) or type(exc).__name__


def _error(message: str, code: int) -> int:
    print(f"dscguard: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `dscguard` command; returns its exit status (see the module docstring for errors)."""
    passive_openmp()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("dscguard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CommandLineError as exc:
        if args.debug:
            raise
        return _error(str(exc), EXIT_USAGE)
    except SystemExit as exc:  # raised with a message by the service commands
        if not isinstance(exc.code, str):
            raise
        if args.debug:
            import traceback

            traceback.print_exc()
            raise
        return _error(exc.code, EXIT_FAILURE)
    except (ValueError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        return _error(_message(exc, args), EXIT_FAILURE)


if __name__ == "__main__":
    # `python -m service.cli` (how the stack starts its processes): run the importable module's main, so
    # that the error classes the commands raise (service.cli.CommandLineError) are the ones caught.
    from service.cli import main as _main

    sys.exit(_main())
