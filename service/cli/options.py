"""What every `dscguard` command shares: the experiment options, `--set` overrides, the one config they
build, and the error a bad command line raises (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ValidationError

from service.core.config import PROFILES, ExperimentConfig, parse_setting, parse_value
from service.core.strategy_registry import REGISTRY

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


def check_field(flag: str, section: str, name: str) -> None:
    """A CommandLineError unless `section.name` is a field of the config, listing what exists."""
    sections = _config_sections()
    if section not in sections:
        raise CommandLineError(f"{flag} {section}.{name}: no section {section!r}; the sections are "
                               f"{', '.join(sections)}")
    fields = sections[section].model_fields
    if name not in fields:
        raise CommandLineError(f"{flag} {section}.{name}: section {section!r} has no field {name!r}; its fields are "
                               f"{', '.join(fields)}")


def parse_overrides(pairs: Sequence[str]) -> dict:
    """`--set strategy.mu=0.5` -> {"strategy": {"mu": 0.5}}; values are read as JSON when they parse.

    >>> parse_overrides(["strategy.early_stop=batch", "campaign.max_batches=3"])
    {'strategy': {'early_stop': 'batch'}, 'campaign': {'max_batches': 3}}
    """
    overrides: dict = {}
    for pair in pairs:
        try:
            section, name, raw = parse_setting(pair, "--set")
        except ValueError as exc:
            raise CommandLineError(str(exc)) from exc
        check_field("--set", section, name)
        overrides.setdefault(section, {})[name] = parse_value(raw)
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


def invalid_message(what: str, lines: list[str]) -> str:
    return f"{what}: {lines[0]}" if len(lines) == 1 else f"{what}:\n" + "\n".join(f"  {line}" for line in lines)


def check_device(name: str):
    """The torch device `--device name` resolves to (auto: CUDA when present); a CommandLineError if none."""
    from service.core.device import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise CommandLineError(f"--device {name}: {exc}") from exc


def experiment_options(parser: argparse.ArgumentParser, *, profile: bool = True, seed: bool = True) -> None:
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


def bundle_options(parser: argparse.ArgumentParser) -> None:
    """--bundle and --data: a user's model bundle and data in place of the profile's burn-in and dataset."""
    parser.add_argument("--bundle", help="a model bundle (a directory from `dscguard bundle create`): its models, "
                                         "trusted set, stream and defense settings in place of the profile's burn-in "
                                         "(the profile gives the attack and campaign settings); needs --data")
    parser.add_argument("--data", help="with --bundle: the data the stream, the attacker and the test measure draw "
                                       "from: x and y in a .npz or .safetensors file, shaped like the bundle's input, "
                                       "or an image-folder tree (a directory or .tar.gz of train/<class>/* and "
                                       "test/<class>/*, pooled); a quarter, at most data.test, for the test, an "
                                       "eighth, at most data.attacker_val, for the attacker, the rest the stream")


def writable_output(path: str | Path, flag: str = "--out") -> Path:
    """The report directory, created and shown writable before any work starts: a run of an hour must not die
    at its last line on a permission error. An OSError naming `flag` and the cause otherwise."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".dscguard-write-check-"):
            pass
    except OSError as exc:
        raise OSError(f"{flag} {out}: cannot write reports there ({exc.strerror or exc}); nothing was run") from exc
    return out


def build_config(args: argparse.Namespace, **extra: dict) -> ExperimentConfig:
    """The one config of a command: its profile, then --seed, --device, --data-dir and every --set."""
    overrides = parse_overrides(args.set)
    for section, fields in extra.items():
        overrides.setdefault(section, {}).update(fields)
    if args.data_dir:
        overrides.setdefault("data", {})["data_dir"] = args.data_dir
    check_device(args.device)
    try:
        return ExperimentConfig.from_profile(args.profile, seed=getattr(args, "seed", 0), device=args.device,
                                             **overrides)
    except ValidationError as exc:
        raise CommandLineError(invalid_message("invalid configuration", validation_lines(exc))) from exc


def count(minimum: int):
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
