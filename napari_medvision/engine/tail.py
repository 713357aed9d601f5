"""A segmentation network cut in two: a frozen trunk whose outputs (the full-resolution decoder
features) are computed once, and the trainable tail: the 1x1 output head on those features.

Fine-tuning on a few corrected slices trains only the head on the cached features: a step is
a matrix product per voxel instead of a pass through the network (on a shared 2-core CPU one
step of even the last decoder block takes seconds), leave-one-slice-out folds become affordable,
and what the parent learned in its encoder and decoder cannot drift. The head's weights go back
into the full network, so the result loads like any other model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def tail_supported(network) -> bool:
    """True for TransUNets whose last decoder step is a U-Net block followed by a 1x1 head."""
    from ..models.transunet2d import TransUNet2D
    from ..models.transunet3d import TransUNet3D

    if isinstance(network, TransUNet3D):
        return network.decoder_kind == "cnn"
    return isinstance(network, TransUNet2D)


def tail_prefixes(network) -> tuple[str, ...]:
    """State-dict prefixes of the tail's parameters (the output head)."""
    return ("head.",)


def trunk(network, x: "torch.Tensor") -> "torch.Tensor":
    """The head's input: full-resolution decoder features ``(B, F, *spatial)`` for ``(B, C, *spatial)``.

    Mirrors the network's own forward up to that block (TransUNet2D has a stem, TransUNet3D not).
    """
    from ..models.transunet2d import TransUNet2D

    if isinstance(network, TransUNet2D):
        skips = [network.stem(x)]
        for stage in network.encoder:
            skips.append(stage(skips[-1]))
    else:
        skips, h = [], x
        for stage in network.encoder:
            h = stage(h)
            skips.append(h)
    h = network.vit(skips.pop())
    for up, skip in zip(network.decoder, reversed(skips)):
        h = up(h, skip)
    return h


def head_weights(network) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The output head as a matrix ``(n_classes, F)`` and a bias ``(n_classes,)`` (a 1x1 convolution)."""
    conv = network.head.conv.conv if hasattr(network.head.conv, "conv") else network.head.conv
    return conv.weight.reshape(conv.weight.shape[0], -1), conv.bias


def tail(network, features: "torch.Tensor") -> "torch.Tensor":
    """Logits ``(B, n_classes, *spatial)`` from the trunk's features: equal to ``network(x)``."""
    return network.head(features)


def tail_parameters(network) -> list:
    """The parameters a tail fine-tune trains; every other parameter is frozen by the caller."""
    return list(network.head.parameters())
