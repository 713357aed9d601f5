"""Macular OCT volume: layered retina with a foveal pit, speckle and vessel shadows, optionally drusen.

Boundaries are smooth surfaces over (B-scan, column) in micrometres; reflectivity is set per
layer in linear units, multiplied by speckle and log-compressed to uint8 as scanners display it.
Boundary names follow ``oct_bscans_layers`` (Chiu et al. graph search): ilm, nflgcl, iplinl,
inlopl, oplonl, isos, rpe; ``choroid_sclera`` closes the choroid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..volume import Volume
from .shapes import make_rng, smooth_noise

BOUNDARIES = ("ilm", "nflgcl", "iplinl", "inlopl", "oplonl", "isos", "rpe", "choroid_sclera")
LABELS = {1: "RNFL", 2: "GCL+IPL", 3: "INL", 4: "OPL", 5: "ONL+IS", 6: "OS+RPE", 7: "choroid"}

# Layer thickness (um) away from the fovea, and how much of it survives at the foveal centre.
_LAYERS = (  # (label, parafoveal thickness, fraction left at the fovea)
    ("RNFL", 28.0, 0.0), ("GCL+IPL", 75.0, 0.0), ("INL", 35.0, 0.05), ("OPL", 28.0, 0.15),
    ("ONL+IS", 80.0, 1.35), ("OS+RPE", 48.0, 1.1), ("choroid", 230.0, 1.0),
)
# Mean linear reflectivity per region (vitreous, layers..., sclera), tuned so that after log
# compression the layer means match the real B-scans' order: RPE/EZ > RNFL ~ OPL > GCL/IPL > INL ~ ONL.
_REFLECTIVITY = {"vitreous": 0.0, "RNFL": 1.9, "GCL+IPL": 1.2, "INL": 0.5, "OPL": 1.6,
                 "ONL+IS": 0.38, "OS+RPE": 5.0, "choroid": 5.0, "sclera": 1.2}


def oct_volume(
    seed: int = 0,
    shape: tuple[int, int, int] = (16, 256, 256),
    spacing: tuple[float, float, float] = (0.12, 0.0039, 0.0117),
    looks: float = 3.0,
    n_vessels: int | None = None,
    drusen: int = 0,
) -> tuple[Volume, Volume]:
    """An OCT cube (uint8, B-scans x depth x width) and its layer label map with boundaries.

    spacing: mm between B-scans, per depth row and per column (Spectralis-like defaults).
    looks: speckle averaging (frames averaged per B-scan); lower is grainier.
    drusen: how many drusen / drusenoid pigment-epithelium detachments (age-related macular
      degeneration) lift the RPE off Bruch's membrane. As in the graph-search references, the
      space beneath the lifted RPE counts as OS+RPE and the "rpe" boundary stays on Bruch's
      membrane. Their random draws come after all others: ``drusen=0`` gives the same cube.
    labels.meta["boundaries"]: ``{name: float32 array (n_bscans, width)}`` of row positions.
    """
    rng = make_rng(seed)
    n_b, n_rows, n_cols = (int(n) for n in shape)
    dz, dy, dx = (float(s) for s in spacing)
    um_per_row = dy * 1000.0

    # Lateral positions in mm, with the fovea near the centre of the cube.
    bz = (np.arange(n_b) - (n_b - 1) / 2) * dz
    cx = (np.arange(n_cols) - (n_cols - 1) / 2) * dx
    fz, fx = rng.normal(0, 0.08 * max(n_b * dz, 0.1)), rng.normal(0, 0.08 * n_cols * dx)
    r2 = (bz[:, None] - fz) ** 2 + (cx[None, :] - fx) ** 2
    pit_width = rng.uniform(0.30, 0.42)  # mm, 1/e radius of the foveal pit
    pit = np.exp(-r2 / (2 * pit_width ** 2)).astype(np.float32)
    plane = (n_b, n_cols)

    def lateral_noise(corr_mm):
        corr = (max(corr_mm / dz, 1.0), max(corr_mm / dx, 1.0))
        return smooth_noise(rng, plane, corr)

    # Bruch's membrane (bottom of the RPE): curved (eye wall), tilted, gently wavy.
    top_margin = rng.uniform(0.3, 0.4)
    rpe_um = (top_margin * n_rows + 0.6 * sum(t for _, t, _ in _LAYERS[:-1]) / um_per_row) * um_per_row
    curvature = rng.uniform(-0.04, 0.08)  # mm of sag per mm^2
    tilt = rng.normal(0, 0.03, size=2)
    bm = (rpe_um + 1000 * (curvature * ((bz[:, None]) ** 2 + cx[None, :] ** 2) + tilt[0] * bz[:, None]
                           + tilt[1] * cx[None, :]) + 4.0 * lateral_noise(0.6))
    # Thicknesses per layer, thinned or thickened at the fovea; stacked upward from Bruch's membrane.
    thick = {}
    for name, t, fovea in _LAYERS:
        scale = 1 + 0.08 * lateral_noise(0.8)
        thick[name] = np.maximum(t * scale * (1 - (1 - fovea) * pit), 0.0)
    # Nerve fibre layer thickens towards the nasal side (toward the optic disc).
    nasal = rng.choice([-1.0, 1.0])
    thick["RNFL"] = thick["RNFL"] * (1 + 0.5 * np.clip(nasal * (cx[None, :] - fx), 0, 2)) * (1 - pit)
    lift = _drusen_lift(np.random.default_rng([int(seed), 7]), bz, cx, drusen) if drusen else None
    if lift is not None:
        thick["OS+RPE"] = thick["OS+RPE"] + lift  # everything above rides on the lifted RPE

    surfaces = {"rpe": bm}
    above = bm
    for boundary, layer in (("isos", "OS+RPE"), ("oplonl", "ONL+IS"), ("inlopl", "OPL"),
                            ("iplinl", "INL"), ("nflgcl", "GCL+IPL"), ("ilm", "RNFL")):
        above = above - thick[layer]
        surfaces[boundary] = above
    surfaces["choroid_sclera"] = bm + thick["choroid"]
    rows = {name: (surfaces[name] / um_per_row).astype(np.float32) for name in BOUNDARIES}

    # Region label per voxel from the boundaries (row centres between consecutive surfaces).
    row = np.arange(n_rows, dtype=np.float32)[None, :, None]
    labels = np.zeros(shape, dtype=np.uint8)
    for label, (upper, lower) in enumerate(zip(BOUNDARIES[:-1], BOUNDARIES[1:]), start=1):
        inside = (row >= rows[upper][:, None, :]) & (row < rows[lower][:, None, :])
        labels[inside] = label

    lifted = None if lift is None else (rows["rpe"] - lift / um_per_row, np.random.default_rng([int(seed), 8]))
    image = _render(rng, labels, rows, row, shape, spacing, looks, n_vessels, fx, nasal, lifted)
    geometry = dict(spacing=(dz, dy, dx), origin=(0.0, 0.0, 0.0))
    meta = {"synthetic": "oct_volume", "seed": seed, "fovea_mm": (float(fz), float(fx)), "drusen": int(drusen)}
    img = Volume(image, modality="OCT", meta=dict(meta), **geometry)
    lab = Volume(labels, modality="OCT", labels=dict(LABELS),
                 meta={**meta, "boundaries": rows, "boundary_order_top_to_bottom": list(BOUNDARIES)},
                 **geometry)
    return img, lab


def _drusen_lift(rng, bz, cx, count: int) -> np.ndarray:
    """RPE elevation (um) over (B-scan, column): dome-shaped drusen, 0.4-2 mm across, 30-200 um high,
    some merged into a larger detachment."""
    lift = np.zeros((len(bz), len(cx)), dtype=np.float32)
    for _ in range(int(count)):
        z0, x0 = rng.uniform(bz.min(), bz.max() + 1e-6), rng.uniform(cx.min(), cx.max())
        radius, height = rng.uniform(0.2, 1.0), rng.uniform(30.0, 200.0)
        r2 = ((bz[:, None] - z0) ** 2 + (cx[None, :] - x0) ** 2) / radius ** 2
        lift = np.maximum(lift, (height * np.clip(1 - r2, 0, None) ** 0.6).astype(np.float32))
    return lift


def _render(rng, labels, rows, row, shape, spacing, looks, n_vessels, fovea_x, nasal, lifted=None):
    """Log-compressed speckled reflectivity with bright bands, choroidal vessels and vessel shadows.

    lifted: ``(RPE row per (B-scan, column), generator)`` where drusen lift the RPE; the bright RPE line
    follows it, Bruch's membrane stays a faint line, and drusen material fills the space between.
    """
    n_b, n_rows, n_cols = shape
    names = ["vitreous", *LABELS.values()]
    table = np.array([_REFLECTIVITY[n] for n in names], dtype=np.float32)
    refl = table[labels]
    below = row >= rows["choroid_sclera"][:, None, :]
    refl[below] = _REFLECTIVITY["sclera"]

    # Thin bright lines: external limiting membrane, ellipsoid zone, interdigitation, RPE.
    def band(name, offset_rows, width_rows, gain):
        centre = rows[name][:, None, :] + offset_rows
        return gain * np.exp(-0.5 * ((row - centre) / width_rows) ** 2)

    um = spacing[1] * 1000
    refl += band("isos", -22 / um, 1.2, 2.0)            # ELM
    refl += band("isos", 3 / um, 6 / um, 18.0)          # ellipsoid zone
    if lifted is None:
        refl += band("rpe", -12 / um, 8 / um, 25.0)     # RPE / Bruch's complex
    else:
        rpe_row, drusen_rng = lifted
        beneath = (row > rpe_row[:, None, :]) & (row < rows["rpe"][:, None, :])
        material = 1.6 * np.clip(1 + 0.25 * smooth_noise(drusen_rng, shape, (1.0, 4.0, 4.0)), 0.2, None)
        refl = np.where(beneath, material, refl)
        refl += 25.0 * np.exp(-0.5 * ((row - (rpe_row[:, None, :] - 12 / um)) / (8 / um)) ** 2)  # lifted RPE
        refl += band("rpe", -2 / um, 3 / um, 4.0)       # Bruch's membrane beneath
    refl *= np.float32(1) + 0.15 * smooth_noise(rng, shape, (1.0, 3.0, 6.0))

    # Choroid: large dark vessel lumens in a bright stroma.
    choroid = labels == 7
    lumens = 1 / (1 + np.exp(-5 * (smooth_noise(rng, shape, (2.0, 14.0, 14.0)) - 0.3)))
    refl[choroid] *= 1 - 0.75 * lumens[choroid]

    # Retinal vessels in the inner retina shadow everything beneath them.
    n_vessels = int(rng.integers(3, 7)) if n_vessels is None else int(n_vessels)
    x = np.arange(n_cols)
    shadow = np.ones((n_b, n_cols), dtype=np.float32)
    vessel_rows = []
    for _ in range(n_vessels):
        x0 = rng.uniform(0, n_cols)
        drift = rng.normal(0, 0.5 * n_cols / max(n_b, 1))
        width = rng.uniform(40, 120) / 1000 / spacing[2]  # vessel diameter in columns
        for b in range(n_b):
            xc = x0 + drift * (b - n_b / 2)
            prof = np.exp(-0.5 * ((x - xc) / (width / 2.5)) ** 2)
            shadow[b] *= 1 - 0.75 * prof
            vessel_rows.append((b, xc, width))
    # Vessel walls and blood scatter strongly; the shadow covers everything below the vessel.
    rr = row[0, :, 0][:, None]
    for b, xc, width in vessel_rows:
        xi = int(np.clip(round(xc), 0, n_cols - 1))
        r0 = rows["nflgcl"][b, xi] + 0.4 * (rows["iplinl"][b, xi] - rows["nflgcl"][b, xi])
        half_rows = 0.5 * width * spacing[2] / spacing[1] * 0.8
        vessel = ((rr - r0) / half_rows) ** 2 + ((x[None, :] - xc) / (width / 2)) ** 2 < 1
        refl[b][vessel] = 3.0
    under = row > (rows["nflgcl"] + 0.6 * (rows["iplinl"] - rows["nflgcl"]))[:, None, :]
    refl = np.where(under, refl * shadow[:, None, :], refl)

    # Signal falls with depth (attenuation in tissue) and with defocus across the scan.
    depth_below_ilm = np.clip(row - rows["ilm"][:, None, :], 0, None) * spacing[1]
    refl *= np.exp(-1.2 * depth_below_ilm).astype(np.float32)

    # Fully developed speckle: intensity follows a gamma law with `looks` degrees of freedom.
    speckle = rng.gamma(looks, 1.0 / looks, size=shape).astype(np.float32)
    intensity = refl * speckle + np.float32(0.07) * rng.gamma(1.0, 1.0, size=shape).astype(np.float32)
    intensity = ndi.gaussian_filter(intensity, sigma=(0, 0.7, 0.7))  # optical PSF
    db = 10 * np.log10(intensity + 1e-4)
    # Display mapping chosen so the vitreous sits near 5 and the RPE near 220, as in the real scans.
    lo, hi = -12.0, 17.0
    out = np.clip((db - lo) / (hi - lo) * 255.0, 0, 255)
    return np.rint(out).astype(np.uint8)
