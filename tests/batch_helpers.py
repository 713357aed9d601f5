"""Tasks the cohort tests run on Dask workers: plain functions Volume -> Volume.

They live apart from the test modules so that a worker process unpickling them imports numpy
only, not torch and the models the tests import.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np


def bright_parts(volume, level: float = 0.0):
    """A label map of the voxels above ``level`` (a stand-in model: fast and exact to check)."""
    return volume.with_data((np.asarray(volume.data) > level).astype(np.uint8), labels={1: "bright"}, rgb=False)


def bright_parts_dying_once(volume, marker: str, victim: str):
    """Kills its own worker process (as the kernel's OOM killer would) the first time it meets ``victim``."""
    if Path(volume.meta["source"]).name.startswith(victim) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return bright_parts(volume)


def slow_bright_parts(volume):
    time.sleep(1.0)
    return bright_parts(volume)
