"""Shared fixtures: a small digits experiment trained once per test session in a temp cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.config import ExperimentConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dscguard-cache")


@pytest.fixture(scope="session")
def digits_config() -> ExperimentConfig:
    return ExperimentConfig.from_profile("digits", burnin={"epochs": 20, "checkpoint_every": 5, "auxiliary_epoch": 10})


@pytest.fixture(scope="session")
def digits_experiment(digits_config, cache_dir):
    from service.experiment import Experiment

    return Experiment.prepare(digits_config, cache_dir=cache_dir, progress=False)
