"""TransUNet architectures, registered for model cards: ``transunet2d`` and ``transunet3d``.

A card's ``architecture`` is ``{"name": "transunet3d", "config": {...}}``; every config key has
a default (the "small" preset), and ``PRESETS_2D`` / ``PRESETS_3D`` hold named starting points::

    from napari_medvision.models import build_model
    from napari_medvision.models.transunet import PRESETS_3D
    net = build_model({"name": "transunet3d", "config": {**PRESETS_3D["tiny"], "n_classes": 3}})

Cards should store the full config (``resolved_config``), so that later changes to a preset
never change a trained model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import transunet2d, transunet3d
from ._config import merged_config
from .registry import register_architecture
from .transunet2d import TransUNet2D
from .transunet3d import TransUNet3D

PRESETS_2D = transunet2d.PRESETS
PRESETS_3D = transunet3d.PRESETS
_DEFAULTS = {"transunet2d": transunet2d.DEFAULTS, "transunet3d": transunet3d.DEFAULTS}


def resolved_config(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The complete config of architecture ``name``: its defaults updated by ``config``."""
    return merged_config(name, _DEFAULTS[name], dict(config or {}))


@register_architecture("transunet2d")
def build_transunet2d(config: dict[str, Any]) -> nn.Module:
    """A ``TransUNet2D`` from a card's config dict (missing keys take the "small" preset's value)."""
    return TransUNet2D(**resolved_config("transunet2d", config))


@register_architecture("transunet3d")
def build_transunet3d(config: dict[str, Any]) -> nn.Module:
    """A ``TransUNet3D`` from a card's config dict (missing keys take the "small" preset's value)."""
    return TransUNet3D(**resolved_config("transunet3d", config))


__all__ = ["TransUNet2D", "TransUNet3D", "PRESETS_2D", "PRESETS_3D", "resolved_config",
           "build_transunet2d", "build_transunet3d"]
