"""Model pickers shared by the panels: fill a combo box from the registry, keep the user's choice,
and refill every open panel at once when a model is saved, removed or made current."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox, QWidget

from ... import models


def fill_models(box: QComboBox, cards: Iterable[Any], extra: Iterable[tuple[str, Any]] = (),
                prefer: Any = None) -> None:
    """Replace the box's items with ``cards`` (then ``extra`` ``(text, data)`` rows), keeping the
    chosen model if it is still listed, else ``prefer``."""
    current = box.currentData() if prefer is None else prefer
    box.clear()
    for card in cards:
        box.addItem(f"{card.id} ({card.source})", card.id)
    for text, data in extra:
        box.addItem(text, data)
    index = box.findData(current) if current is not None else -1
    if index >= 0:
        box.setCurrentIndex(index)


class _Relay(QObject):
    changed = Signal(str, str)


def watch_models(widget: QWidget, refresh: Callable[[str, str], None]) -> None:
    """Call ``refresh(event, model_id)`` on the GUI thread whenever the registry announces a change,
    until ``widget`` is destroyed (a fine-tune saves from its worker thread)."""
    relay = _Relay(widget)
    relay.changed.connect(refresh)
    stop = models.on_change(lambda event, model_id: relay.changed.emit(event, model_id))
    widget.destroyed.connect(lambda *_: stop())
    widget._model_relay = relay  # kept alive with the widget
