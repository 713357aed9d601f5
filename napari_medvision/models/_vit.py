"""The ViT both TransUNets run over the tokens of a CNN feature map, and its position embedding."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from torch import nn


class LearnedPositionEmbedding(nn.Module):
    """Adds a learned position embedding to tokens; resized for grids other than the training one.

    MONAI's ``PatchEmbeddingBlock`` fixes its embedding to one image size, so a model trained on
    patches could not run on a whole image of another size; this one is stored as a small image
    ``(1, dim, *grid)`` and interpolated (bilinear/trilinear) to the grid of the current input,
    as ViT does when fine-tuned at another resolution.

    Args:
        dim: token width.
        grid: token grid ``(h, w[, d])`` of the training patch the embedding is sized for.
    """

    def __init__(self, dim: int, grid: Sequence[int]):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(self.grid)]
        self.weight = nn.Parameter(torch.zeros(1, dim, *self.grid))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def resized(self, grid: Sequence[int]) -> torch.Tensor:
        """The embedding as ``(1, dim, *grid)``, interpolated when ``grid`` is not the training grid."""
        grid = tuple(grid)
        if grid == self.grid:  # shapes only: a guard for torch.compile, not data-dependent flow
            return self.weight
        return F.interpolate(self.weight, size=grid, mode=self.mode, align_corners=False)

    def forward(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``tokens`` (B, N, dim) with N = prod(grid), plus the embedding for ``grid``."""
        return tokens + self.resized(grid).flatten(2).transpose(1, 2).to(tokens.dtype)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) feature map → (B, N, C) tokens, N = prod(S), in row-major order."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, N, C) tokens → (B, C, *grid) feature map (inverse of ``to_tokens``)."""
    return tokens.transpose(1, 2).unflatten(2, tuple(grid))


def self_attention_block(dim: int, heads: int, mlp_ratio: float) -> TransformerBlock:
    """A pre-norm MONAI ``TransformerBlock`` (self-attention + MLP) on (B, N, dim) tokens.

    MONAI creates a cross-attention LayerNorm even when the block has no cross-attention; it is
    replaced by an identity so that no weight goes untrained and unused into the weights file.
    Dropout stays 0: MONAI's flash-attention path would apply it in eval mode too.
    """
    block = TransformerBlock(dim, int(round(dim * mlp_ratio)), heads, dropout_rate=0.0, qkv_bias=True,
                             use_flash_attention=True)
    block.norm_cross_attn = nn.Identity()
    return block


class FeatureMapTransformer(nn.Module):
    """A ViT over the pixels/voxels of a CNN feature map (patch size 1, as in TransUNet's hybrid).

    Input and output are ``(B, channels, *S)``: each position is a token projected to ``dim``,
    given a position embedding, passed through ``depth`` MONAI ``TransformerBlock``s and
    projected back to ``channels``.

    Args:
        channels: channels of the feature map (in and out).
        dim: token width inside the transformer.
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: width of each block's MLP relative to ``dim``.
        grid: token grid of the training patch (the feature map's spatial size then).
    """

    def __init__(self, channels: int, dim: int, depth: int, heads: int, mlp_ratio: float, grid: Sequence[int]):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.position = LearnedPositionEmbedding(dim, grid)
        self.blocks = nn.Sequential(*[self_attention_block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.unembed = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, channels, *S) → (B, channels, *S)."""
        grid = x.shape[2:]
        tokens = self.position(self.embed(to_tokens(x)), grid)
        tokens = self.unembed(self.norm(self.blocks(tokens)))
        return from_tokens(tokens, grid)
