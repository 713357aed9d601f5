"""Lines of model versions: a shipped model, the models fine-tuned from it, theirs, and so on.

Every fine-tuned card names its ``parent``; the version a user works with in a line (the one
the panels select and the next fine-tune starts from) is recorded in ``<user folder>/current.json``.
Rolling back makes an older version current again; no model file is ever deleted or changed.

    mv.models.versions("ct-abdomen-organs-3d")   # the line, oldest first, the current one marked
    mv.models.rollback("ct-abdomen-organs-3d")   # back to the shipped model
"""

from __future__ import annotations

import json
from typing import Optional

from .card import CardError, ModelCard
from .registry import available, get_card, notify, user_dir


def root_of(model_id: str, cards: Optional[dict[str, ModelCard]] = None) -> str:
    """The first ancestor of ``model_id`` (the model its line started from)."""
    cards = cards if cards is not None else {c.id: c for c in available()}
    seen, current = set(), model_id
    while current in cards and cards[current].parent and cards[current].parent in cards and current not in seen:
        seen.add(current)
        current = cards[current].parent
    return current


def versions(model_id: str) -> list[dict]:
    """The versions in ``model_id``'s line, oldest first: ``{id, parent, source, date, steps, gain, current}``."""
    cards = {c.id: c for c in available()}
    if model_id not in cards:
        get_card(model_id)  # raises the registry's clear error for an unknown id
    root = root_of(model_id, cards)
    line = [c for c in cards.values() if root_of(c.id, cards) == root]
    chosen = current(root)
    out = []
    for card in line:
        training = card.training or {}
        guard = training.get("guard") or {}
        figures = guard.get("figures") or {}
        out.append({"id": card.id, "parent": card.parent, "source": card.source,
                    "date": training.get("date"), "steps": training.get("steps"),
                    "gain": figures.get("mean gain, corrected labels"), "current": card.id == chosen})
    order = {"shipped": 0}
    return sorted(out, key=lambda v: (order.get(v["source"], 1), v["date"] or "", v["id"]))


def current(model_id: str) -> str:
    """The current version of ``model_id``'s line (default: its first model)."""
    root = root_of(model_id)
    chosen = _read().get(root)
    known = {c.id for c in available()}
    return chosen if chosen in known else root


def rollback(model_id: str) -> str:
    """Make ``model_id`` the current version of its line (any older or newer one); returns its id."""
    card = get_card(model_id)
    root = root_of(card.id)
    table = _read()
    table[root] = card.id
    path = user_dir() / "current.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError as exc:
        raise CardError(path, f"could not record the current version ({exc.strerror or exc})") from exc
    notify("current", card.id)
    return card.id


def _read() -> dict:
    path = user_dir() / "current.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
