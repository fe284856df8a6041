"""`dscguard` errors are one message naming the problem and the fix, never a traceback (unless --debug)."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import service.cli as cli
import service.cli.experiments as experiments
import service.core.data.locations as locations
from service.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No dataset anywhere: an empty $DSCGUARD_DATA_DIR, a working directory without ./data or
    ../shared/data, no checkout sibling ../shared/data, and an empty cache."""
    empty = tmp_path / "empty"
    empty.mkdir()
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("DSCGUARD_DATA_DIR", str(empty))
    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(locations, "_REPO_ROOT", tmp_path / "nowhere" / "repo")
    return empty


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("dscguard: error: ") and "Traceback" not in err
    return err


def test_missing_dataset_under_a_missing_data_dir(nowhere, capsys):
    assert main(["stream", "--profile", "mnist", "--data-dir", "/nonexistent", "--no-progress"]) == 1
    err = _error(capsys)
    assert "dataset 'mnist' not found" in err
    assert "searched: --data-dir = /nonexistent (missing)" in err
    # the defaults are named, and said not to be searched: --data-dir replaces them
    assert re.search(r"not searched, as --data-dir was given: \$DSCGUARD_DATA_DIR, \./data, \.\./shared/data", err)
    assert "put mnist-png.tar.gz in /nonexistent" in err and "MNIST/raw/" in err
    assert "--set data.download=true" in err and "download=True" not in err


def test_missing_dataset_with_an_empty_data_dir_and_environment(nowhere, capsys):
    assert main(["stream", "--dataset", "cifar10", "--data-dir", str(nowhere), "--no-progress"]) == 1
    err = _error(capsys)
    assert f"searched: --data-dir = {nowhere}\n" in err
    for place in ("$DSCGUARD_DATA_DIR", "./data", "../shared/data", "the download cache"):
        assert place in err.split("not searched")[1]
    assert f"put cifar10-jpeg.tar.gz in {nowhere}" in err and "cifar-10-batches-py/" in err
    assert "--set data.download=true" in err and "download=True" not in err


def test_missing_dataset_without_data_dir_lists_every_default_place(nowhere, tmp_path, capsys):
    assert main(["stream", "--dataset", "cifar10", "--no-progress"]) == 1
    err = _error(capsys)
    searched = err.split("searched: ")[1].split("\n")[0]
    work = tmp_path / "deep" / "work"
    assert searched == (f"$DSCGUARD_DATA_DIR = {nowhere}, ./data = {work / 'data'} (missing), "
                        f"../shared/data = {tmp_path / 'deep' / 'shared' / 'data'} (missing), "
                        f"the checkout's ../shared/data = {tmp_path / 'nowhere' / 'shared' / 'data'} (missing), "
                        f"the download cache = {tmp_path / 'cache' / 'downloads'} (missing)")
    assert "not searched" not in err
    assert "--set data.download=true" in err and "--data-dir DIR" in err and "download=True" not in err


def test_an_unset_data_dir_variable_is_named_too(nowhere, monkeypatch, capsys):
    monkeypatch.delenv("DSCGUARD_DATA_DIR")
    assert main(["stream", "--dataset", "cifar10", "--no-progress"]) == 1
    assert "$DSCGUARD_DATA_DIR (unset)" in _error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    assert main(["stream", "--device", "cuda", "--no-progress"]) == 2
    err = _error(capsys)
    assert err == ("dscguard: error: --device cuda: device 'cuda' asked for, but CUDA is not available on this "
                   "machine; use auto (CUDA when present) or cpu\n")


def test_an_unknown_device_is_one_line(capsys):
    assert main(["burn-in", "--device", "nosuch", "--no-progress"]) == 2
    err = _error(capsys)
    assert len(err.splitlines()) == 1
    assert "--device nosuch: unknown device 'nosuch'; expected auto (CUDA when present), cpu, cuda" in err


def test_an_unknown_section_lists_the_sections(capsys):
    assert main(["stream", "--set", "nonexistent.field=1"]) == 2
    err = _error(capsys)
    assert "--set nonexistent.field: no section 'nonexistent'; the sections are data, model, burnin, stream, " \
           "strategy, calibration, attack, campaign" in err


def test_an_unknown_field_lists_its_sections_fields(capsys):
    assert main(["stream", "--set", "strategy.nosuch=1"]) == 2
    err = _error(capsys)
    assert "section 'strategy' has no field 'nosuch'; its fields are name," in err
    for field in ("epsilon", "early_stop", "divergence", "mu", "tau"):
        assert field in err


def test_bad_values_are_short_lines_one_per_field(capsys):
    assert main(["stream", "--set", "strategy.epsilon=3", "--set", "campaign.max_batches=zero"]) == 2
    err = _error(capsys)
    assert err.splitlines() == [
        "dscguard: error: invalid configuration:",
        "  strategy.epsilon: Input should be less than or equal to 1 (got 3)",
        "  campaign.max_batches: Input should be a valid integer, unable to parse string as an integer (got 'zero')"]


@pytest.mark.parametrize("error", [ValueError("bad value"), RuntimeError("went wrong"),
                                   FileNotFoundError("no such file: x.json"), PermissionError("read-only: /out")])
def test_other_errors_are_one_message_and_exit_1(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(experiments, "cmd_burn_in", fail)
    assert main(["burn-in"]) == 1
    err = _error(capsys)
    assert err.splitlines()[0] == f"dscguard: error: {error}"


def test_debug_lets_the_exception_through(monkeypatch):
    def fail(args):
        raise RuntimeError("went wrong")

    monkeypatch.setattr(experiments, "cmd_burn_in", fail)
    with pytest.raises(RuntimeError, match="went wrong"):
        main(["--debug", "burn-in"])
    with pytest.raises(cli.CommandLineError, match="--device nosuch"):
        main(["--debug", "stream", "--device", "nosuch"])


def test_debug_prints_the_traceback_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "service.cli", "--debug", "stream", "--device", "nosuch"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    plain = subprocess.run([sys.executable, "-m", "service.cli", "stream", "--device", "nosuch"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert plain.returncode == 2 and plain.stderr.startswith("dscguard: error: --device nosuch")
    assert "Traceback" not in plain.stderr


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "cmd_burn_in", interrupted)
    assert main(["burn-in"]) == 130
    err = capsys.readouterr().err
    assert err == "dscguard: interrupted\n"


# ---------------------------------------------------------------- help


def _walk(parser: argparse.ArgumentParser, prefix: str = ""):
    """(command, parser) of every parser below `parser`, nested subcommands included."""
    yield prefix.strip(), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _walk(subparser, f"{prefix}{name} ")


def _help_blocks(text: str) -> dict[str, str]:
    """The rendered help of each option, keyed by its first option string, whitespace collapsed."""
    blocks, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line
        else:
            current = None
    return {key: " ".join(value.split()) for key, value in blocks.items()}


def _shown(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)


def test_every_option_of_every_command_has_help_showing_its_default():
    parsers = list(_walk(build_parser()))
    assert len(parsers) >= 12  # dscguard, 10 commands, stack up
    for command, parser in parsers:
        blocks = _help_blocks(parser.format_help())
        for action in parser._actions:
            if not action.option_strings or "-h" in action.option_strings:
                continue
            where = f"dscguard {command} {action.option_strings[0]}"
            assert action.help and action.help.strip(), f"{where} has no help"
            block = blocks[action.option_strings[0]]
            invocation = ", ".join(action.option_strings)
            assert len(block) > len(invocation) + 5, f"{where}: help not rendered"
            has_default = action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS)
            if has_default:
                assert f"(default: {_shown(action.default)})" in block, f"{where}: default not shown: {block}"


@pytest.mark.parametrize(("command", "option", "shown"), [
    ("stream", "--seed", "0"), ("stream", "--strategy", "guard"), ("sweep", "--out", "reports/sweep"),
    ("analyze-md", "--out", "reports/analyze-md"), ("analyze-md", "--k", "1 2 5 10 20"), ("serve", "--port", "8000"),
    ("serve", "--log-level", "info"), ("stack up", "--api-port", "8000"), ("stack up", "--prometheus-port", "9090")])
def test_named_options_show_their_defaults(command, option, shown):
    parser = dict(_walk(build_parser()))[command]
    assert f"(default: {shown})" in _help_blocks(parser.format_help())[option]


def test_seeds_options_say_what_they_default_to():
    parsers = dict(_walk(build_parser()))
    for command in ("eval", "demo", "sweep", "analyze-md"):
        block = _help_blocks(parsers[command].format_help())["--seeds"]
        assert "(default: the profile's, 0 1 2)" in block, command


def test_the_top_level_description_names_every_command():
    parser = build_parser()
    names = [name for name, _ in _walk(parser) if name and " " not in name]
    assert len(names) >= 10
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", parser.description), name


def test_demo_is_digits_with_seeds_only(capsys):
    demo = dict(_walk(build_parser()))["demo"]
    options = {o for a in demo._actions for o in a.option_strings}
    assert "--seeds" in options and "--seed" not in options and "--profile" not in options
    assert demo.parse_args([]).profile == "digits"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--profile", "mnist"])
    assert "unrecognized arguments: --profile mnist" in capsys.readouterr().err


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("command", ["burn-in", "stream", "demo", "eval", "false-flags", "sweep", "analyze-md",
                                     "serve", "worker", "attack", "stack"])
def test_every_command_sets_passive_openmp_unless_set(command, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


_SPY = """
import builtins, os, sys
seen = []
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY", "unset"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
from service.cli import main
status = main(["stream", "--device", "nosuch"])
print(status, seen[0] if seen else "torch never imported")
"""


@pytest.mark.parametrize(("env", "expected"), [(None, "2 PASSIVE"), ("ACTIVE", "2 ACTIVE")])
def test_stream_sets_the_policy_before_torch_is_imported(env, expected):
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env:
        environment["OMP_WAIT_POLICY"] = env
    result = subprocess.run([sys.executable, "-c", _SPY], capture_output=True, text=True, cwd=ROOT, env=environment,
                            timeout=120)
    assert result.stdout.strip() == expected, result.stderr


# ---------------------------------------------------------------- reports


@pytest.mark.parametrize("argv", [
    ["eval"], ["arena"], ["demo"], ["analyze-md"], ["sweep", "--vary", "strategy.early_stop=sample,batch"],
    ["false-flags"],
    ["attack", "--target", "http://127.0.0.1:9"],
])
def test_an_unwritable_report_directory_is_refused_before_any_work(argv, tmp_path, monkeypatch, capsys):
    """A file where the report directory should go (root ignores permission bits, not this): one line, exit 1,
    and the run never starts (the work functions would raise if called)."""
    import attacker_sim.analysis
    import attacker_sim.arena
    import attacker_sim.evaluation
    import attacker_sim.false_flags
    import attacker_sim.http_target
    import attacker_sim.sweep

    def never(*args, **kwargs):
        raise AssertionError("the run started although its report directory is unwritable")

    for module, name in ((attacker_sim.evaluation, "evaluate"), (attacker_sim.arena, "run_arena"),
                         (attacker_sim.analysis, "backtracking_rows"), (attacker_sim.sweep, "sweep"),
                         (attacker_sim.false_flags, "false_flag_check"),
                         (attacker_sim.http_target, "HttpTarget")):
        monkeypatch.setattr(module, name, never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "reports"
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dscguard: error: --out {out}: cannot write reports there") and err.endswith(
        "nothing was run") and "\n" not in err
