"""Datasets held in memory as uint8 arrays, and seeded disjoint splits of them.

>>> train, test = load_dataset("digits")            # bundled with scikit-learn: works offline
>>> sizes = SplitSizes(stream=500, attacker_val=100, calibration=200, test=300)
>>> splits = make_splits(train, test, sizes, seed=0)
>>> len(splits.stream), len(splits.burnin)
(500, 697)
"""

from service.core.data.catalog import DATASETS
from service.core.data.dataset import ArrayDataset
from service.core.data.errors import DatasetNotFoundError
from service.core.data.loading import load_dataset
from service.core.data.locations import default_cache_dir, find_data_dir
from service.core.data.splits import Splits, SplitSizes, make_splits

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetNotFoundError",
    "SplitSizes",
    "Splits",
    "default_cache_dir",
    "find_data_dir",
    "load_dataset",
    "make_splits",
]
