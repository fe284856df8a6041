"""benchmarks/architectures.py: a user's network goes train -> bundle -> `dscguard eval --bundle`, and its row says
what ST and guard did; an architecture the product cannot serve is an error row, not a crash of the sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def architectures(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # bundles name its networks `architectures:NAME`
    monkeypatch.delitem(sys.modules, "architectures", raising=False)
    import architectures

    return architectures


def test_tied_weights_and_a_spare_parameter_are_measured_end_to_end(architectures, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert architectures.main(["--only", "mlp_tied", "mlp_spare_head", "--epochs", "2", "--json", str(out)]) == 0
    rows = {row["architecture"]: row for row in json.loads(out.read_text())}
    for row in rows.values():
        assert row["exit_code"] == 0
        for field in ("st_clean_final", "guard_clean_final", "st_after_trigger", "guard_after_trigger"):
            assert 0 <= row[field] <= 100, (row["architecture"], field)
        assert row["st_poisons_flagged"] == 0 and row["guard_poisons_flagged"] > 0  # st judges nothing
    table = capsys.readouterr().out
    assert "| mlp_tied | tied weights |" in table and "| ok |" in table


def test_an_architecture_the_attacks_cannot_differentiate_twice_is_an_error_row(architectures, monkeypatch,
                                                                                tmp_path, capsys):
    from torch import nn

    monkeypatch.setitem(architectures.CATALOG, "mlp_hardsigmoid", (
        lambda c: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Hardsigmoid(), nn.Linear(16, c)),
        "hardsigmoid, as MobileNetV3 has"))
    assert architectures.main(["--only", "mlp_hardsigmoid", "--epochs", "2"]) == 1
    captured = capsys.readouterr()
    assert "differentiates the model's parameter gradient" in captured.err
    assert "| mlp_hardsigmoid |" in captured.out and "exit 1" in captured.out
