"""Shared fixtures: a small digits experiment trained once per test session in a temp cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.core.config import ExperimentConfig
from tests.profiles import DIGITS_OVERRIDES

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dscguard-cache")


@pytest.fixture(scope="session")
def digits_config() -> ExperimentConfig:
    return ExperimentConfig.from_profile("digits", **DIGITS_OVERRIDES)


@pytest.fixture(scope="session")
def digits_experiment(digits_config, cache_dir):
    from service.core.experiment import Experiment

    return Experiment.prepare(digits_config, cache_dir=cache_dir, progress=False)


@pytest.fixture
def namespace():
    """A fresh Redis namespace for one test; every key of it is deleted afterwards (tests/service_harness.py)."""
    from tests.service_harness import redis_namespace  # imported here: it needs the service stack, most tests don't

    with redis_namespace() as name:
        yield name
