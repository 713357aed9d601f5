"""The two ways of prompting, each as a function of what is given: annotated slices or example scans.

Each run returns, for a named variant, the class map on the target, so that ``prompt`` can score
every variant by leave-one-out (hide one annotated slice / one example, predict it from the rest)
and keep the best. Variants:

    "propagation" / "registration"   the spatial prior alone (slice propagation / fused examples)
    "appearance"                     the appearance head alone
    "combined:<w>"                   head * prior ** w, with the prior softened by distance
    "adapted" (examples only)        head fitted on the *target's* pixels where the registered
                                     prior is sure, times the prior: the examples say where, the
                                     target itself what each label looks like there (another
                                     scanner, contrast or modality than the examples)
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from ...engine.progress import CancelToken, check
from .propagate import propagate
from .refine import MAX_SAMPLES, AppearanceHead, clean_up, combine, soften
from .register import fuse

WEIGHTS = (1.0, 2.0, 4.0)


def variants(prior_name: str) -> list[str]:
    extra = ["adapted"] if prior_name == "registration" else []
    return [prior_name, "appearance"] + [f"combined:{w:g}" for w in WEIGHTS] + extra


def onehot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    return (classes[None] == np.arange(n_classes).reshape((-1,) + (1,) * classes.ndim)).astype(np.float32)


BAND = 10.0  # pixels of background around the labels that the head learns from
FAR_SHARE = 0.1


def fit_head(features: list[np.ndarray], classes: list[np.ndarray], n_classes: int, device: str,
             store=None) -> AppearanceHead:
    """Head fitted on pixels ``features[i] (n, y, x, F)`` labelled ``classes[i] (n, y, x)``.

    Background is taken mostly from a band around the labels: the prior already rules out what
    is far away, so the head must learn the boundary (liver against muscle next to it), not
    every look-alike elsewhere in the body. A few far pixels keep it sane there too.

    store: a ``VolumeCache``; a head fitted on exactly these pixels before is read back instead
    (painting one more slice makes the previous prompt's head one of the leave-one-out folds).
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    xs, ys = [], []
    for f, c in zip(features, classes):
        keep = np.ones(c.shape, dtype=bool)
        for i, one in enumerate(c):
            if one.any():
                near = ndi.distance_transform_edt(one == 0) <= BAND
                keep[i] = near | (rng.random(one.shape) < FAR_SHARE)
        xs.append(f[keep])
        ys.append(c[keep])
    x = np.ascontiguousarray(np.concatenate(xs), dtype=np.float32)
    y = np.concatenate(ys).astype(np.int64)
    head = AppearanceHead(n_classes, device=device)
    if store is None or not store.enabled:
        return head.fit(x, y)
    import torch

    digest = hashlib.blake2b(x.tobytes(), digest_size=16)
    digest.update(y.tobytes())
    params = {"version": "head-1", "pixels": digest.hexdigest(), "shape": list(x.shape), "classes": n_classes,
              "hidden": head.hidden, "steps": head.steps, "seed": head.seed, "samples": MAX_SAMPLES,
              "torch": torch.__version__, "device": str(device)}
    state = store.get("prompt-head", params, {n: (None, "float32") for n in head.state_names(x.shape[1])},
                      lambda: AppearanceHead(n_classes, device=device).fit(x, y).state())
    return head.load(state)


def from_annotations(features: np.ndarray, displacements: np.ndarray, classes: np.ndarray, annotated: list[int],
                     n_classes: int, compact: set[int], wanted: list[str], device: str,
                     cancel: Optional[CancelToken] = None, store=None,
                     region: Optional[tuple[int, int]] = None,
                     learn_from: Optional[list[int]] = None,
                     window: Optional[tuple[int, int, int, int]] = None,
                     guard: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Optional[dict[str, np.ndarray]]:
    """Class maps of each ``wanted`` variant from the ``annotated`` slices of ``classes``.

    region: ``(first, last)`` slices (inclusive) to predict; the maps then cover those slices
    only. A leave-one-out fold needs just the slab from the hidden slice's annotated neighbours
    (or the hidden slice itself, beyond the outermost one) to it: on 300 slices that is a few
    slices instead of all. The head still learns from every annotated slice.
    learn_from: the slices the head learns from (default: ``annotated``); a preview reuses the
    previous prompt's head this way (``prompt(previous=...)``).
    window: ``(y0, y1, x0, x1)``: predict inside this part of each slice only (the maps cover it;
    ``features`` need be set only there, and on the learning slices). Valid while every carried
    mask stays ``guard`` pixels (top, bottom, left, right) inside it: then warping, blurring and
    the product with the head see what they would on the whole slice (only the head's test of
    where a mask carried past the outermost slice ends sums its share inside the window, where
    pixels outside count ~1e-6 each). Returns None where a mask comes closer, so that the caller
    can widen the window.
    """
    check(cancel)
    head = None
    if any(v != "propagation" for v in wanted):
        learn = annotated if learn_from is None else learn_from
        head = fit_head([features[learn]], [classes[learn]], n_classes, device, store)
    lo, hi = region if region is not None else (0, len(classes) - 1)
    features, classes, displacements = features[lo:hi + 1], classes[lo:hi + 1], displacements[lo:hi]
    if window is not None:
        y0, y1, x0, x1 = window
        features, classes = features[:, y0:y1, x0:x1], classes[:, y0:y1, x0:x1]
        displacements = displacements[:, :, y0:y1, x0:x1]
    annotated = [a - lo for a in annotated if lo <= a <= hi]
    # The prior is carried, blurred and multiplied in torch on ``device``: on a GPU it stays
    # there, and on a CPU it is faster than scipy too; the results agree with scipy's to float32
    # rounding (tests/test_prompt_on_device.py). The one step a CPU tensor hands to scipy is the
    # blur (``soften``: on a CPU torch's one-channel conv2d is several times slower than scipy,
    # and scipy blurs only around the labels).
    hot, displacements = _on(onehot(classes, n_classes), device), _on(displacements, device)
    if head is not None:
        head = head.predict(features, on_device=True)
    check(cancel)
    out, softened = {}, None
    anchor = np.full(classes.shape, -1, dtype=np.int32)
    anchor[annotated] = classes[annotated]
    for variant in wanted:
        if variant == "propagation":
            prob = propagate(hot, annotated, displacements)[0]
            if window is not None and not _clear_of_edges(prob, guard):
                return None
        elif variant == "appearance":
            prob = head
        else:
            w = float(variant.split(":")[1])
            if softened is None:  # one prior for every weight
                prior, distance = propagate(hot, annotated, displacements, head=head)
                if window is not None and not _clear_of_edges(prior, guard):
                    return None
                softened = soften(prior, distance)
                del prior
            prob = combine(head, softened, w)
        labels = clean_up(_class_map(prob), compact, anchor)
        labels[annotated] = classes[annotated]  # what the user drew is kept as drawn
        out[variant] = labels
    return out


def _on(array: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _as_numpy(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.cpu().numpy()


def _class_map(prob) -> np.ndarray:
    """``argmax`` over classes of ``prob`` ``(K+1, ...)`` (numpy or a tensor) as a numpy int32 map."""
    if isinstance(prob, np.ndarray):
        return np.argmax(prob, axis=0).astype(np.int32)
    import torch

    # A pass per class, not torch's argmax along the outer axis, which on a CPU is a large share
    # of a whole prompt's time; ties go to the lower class, as argmax gives them.
    best, classes = prob[0], torch.zeros(prob.shape[1:], dtype=torch.int32, device=prob.device)
    for k in range(1, prob.shape[0]):
        higher = prob[k] > best
        classes[higher] = k
        best = best.maximum(prob[k])
    return classes.cpu().numpy()


def _clear_of_edges(prior, guard: tuple[int, int, int, int]) -> bool:
    """Whether every label of ``prior`` ``(K+1, z, y, x)`` keeps ``guard`` pixels from each edge."""
    found = _as_numpy((prior[1:] > 0).any(0).any(0))  # numpy or torch alike
    rows, cols = np.flatnonzero(found.any(1)), np.flatnonzero(found.any(0))
    if rows.size == 0:
        return True
    top, bottom, left, right = guard
    return (rows[0] >= top and rows[-1] < found.shape[0] - bottom
            and cols[0] >= left and cols[-1] < found.shape[1] - right)


def from_examples(target_features: np.ndarray, priors: list[np.ndarray], similarities: list[np.ndarray],
                  example_heads, n_classes: int, compact: set[int], wanted: list[str], device: str,
                  cancel: Optional[CancelToken] = None) -> dict[str, np.ndarray]:
    """Class maps ``(n, y, x)`` of each ``wanted`` variant from registered example priors and heads.

    example_heads: a callable giving one ``AppearanceHead`` per example (``fit_head`` on that
    example alone), called only when a variant needs the heads. Their probabilities
    are averaged: on DRIVE one head per photo keeps gaining with more examples where one head
    fitted on the pooled pixels does not, and each head is fitted once for all leave-one-out folds.
    """
    check(cancel)
    prior = fuse(priors, similarities)
    anchor = np.where(prior.max(0) >= 0.5, np.argmax(prior, axis=0), -1)
    head = None
    if any(v not in ("registration", "adapted") for v in wanted):
        head = np.mean([h.predict(target_features) for h in example_heads()], axis=0)
    out = {}
    for variant in wanted:
        if variant == "registration":
            prob = prior
        elif variant == "appearance":
            prob = head
        elif variant == "adapted":
            prob = combine(adapted_head(target_features, prior, n_classes, device), soften(prior), 1.0)
        else:
            prob = combine(head, soften(prior), float(variant.split(":")[1]))
        labels = np.argmax(prob, axis=0).astype(np.int32)
        if variant == "adapted":
            labels = keep_registration_where_dropped(labels, np.argmax(prior, axis=0).astype(np.int32), n_classes)
        out[variant] = clean_up(labels, compact, anchor)
    return out


ADAPTED_KEEP = 0.7  # share of a label's registered area the adapted product must keep to be trusted


def keep_registration_where_dropped(adapted: np.ndarray, registered: np.ndarray, n_classes: int,
                                    keep: float = ADAPTED_KEEP) -> np.ndarray:
    """``adapted`` with each label it shrank below ``keep`` of its registered area put back as registered.

    Adapting may move a label's edge, not discard much of it: when the target head drops more
    than 30 % of where the registration put a label, the registration put it on the wrong tissue
    and the head learnt that (e.g. a small kidney registered half onto fat), or the label's
    tissue looks like its surroundings. On the seven one-example pairs of
    docs/evaluation/prompting.md the labels that adapting hurt had mostly kept under 0.7 of their
    area, those it helped 0.7 or more. The threshold is set on those pairs (no other labelled
    cross-scan data is at hand): from 0.7 on every pair is above its affine baseline, and 0.7
    costs least where adapting works.
    """
    out = adapted.copy()
    for k in range(1, n_classes):
        registered_area = int((registered == k).sum())
        if registered_area and int((adapted == k).sum()) < keep * registered_area:
            dropped = (adapted == k) & (registered != k)
            out[dropped] = registered[dropped]
            out[registered == k] = k
    return out


SURE = 0.9  # prior probability (after a 1-pixel blur) at which a target pixel teaches the adapted head


def adapted_head(target_features: np.ndarray, prior: np.ndarray, n_classes: int, device: str) -> np.ndarray:
    """Probabilities of a head fitted on the target's pixels labelled by the registered ``prior``.

    Only pixels where the blurred prior is sure (``SURE``) teach it: the registration is roughly
    right inside each organ and wrong near its edges. With a labelled real CT as the example for
    a real MR of another person it beats affine registration, where the CT-fitted head finds
    nothing; MR onto CT it gains a little only with ``keep_registration_where_dropped`` (CT
    organs share intensities, so the target head learns some of the registration's errors).
    """
    sure = soften(prior, base=1.0)
    pseudo = np.argmax(sure, axis=0)
    keep = sure.max(0) >= SURE
    if not keep.any():
        keep = np.ones(pseudo.shape, dtype=bool)
    x = np.ascontiguousarray(target_features[keep], dtype=np.float32)
    return AppearanceHead(n_classes, device=device).fit(x, pseudo[keep].astype(np.int64)).predict(target_features)


def overlap_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[int, tuple[int, int]]:
    """``{class: (2 |P & T|, |P| + |T|)}`` for classes present in either map, to pool over folds."""
    out = {}
    for k in range(1, n_classes):
        p, t = pred == k, truth == k
        total = int(p.sum()) + int(t.sum())
        if total:
            out[k] = (2 * int((p & t).sum()), total)
    return out


def pooled_dice(folds: list[dict[int, tuple[int, int]]]) -> dict[int, float]:
    """Dice per class over all folds together (small hidden slices do not swing it)."""
    sums: dict[int, list[int]] = {}
    for fold in folds:
        for k, (inter, total) in fold.items():
            acc = sums.setdefault(k, [0, 0])
            acc[0] += inter
            acc[1] += total
    return {k: inter / total for k, (inter, total) in sums.items()}
