"""`dscguard eval` end to end on a reduced budget: results.json validates, report and plots exist."""

import json

import jsonschema
import pytest

from service.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
    overrides = ["campaign.max_batches=3", "burnin.epochs=10", "burnin.auxiliary_epoch=5"]
    argv = ["eval", "--profile", "digits", "--seeds", "0", "1", "--out", str(out), "--no-progress"]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 0
    mp.undo()
    return out


def _published_schema(demo_dir) -> dict:
    return json.loads((demo_dir / "results.schema.json").read_text())


def test_demo_writes_a_valid_results_file(demo_dir):
    document = json.loads((demo_dir / "results.json").read_text())
    jsonschema.validate(document, _published_schema(demo_dir))
    rows = {(r["strategy"], r["scenario"]): r for r in document["rows"]}
    assert set(rows) == {(s, c) for s in ("st", "gc", "at", "dsc") for c in ("clean", "poison")}
    assert all(r["seed_count"] == 2 for r in rows.values())
    assert document["seeds"] == [0, 1]
    # The attacker triggers once its monitor (accuracy on its validation split) fell more than monitor_drop, or
    # after max_batches. Undefended (st), the first accumulative batch already costs over twice that drop in test
    # accuracy (every seed), so the trigger follows it; gradient clipping (gc) keeps accuracy where it was, so
    # the monitor stays quiet and the trigger waits for the cap.
    campaign = document["config"]["campaign"]
    drop, cap = campaign["monitor_drop"], campaign["max_batches"]
    poison, clipped = rows["st", "poison"], rows["gc", "poison"]
    assert poison["batches"]["values"] == [1, 1]
    assert all(start - after > 2 * drop for start, after in zip(poison["start_acc"]["values"],
                                                                 poison["poison_acc"]["values"], strict=True))
    assert clipped["batches"]["values"] == [cap, cap]
    assert all(abs(start - after) < drop for start, after in zip(clipped["start_acc"]["values"],
                                                                  clipped["poison_acc"]["values"], strict=True))
    for values in zip(poison["poison_acc"]["values"], poison["trigger_acc"]["values"], poison["delta"]["values"],
                      strict=True):
        assert values[2] == pytest.approx(values[1] - values[0])
    assert rows["at", "clean"]["flagged_rate"]["mean"] == 1.0  # at corrects every sample
    assert rows["st", "clean"]["flagged_rate"]["mean"] == 0.0
    assert document["environment"]["torch"] and document["config"]["profile"] == "digits"


def test_demo_writes_the_table_and_plots(demo_dir):
    report = (demo_dir / "report.md").read_text()
    assert "| strategy | clean oracle final | start | batch | +poison | +trigger | delta |" in report
    assert sum(line.startswith(("| ST ", "| GC ", "| AT ", "| DSC ")) for line in report.splitlines()) == 4
    for name in ("accuracy_along_stream.png", "discrepancy_histogram.png"):
        assert (demo_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schema_rejects_accuracies_out_of_range(demo_dir):
    document = json.loads((demo_dir / "results.json").read_text())
    document["rows"][0]["start_acc"]["mean"] = 97.4  # a percentage where a fraction belongs
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, _published_schema(demo_dir))


def test_unknown_scenario_is_rejected():
    from attacker_sim.evaluation import evaluate
    from service.core.config import ExperimentConfig

    with pytest.raises(ValueError, match="unknown scenario"):
        evaluate(ExperimentConfig(), scenarios=["sideways"])


def test_sweep_runs_one_variant_per_value(cache_dir, monkeypatch):
    from attacker_sim.sweep import parse_vary, sweep, sweep_markdown
    from service.core.config import ExperimentConfig

    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
    config = ExperimentConfig.from_profile("digits", campaign={"max_batches": 2},
                                           burnin={"epochs": 10, "auxiliary_epoch": 5})
    results = sweep(config, ["strategy.early_stop=sample,batch"], seeds=[0], progress=False)
    assert [(r["parameter"], r["value"]) for r in results] == [("strategy.early_stop", "sample"),
                                                               ("strategy.early_stop", "batch")]
    assert sweep_markdown(results).count("| strategy.early_stop |") == 2
    assert parse_vary("calibration.target_false_flag_rate=0.05,0.2")[2] == [0.05, 0.2]
    with pytest.raises(ValueError, match="SECTION.FIELD=V1,V2"):
        parse_vary("early_stop")


def test_backtracking_rows_compare_clean_and_poisoned(cache_dir, monkeypatch):
    from attacker_sim.analysis import backtracking_rows
    from service.core.config import ExperimentConfig

    monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
    config = ExperimentConfig.from_profile("digits", burnin={"epochs": 10, "auxiliary_epoch": 5})
    for on in ("stream", "trusted"):  # the paper's view, and the defender's own data (to choose the window)
        rows = backtracking_rows(config, ks=[1, 3], seeds=[0], probe_batches=1, progress=False, on=on)
        assert [r["k"] for r in rows] == [1, 3]
        for row in rows:  # at every k, poisoned samples show the larger discrepancy (the paper's Fig. 2)
            assert row["poisoned"]["mean"] > row["clean"]["mean"], (on, row)
            assert row["clean"]["values"] and len(row["poisoned"]["values"]) == 1
    with pytest.raises(ValueError, match="backtracking intervals"):
        backtracking_rows(config, ks=[0])
    with pytest.raises(ValueError, match="trusted"):
        backtracking_rows(config, ks=[1], on="test")
