"""Seeded, disjoint splits of a train pool into the parts an online-learning run needs.

burnin trains the initial model; stream is the online data an attacker may poison;
attacker_val is held by the attacker to craft poisons; calibration sets the defense's
thresholds; test measures accuracy. Keeping them disjoint prevents any part from leaking
into another's evaluation.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from service.core.data.dataset import ArrayDataset

PARTS = ("burnin", "stream", "attacker_val", "calibration", "test")


@dataclass(frozen=True)
class SplitSizes:
    """How many images each part gets.

    ``burnin=None`` takes everything left of the train pool; ``test=None`` keeps the whole
    test set (and is not allowed when the dataset has no test split, see make_splits).

    >>> SplitSizes(stream=500, attacker_val=100, calibration=200, test=300).burnin is None
    True
    """

    stream: int
    attacker_val: int
    calibration: int
    burnin: int | None = None
    test: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("stream", 1), ("attacker_val", 1), ("calibration", 1),
                              ("burnin", 0), ("test", 1)):
            value = getattr(self, name)
            if value is None and name in ("burnin", "test"):
                continue
            # bool is an Integral too, but True as a size is always a mistake.
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"SplitSizes.{name} must be an integer, got {value!r}")
            if value < minimum:
                raise ValueError(f"SplitSizes.{name} must be >= {minimum}, got {value}")
            object.__setattr__(self, name, int(value))  # numpy ints -> int, for clean reprs and JSON


@dataclass(frozen=True, eq=False)
class Splits:
    """The five disjoint parts, plus where each came from.

    ``indices[part]`` holds positions in the train pool given to make_splits, except for
    ``indices["test"]``, which indexes the given test set, or the train pool when
    ``test_from_train`` is True.

    >>> from service.core.data.digits import load_sklearn_digits
    >>> s = make_splits(load_sklearn_digits(), None, SplitSizes(100, 50, 50, burnin=200, test=300), seed=0)
    >>> len(s.burnin), len(s.stream), len(s.test), s.test_from_train
    (200, 100, 300, True)
    """

    burnin: ArrayDataset
    stream: ArrayDataset
    attacker_val: ArrayDataset
    calibration: ArrayDataset
    test: ArrayDataset
    indices: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    test_from_train: bool = False

    def parts(self) -> dict[str, ArrayDataset]:
        """The parts by name, in PARTS order."""
        return {name: getattr(self, name) for name in PARTS}


def make_splits(train: ArrayDataset, test: ArrayDataset | None, sizes: SplitSizes, seed: int) -> Splits:
    """Shuffle ``train`` with ``seed`` and carve stream, attacker_val, calibration, [test], burnin.

    Carving the fixed-size parts before burnin means changing burnin's size leaves the other
    parts unchanged for a given seed. With ``test=None`` (digits has no official test split)
    the test part is carved from the train pool, and ``sizes.test`` is required. A given test
    set is used whole, or subsampled with the seed when ``sizes.test`` is smaller.
    """
    seed = _check_seed(seed)
    if test is not None and (test.input_shape != train.input_shape or test.classes != train.classes):
        raise ValueError(f"test set {test.name} {test.input_shape} does not match train set "
                         f"{train.name} {train.input_shape} (shape or classes differ)")
    if test is None and sizes.test is None:
        raise ValueError(f"{train.name} has no test set: give SplitSizes.test to carve one "
                         "from the train pool")

    # Independent child streams: subsampling the test set does not shift the train-pool shuffle.
    pool_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    order = np.random.default_rng(pool_seed).permutation(len(train))

    plan = [("stream", sizes.stream), ("attacker_val", sizes.attacker_val),
            ("calibration", sizes.calibration)]
    if test is None:
        plan.append(("test", sizes.test))
    fixed = sum(n for _, n in plan)
    burnin = sizes.burnin if sizes.burnin is not None else max(len(train) - fixed, 0)
    plan.append(("burnin", burnin))
    if fixed + burnin > len(train):
        wanted = " + ".join(f"{name} {n}" for name, n in plan)
        raise ValueError(f"split sizes need {fixed + burnin} images ({wanted}) but the {train.name} "
                         f"train pool has only {len(train)}")

    indices: dict[str, np.ndarray] = {}
    start = 0
    for name, n in plan:
        indices[name] = order[start:start + n]
        start += n
    parts = {name: train.subset(idx) for name, idx in indices.items()}

    if test is not None:
        indices["test"] = _test_indices(len(test), sizes.test, test_seed)
        parts["test"] = test.subset(indices["test"])
    return Splits(**parts, indices=indices, test_from_train=test is None)


def _test_indices(n_test: int, wanted: int | None, seed: np.random.SeedSequence) -> np.ndarray:
    if wanted is None:
        return np.arange(n_test)
    if wanted > n_test:
        raise ValueError(f"SplitSizes.test is {wanted} but the test set has only {n_test} images")
    # Sorted: evaluation order is irrelevant, and sorted indices are easier to inspect.
    return np.sort(np.random.default_rng(seed).choice(n_test, size=wanted, replace=False))


def _check_seed(seed: int) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
