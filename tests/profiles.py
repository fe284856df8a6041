"""The burn-in every digits test shares, in one place.

`tests/conftest.py`'s session `digits_config` and the service tests' `config_overrides`
(`tests/service_harness.py`) both read `DIGITS_OVERRIDES`, so the worker processes the service tests start
find the burn-in the session already trained in the shared cache instead of training another.
"""

DIGITS_OVERRIDES = {"burnin": {"epochs": 20, "checkpoint_every": 5, "auxiliary_epoch": 10}}
