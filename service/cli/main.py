"""The `dscguard` command line: the experiments (burn-in, stream, demo, arena, eval, false-flags, sweep,
analyze-md), the service (serve, worker, attack, stack) and model bundles (bundle create, check, show);
`build_parser` lists them all.

Errors are one short message on stderr, `dscguard: error: ...`, naming the problem and the fix:
exit status 2 for a problem with the command line itself (as argparse's own errors), 1 for a
failure while running (a dataset not found, a file that cannot be written, ...), 130 on Ctrl-C.
`dscguard --debug COMMAND ...` lets the exception through, traceback and all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

from pydantic import ValidationError

from service.cli.bundles import add_bundle_commands
from service.cli.experiments import add_experiment_commands
from service.cli.options import CommandLineError, invalid_message, passive_openmp, validation_lines
from service.cli.services import add_service_commands

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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

    add_experiment_commands(sub)
    add_service_commands(sub)
    add_bundle_commands(sub)

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

    from service.core.data.loading import default_search_places

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
    from service.core.data.errors import DatasetNotFoundError

    if isinstance(exc, DatasetNotFoundError) and exc.dataset:
        return _dataset_message(exc, args)
    if isinstance(exc, ValidationError):
        return invalid_message("invalid configuration", validation_lines(exc))
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
