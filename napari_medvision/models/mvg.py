"""MVG, the Medical Vision Generalist (Ren et al., 2024): every task is in-context image generation.

A task is shown, not named: one prompt pair (an image and what should become of it) and a query
image are laid out as a 2x2 canvas ::

    [ prompt image | prompt target ]
    [ query image  | query target  ]      <- the model fills this quadrant

and a ViT encoder-decoder predicts the masked query-target quadrant. Synthesis, denoising,
inpainting and segmentation (labels drawn as grey levels, the paper's "in-context colouring")
are all the same call; a new prompt pair is a new task, with no retraining.

Training mixes the paper's two objectives (``hybrid_target_mask``): masked image modelling (a
random subset of target patches is hidden) and autoregressive generation (the target is revealed
in raster order up to a random point and the rest is predicted). At inference ``generate`` fills
the target in one pass or, with ``steps > 1``, autoregressively in row chunks.

Two departures from the paper, for models small enough to train without a data centre:
- the hidden target starts from an *intensity prior* read off the prompt pair
  (``intensity_prior``: for each grey level of the prompt image, the mean prompt-target value,
  applied to the query), embedded into the hidden target tokens and added to the output, so the
  network learns a correction with context instead of discovering the whole mapping from scratch;
- a small convolutional head turns the decoder's target tokens into pixels next to the query
  image at full resolution (patch-wise linear heads leave block edges at these sizes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import register_architecture

PRESETS: dict[str, dict[str, Any]] = {
    # for tests: builds and runs in milliseconds
    "tiny": dict(tile=32, patch=8, dim=32, depth=2, decoder_depth=1, heads=2, head_channels=8),
    # trains on a 2-core CPU in about an hour
    "cpu": dict(tile=64, patch=8, dim=128, depth=6, decoder_depth=2, heads=4, head_channels=24),
    # the CPU model's tiles at twice the width and more depth: for a GPU run of minutes, not hours
    "medium": dict(tile=64, patch=8, dim=192, depth=8, decoder_depth=2, heads=6, head_channels=32),
    # the "small" configuration: about half an hour on one data-centre GPU
    "small": dict(tile=128, patch=16, dim=384, depth=12, decoder_depth=4, heads=6, head_channels=48),
}
DEFAULTS = dict(PRESETS["small"], channels=1, mlp_ratio=4.0)

PROMPT_IMAGE, PROMPT_TARGET, QUERY_IMAGE, QUERY_TARGET = range(4)


def make_canvas(prompt_image: torch.Tensor, prompt_target: torch.Tensor, query_image: torch.Tensor,
                query_target: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(B, C, 2T, 2T)`` canvas of four ``(B, C, T, T)`` tiles; an absent query target is zeros."""
    if query_target is None:
        query_target = torch.zeros_like(query_image)
    top = torch.cat([prompt_image, prompt_target], dim=-1)
    bottom = torch.cat([query_image, query_target], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def quadrant_of_tokens(grid: int) -> torch.Tensor:
    """``(grid*grid,)`` quadrant index of each token of a ``grid x grid`` token canvas (raster order)."""
    half = grid // 2
    rows = torch.arange(grid)[:, None].expand(grid, grid)
    cols = torch.arange(grid)[None, :].expand(grid, grid)
    return ((rows >= half).long() * 2 + (cols >= half).long()).reshape(-1)


def hybrid_target_mask(batch: int, tile_tokens: int, mim_ratio: float = 0.5, mim_keep: tuple[float, float] = (0.0, 0.5),
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``(batch, tile_tokens**2)`` bool, True where a query-target patch is hidden (and predicted).

    A share ``mim_ratio`` of the rows are masked-image-modelling samples (each target patch stays
    visible with a probability drawn from ``mim_keep``); the others are autoregressive samples
    (a raster-order prefix of random length stays visible, everything after it is predicted).
    """
    n = tile_tokens * tile_tokens
    mask = torch.ones(batch, n, dtype=torch.bool)
    kinds = torch.rand(batch, generator=generator) < mim_ratio
    for b in range(batch):
        if kinds[b]:
            keep = float(torch.empty(1).uniform_(*mim_keep, generator=generator))
            mask[b] = torch.rand(n, generator=generator) >= keep
        else:
            visible_rows = int(torch.randint(0, tile_tokens, (1,), generator=generator))
            mask[b, : visible_rows * tile_tokens] = False
    return mask


def intensity_prior(prompt_image: torch.Tensor, prompt_target: torch.Tensor, query_image: torch.Tensor,
                    bins: int = 48, shrink: float = 4.0) -> torch.Tensor:
    """``(B, C, T, T)``: each query pixel's expected target value given its grey level, learned from the
    prompt pair (the mean prompt-target value per prompt-image grey level; sparsely filled levels
    shrink toward the prompt target's mean)."""
    shape = query_image.shape
    image = prompt_image.reshape(shape[0] * shape[1], -1).float()
    target = prompt_target.reshape(shape[0] * shape[1], -1).float()
    index = (image.clamp(0, 1) * (bins - 1)).round().long()
    sums = torch.zeros(len(image), bins, device=image.device).scatter_add_(1, index, target)
    counts = torch.zeros(len(image), bins, device=image.device).scatter_add_(1, index, torch.ones_like(target))
    table = (sums + shrink * target.mean(1, keepdim=True)) / (counts + shrink)
    query = (query_image.reshape(len(image), -1).float().clamp(0, 1) * (bins - 1)).round().long()
    return table.gather(1, query).reshape(shape).to(query_image.dtype)


class MVG(nn.Module):
    """In-context image-to-image generalist over a 2x2 canvas of ``tile``-pixel tiles.

    tile: side of each canvas tile in pixels; patch: ViT patch side in pixels; dim: token width;
    depth / decoder_depth: encoder / decoder Transformer layers; heads: attention heads;
    head_channels: feature channels of the convolutional pixel head; channels: image channels.
    Input ``(B, C, 2*tile, 2*tile)`` canvas, output ``(B, C, tile, tile)`` query target.
    """

    def __init__(self, tile: int, patch: int, dim: int, depth: int, decoder_depth: int, heads: int,
                 head_channels: int, channels: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if tile % patch:
            raise ValueError(f"tile {tile} is not a multiple of patch {patch}")
        self.tile, self.patch, self.channels = tile, patch, channels
        self.tile_tokens = tile // patch
        grid = 2 * self.tile_tokens
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.prior_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.quadrant = nn.Parameter(torch.zeros(4, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("token_quadrant", quadrant_of_tokens(grid), persistent=False)

        def layer():
            return nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                              batch_first=True, norm_first=True)

        self.encoder = nn.TransformerEncoder(layer(), depth, enable_nested_tensor=False)
        self.encoder_norm = nn.LayerNorm(dim)
        self.decoder = nn.TransformerEncoder(layer(), decoder_depth, enable_nested_tensor=False)
        self.decoder_norm = nn.LayerNorm(dim)
        self.to_pixels = nn.Linear(dim, patch * patch * head_channels)
        self.pixel_head = nn.Sequential(
            nn.Conv2d(head_channels + 2 * channels, head_channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(head_channels, head_channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(head_channels, channels, 1),
        )
        nn.init.zeros_(self.pixel_head[-1].weight)  # a new network outputs the prior: it learns corrections
        nn.init.zeros_(self.pixel_head[-1].bias)
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.quadrant, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, canvas: torch.Tensor, target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The query target ``(B, C, T, T)`` of a canvas; ``target_mask`` ``(B, (T/p)^2)`` marks the
        hidden target patches (default: all hidden)."""
        batch, tile = canvas.shape[0], self.tile
        prompt_image, prompt_target = canvas[..., :tile, :tile], canvas[..., :tile, tile:]
        query_image = canvas[..., tile:, :tile]
        prior = intensity_prior(prompt_image, prompt_target, query_image)
        tokens = self.patch_embed(canvas).flatten(2).transpose(1, 2)  # (B, N, dim), raster order
        target_index = (self.token_quadrant == QUERY_TARGET).nonzero().squeeze(1)
        hidden = torch.zeros(batch, tokens.shape[1], dtype=torch.bool, device=canvas.device)
        if target_mask is None:
            hidden[:, target_index] = True
        else:
            hidden[:, target_index] = target_mask.to(canvas.device)
        fill = self.mask_token.to(tokens.dtype).expand_as(tokens).clone()
        fill[:, target_index] = fill[:, target_index] + self.prior_embed(prior).flatten(2).transpose(1, 2)
        tokens = torch.where(hidden[..., None], fill, tokens)
        tokens = tokens + self.position + self.quadrant[self.token_quadrant]
        tokens = self.decoder_norm(self.decoder(self.encoder_norm(self.encoder(tokens))))
        target = self.to_pixels(tokens[:, target_index])  # (B, t*t, p*p*hc)
        t, p = self.tile_tokens, self.patch
        target = target.reshape(batch, t, t, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, t * p, t * p)
        return prior + self.pixel_head(torch.cat([target, query_image, prior], dim=1))

    @torch.no_grad()
    def generate(self, prompt_image: torch.Tensor, prompt_target: torch.Tensor, query_image: torch.Tensor,
                 steps: int = 1) -> torch.Tensor:
        """The query target ``(B, C, T, T)``: one pass (``steps=1``) or autoregressively in ``steps``
        chunks of token rows, each chunk conditioned on the ones generated before it."""
        t = self.tile_tokens
        steps = max(1, min(int(steps), t))
        output = torch.zeros_like(query_image)
        bounds = torch.linspace(0, t, steps + 1).round().long().tolist()
        for start in bounds[:-1]:
            mask = torch.ones(query_image.shape[0], t, t, dtype=torch.bool)
            mask[:, :start] = False
            prediction = self(make_canvas(prompt_image, prompt_target, query_image, output), mask.reshape(len(mask), -1))
            # rows from ``start`` on are replaced: the chunk just generated is kept, later ones are redone
            output = output.clone()
            output[..., start * self.patch:, :] = prediction[..., start * self.patch:, :]
        return output


def resolved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A full MVG config: a named ``preset`` and explicit keys override the defaults."""
    merged = dict(DEFAULTS)
    merged.update(PRESETS.get(config.get("preset", ""), {}))
    merged.update({k: v for k, v in config.items() if k != "preset"})
    return merged


@register_architecture("mvg")
def build_mvg(config: dict[str, Any]) -> nn.Module:
    """An ``MVG`` from a card's config dict (missing keys take the "small" preset's value)."""
    return MVG(**resolved_config(config))
