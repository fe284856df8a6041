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
    [(["stream", "--set", "strategy.epsilon=-1"], "strategy.epsilon"),
     (["stream", "--set", "nonsense"], "SECTION.FIELD=VALUE"),
     (["stream", "--batches", "-2"], "--batches")],
)
def test_bad_arguments_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_unknown_strategy_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["stream", "--strategy", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err
