"""The two ways of prompting, each as a function of what is given: annotated slices or example scans.

Each run returns, for a named variant, the class map on the target, so that ``prompt`` can score
every variant by leave-one-out (hide one annotated slice / one example, predict it from the rest)
and keep the best. Variants:

    "propagation" / "registration"   the spatial prior alone (slice propagation / fused examples)
    "appearance"                     the appearance head alone
    "combined:<w>"                   head * prior ** w, with the prior softened by distance
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..engine.progress import CancelToken, check
from ._propagate import propagate
from ._refine import AppearanceHead, clean_up, combine, soften

WEIGHTS = (0.5, 1.0, 2.0)


def variants(prior_name: str) -> list[str]:
    return [prior_name, "appearance"] + [f"combined:{w:g}" for w in WEIGHTS]


def onehot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    return (classes[None] == np.arange(n_classes).reshape((-1,) + (1,) * classes.ndim)).astype(np.float32)


def fit_head(features: list[np.ndarray], classes: list[np.ndarray], n_classes: int, device: str) -> AppearanceHead:
    """Head fitted on pixels ``features[i] (..., F)`` labelled ``classes[i] (...)``."""
    x = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features])
    y = np.concatenate([c.reshape(-1) for c in classes]).astype(np.int64)
    return AppearanceHead(n_classes, device=device).fit(x, y)


def from_annotations(features: np.ndarray, displacements: np.ndarray, classes: np.ndarray, annotated: list[int],
                     n_classes: int, compact: set[int], wanted: list[str], device: str,
                     cancel: Optional[CancelToken] = None) -> dict[str, np.ndarray]:
    """Class maps ``(z, y, x)`` of each ``wanted`` variant from the ``annotated`` slices of ``classes``."""
    check(cancel)
    hot = onehot(classes, n_classes)
    head = None
    if any(v != "propagation" for v in wanted):
        head = fit_head([features[annotated]], [classes[annotated]], n_classes, device).predict(features)
    check(cancel)
    out = {}
    for variant in wanted:
        if variant == "propagation":
            prob = propagate(hot, annotated, displacements)[0]
        elif variant == "appearance":
            prob = head
        else:
            w = float(variant.split(":")[1])
            prior, distance = propagate(hot, annotated, displacements, head=head, weight=w)
            prob = combine(head, soften(prior, distance), w)
        labels = np.argmax(prob, axis=0).astype(np.int32)
        labels[annotated] = classes[annotated]  # what the user drew is kept as drawn
        out[variant] = clean_up(labels, compact)
    return out


def from_examples(target_features: np.ndarray, priors: list[np.ndarray], similarities: list[np.ndarray],
                  example_features: list[np.ndarray], example_classes: list[np.ndarray], n_classes: int,
                  compact: set[int], wanted: list[str], device: str,
                  cancel: Optional[CancelToken] = None) -> dict[str, np.ndarray]:
    """Class maps ``(n, y, x)`` of each ``wanted`` variant from registered example priors and a head."""
    from ._register import fuse

    check(cancel)
    prior = fuse(priors, similarities)
    head = None
    if any(v != "registration" for v in wanted):
        head = fit_head(example_features, example_classes, n_classes, device).predict(target_features)
    out = {}
    for variant in wanted:
        if variant == "registration":
            prob = prior
        elif variant == "appearance":
            prob = head
        else:
            prob = combine(head, soften(prior), float(variant.split(":")[1]))
        out[variant] = clean_up(np.argmax(prob, axis=0).astype(np.int32), compact)
    return out


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[int, float]:
    """Dice of every class present in either map (classes absent from both have no Dice)."""
    out = {}
    for k in range(1, n_classes):
        p, t = pred == k, truth == k
        total = int(p.sum()) + int(t.sum())
        if total:
            out[k] = 2.0 * int((p & t).sum()) / total
    return out
