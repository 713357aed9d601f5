"""Training patches: random crops biased toward foreground (or toward user corrections), augmented.

Images are ``(C, *spatial)`` float32 arrays already normalised the way the model card says;
labels are ``(*spatial)`` integer maps. ``weights`` (same shape as a label map, optional) make
some voxels more likely patch centres: fine-tuning uses it to favour corrected slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PatchSampler:
    """Draws ``(images, labels)`` batches of fixed-size patches.

    images: list of ``(C, *spatial)`` float32 arrays (2D or 3D).
    labels: list of integer label maps with the images' spatial shapes.
    patch_size: patch shape (spatial), padded with the image minimum where the image is smaller.
    foreground_fraction: share of patches centred on a labelled voxel (classes drawn uniformly).
    weights: optional per-image voxel weights for choosing centres (e.g. corrected slices).
    shares: optional relative chance of drawing each image (default: its voxel count), so one
      small real scan can count as much as dozens of larger synthetic ones.
    augment: random flips, 90-degree in-plane rotations (square patches), intensity scale/shift,
      gamma and noise.
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    patch_size: tuple[int, ...]
    foreground_fraction: float = 0.6
    weights: list[np.ndarray] | None = None
    shares: list[float] | None = None
    augment: bool = True
    flip_axes: tuple[int, ...] | None = None
    _class_index: list[dict[int, np.ndarray]] = field(default_factory=list, init=False, repr=False)
    _transforms: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.images or len(self.images) != len(self.labels):
            raise ValueError("PatchSampler needs as many label maps as images, and at least one of each")
        for image, label in zip(self.images, self.labels):
            if image.shape[1:] != label.shape:
                raise ValueError(f"image spatial shape {image.shape[1:]} differs from label shape {label.shape}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        for label in self.labels:
            flat = label.ravel()
            index = {}
            for value in np.unique(flat):
                if value > 0:
                    where = np.flatnonzero(flat == value)
                    # Keep a bounded sample of candidate centres per class: memory stays small on big scans.
                    index[int(value)] = where if where.size <= 200_000 else where[:: where.size // 200_000 + 1]
            self._class_index.append(index)
        if self.shares is not None and (len(self.shares) != len(self.images) or min(self.shares) < 0
                                        or sum(self.shares) <= 0):
            raise ValueError("PatchSampler shares need one non-negative number per image, not all zero")

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch: images ``(B, C, *patch)`` float32 and labels ``(B, 1, *patch)`` int64."""
        xs, ys = [], []
        for _ in range(batch_size):
            i = self._pick_image(rng)
            centre = self._pick_centre(rng, i)
            x, y = self._crop(self.images[i], self.labels[i], centre)
            if self.augment:
                x, y = self._augment(rng, x, y)
            xs.append(x)
            ys.append(y[None])
        return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)

    def _pick_image(self, rng: np.random.Generator) -> int:
        if self.shares is None:
            sizes = np.array([lab.size for lab in self.labels], dtype=float)
        else:
            sizes = np.asarray(self.shares, dtype=float)
        return int(rng.choice(len(self.images), p=sizes / sizes.sum()))

    def _pick_centre(self, rng: np.random.Generator, i: int) -> tuple[int, ...]:
        shape = self.labels[i].shape
        if self.weights is not None and self.weights[i] is not None and rng.random() < 0.5:
            w = self.weights[i].ravel().astype(np.float64)
            if w.sum() > 0:
                return np.unravel_index(int(rng.choice(w.size, p=w / w.sum())), shape)
        classes = self._class_index[i]
        if classes and rng.random() < self.foreground_fraction:
            cls = list(classes)[int(rng.integers(len(classes)))]
            return np.unravel_index(int(rng.choice(classes[cls])), shape)
        return tuple(int(rng.integers(s)) for s in shape)

    def _crop(self, image: np.ndarray, label: np.ndarray, centre) -> tuple[np.ndarray, np.ndarray]:
        starts = [int(c) - p // 2 for c, p in zip(centre, self.patch_size)]
        starts = [min(max(s, 0), max(dim - p, 0)) for s, dim, p in zip(starts, label.shape, self.patch_size)]
        window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        x = image[(slice(None), *window)]
        y = label[window]
        pad = [(0, p - s) for s, p in zip(y.shape, self.patch_size)]
        if any(after for _, after in pad):
            x = np.pad(x, [(0, 0)] + pad, constant_values=float(image.min()))
            y = np.pad(y, pad)
        return x, y

    def _augment(self, rng: np.random.Generator, x: np.ndarray, y: np.ndarray):
        if self._transforms is None:
            self._transforms = augmentations(len(self.patch_size), self.flip_axes,
                                             square=self.patch_size[-1] == self.patch_size[-2])
            self._transforms.set_random_state(seed=int(rng.integers(2**31)))
        out = self._transforms({"image": np.ascontiguousarray(x), "label": np.ascontiguousarray(y[None])})
        return np.asarray(out["image"], dtype=np.float32), np.asarray(out["label"])[0]


def augmentations(spatial_dims: int, flip_axes: tuple[int, ...] | None = None, square: bool = True):
    """MONAI dictionary transforms: flips, in-plane 90-degree turns, intensity scale/shift, gamma, noise."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandFlipd, RandGaussianNoised,
                                  RandRotate90d, RandScaleIntensityd, RandShiftIntensityd)

    axes = tuple(range(spatial_dims)) if flip_axes is None else flip_axes
    keys = ("image", "label")
    steps = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in axes]
    if square and len(axes) >= 2:
        steps.append(RandRotate90d(keys, prob=0.5, spatial_axes=(spatial_dims - 2, spatial_dims - 1)))
    steps += [
        RandScaleIntensityd("image", factors=0.15, prob=0.8),
        RandShiftIntensityd("image", offsets=0.15, prob=0.8),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised("image", std=0.05, prob=0.3),
    ]
    return Compose(steps)
