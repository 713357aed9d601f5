"""Plain baselines a synthesis model must beat, each fitted on the same prompt pair MVG sees.

- identity: the input itself (in the target's unit range for cross-contrast tasks);
- histogram matching: the input's histogram mapped onto the prompt target's (scikit-image);
- linear map: ``target ~ a * image + b`` fitted on the prompt pair by least squares.
"""

from __future__ import annotations

import numpy as np

from ..engine.synthesis import UnitScale, unit_scale


def identity(query: np.ndarray, target_scale: UnitScale, modality: str = "") -> np.ndarray:
    """The input, re-expressed so that its own unit range lands on the target's (a contrast-blind copy)."""
    return target_scale.from_unit(unit_scale(query, modality).to_unit(query))


def histogram_matching(query: np.ndarray, prompt_target: np.ndarray) -> np.ndarray:
    """``query`` with the grey-level distribution of ``prompt_target``."""
    from skimage.exposure import match_histograms

    return match_histograms(np.asarray(query, np.float32), np.asarray(prompt_target, np.float32)).astype(np.float32)


def linear_map(query: np.ndarray, prompt_image: np.ndarray, prompt_target: np.ndarray) -> np.ndarray:
    """``a * query + b`` with ``a, b`` the least-squares fit of the prompt target on the prompt image."""
    x = np.asarray(prompt_image, np.float64).ravel()
    y = np.asarray(prompt_target, np.float64).ravel()
    a, b = np.polyfit(x, y, 1)
    return (a * np.asarray(query, np.float64) + b).astype(np.float32)


def intensity_map(query: np.ndarray, prompt_image: np.ndarray, prompt_target: np.ndarray, modality: str = "",
                  bins: int = 48) -> np.ndarray:
    """Each query pixel replaced by the mean prompt-target value at its grey level in the prompt image.

    The whole-image version of the prior MVG starts from (``models.mvg.intensity_prior``): a
    non-linear intensity transfer learned from the pair, blind to context. Grey levels are compared
    after each image's own unit scaling, as the model sees them.
    """
    image_unit = unit_scale(prompt_image, modality).to_unit(prompt_image)
    query_unit = unit_scale(query, modality).to_unit(query)
    index = np.clip(np.round(image_unit * (bins - 1)), 0, bins - 1).astype(int).ravel()
    target = np.asarray(prompt_target, np.float64).ravel()
    sums = np.bincount(index, weights=target, minlength=bins)
    counts = np.bincount(index, minlength=bins)
    table = (sums + 4.0 * target.mean()) / (counts + 4.0)
    query_index = np.clip(np.round(query_unit * (bins - 1)), 0, bins - 1).astype(int)
    return table[query_index].astype(np.float32)
