"""The prompting appearance head as a stored model: a per-pixel MLP on the prompt's features.

``mv.prompt`` fits this head afresh on every prompt. Fine-tuning it on a user's corrections
(``mv.finetune("prompt-head", ...)``) keeps it: the head then segments other scans of the same
kind without a prompt (``mv.segment``), and can be fine-tuned again on later corrections. It
reads only intensity features (``tasks.prompting.features.intensity_features``), which mean the same on
every scan of a modality; DINO features are not used because their PCA basis is fitted per
prompt and would not carry over to another scan.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_architecture


class AppearanceHeadNet(nn.Module):
    """``(N, n_features)`` pixel features -> ``(N, n_classes)`` logits; class 0 is background.

    n_features: feature channels (``tasks.prompting.features.PER_CHANNEL`` per image channel).
    n_classes: background plus one per label.
    hidden: width of the two hidden layers.
    The feature standardisation (mean, std of the first training set) is part of the weights,
    so a fine-tuned head reads features exactly as its parent did.
    """

    def __init__(self, n_features: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.mean) / self.std)


@register_architecture("appearance-head")
def build_appearance_head(config: dict) -> AppearanceHeadNet:
    return AppearanceHeadNet(int(config["n_features"]), int(config["n_classes"]), int(config.get("hidden", 32)))
