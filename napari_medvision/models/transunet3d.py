"""3D TransUNet (Chen et al. 2023): an nnU-Net-style 3D U-Net with a ViT over the bottleneck
tokens ("Encoder-only") and optionally a Transformer decoder of learnable queries that predict
masks ("Decoder-only" with ``vit_depth=0``, "Encoder+Decoder" with both)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

from ._config import check_input_size, norm_spec
from ._vit import FeatureMapTransformer
from .card import CardError
from .query_decoder import QueryMaskDecoder

PRESETS: dict[str, dict[str, Any]] = {
    # forward on (1, 1, 32, 32, 32) in well under a second on a CPU: for tests
    "tiny": {"in_channels": 1, "n_classes": 2, "features": [8, 16, 32, 64], "strides": [2, 2, 2],
             "kernel_sizes": 3, "img_size": [32, 32, 32], "vit_dim": 32, "vit_depth": 1, "vit_heads": 2,
             "mlp_ratio": 2.0, "norm": "instance", "decoder": "cnn", "num_queries": 4, "query_dim": 32,
             "query_heads": 2, "query_layers": 3, "query_scales": 3, "masked_attention": True,
             "deep_supervision": False},
    # trainable on a CPU in 10-20 minutes; the first step halves only in-plane (thick slices)
    "small": {"in_channels": 1, "n_classes": 2, "features": [16, 32, 64, 128],
              "strides": [[1, 2, 2], [2, 2, 2], [2, 2, 2]], "kernel_sizes": 3, "img_size": [32, 64, 64],
              "vit_dim": 128, "vit_depth": 2, "vit_heads": 4, "mlp_ratio": 2.0, "norm": "instance",
              "decoder": "cnn", "num_queries": 8, "query_dim": 64, "query_heads": 4, "query_layers": 3,
              "query_scales": 3, "masked_attention": True, "deep_supervision": False},
    # closer to the paper (nnU-Net stages, 12-layer ViT-B there; narrower here to keep weights small): a GPU
    "base": {"in_channels": 1, "n_classes": 2, "features": [24, 48, 96, 192, 256],
             "strides": [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "kernel_sizes": 3,
             "img_size": [64, 128, 128], "vit_dim": 256, "vit_depth": 6, "vit_heads": 8, "mlp_ratio": 4.0,
             "norm": "instance", "decoder": "cnn", "num_queries": 20, "query_dim": 128, "query_heads": 8,
             "query_layers": 6, "query_scales": 3, "masked_attention": True, "deep_supervision": False},
}
DEFAULTS = PRESETS["small"]


def _per_axis(value, n: int, name: str) -> list[list[int]]:
    """``n`` per-axis triples from an int, a triple, or a list of ints/triples (JSON friendly)."""
    if isinstance(value, (int, np.integer)):
        return [[int(value)] * 3 for _ in range(n)]
    value = list(value)
    if len(value) == 3 and all(isinstance(v, (int, np.integer)) for v in value) and n != 3:
        return [[int(v) for v in value] for _ in range(n)]
    if len(value) != n:
        raise CardError("<card>", f"transunet3d {name} needs {n} entries, got {len(value)}")
    return [[int(v)] * 3 if isinstance(v, (int, np.integer)) else [int(a) for a in v] for v in value]


class TransUNet3D(nn.Module):
    """Segmentation logits ``(B, n_classes, D, H, W)`` for volumes ``(B, in_channels, D, H, W)``.

    Encoder: nnU-Net stages of two conv-norm-LeakyReLU layers (MONAI ``UnetBasicBlock``), the
    first at full size, each next one downsampling by its entry in ``strides``. The ViT
    (``FeatureMapTransformer``) runs over every bottleneck voxel. CNN decoder: ``UnetUpBlock``
    stages back to full size.

    ``decoder="cnn"``: a 1x1x1 conv head gives logits. ``decoder="transformer"``: a
    ``QueryMaskDecoder`` attends to the coarsest ``query_scales`` CNN decoder levels and predicts
    masks on the full-resolution decoder features; it returns the log of normalised per-class
    probabilities, which are logits too (softmax gives the probabilities back), so training
    losses and inference treat both decoders alike. (Under autocast that output stays float32:
    its sum of small probabilities is taken in float32 before the log.)

    With ``deep_supervision``, forward in training mode returns a tuple: the main output first,
    then auxiliary outputs (CNN decoder: coarser decoder levels, finest first, at their own size;
    transformer decoder: the state before each query round, latest first, full size). In eval
    mode only the main output.

    Attributes:
        size_divisor: ``(sd, sh, sw)``, the product of ``strides`` per axis; D, H, W must be multiples.

    Args:
        in_channels: image channels.
        n_classes: output channels, background included.
        features: channels of the encoder stages, fine to coarse.
        strides: downsampling from each stage to the next, ``len(features) - 1`` entries, each an
            int or ``[sd, sh, sw]`` (e.g. ``[1, 2, 2]`` keeps thick slices); one int or triple
            applies to all (a flat list of ``len(features) - 1`` ints is one int per step).
        kernel_sizes: conv kernel per stage (``len(features)`` entries), int or triple, or one for all.
        img_size: training patch ``(D, H, W)`` in voxels; sizes the position embeddings.
        vit_dim: token width of the bottleneck ViT.
        vit_depth: transformer blocks of the bottleneck ViT (0: none, a plain nnU-Net encoder).
        vit_heads: attention heads of the ViT; must divide ``vit_dim``.
        mlp_ratio: width of transformer MLPs relative to the token width.
        norm: ``"instance"`` (default, as nnU-Net), ``"batch"`` or ``"group"``.
        decoder: ``"cnn"`` (conv head) or ``"transformer"`` (query mask decoder).
        num_queries: queries of the transformer decoder.
        query_dim: token width of the transformer decoder.
        query_heads: attention heads of the transformer decoder; must divide ``query_dim``.
        query_layers: refinement rounds of the transformer decoder.
        query_scales: how many of the coarsest CNN decoder levels the queries attend to.
        masked_attention: restrict each query's cross-attention to its current mask.
        deep_supervision: also return auxiliary outputs in training mode.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, features: Sequence[int] = (16, 32, 64, 128),
                 strides=((1, 2, 2), (2, 2, 2), (2, 2, 2)), kernel_sizes=3, img_size: Sequence[int] = (32, 64, 64),
                 vit_dim: int = 128, vit_depth: int = 2, vit_heads: int = 4, mlp_ratio: float = 2.0,
                 norm: str = "instance", decoder: str = "cnn", num_queries: int = 8, query_dim: int = 64,
                 query_heads: int = 4, query_layers: int = 3, query_scales: int = 3,
                 masked_attention: bool = True, deep_supervision: bool = False):
        super().__init__()
        if decoder not in ("cnn", "transformer"):
            raise CardError("<card>", f"transunet3d decoder must be 'cnn' or 'transformer', not {decoder!r}")
        features = [int(f) for f in features]
        n = len(features)
        strides = _per_axis(strides, n - 1, "strides")
        kernels = _per_axis(kernel_sizes, n, "kernel_sizes")
        norm_name = norm_spec(norm)
        self.decoder_kind = decoder
        self.deep_supervision = deep_supervision
        # size of each level relative to the input, fine (level 0, full size) to coarse
        scales = np.cumprod([[1, 1, 1]] + strides, axis=0)
        self.size_divisor = tuple(int(s) for s in scales[-1])
        self.encoder = nn.ModuleList(
            UnetBasicBlock(3, in_channels if i == 0 else features[i - 1], features[i], kernel_size=kernels[i],
                           stride=1 if i == 0 else strides[i - 1], norm_name=norm_name)
            for i in range(n))
        grids = [[int(s) // int(d) for s, d in zip(img_size, scale)] for scale in scales]
        self.vit = (FeatureMapTransformer(features[-1], vit_dim, vit_depth, vit_heads, mlp_ratio, grids[-1])
                    if vit_depth > 0 else nn.Identity())
        # coarse to fine: decoder[j] brings level n-1-j to level n-2-j
        self.decoder = nn.ModuleList(
            UnetUpBlock(3, features[i], features[i - 1], kernel_size=kernels[i - 1], stride=1,
                        upsample_kernel_size=strides[i - 1], norm_name=norm_name)
            for i in reversed(range(1, n)))
        if decoder == "cnn":
            self.head = UnetOutBlock(3, features[0], n_classes)
            # auxiliary heads on decoder levels 1 .. n-2 (not the bottleneck), finest first
            self.aux_heads = nn.ModuleList(UnetOutBlock(3, features[i], n_classes)
                                           for i in range(1, n - 1)) if deep_supervision else nn.ModuleList()
        else:
            # coarsest levels the queries attend to: decoder outputs from the bottleneck on, never the
            # full-size level (that one carries the mask features); fewer if there are fewer rounds
            used = min(query_scales, n - 1, query_layers)
            levels = list(reversed(range(n)))[:used]  # level indices, coarse to fine
            self.query_decoder = QueryMaskDecoder(
                3, n_classes, [features[i] for i in levels], [grids[i] for i in levels], features[0],
                num_queries=num_queries, dim=query_dim, heads=query_heads, layers=query_layers,
                mlp_ratio=mlp_ratio, masked_attention=masked_attention)
            self._query_levels = used

    def forward(self, x: torch.Tensor):
        """(B, in_channels, D, H, W) → logits (B, n_classes, D, H, W) (a tuple with deep supervision)."""
        check_input_size(x.shape[2:], self.size_divisor, "TransUNet3D")
        h = x
        skips = []
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        h = self.vit(skips.pop())
        levels = [h]  # decoder outputs, coarse to fine
        for up, skip in zip(self.decoder, reversed(skips)):
            h = up(h, skip)
            levels.append(h)
        with_aux = self.deep_supervision and self.training
        if self.decoder_kind == "cnn":
            main = self.head(h)
            if not with_aux:
                return main
            finest_first = levels[-2:0:-1]
            return (main, *[head(level) for head, level in zip(self.aux_heads, finest_first)])
        main, aux = self.query_decoder(levels[: self._query_levels], h, with_aux=with_aux)
        return (main, *reversed(aux)) if with_aux else main
