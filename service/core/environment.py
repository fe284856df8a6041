"""Versions and hardware, recorded with every result file (evaluations, arenas, benchmarks).

>>> sorted(environment())[:4]
['cpu_model', 'cpu_threads', 'cpus', 'cuda']
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Python and library versions, the platform, the CPU and its threads, the GPU if any."""
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scikit_learn": sklearn.__version__, "platform": platform.platform(), "machine": platform.machine(),
            "cpu_model": cpu_model(), "cpus": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
