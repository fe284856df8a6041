import re

import pytest

from service.cli import main


def test_stream_quickstart_prints_curve_and_discrepancy(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
    assert main(["stream", "--strategy", "dsc", "--batches", "4", "--eval-every", "2", "--no-progress",
                 "--set", "burnin.epochs=10", "--set", "burnin.auxiliary_epoch=5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"calibration: mu=\d+\.\d+ tau=\d+\.\d+", out)
    rows = re.findall(r"^\s+([24])\s+(0\.\d{4}|1\.0000)\s+\d+", out, flags=re.M)
    assert [r[0] for r in rows] == ["2", "4"]
    assert "memorization discrepancy of clean stream samples" in out


def test_burn_in_is_cached(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
    args = ["burn-in", "--no-progress", "--seed", "5", "--set", "burnin.epochs=5", "--set", "burnin.auxiliary_epoch=5"]
    main(args)
    assert "trained" in capsys.readouterr().out
    main(args)
    assert "loaded from cache" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["stream", "--set", "strategy.epsilon=-1"], "invalid configuration: strategy.epsilon: Input should be greater "
                                                  "than 0 (got -1)"),
     (["stream", "--set", "nonsense"], "--set expects SECTION.FIELD=VALUE, got 'nonsense'"),
     (["sweep", "--vary", "strategy.early_stop=sample,sometimes"], "strategy.early_stop: Input should be 'sample' "
                                                                   "or 'batch' (got 'sometimes')"),
     (["sweep", "--vary", "strategy.nosuch=1,2"], "section 'strategy' has no field 'nosuch'")],
)
def test_bad_arguments_are_one_line_errors_with_exit_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dscguard: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [(["stream", "--batches", "-2"], "argument --batches: must be >= 0"),
                                               (["stream", "--eval-every", "0"], "argument --eval-every: must be >= 1"),
                                               (["analyze-md", "--k", "0"], "argument --k: must be >= 1")])
def test_counts_are_checked_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_strategy_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["stream", "--strategy", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err
