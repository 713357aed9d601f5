"""``mv.segment``: a label map on the input's grid from a segmentation model."""

from __future__ import annotations

import os
from typing import Optional

from ..engine.device import resolve_device
from ..engine.progress import CancelToken, ProgressFn, check, report
from ..models.card import ModelCard
from ..models.registry import get_card, load_model
from ..volume import Volume

# Share of the sliding window that neighbouring windows overlap in ``mv.segment`` (the recipes
# validate at 0.25, which is cheaper; their card entry for what a user gets uses this one).
SEGMENT_OVERLAP = 0.5


def segment(
    volume: Volume,
    model: str | os.PathLike | ModelCard,
    device: Optional[str] = None,
    overlap: float = SEGMENT_OVERLAP,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    compile: bool = False,
    network=None,
) -> Volume:
    """Labels Volume (names from the model card) on ``volume``'s grid; the input is never changed.

    volume: an image; for a multi-contrast model (e.g. ``mr-brain-tumour-3d``) one image or a dict of
        them, ``{"flair": flair, "t1c": t1c}``, any subset (see :mod:`.contrasts`).
    model: a model id from ``mv.models.available()``, a path to a checkpoint with its card, or a card.
    device: "cuda", "mps" or "cpu"; default the best available.
    overlap: fraction of the sliding window shared by neighbouring tiles.
    network: the model already loaded on ``device`` (a cohort run loads it once per worker).
    """
    from ..engine.inference import predict_labels
    from .atlas_segment import segment_if_atlas_backed

    # An atlas set's name, or a model with atlas sets: registered real scans + the network (tasks.atlas_segment)
    atlas_result = segment_if_atlas_backed(volume, model, device, progress, cancel, network=network)
    if atlas_result is not None:
        return atlas_result
    card = get_card(model)
    if isinstance(volume, dict) or card.input.get("contrasts"):  # several MR contrasts: tasks.contrasts
        from .contrasts import segment_multicontrast

        return segment_multicontrast(volume, card, device, overlap, batch_size, progress, cancel, network)
    _check_input(volume, card)
    device = resolve_device(device)
    if network is None:
        report(progress, 0, 1, f"loading model {card.id}")  # the panel shows the stage, not a silent bar
        network, card = load_model(card, device=device)
        check(cancel)
    if card.architecture.get("name") == "appearance-head":  # a prompting head: pixel features, slice by slice
        from .prompting.head import segment_with_head

        return segment_with_head(volume, network, card, device=device, progress=progress, cancel=cancel)
    return predict_labels(network, card, volume, device=device, overlap=overlap, batch_size=batch_size,
                          progress=progress, cancel=cancel, compile=compile)


def _check_input(volume: Volume, card: ModelCard) -> None:
    source = volume.meta.get("source", "the image")
    channels = int(card.input.get("channels", 1))
    have = 3 if volume.rgb else 1
    if channels != have:
        raise ValueError(f"{source}: model {card.id} expects {'colour' if channels == 3 else 'greyscale'} images, "
                         f"this one is {'colour' if have == 3 else 'greyscale'}")
    if volume.is_labels:
        raise ValueError(f"{source}: is a label map; segment the image it was drawn on")
    dims = int(card.input.get("dims", 3))
    if dims == 3 and volume.ndim != 3:
        raise ValueError(f"{source}: model {card.id} segments 3D volumes, this image is {volume.ndim}D")
