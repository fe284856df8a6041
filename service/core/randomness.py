"""Random draws that repeat: torch's global generator seeded by a key inside a block, and put back after it.

Dropout draws its masks from torch's global generator (the CPU's, and the GPU's for a model there). A learner's
update and a gate's calibration each take theirs from the generator seeded by what they are (the deployment's seed,
what the draws are for, and their number), so that they repeat whatever else ran in the process before them (another
strategy's stream, a burn-in trained or read from the cache, an attacker's crafting), a restored learner draws what
the original would have, and the global draws outside the block are left as they were.

>>> cpu = torch.device("cpu")
>>> _ = torch.manual_seed(0)
>>> expected = torch.rand(1)
>>> _ = torch.manual_seed(0)
>>> with seeded_draws(cpu, key_seed(7, UPDATE, 3)):
...     inside = torch.rand(1)
>>> _ = torch.rand(5)  # whatever ran between
>>> with seeded_draws(cpu, key_seed(7, UPDATE, 3)):
...     again = torch.rand(1)
>>> with seeded_draws(cpu, key_seed(7, UPDATE, 4)):
...     next_update = torch.rand(1)
>>> bool(inside == again), bool(inside == next_update)
(True, False)
>>> _ = torch.manual_seed(0)
>>> with seeded_draws(cpu, key_seed(7, UPDATE, 3)):
...     _ = torch.rand(1)
>>> bool(torch.rand(1) == expected)  # the global draws are the ones they would have been without the block
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

# what the draws are for: the second part of every key, so that no two purposes share a sequence (ATTACK: the
# simulated attacker's run against a target; LABEL_FLIP: which samples a partial label flip relabels; BACKDOOR: which
# stream samples a backdoor stamps; SIZE_RUNG: the clean batches a gate of another batch size draws)
UPDATE, CALIBRATION, FRESH_JUDGE, ATTACK, LABEL_FLIP, BACKDOOR, SIZE_RUNG = 0, 1, 2, 3, 4, 5, 6


def key_seed(*key: int) -> int:
    """A 64-bit seed mixed from non-negative integers (numpy's `SeedSequence`: neighbouring keys give unrelated seeds).

    >>> key_seed(0, UPDATE, 1) == key_seed(0, UPDATE, 1), key_seed(0, UPDATE, 1) == key_seed(1, UPDATE, 0)
    (True, False)
    """
    if any(part < 0 for part in key):
        raise ValueError(f"a random key is made of non-negative integers, got {key}")
    high, low = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


@contextmanager
def seeded_draws(device: torch.device | str, seed: int) -> Iterator[None]:
    """torch's global generator (the CPU's, and `device`'s when it is a GPU) seeded with `seed` inside the block,
    and put back as it was after it."""
    device = torch.device(device)
    gpu = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu):
        torch.random.default_generator.manual_seed(seed)
        for index in gpu:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
