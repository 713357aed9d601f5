"""Synthetic medical images with exact labels, deterministic from a seed.

Used for napari's sample data, for tests, and as training data where real labelled scans are
scarce. Each generator returns ``(image, labels)`` Volumes with true geometry (mm), modality
and label names; the same seed always gives the same arrays.
"""

from __future__ import annotations

from ..volume import Volume
from .brain import brain_mr
from .ct import ct_abdomen
from .fundus import fundus_photo
from .oct import oct_volume

__all__ = ["ct_abdomen", "brain_mr", "oct_volume", "fundus_photo", "sample", "SAMPLES"]

# Sizes for napari's sample-data menu: each builds in well under 2 s on a 2-core CPU.
SAMPLES = {
    "ct": lambda seed: ct_abdomen(seed=seed),
    "mr": lambda seed: brain_mr(seed=seed),
    "oct": lambda seed: oct_volume(seed=seed),
    "fundus": lambda seed: fundus_photo(seed=seed),
}


def sample(name: str, seed: int = 0) -> tuple[Volume | dict[str, Volume], Volume]:
    """The ``(image, labels)`` pair of sample ``name`` ("ct", "mr", "oct" or "fundus").

    For "mr" the image is a dict of contrasts (``{"T1": Volume, "T2": ..., "PD": ...}``).
    """
    try:
        make = SAMPLES[name]
    except KeyError:
        raise ValueError(f"no synthetic sample named {name!r}; choose from {sorted(SAMPLES)}") from None
    return make(seed)
