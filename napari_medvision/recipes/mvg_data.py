"""Training pairs for the MVG generalist: every task as (prompt pair, query pair) tiles in unit space.

Four task families, each drawn from a bank of 2D slices in the model's unit space
(``engine.synthesis.unit_scale``):
- MR contrast synthesis (all six orderings of T1, T2, PD): simulated from the MNI152 tissue maps
  (``synthetic.brain_mr``: spin-echo signal equations, bias field, Rician noise, random field
  strength), paired voxel for voxel; the data folder has no real paired contrasts;
- CT denoising: CT phantoms and the real TotalSegmentator CT (slices 0-19) with projection-domain
  low-dose noise (``tasks.synthesis_tasks.low_dose_ct``);
- inpainting: any bank slice with random holes;
- segmentation as generation: CT organs (phantoms + the real CT's slices 0-16), DRIVE vessels
  (images 21-35) and OCT layers (real B-scan 0001 + simulated B-scans), labels as grey levels.
A sample's prompt and query come from the same task and, where the bank has several volumes,
from different ones. Where target and image differ in kind (contrast synthesis, segmentation)
both are cropped at the same relative place, as inference pairs tiles; where they share units
(denoising, inpainting) the prompt crop is taken anywhere, so the model learns the operation
instead of copying tissue from the prompt tile (aligned crops teach it to paint abdominal tissue
into the air of a CT phantom, far worse than the noisy input).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.synthesis import unit_scale
from ..synthetic import brain_mr, ct_abdomen
from ..tasks.synthesis_tasks import inpainting_holes, low_dose_ct



@dataclass
class Family:
    """One task family: ``variants[name] = list of (image slices, target slices)`` per source volume."""

    name: str
    weight: float
    aligned: bool = True  # prompt tile at the query's relative place (False: anywhere)
    variants: dict[str, list[tuple[list[np.ndarray], list[np.ndarray]]]] = field(default_factory=dict)

    def add(self, variant: str, images: list[np.ndarray], targets: list[np.ndarray]) -> None:
        self.variants.setdefault(variant, []).append((images, targets))



def save_families(families: list[Family], path: Path) -> None:
    """Write a training bank as one ``.npz`` (arrays plus a JSON index); no pickle, so a bank file
    from elsewhere can never run code when loaded."""
    arrays: dict[str, np.ndarray] = {}
    index = []
    for family in families:
        variants = {}
        for name, sources in family.variants.items():
            entries = []
            for images, targets in sources:
                keys = []
                for kind, slices in (("i", images), ("t", targets)):
                    names = []
                    for array in slices:
                        key = f"a{len(arrays)}"
                        arrays[key] = np.asarray(array)
                        names.append(key)
                    keys.append(names)
                entries.append(keys)
            variants[name] = entries
        index.append({"name": family.name, "weight": family.weight, "aligned": family.aligned, "variants": variants})
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    tmp = Path(path).with_name(Path(path).name + ".partial.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_families(path: Path) -> list[Family]:
    """The training bank written by :func:`save_families` (read with ``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as bank:
        index = json.loads(bank["index"].tobytes().decode())
        families = []
        for entry in index:
            family = Family(entry["name"], float(entry["weight"]), bool(entry["aligned"]))
            for name, sources in entry["variants"].items():
                for image_keys, target_keys in sources:
                    family.add(name, [bank[k] for k in image_keys], [bank[k] for k in target_keys])
            families.append(family)
    return families

def _slices(volume: np.ndarray, keep: float = 0.7) -> list[np.ndarray]:
    """The middle ``keep`` share of a (z, y, x) array's slices (the ends are mostly empty)."""
    n = len(volume)
    lo, hi = int(n * (1 - keep) / 2), max(int(n * (1 + keep) / 2), int(n * (1 - keep) / 2) + 1)
    return [np.ascontiguousarray(s, dtype=np.float32) for s in volume[lo:hi]]


def mr_family(seeds, template, log=print) -> Family:
    family = Family("mr synthesis", 0.3)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        images, _ = brain_mr(seed=seed, shape=(80, 112, 96), spacing=(1.8, 1.6, 1.6), template=template,
                             field_strength=float(rng.choice([1.5, 3.0])), noise=float(rng.uniform(0.005, 0.03)),
                             bias=float(rng.uniform(0.0, 0.25)))
        units = {c: _slices(unit_scale(np.asarray(v.data), "MR").to_unit(np.asarray(v.data))) for c, v in images.items()}
        for source in units:
            for target in units:
                if source != target:
                    family.add(f"{source}->{target}", units[source], units[target])
        log(f"mr subject {seed} ready")
    return family


def ct_volumes(phantom_seeds, real_ct=None):
    """(clean HU volumes, label volumes, in-plane spacing) of CT phantoms and the real CT's training slab."""
    volumes = []
    for seed in phantom_seeds:
        image, labels = ct_abdomen(seed=seed, shape=(20, 128, 144), spacing=(6.0, 2.2, 2.2),
                                   contrast="venous" if seed % 2 else None, noise_hu=0.0)
        volumes.append((np.asarray(image.data, np.float32), np.asarray(labels.data), image.spacing[-1]))
    if real_ct is not None:
        image, labels = real_ct
        volumes.append((np.asarray(image.data, np.float32), labels, image.spacing[-1]))
    return volumes


def ct_families(volumes, rng, log=print) -> tuple[Family, Family]:
    denoise, organs = Family("ct denoising", 0.2, aligned=False), Family("segmentation", 0.35)
    window = unit_scale(np.zeros(1), "CT")
    for hu, labels, spacing in volumes:
        clean = _slices(hu, keep=0.9)
        noisy = [low_dose_ct(s, spacing, float(rng.uniform(1e4, 6e4)), rng) for s in clean]
        denoise.add("ct", [window.to_unit(s) for s in noisy], [window.to_unit(s) for s in clean])
        # grey levels from the volume's own label ids, exactly as inference scales an example target
        levels = unit_scale(labels, is_labels=True)
        organs.add("ct organs", [window.to_unit(s) for s in clean],
                   [levels.to_unit(s) for s in _slices(labels, keep=0.9)])
        log(f"ct volume {hu.shape} ready")
    return denoise, organs


def add_fundus(family: Family, images, vessels) -> None:
    """DRIVE photos (3, H, W in [0, 1]) as green-channel unit images with binary vessel targets."""
    for photo, vessel in zip(images, vessels):
        green = photo[1]
        family.add("fundus vessels", [unit_scale(green).to_unit(green)], [vessel.astype(np.float32)])


def add_oct(family: Family, images, labels, downsample: int = 2) -> None:
    """OCT B-scans (1, H, W normalised) with layer ids, at half resolution (the layers' context fits a tile)."""
    for image, label in zip(images, labels):
        img = image[0][::downsample, ::downsample]
        lab = label[::downsample, ::downsample]
        family.add("oct layers", [unit_scale(img).to_unit(img)], [unit_scale(lab, is_labels=True).to_unit(lab)])


class PairSampler:
    """Random training canvases: (prompt image, prompt target, query image, query target) tiles."""

    def __init__(self, families: list[Family], tile: int, seed: int = 0, inpaint_weight: float = 0.15):
        self.families = [f for f in families if f.variants]
        self.tile = tile
        self.rng = np.random.default_rng(seed)
        self.inpaint_weight = inpaint_weight
        self._holes = inpainting_holes
        weights = np.array([f.weight for f in self.families])
        self.weights = weights / weights.sum()

    def _pick(self, family: Family, aligned: bool):
        variant = list(family.variants)[self.rng.integers(len(family.variants))]
        sources = family.variants[variant]
        a = sources[self.rng.integers(len(sources))]
        b = sources[self.rng.integers(len(sources))] if len(sources) > 1 and self.rng.random() < 0.8 else a
        i = self.rng.integers(len(b[0]))
        if aligned:  # the prompt slice sits at about the same relative height in its volume, as at inference
            rel = i / max(len(b[0]) - 1, 1)
            j = int(np.clip(round(rel * (len(a[0]) - 1) + self.rng.integers(-2, 3)), 0, len(a[0]) - 1))
        else:
            j = self.rng.integers(len(a[0]))
        return (a[0][j], a[1][j]), (b[0][i], b[1][i])

    def _crop(self, arrays, rel):
        t = self.tile
        out = []
        for image in arrays:
            pad = [(0, max(0, t - s)) for s in image.shape]
            image = np.pad(image, pad, mode="edge") if any(p[1] for p in pad) else image
            y = int(round(rel[0] * (image.shape[0] - t)))
            x = int(round(rel[1] * (image.shape[1] - t)))
            out.append(image[y:y + t, x:x + t])
        return out

    def sample(self):
        if self.rng.random() < self.inpaint_weight:
            family = self.families[self.rng.integers(len(self.families))]
            (pi, _), (qi, _) = self._pick(family, aligned=False)
            (pi,), (qi,) = self._crop([pi], self.rng.random(2)), self._crop([qi], self.rng.random(2))
            tiles = []
            for image in (pi, qi):
                holed = image.copy()
                holed[self._holes(image.shape, self.rng)] = 0.0
                tiles += [holed, image]
        else:
            family = self.families[self.rng.choice(len(self.families), p=self.weights)]
            (pi, pt), (qi, qt) = self._pick(family, family.aligned)
            rel = self.rng.random(2)
            query_rel = np.clip(rel + self.rng.normal(0, 0.05, 2), 0, 1) if family.aligned else self.rng.random(2)
            tiles = self._crop([pi, pt], rel) + self._crop([qi, qt], query_rel)
        if self.rng.random() < 0.5:
            tiles = [t[:, ::-1] for t in tiles]
        return [np.ascontiguousarray(t, dtype=np.float32) for t in tiles]

    def batch(self, size: int):
        import torch

        samples = [self.sample() for _ in range(size)]
        return [torch.from_numpy(np.stack([s[k] for s in samples])[:, None]) for k in range(4)]
