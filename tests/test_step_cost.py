"""benchmarks/step_cost.py's strategy labels: guard with a smaller lookahead probe (--probe-sizes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"


@pytest.fixture(scope="module")
def step_cost():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_probe_size_times_guard_with_that_many_probe_images(step_cost, digits_experiment):
    variants = step_cost._variants([8, 64])
    for size in (8, 64):
        learner = digits_experiment.new_learner(digits_experiment.config.strategy.model_copy(
            update=variants[f"guard-p{size}"]))
        assert learner.strategy.name == "guard" and len(learner.strategy.gate.probe) == size
    assert "guard-p8" not in step_cost._variants([])  # the arena's labels only, unless asked


def test_a_probe_too_small_to_judge_is_refused_naming_the_flag(step_cost, capsys):
    with pytest.raises(SystemExit) as exit_:
        step_cost.main(["--probe-sizes", "64", "3"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "--probe-sizes: 3 is not a strategy.gate_probe_samples" in error
    assert "greater than or equal to 4" in error
