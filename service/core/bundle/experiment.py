"""`BundleExperiment`: the `Experiment` of a bundle, whose learners start their stream optimizer from the bundle's
optimizer state (`files.optimizer`), or fresh when it has none, as a profile's learners do.

Kept apart from `serving` because it subclasses the service's `Experiment`, which imports the learner, which imports
the bundle package: `serving.bundle_experiment` imports it when it is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.core.bundle.store import OptimizerState, apply_optimizer_state
from service.core.config import StrategyConfig
from service.core.experiment import Experiment
from service.core.learner import OnlineLearner


@dataclass
class BundleExperiment(Experiment):
    """An `Experiment` whose burn-in is a bundle; `optimizer_state` is the bundle's (None: a fresh optimizer)."""

    optimizer_state: OptimizerState | None = field(default=None, repr=False)

    def new_learner(self, strategy: StrategyConfig | None = None) -> OnlineLearner:
        """A learner at the bundle's weights, its optimizer holding a copy of the bundle's optimizer state."""
        learner = super().new_learner(strategy)
        apply_optimizer_state(learner.optimizer, learner.model, self.optimizer_state)
        return learner
