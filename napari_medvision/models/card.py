"""Model cards: everything inference needs travels beside the weights (``<id>.json``).

A card names the architecture and its config, the modality, how to prepare the input
(spacing, normalisation, patch size, channels), the label names, how the model was trained,
its metrics on data it was not trained on, and the sha256 of its weights file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CARD_FIELDS_REQUIRED = ("id", "task", "architecture", "modality", "input", "sha256")


class CardError(ValueError):
    """A model card is missing, unreadable or inconsistent with its weights."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


@dataclass
class ModelCard:
    """The JSON card of one model; ``path`` is where its weights file lies (not serialised)."""

    id: str
    task: str
    architecture: dict[str, Any]
    modality: str
    input: dict[str, Any]
    sha256: str
    labels: dict[int, str] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    license: str = "Apache-2.0"
    parent: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    weights_path: Path | None = None
    source: str = "shipped"

    @property
    def label_names(self) -> dict[int, str]:
        return dict(self.labels or {})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("weights_path")
        data.pop("source")
        if self.labels is not None:
            data["labels"] = {str(k): v for k, v in self.labels.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None = None) -> "ModelCard":
        missing = [k for k in CARD_FIELDS_REQUIRED if k not in data]
        if missing:
            raise CardError(path or "<card>", f"model card lacks {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__ if f not in ("weights_path", "source")}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if kwargs.get("labels") is not None:
            kwargs["labels"] = {int(k): str(v) for k, v in kwargs["labels"].items()}
        card = cls(**kwargs)
        card.extra.update(extra)
        return card


def read_card(path: str | Path) -> ModelCard:
    """The card at ``path`` (``<id>.json``), pointing at ``<id>.safetensors`` beside it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CardError(path, "model card not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CardError(path, f"model card is not valid JSON ({exc})") from exc
    card = ModelCard.from_json(data, path)
    card.weights_path = path.with_suffix(".safetensors")
    return card


def write_card(card: ModelCard, path: str | Path) -> None:
    """Write ``card`` as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(json.dumps(card.to_json(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
