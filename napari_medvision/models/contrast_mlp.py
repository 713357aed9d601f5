"""A per-voxel MR contrast model: multi-scale intensity features of one contrast -> another contrast.

Fitted on real co-registered pairs (``recipes/mr_contrast.py``); the features are computed by
``tasks.mr_contrast.voxel_features``. A small MLP over fixed multi-scale filters is what fits on a
2-core CPU in a minute and runs on a whole 240x240x155 brain in seconds; the feature scales
(1-8 mm) give it the context that a grey-level map lacks (partial volume at tissue borders,
CSF in sulci next to cortex).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_architecture


class ContrastMLP(nn.Module):
    """Maps ``(N, n_features)`` voxel features to ``(N,)`` target intensities (1 = the brain's 99th percentile).

    n_features: feature columns per voxel; hidden: width of the hidden layers; layers: hidden layers.
    The features' training mean and spread travel with the weights (buffers ``mean``, ``std``).
    """

    def __init__(self, n_features: int, hidden: int = 64, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = []
        width = n_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*blocks)
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)[:, 0]


@register_architecture("contrast-mlp")
def build(config: dict) -> ContrastMLP:
    return ContrastMLP(int(config["n_features"]), int(config.get("hidden", 64)), int(config.get("layers", 2)))
