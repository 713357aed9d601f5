"""Atlases: labelled real scans used at run time, shipped beside the weights or added by the user.

An atlas set is a folder holding one or more members (an image and its label map on the same
grid) and a card ``atlas.json``: name, modality, label names, source, licence, the sha256 of
every file, and (shipped sets) the models it backs::

    weights/atlases/<name>/atlas.json, image.nii.gz, labels.nii.gz, LICENSE
    $MEDVISION_HOME/atlases/<name>/atlas.json, 0_image.nii.gz, 0_labels.nii.gz, ...

``mv.segment(vol, model="<model id>")`` registers the atlases that back the model onto the scan;
``mv.segment(vol, model="<atlas set name>")`` segments with an atlas set alone, no network
(``tasks/atlas_segment.py`` does the registration and fusion)::

    mv.atlases.add("my-organs", [(image, labels), ...])
    mv.segment(vol, model="my-organs")
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .models.card import CardError, ModelCard, sha256_of
from .models.registry import get_card, user_dir, weights_dir
from .volume import Volume

CARD_NAME = "atlas.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class AtlasError(ValueError):
    """An atlas set is missing, unreadable, or its labels do not fit its images."""


@dataclass
class AtlasSet:
    """One atlas set: its card and where its member files lie (loaded on demand)."""

    name: str
    folder: Path
    card: dict[str, Any]
    source: str = "user"  # "shipped" or "user"
    _cache: dict[int, tuple[Volume, Volume]] = field(default_factory=dict, repr=False)

    @property
    def modality(self) -> str | None:
        return self.card.get("modality")

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.card.get("labels", {}).items()}

    @property
    def models(self) -> list[str]:
        """Ids of the networks this set backs (empty: the set segments alone)."""
        return list(self.card.get("models", []))

    def __len__(self) -> int:
        return len(self.card.get("members", []))

    def member(self, i: int) -> tuple[Volume, Volume]:
        """``(image, labels)`` of member ``i``, files checked against the card's sha256."""
        if i not in self._cache:
            from .io import load

            entry = self.card["members"][i]
            pair = []
            for key in ("image", "labels"):
                path = self.folder / entry[key]
                if not path.exists():
                    raise AtlasError(f"atlas {self.name}: {path} is missing")
                want = entry.get(f"{key}_sha256")
                if want and sha256_of(path) != want:
                    raise AtlasError(f"atlas {self.name}: {path.name} does not match its card's sha256 "
                                     "(the file was changed or is corrupt)")
                pair.append(load(path))
            image, labels = pair
            labels = labels.with_data(np.asarray(labels.data), labels=self.labels, modality=None)
            if image.modality is None and self.modality:
                image.modality = self.modality
            self._cache[i] = (image, labels)
        return self._cache[i]

    def members(self) -> Iterator[tuple[Volume, Volume]]:
        for i in range(len(self)):
            yield self.member(i)

    def summary(self) -> dict[str, Any]:
        """What the CLI and the Segment panel show: name, where, modality, members, labels, source, licence."""
        return {"name": self.name, "kind": self.source, "modality": self.modality, "members": len(self),
                "labels": len(self.labels), "models": self.models, "source": self.card.get("source", ""),
                "license": self.card.get("license", "")}


def shipped_dir() -> Path:
    """Shipped atlas sets: ``<weights>/atlases``."""
    return weights_dir() / "atlases"


def user_atlas_dir() -> Path:
    """The user's atlas sets: ``atlases/`` beside the user model folder (``$MEDVISION_HOME``)."""
    return user_dir().parent / "atlases"


def available(modality: str | None = None) -> list[AtlasSet]:
    """Shipped and user atlas sets (optionally only those of ``modality``); unreadable folders are skipped."""
    sets = []
    for source, root in (("shipped", shipped_dir()), ("user", user_atlas_dir())):
        if not root.is_dir():
            continue
        for card_path in sorted(root.glob(f"*/{CARD_NAME}")):
            try:
                card = json.loads(card_path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            sets.append(AtlasSet(card.get("name", card_path.parent.name), card_path.parent, card, source))
    return [s for s in sets if modality is None or s.modality is None or s.modality.lower() == modality.lower()]


def names() -> list[str]:
    return [s.name for s in available()]


def get(name: str) -> AtlasSet:
    """The atlas set called ``name`` (user sets of that name come after shipped ones and cannot shadow them)."""
    for atlas in available():
        if atlas.name == name:
            return atlas
    raise AtlasError(f"no atlas set called {name!r}; available: {', '.join(names()) or 'none'}")


def find(name: str) -> AtlasSet | None:
    """The atlas set called ``name``, or None."""
    return next((a for a in available() if a.name == name), None)


def for_model(model: Any) -> list[AtlasSet]:
    """The atlas sets that back the network ``model`` (an id or a ``ModelCard``): those whose cards list it
    under ``models``, else those of its parent, and so on up the line of fine-tuned versions.

    A fine-tuned model keeps its parent's labels and grid, so its parent's atlases (the anatomy) serve
    it as they served the parent; the network it brings is its own.
    """
    sets = available()
    card = model if isinstance(model, ModelCard) else None
    current, seen = (card.id if card is not None else str(model)), set()
    while current and current not in seen:
        seen.add(current)
        found = [a for a in sets if current in a.models]
        if found:
            return found
        if card is None or card.id != current:
            try:
                card = get_card(current)
            except CardError:
                return []
        current = card.parent
    return []


def add(name: str, pairs: Sequence[tuple[Volume, Volume]] | str | Path, modality: str | None = None,
        description: str = "", source: str = "", license: str = "", overwrite: bool = False) -> AtlasSet:
    """Store ``pairs`` (``[(image, labels), ...]`` or a folder) as the user atlas set ``name``; return it.

    A folder holds ``images/`` and ``labels/`` with files of the same names (NIfTI, NRRD, MHA).
    Each label map must lie on its image's grid; label ids must mean the same in every member.
    The set is written to a temporary folder and renamed, so a failed add leaves nothing behind.
    """
    _check_name(name)
    if isinstance(pairs, (str, Path)):
        pairs = _pairs_from_folder(Path(pairs))
    pairs = list(pairs)
    if not pairs:
        raise AtlasError(f"atlas set {name}: no (image, labels) pairs given; an atlas set needs at least one")
    labels, modality = _validate(name, pairs, modality)
    root = user_atlas_dir()
    folder = root / name
    if folder.exists() and not overwrite:
        raise AtlasError(f"atlas set {name} exists already in {root}; remove it first or pass overwrite=True")
    from .io import save

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        members = []
        for i, (image, label_map) in enumerate(pairs):
            entry: dict[str, Any] = {"image": f"{i}_image.nii.gz", "labels": f"{i}_labels.nii.gz",
                                     "shape": list(image.spatial_shape), "spacing": list(image.spacing)}
            save(image, tmp / entry["image"])
            data = np.asarray(label_map.data)
            save(label_map.with_data(data.astype(np.uint16 if data.max() > 255 else np.uint8)), tmp / entry["labels"])
            for key in ("image", "labels"):
                entry[f"{key}_sha256"] = sha256_of(tmp / entry[key])
            if image.meta.get("source"):
                entry["from"] = str(image.meta["source"])
            members.append(entry)
        card = {"name": name, "modality": modality, "labels": {str(k): v for k, v in sorted(labels.items())},
                "members": members, "models": [], "description": description, "source": source or "user's own scans",
                "license": license or "the user's own data"}
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return get(name)


def remove(name: str) -> None:
    """Delete the user atlas set ``name``; shipped sets are never removed."""
    atlas = get(name)
    if atlas.source != "user":
        raise AtlasError(f"atlas set {name} is shipped with the package and is not removed")
    shutil.rmtree(atlas.folder)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AtlasError(f"atlas set name {name!r}: use letters, digits, '-', '_' or '.', at most 64 characters")
    shipped = next((a for a in available() if a.name == name and a.source == "shipped"), None)
    if shipped is not None:
        raise AtlasError(f"atlas set name {name!r} is taken by a shipped atlas set; choose another")
    from .models.registry import available as models

    if any(card.id == name for card in models()):
        raise AtlasError(f"atlas set name {name!r} is a model id; choose another so that segment(model=...) is clear")


def _validate(name: str, pairs, modality: str | None) -> tuple[dict[int, str], str | None]:
    """The set's label names and modality, after checking every pair; raises AtlasError naming the member."""
    labels: dict[int, str] = {}
    modalities = set()
    for i, pair in enumerate(pairs, start=1):
        what = f"atlas set {name}, member {i}"
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, Volume) for v in pair)):
            raise AtlasError(f"{what}: give an (image, labels) pair of Volumes")
        image, label_map = pair
        if image.is_labels or image.rgb or image.ndim != 3 or image.n_leading:
            raise AtlasError(f"{what}: the image must be a 3D greyscale image, got {image!r}")
        data = np.asarray(label_map.data)
        if not label_map.is_labels and not np.issubdtype(data.dtype, np.integer):
            raise AtlasError(f"{what}: the labels must be a label map (integer values), got {label_map!r}")
        if label_map.spatial_shape != image.spatial_shape:
            raise AtlasError(f"{what}: labels of shape {label_map.spatial_shape} do not fit the image grid "
                             f"{image.spatial_shape}")
        if not image.same_grid(label_map, tol=1e-3):
            raise AtlasError(f"{what}: the labels' geometry (spacing {label_map.spacing}, origin "
                             f"{tuple(round(o, 2) for o in label_map.origin)}) does not fit the image's "
                             f"(spacing {image.spacing}, origin {tuple(round(o, 2) for o in image.origin)})")
        ids = [int(v) for v in np.unique(data) if v != 0]
        if not ids:
            raise AtlasError(f"{what}: the label map is empty")
        if min(ids) < 0:
            raise AtlasError(f"{what}: label values must be positive integers")
        named = label_map.labels or {}
        for k in ids:
            label = str(named.get(k, f"label {k}"))
            if labels.get(k, label) != label:
                raise AtlasError(f"{what}: label {k} is {label!r} here but {labels[k]!r} in an earlier member")
            labels[k] = label
        modalities.add(modality or image.modality)
    modalities.discard(None)
    if len(modalities) > 1:
        raise AtlasError(f"atlas set {name}: members have different modalities {sorted(modalities)}; "
                         "one set holds one modality")
    return labels, (modalities.pop() if modalities else None)


def _pairs_from_folder(folder: Path) -> list[tuple[Volume, Volume]]:
    from .io import load

    images, labels = folder / "images", folder / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise AtlasError(f"{folder}: an atlas folder holds images/ and labels/ with files of the same names")
    pairs = []
    for path in sorted(p for p in images.iterdir() if p.name.endswith(_IMAGE_SUFFIXES)):
        partner = labels / path.name
        if not partner.exists():
            raise AtlasError(f"{folder}: {path.name} has no label map of the same name in labels/")
        label_map = load(partner)
        if label_map.labels is None:
            label_map = label_map.with_data(np.asarray(label_map.data).astype(np.int32),
                                            labels={int(v): f"label {int(v)}" for v in np.unique(label_map.data) if v})
        pairs.append((load(path), label_map))
    if not pairs:
        raise AtlasError(f"{folder}: images/ holds no NIfTI, NRRD or MHA files")
    return pairs
