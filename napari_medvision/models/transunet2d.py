"""TransUNet 2D (Chen et al. 2021): residual CNN encoder, a ViT on its coarsest features, a
cascaded upsampler with skip connections back to full resolution."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from ._config import check_input_size, norm_spec
from ._vit import FeatureMapTransformer

PRESETS: dict[str, dict[str, Any]] = {
    # forward on (1, 1, 64, 64) in a few ms on a CPU: for tests
    "tiny": {"in_channels": 1, "n_classes": 2, "features": [8, 16, 32, 64], "blocks_per_stage": 1,
             "img_size": [64, 64], "vit_dim": 32, "vit_depth": 1, "vit_heads": 2, "mlp_ratio": 2.0,
             "norm": "instance"},
    # trainable on a CPU in 10-20 minutes
    "small": {"in_channels": 1, "n_classes": 2, "features": [16, 32, 64, 128], "blocks_per_stage": 2,
              "img_size": [128, 128], "vit_dim": 128, "vit_depth": 4, "vit_heads": 4, "mlp_ratio": 2.0,
              "norm": "instance"},
    # closer to the paper (R50-ViT-B/16 has ~100M parameters; this keeps shipped weights small): a GPU
    "base": {"in_channels": 1, "n_classes": 2, "features": [32, 64, 128, 256], "blocks_per_stage": 3,
             "img_size": [224, 224], "vit_dim": 256, "vit_depth": 6, "vit_heads": 8, "mlp_ratio": 4.0,
             "norm": "instance"},
}
DEFAULTS = PRESETS["small"]


class TransUNet2D(nn.Module):
    """Segmentation logits ``(B, n_classes, H, W)`` for images ``(B, in_channels, H, W)``.

    Encoder: a full-resolution stem, then ``len(features)`` residual stages that each halve the
    size (MONAI ``UnetResBlock``). A ViT (``FeatureMapTransformer``) runs over every position of
    the coarsest map, as TransUNet's hybrid ViT does with patch size 1. Decoder: ``UnetUpBlock``
    (transposed conv, concatenation with the encoder's skip, two convs) back to full size.

    Unlike the paper, whose ResNet-50 root has no full-resolution skip, the stem gives one: thin
    structures (retinal vessels) need full-resolution detail.

    Attributes:
        size_divisor: ``(sy, sx)``; H and W must be multiples (``2 ** len(features)`` each).
            Any such size works, square or not; the ViT's position embedding is interpolated.

    Args:
        in_channels: image channels (1 for grey scale, 3 for RGB fundus photographs).
        n_classes: output channels, background included.
        features: channels of the encoder stages, fine to coarse; each stage halves H and W.
        blocks_per_stage: residual blocks per encoder stage (the first one downsamples).
        img_size: training patch ``(H, W)`` in pixels; sizes the ViT's position embedding.
        vit_dim: token width of the ViT.
        vit_depth: transformer blocks of the ViT (0: a plain residual U-Net).
        vit_heads: attention heads of the ViT; must divide ``vit_dim``.
        mlp_ratio: width of the ViT's MLPs relative to ``vit_dim``.
        norm: ``"instance"`` (default), ``"batch"`` or ``"group"`` normalisation in the CNN.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, features: Sequence[int] = (16, 32, 64, 128),
                 blocks_per_stage: int = 2, img_size: Sequence[int] = (128, 128), vit_dim: int = 128,
                 vit_depth: int = 4, vit_heads: int = 4, mlp_ratio: float = 2.0, norm: str = "instance"):
        super().__init__()
        features = [int(f) for f in features]
        norm_name = norm_spec(norm)
        self.size_divisor = (2 ** len(features),) * 2
        self.stem = UnetBasicBlock(2, in_channels, features[0], kernel_size=3, stride=1, norm_name=norm_name)
        self.encoder = nn.ModuleList()
        previous = features[0]
        for channels in features:
            blocks = [UnetResBlock(2, previous, channels, kernel_size=3, stride=2, norm_name=norm_name)]
            blocks += [UnetResBlock(2, channels, channels, kernel_size=3, stride=1, norm_name=norm_name)
                       for _ in range(blocks_per_stage - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            previous = channels
        grid = [int(s) // d for s, d in zip(img_size, self.size_divisor)]
        self.vit = (FeatureMapTransformer(features[-1], vit_dim, vit_depth, vit_heads, mlp_ratio, grid)
                    if vit_depth > 0 else nn.Identity())
        # coarse to fine: each step doubles the size and joins the skip one level finer
        skip_channels = [features[0]] + features[:-1]
        self.decoder = nn.ModuleList(
            UnetUpBlock(2, features[i], skip_channels[i], kernel_size=3, stride=1, upsample_kernel_size=2,
                        norm_name=norm_name)
            for i in reversed(range(len(features))))
        self.head = UnetOutBlock(2, features[0], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) → logits (B, n_classes, H, W)."""
        check_input_size(x.shape[2:], self.size_divisor, "TransUNet2D")
        skips = [self.stem(x)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        h = self.vit(skips.pop())
        for up, skip in zip(self.decoder, reversed(skips)):
            h = up(h, skip)
        return self.head(h)
