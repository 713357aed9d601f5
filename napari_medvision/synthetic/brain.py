"""Multi-contrast brain MR from one anatomy: T1-, T2- and PD-weighted spin-echo images.

The anatomy is a set of tissue fractions per voxel (partial volume), either procedural (skull,
cortex folded by smooth noise, ventricles, deep grey matter, cerebellum) or taken from the
MNI152 grey/white-matter probability maps when ``template=`` names their folder. Each contrast
is then simulated with the spin-echo signal equation, a smooth receive-coil bias field and
Rician noise, so that all contrasts agree voxel for voxel, as a paired acquisition would.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..io.errors import ReadError
from ..volume import Volume
from .shapes import centred_grid, centred_origin, displacement_field, ellipsoid, make_rng, smooth_noise

LABELS = {1: "CSF", 2: "grey matter", 3: "white matter"}
TISSUES = ("air", "skin", "fat", "bone", "marrow", "muscle", "CSF", "grey matter", "white matter", "deep grey matter")

# (PD relative to water, T1 ms, T2 ms). GM / WM / muscle: Stanisz et al., MRM 54:507 (2005);
# CSF close to water; fat and marrow: typical subcutaneous-fat values; deep grey matter
# (thalamus, basal ganglia) between GM and WM; cortical bone gives almost no signal.
RELAXATION = {
    1.5: {
        "air": (0.0, 1.0, 1.0), "skin": (0.75, 800.0, 40.0), "fat": (0.9, 290.0, 165.0),
        "bone": (0.05, 300.0, 1.0), "marrow": (0.7, 290.0, 165.0), "muscle": (0.72, 1008.0, 44.0),
        "CSF": (1.0, 4000.0, 2000.0), "grey matter": (0.82, 1124.0, 95.0),
        "white matter": (0.70, 884.0, 72.0), "deep grey matter": (0.78, 1000.0, 80.0),
    },
    3.0: {
        "air": (0.0, 1.0, 1.0), "skin": (0.75, 1100.0, 35.0), "fat": (0.9, 380.0, 130.0),
        "bone": (0.05, 300.0, 1.0), "marrow": (0.7, 380.0, 130.0), "muscle": (0.72, 1412.0, 50.0),
        "CSF": (1.0, 4300.0, 2000.0), "grey matter": (0.82, 1820.0, 99.0),
        "white matter": (0.70, 1084.0, 69.0), "deep grey matter": (0.78, 1400.0, 80.0),
    },
}

# Spin-echo timing (TR, TE) in ms for each weighting.
SEQUENCES = {"T1": (500.0, 10.0), "T2": (4500.0, 100.0), "PD": (4500.0, 15.0)}


def brain_mr(
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 112, 96),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    contrasts: tuple[str, ...] = ("T1", "T2", "PD"),
    template: str | Path | None = None,
    field_strength: float = 3.0,
    noise: float = 0.02,
    bias: float = 0.15,
) -> tuple[dict[str, Volume], Volume]:
    """Images per contrast (float32, arbitrary scanner units) and the CSF/GM/WM label map (uint8).

    seed: anatomy, bias field and noise are a pure function of it.
    contrasts: any of ``"T1"``, ``"T2"``, ``"PD"`` (spin-echo timings in ``SEQUENCES``).
    template: folder holding the MNI152 ``*_gm_*`` and ``*_wm_*`` NIfTI maps; anatomy is then
        the template's, randomly deformed; ``None`` builds it procedurally.
    field_strength: 1.5 or 3.0 tesla (selects the relaxation times).
    noise: Rician noise level as a fraction of the white-matter signal.
    bias: peak-to-peak amplitude of the smooth multiplicative bias field (0.15 = +-7.5 %).
    labels.meta["fractions"] holds the partial-volume fraction of every tissue in ``TISSUES``.
    """
    unknown = [c for c in contrasts if c not in SEQUENCES]
    if unknown:
        raise ValueError(f"unknown MR contrast(s) {unknown}; choose from {list(SEQUENCES)}")
    if field_strength not in RELAXATION:
        raise ValueError(f"field_strength must be one of {list(RELAXATION)} tesla, not {field_strength}")
    rng = make_rng(seed)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)

    # Anatomy is built on a grid of at most 1.5 mm and averaged down, so that a thin cortex
    # survives as partial volume on coarse grids instead of vanishing.
    factors = tuple(max(1, int(np.ceil(s / 1.5 - 1e-6))) for s in spacing)
    fine_shape = tuple(n * f for n, f in zip(shape, factors))
    fine_spacing = tuple(s / f for s, f in zip(spacing, factors))
    coords, scale = _template_coords(rng, fine_shape, fine_spacing)
    if template is None:
        fractions = _procedural_fractions(rng, coords, fine_spacing, scale)
    else:
        fractions = _template_fractions(rng, coords, fine_spacing, scale, Path(template))
    if factors != (1, 1, 1):
        blocks = [v for n, f in zip(shape, factors) for v in (n, f)]
        fractions = {k: v.reshape(blocks).mean(axis=(1, 3, 5)) for k, v in fractions.items()}
    labels = _hard_labels(fractions)
    images = _simulate(rng, fractions, contrasts, RELAXATION[field_strength], shape, noise, bias)

    geometry = dict(spacing=spacing, origin=centred_origin(shape, spacing))
    meta = {"synthetic": "brain_mr", "seed": seed, "field_strength_T": field_strength,
            "anatomy": "procedural" if template is None else f"template {Path(template).name}"}
    out = {
        c: Volume(images[c], modality="MR",
                  meta={**meta, "contrast": c, "TR_ms": SEQUENCES[c][0], "TE_ms": SEQUENCES[c][1]},
                  **geometry)
        for c in contrasts
    }
    label_map = Volume(labels, modality="MR", labels=dict(LABELS),
                       meta={**meta, "fractions": fractions}, **geometry)
    return out, label_map


def _template_coords(rng, shape, spacing):
    """Head-frame mm coordinates (z, y, x full arrays: superior, posterior, left) and the head scale."""
    zw, yw, xw = centred_grid(shape, spacing)
    half = [(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    # An adult head is about 155 x 195 x 180 mm; shrink it only when the field of view is smaller.
    scale = min(half[2] / 79.0, half[1] / 99.0, half[0] / 92.0, 1.0) * rng.uniform(0.93, 1.0)
    stretch = rng.uniform(0.94, 1.06, size=3)
    t = np.deg2rad(rng.uniform(-5, 5, size=2))
    c0, s0, c1, s1 = (np.float32(f(a)) for a in t for f in (np.cos, np.sin))
    x = xw / np.float32(scale * stretch[2])
    y = yw / np.float32(scale * stretch[1])
    z = zw / np.float32(scale * stretch[0]) - np.float32(5.0)
    x, y = c0 * x + s0 * y, -s0 * x + c0 * y  # turn in the axial plane
    y, z = c1 * y + s1 * z, -s1 * y + c1 * z  # nod
    full = np.broadcast_shapes(x.shape, y.shape, z.shape)
    dz, dy, dx = displacement_field(rng, full, tuple(40.0 * scale / s for s in spacing), 3.0)
    return [z + dz, y + dy, x + dx], scale


def _procedural_fractions(rng, coords, spacing, scale):
    """Tissue fractions of a procedural head: scalp, skull, CSF spaces, folded cortex, deep nuclei."""
    z, y, x = coords
    full = z.shape
    mm = tuple(s / scale for s in spacing)  # voxel size in head-frame mm

    def vox(length):
        return tuple(length / m for m in mm)

    lob = smooth_noise(rng, full, vox(30.0)) * np.float32(0.03)
    head_rho = ellipsoid((x, y, z), (0, 4, -8), (76, 96, 92)) + lob
    head_r = np.sqrt(x ** 2 + (y - 4) ** 2 + (z + 8) ** 2) / np.maximum(head_rho, 1e-3)
    depth = (1 - head_rho) * head_r  # mm under the skin

    tissue = np.zeros(full, dtype=np.uint8)
    t = {n: i for i, n in enumerate(TISSUES)}
    scalp_t = 5.5 + 1.5 * rng.uniform()
    skull_t = 6.5 + 1.5 * rng.uniform()
    tissue[depth > 0] = t["skin"]
    tissue[depth > 1.5] = t["fat"]
    tissue[depth > scalp_t - 1.5] = t["muscle"]  # galea and temporal muscle
    tissue[depth > scalp_t] = t["bone"]
    tissue[(depth > scalp_t + 2) & (depth < scalp_t + skull_t - 2)] = t["marrow"]  # diploe
    inside = depth > scalp_t + skull_t
    tissue[inside] = t["CSF"]

    # Cerebrum: a lobulated ellipsoid plus temporal lobes; cerebellum and brainstem below.
    atrophy = rng.uniform(0.0, 1.0)
    cereb = ellipsoid((x, y, z), (0, 2, 6), (66, 84, 64)) + lob
    temporal = np.minimum(ellipsoid((x, y, z), (-44, -2, -22), (22, 36, 20)),
                          ellipsoid((x, y, z), (44, -2, -22), (22, 36, 20))) + lob
    cbl = np.minimum(ellipsoid((x, y, z), (-24, 52, -46), (30, 28, 20)),
                     ellipsoid((x, y, z), (24, 52, -46), (30, 28, 20))) + lob
    stem = np.sqrt(x ** 2 + ((y - 22) / 1.2) ** 2) / 11.0
    cerebrum = (np.minimum(cereb, temporal) < 1 - 0.02 * atrophy) & (cbl > 1.12) & inside
    cerebellum = (cbl < 1) & inside
    brainstem = (stem < 1) & (z < -10) & inside

    # Sulci: thin sheets where a smooth field crosses zero, reaching 10-20 mm into the cortex;
    # the interhemispheric and Sylvian fissures are sheets at fixed places.
    d_brain = ndi.distance_transform_edt(cerebrum, sampling=mm).astype(np.float32)
    gyri = smooth_noise(rng, full, vox(8.0))
    sulcal_depth = 17 + 5 * smooth_noise(rng, full, vox(40.0))
    sulci = (np.abs(gyri) < 0.15 + 0.06 * atrophy) & (d_brain < sulcal_depth)
    midline = 1.5 * smooth_noise(rng, full, vox(50.0))
    fissure = (np.abs(x - midline) < 1.2 + 0.6 * atrophy) & (d_brain < 26) & ~((z < 25) & (np.abs(y) < 35))
    sylvian = (np.abs(z + 8 - 0.3 * y) < 1.5) & (np.abs(x) > 32) & (y < 25) & (d_brain < 22)
    csf_in = sulci | fissure | sylvian
    brain = cerebrum & ~csf_in

    # Cortex: everything within ~2.5 mm of CSF; deeper tissue is white matter.
    to_csf = ndi.distance_transform_edt(brain, sampling=mm).astype(np.float32)
    thickness = 3.1 + 0.4 * smooth_noise(rng, full, vox(25.0))
    tissue[brain] = t["white matter"]
    tissue[brain & (to_csf < thickness)] = t["grey matter"]

    # Cerebellum: grey cortex finely folded round a white core; brainstem white.
    folia = np.abs(smooth_noise(rng, full, vox(4.0))) < 0.12
    tissue[cerebellum] = t["grey matter"]
    tissue[cerebellum & folia & (cbl > 0.55)] = t["CSF"]
    tissue[cerebellum & (cbl < 0.45 + 0.1 * smooth_noise(rng, full, vox(6.0)))] = t["white matter"]
    tissue[brainstem] = t["white matter"]

    # Deep grey nuclei (caudate, putamen, thalamus) and the ventricles, larger with atrophy.
    for side in (-1, 1):
        for centre, radii in (((15, -10, 12), (6, 11, 9)), ((25, -2, -2), (6, 14, 10)), ((10, 14, -2), (9, 13, 9))):
            nucleus = ellipsoid((x, y, z), (side * centre[0], centre[1], centre[2]), radii) + lob < 1
            tissue[nucleus & cerebrum] = t["deep grey matter"]
    v = 1.0 + 0.6 * atrophy
    vent = np.minimum.reduce([
        ellipsoid((x, y, z), (-9, 2, 14), (5 * v, 28, 7 * v), [(-8, (0, 1))]),
        ellipsoid((x, y, z), (9, 2, 14), (5 * v, 28, 7 * v), [(8, (0, 1))]),
        ellipsoid((x, y, z), (-16, 30, 4), (6 * v, 12, 9 * v)),
        ellipsoid((x, y, z), (16, 30, 4), (6 * v, 12, 9 * v)),
        ellipsoid((x, y, z), (-28, 8, -18), (3 * v, 14, 4 * v)),
        ellipsoid((x, y, z), (28, 8, -18), (3 * v, 14, 4 * v)),
        ellipsoid((x, y, z), (0, 10, -6), (1.5 * v, 13, 9)),
    ]) + lob
    tissue[(vent < 1) & cerebrum] = t["CSF"]

    # CSF fills only a few mm round the brain; lower down the skull base and neck take over.
    any_brain = cerebrum | cerebellum | brainstem
    off_brain = ndi.distance_transform_edt(~any_brain, sampling=mm).astype(np.float32)
    base = inside & ~any_brain & (off_brain > 3.0 + 2.0 * atrophy)
    tissue[base] = t["bone"]
    tissue[base & (z < -30)] = t["muscle"]

    # Partial volume: each voxel averages the tissues of its neighbourhood (scanner PSF).
    fractions = {}
    for name, i in t.items():
        frac = ndi.gaussian_filter((tissue == i).astype(np.float32), 0.55)
        fractions[name] = frac
    return fractions


def _template_fractions(rng, coords, spacing, scale, folder: Path):
    """Tissue fractions from the MNI152 GM/WM probability maps, resampled on the deformed grid."""
    found = {}
    for kind in ("gm", "wm"):
        hits = sorted(folder.glob(f"*_{kind}_*.nii*")) if folder.is_dir() else []
        if not hits:
            raise ReadError(folder, f"holds no MNI152 {kind.upper()} probability map (*_{kind}_*.nii.gz)")
        found[kind] = nib.load(str(hits[0]))
    z, y, x = coords
    # Head frame (x left, y posterior, z superior, centred on the brain) to MNI RAS mm.
    ras = np.stack(np.broadcast_arrays(-x, -y - 18.0, z + 12.0, np.ones_like(x)), axis=0).reshape(4, -1)
    fr = {}
    for kind, img in found.items():
        ijk = np.linalg.inv(img.affine) @ ras
        data = np.asarray(img.dataobj, dtype=np.float32)
        data /= max(float(data.max()), 1e-6)
        fr[kind] = ndi.map_coordinates(data, ijk[:3], order=1, mode="constant", cval=0.0).reshape(x.shape)
    gm, wm = fr["gm"], fr["wm"]
    mm = tuple(s / scale for s in spacing)
    brain = ndi.binary_fill_holes((gm + wm) > 0.25)
    outside = ndi.distance_transform_edt(~brain, sampling=mm).astype(np.float32)
    icv = np.clip(1.0 - (outside - 2.0) / 1.5, 0, 1)  # CSF rim ~2-3 mm around the brain
    csf = np.clip(icv - gm - wm, 0, 1)
    skull_t = 6.5 + 1.5 * rng.uniform()
    shell = outside - 3.0
    frac = {name: np.zeros_like(gm) for name in TISSUES}
    frac["CSF"], frac["grey matter"], frac["white matter"] = csf, gm, wm
    frac["bone"] = ((shell > 0) & (shell <= skull_t)).astype(np.float32)
    frac["marrow"] = ((shell > 2) & (shell <= skull_t - 2)).astype(np.float32)
    frac["bone"] -= frac["marrow"]
    frac["muscle"] = ((shell > skull_t) & (shell <= skull_t + 1.5)).astype(np.float32)
    frac["fat"] = ((shell > skull_t + 1.5) & (shell <= skull_t + 4.5)).astype(np.float32)
    frac["skin"] = ((shell > skull_t + 4.5) & (shell <= skull_t + 6.0)).astype(np.float32)
    for name in ("bone", "marrow", "muscle", "fat", "skin"):
        frac[name] = ndi.gaussian_filter(frac[name] * (1 - icv), 0.55)
    frac["air"] = np.clip(1 - sum(frac[n] for n in TISSUES if n != "air"), 0, 1)
    return frac


def _hard_labels(fractions):
    """CSF / GM / WM label where that tissue is the largest share of the voxel (deep GM counts as GM)."""
    stack = np.stack([fractions[n] for n in TISSUES])
    winner = np.argmax(stack, axis=0)
    labels = np.zeros(winner.shape, dtype=np.uint8)
    for label, names in ((1, ("CSF",)), (2, ("grey matter", "deep grey matter")), (3, ("white matter",))):
        for n in names:
            labels[winner == TISSUES.index(n)] = label
    return labels


def _simulate(rng, fractions, contrasts, relaxation, shape, noise, bias):
    """Spin-echo images: sum over tissues of fraction x PD (1 - exp(-TR/T1)) exp(-TE/T2), biased and noisy."""
    full = fractions["CSF"].shape
    texture = smooth_noise(rng, full, 3.0) * np.float32(0.03)  # local T1/T2 variation of brain tissue
    bias_base = smooth_noise(rng, full, max(full) * 0.8)
    images = {}
    for contrast in contrasts:
        tr, te = SEQUENCES[contrast]
        signal = np.zeros(full, dtype=np.float32)
        for name in TISSUES:
            pd, t1, t2 = relaxation[name]
            if pd == 0:
                continue
            if name in ("grey matter", "white matter", "deep grey matter"):
                t1 = t1 * (1 + texture)
                t2 = t2 * (1 + texture)
            signal += fractions[name] * np.float32(pd) * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)
        wm_pd, wm_t1, wm_t2 = relaxation["white matter"]
        reference = wm_pd * (1 - np.exp(-tr / wm_t1)) * np.exp(-te / wm_t2)
        field = np.exp(np.float32(bias / 2) * (bias_base + 0.2 * smooth_noise(rng, full, max(full) * 0.8)))
        signal *= field
        sigma = np.float32(noise * reference)
        real = signal + sigma * rng.standard_normal(full, dtype=np.float32)
        imag = sigma * rng.standard_normal(full, dtype=np.float32)
        magnitude = np.sqrt(real ** 2 + imag ** 2)  # Rician: the magnitude of complex Gaussian noise
        images[contrast] = (magnitude * np.float32(1000.0)).astype(np.float32)
    return images


TISSUE_ORDERS = {"T1": ("CSF", "grey matter", "white matter"), "T2": ("white matter", "grey matter", "CSF")}


def random_contrast(fractions: dict[str, np.ndarray], seed: int | np.random.Generator = 0,
                    min_tissue_gap: float = 0.1, order: str | None = None) -> np.ndarray:
    """An MR-like image of any contrast from tissue fractions: every tissue gets a random mean.

    Domain randomisation after SynthSeg (Billot et al., Med. Image Anal. 2023): a network trained
    on these learns tissue *shapes and boundaries*, not where one scanner's tissues sit in the
    intensity range, so it transfers to contrasts the signal equations here do not model (a
    gradient-echo T1 or an averaged template with white matter brightest). MONAI has the
    augmentations but no label-to-image generator, hence this function.

    fractions: partial-volume fraction per tissue name in ``TISSUES`` (``labels.meta["fractions"]``
        of ``brain_mr``), all of one shape.
    min_tissue_gap: CSF, grey and white matter means differ by at least this much (of a 0-1
        range), so the three labels are always visible.
    order: ``None`` for any order of the brain tissues, or ``"T1"`` (CSF < GM < WM, as in T1-weighted
        scans and templates) / ``"T2"`` (WM < GM < CSF, also PD) to keep that order while their
        levels, gaps and every other tissue (fat, muscle, bone, skin) stay random.
    Returns float32 in roughly 0-1: random means, per-tissue texture, blur (a random
    resolution), a smooth bias field, Gaussian noise and a random gamma.
    """
    rng = make_rng(seed)
    shape = fractions["CSF"].shape
    while True:
        means = {name: float(rng.uniform(0.0, 1.0)) for name in TISSUES}
        if order is not None:
            levels = sorted(means[n] for n in TISSUE_ORDERS[order])
            means.update(zip(TISSUE_ORDERS[order], levels))
        brain = [means[n] for n in ("CSF", "grey matter", "white matter")]
        if min(abs(a - b) for i, a in enumerate(brain) for b in brain[i + 1:]) >= min_tissue_gap:
            break
    means["air"] = float(rng.uniform(0.0, 0.1))
    # Deep grey matter lies between cortical grey and white matter in every MR contrast.
    means["deep grey matter"] = means["white matter"] + float(rng.uniform(0.3, 0.7)) * (
        means["grey matter"] - means["white matter"])
    image = np.zeros(shape, dtype=np.float32)
    for name in TISSUES:
        texture = np.float32(rng.uniform(0.0, 0.04)) * smooth_noise(rng, shape, 2.0)
        image += fractions[name] * (np.float32(means[name]) + texture)
    sigma = rng.uniform(0.0, 1.2, size=3)  # voxels: thicker slices or a softer scanner
    image = ndi.gaussian_filter(image, sigma)
    image *= np.exp(np.float32(rng.uniform(0.0, 0.3)) * smooth_noise(rng, shape, max(shape) * 0.8))
    image += np.float32(rng.uniform(0.0, 0.04)) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(image, 0, None)
    image /= max(float(np.percentile(image, 99.9)), 1e-6)
    return (np.clip(image, 0, 1.5) ** np.float32(np.exp(rng.normal(0.0, 0.25)))).astype(np.float32)
