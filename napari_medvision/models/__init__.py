"""Model architectures and the registry of shipped and user models.

``mv.models.available()`` lists model cards; ``load_model`` builds a checked network.
"""

from __future__ import annotations

from .card import CardError, ModelCard, read_card
from .registry import (available, build_model, get_card, load_model, on_change, remove_model, save_model, user_dir,
                       weights_dir)
from .versions import current, rollback, versions

__all__ = ["available", "build_model", "get_card", "load_model", "save_model", "user_dir", "weights_dir",
           "on_change", "remove_model", "versions", "current", "rollback",
           "ModelCard", "CardError", "read_card"]
