"""The defense: Memorization Discrepancy, reverse-PGD correction, strategies and calibration."""

from service.core.defense.calibration import Calibration, calibrate
from service.core.defense.correction import CorrectionResult, ReversePGD
from service.core.defense.discrepancy import DIVERGENCES, memorization_discrepancy
from service.core.defense.strategies import STRATEGIES, Strategy, build_strategy

__all__ = [
    "DIVERGENCES",
    "STRATEGIES",
    "Calibration",
    "CorrectionResult",
    "ReversePGD",
    "Strategy",
    "build_strategy",
    "calibrate",
    "memorization_discrepancy",
]
