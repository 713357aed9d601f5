"""Architecture configs: a card's plain JSON dict merged over an architecture's defaults."""

from __future__ import annotations

import copy
from typing import Any

from .card import CardError


def merged_config(architecture: str, defaults: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``config``; an unknown key (a typo in a card) is an error, not ignored."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise CardError("<card>", f"{architecture} config has unknown keys {', '.join(unknown)}; "
                                  f"known: {', '.join(sorted(defaults))}")
    merged = copy.deepcopy(defaults)
    merged.update(copy.deepcopy(config))
    return merged


def norm_spec(norm: str) -> tuple | str:
    """MONAI's norm argument for a config's ``norm`` name (``"instance"``, ``"batch"`` or ``"group"``)."""
    specs = {
        # nnU-Net's choice: affine instance norm, independent of batch size (CPU batches are small).
        "instance": ("instance", {"affine": True}),
        "batch": "batch",
        "group": ("group", {"num_groups": 8}),
    }
    if norm not in specs:
        raise CardError("<card>", f"unknown norm {norm!r}; use one of {', '.join(specs)}")
    return specs[norm]


def check_input_size(shape, size_divisor, architecture: str) -> None:
    """Raise a readable error when a spatial ``shape`` is not a multiple of ``size_divisor``.

    Without it a wrong size fails deep inside the decoder with a tensor-concatenation message.
    Depends on shapes only, so torch.compile treats it as a guard, not a graph break per call.
    """
    if any(int(s) % int(d) for s, d in zip(shape, size_divisor)):
        raise ValueError(f"{architecture} needs spatial sizes that are multiples of {tuple(size_divisor)}, "
                         f"got {tuple(int(s) for s in shape)}; pad the input (sliding-window inference does)")
