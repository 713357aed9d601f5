"""File > Open Sample: synthetic CT, MR, OCT and fundus images, each with its label map.

All come from :func:`napari_medvision.synthetic.sample` (generated, no download, no patient data),
so every layer name says "(synthetic)".
"""

from __future__ import annotations

from ..synthetic import sample
from .layers import LayerDataTuple, volume_to_layer

TITLES = {"ct": "CT abdomen", "mr": "MR brain", "oct": "OCT macula", "fundus": "Fundus photo"}
MR_FIRST = "T1"  # shown visible; the other contrasts are added hidden, one layer each


def sample_layers(name: str, seed: int = 0) -> list[LayerDataTuple]:
    """Layers of synthetic sample ``name``: the image (every MR contrast), then its labels."""
    image, labels = sample(name, seed=seed)
    title = TITLES.get(name, name)
    layers: list[LayerDataTuple] = []
    if isinstance(image, dict):
        first = MR_FIRST if MR_FIRST in image else next(iter(image))
        for contrast in [first] + [c for c in image if c != first]:
            layers.append(
                volume_to_layer(image[contrast], name=f"{title} {contrast} (synthetic)", visible=contrast == first)
            )
    else:
        layers.append(volume_to_layer(image, name=f"{title} (synthetic)"))
    if labels is not None:
        layers.append(volume_to_layer(labels, name=f"{title} labels (synthetic)", opacity=0.5))
    return layers


def ct_sample() -> list[LayerDataTuple]:
    """Synthetic abdominal CT in HU with organ labels."""
    return sample_layers("ct")


def mr_sample() -> list[LayerDataTuple]:
    """Synthetic brain MR (T1 shown, other contrasts hidden) with tissue labels."""
    return sample_layers("mr")


def oct_sample() -> list[LayerDataTuple]:
    """Synthetic macular OCT volume with retinal layer labels."""
    return sample_layers("oct")


def fundus_sample() -> list[LayerDataTuple]:
    """Synthetic colour fundus photo with a vessel mask."""
    return sample_layers("fundus")
