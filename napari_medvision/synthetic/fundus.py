"""Colour fundus photograph with a grown retinal vessel tree and its vessel mask.

Vessels grow from the optic disc as four arcades of paired arteries and veins that bend
around the macula, branching with Murray's law (w^3 = w1^3 + w2^3) until they are about one
pixel wide. Colours, widths and vessel density were matched to the DRIVE training set
(background about (184, 97, 57) RGB, vessels 8-14 % of the field of view, trunks about 8 px
at 565 px image width).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..volume import Volume
from .shapes import make_rng, smooth_noise

LABELS = {1: "vessel"}
FOV_MM = 11.5  # diameter of a 45-degree field of view on the retina


def fundus_photo(
    seed: int = 0,
    size: tuple[int, int] = (512, 512),
    vessel_density: float = 1.0,
) -> tuple[Volume, Volume]:
    """An RGB uint8 fundus photo ``(y, x, 3)`` and its vessel label map (uint8, 1 = vessel).

    size: image height and width in pixels; the circular field of view fills ~94 % of the
        shorter side, and the pixel spacing follows from a 45-degree (11.5 mm) field.
    vessel_density: multiplies how often vessels branch (1.0 matches DRIVE).
    labels.meta["fov"]: bool ``(y, x)`` mask of the field of view.
    """
    rng = make_rng(seed)
    h, w = (int(s) for s in size)
    radius = 0.47 * min(h, w)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r_fov = np.hypot(yy - centre[0], xx - centre[1]) / radius
    fov = r_fov <= 1.0

    side = rng.choice([-1.0, 1.0])  # optic disc on the right (right eye) or left
    fovea = centre + radius * np.array([rng.normal(0.02, 0.03), -side * rng.uniform(0.0, 0.08)])
    disc = fovea + radius * np.array([rng.normal(-0.06, 0.03), side * rng.uniform(0.66, 0.76)])
    disc_r = radius * rng.uniform(0.13, 0.16)
    px = radius / 270.0  # widths below are in DRIVE pixels, scaled to this image

    segments = _grow_tree(rng, disc, disc_r, fovea, centre, radius, px, side, vessel_density)
    vessel, veins, arteries, reflex = _rasterise(segments, (h, w))
    vessel &= fov

    image = _paint(rng, (h, w), yy, xx, fov, r_fov, radius, fovea, disc, disc_r, veins, arteries, reflex)
    spacing = FOV_MM / (2 * radius)
    meta = {"synthetic": "fundus_photo", "seed": seed, "eye": "right" if side > 0 else "left",
            "optic_disc_yx": tuple(float(v) for v in disc), "fovea_yx": tuple(float(v) for v in fovea)}
    img = Volume(image, spacing=(spacing, spacing), modality="fundus", rgb=True, meta=dict(meta))
    lab = Volume(vessel.astype(np.uint8), spacing=(spacing, spacing), modality="fundus",
                 labels=dict(LABELS), meta={**meta, "fov": fov})
    return img, lab


def _grow_tree(rng, disc, disc_r, fovea, centre, radius, px, side, density):
    """Centre-line samples ``(y, x, radius_px, is_vein)`` of the whole vessel tree, 1 px apart."""
    samples = []
    fovea_gap = 0.09 * radius  # foveal avascular zone
    stack = []
    for up in (-1.0, 1.0):
        # Temporal arcades pass above / below the fovea and sweep back towards the horizontal
        # raphe; nasal ones head up / down and out. Waypoints are in units of the FOV radius.
        temporal = [(0.36, 0.3), (0.42, -0.2), (0.3, -0.75), (0.12, -1.1)]
        nasal = [(0.55, 0.95), (0.9, 1.2)]
        for route, w_vein, w_art in ((temporal, 8.5, 6.5), (nasal, 6.5, 5.0)):
            jitter = rng.normal(0, 0.05, size=(len(route), 2))
            points = [fovea + radius * np.array([up * (dy + j0), side * (dx + j1)])
                      for (dy, dx), (j0, j1) in zip(route, jitter)]
            for is_vein, w0 in ((True, w_vein), (False, w_art)):
                offset = disc_r * 0.25 * np.array([up, side * (0.5 if is_vein else -0.5)])
                ang = np.arctan2(*(points[0] - disc)) + rng.normal(0, 0.1)
                stack.append((disc + offset, ang, w0 * px * rng.uniform(0.9, 1.1), is_vein, points))
    for _ in range(int(rng.integers(2, 5))):  # small vessels straight towards the macula
        ang = np.arctan2(*(fovea - disc)) + rng.normal(0, 0.4)
        stack.append((disc.copy(), ang, 2.6 * px, bool(rng.integers(2)), []))

    while stack:
        pos, ang, width, is_vein, waypoints = stack.pop()
        pos = np.array(pos, dtype=float)
        waypoints = list(waypoints)
        next_branch = _branch_gap(rng, width, px, density)
        travelled = 0.0
        for _ in range(6000):
            if width < 1.2 * px:
                break
            if waypoints:
                target = waypoints[0]
                if np.hypot(*(target - pos)) < 0.1 * radius:
                    waypoints.pop(0)
                else:
                    ang = _turn_towards(ang, np.arctan2(*(target - pos)), 0.07)
            rel = pos - fovea
            if np.hypot(*rel) < 2.0 * fovea_gap:  # keep the fovea free of vessels
                ang = _turn_towards(ang, np.arctan2(rel[0], rel[1]), 0.15)
            ang += rng.normal(0, 0.05)
            pos = pos + np.array([np.sin(ang), np.cos(ang)])
            travelled += 1.0
            if np.hypot(*(pos - centre)) > 1.02 * radius:
                break
            samples.append((pos[0], pos[1], width / 2, is_vein))
            if travelled >= next_branch:
                travelled, next_branch = 0.0, _branch_gap(rng, width, px, density)
                child = width * rng.uniform(0.4, 0.8)
                width = max(width ** 3 - child ** 3, 0.0) ** (1 / 3)
                turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
                stack.append((pos.copy(), ang + turn, child, is_vein, []))
            width *= 1 - 0.0015  # gentle taper between branches
    return np.array(samples, dtype=np.float32).reshape(-1, 4)


def _branch_gap(rng, width, px, density):
    """Path length (px) until the next branch: thicker vessels run longer between branches."""
    return rng.uniform(20, 48) * px * (0.8 + 0.2 * width / max(px, 1e-6)) / density


def _turn_towards(angle, target, rate):
    diff = (target - angle + np.pi) % (2 * np.pi) - np.pi
    return angle + rate * diff


def _rasterise(samples, shape):
    """Vessel mask, darkening profiles for veins and arteries, and the arterial light reflex."""
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    profiles = {True: np.zeros(shape, np.float32), False: np.zeros(shape, np.float32)}
    reflex = np.zeros(shape, np.float32)
    if len(samples) == 0:
        return mask, profiles[True], profiles[False], reflex
    bins = [0.0, 0.75, 1.1, 1.6, 2.2, 3.0, 4.0, 5.5, 1e9]
    for is_vein in (True, False):
        sel = samples[samples[:, 3] == float(is_vein)]
        for lo, hi in zip(bins[:-1], bins[1:]):
            s = sel[(sel[:, 2] >= lo) & (sel[:, 2] < hi)]
            if len(s) == 0:
                continue
            r = float(np.median(s[:, 2]))
            seeds = np.ones(shape, dtype=bool)
            iy = np.clip(np.rint(s[:, 0]).astype(int), 0, h - 1)
            ix = np.clip(np.rint(s[:, 1]).astype(int), 0, w - 1)
            seeds[iy, ix] = False
            d = ndi.distance_transform_edt(seeds).astype(np.float32)
            mask |= d <= max(r, 0.5)
            prof = np.sqrt(np.clip(1 - (d / (r + 0.5)) ** 2, 0, 1)) * min(1.0, 0.35 + 0.22 * r)
            profiles[is_vein] = np.maximum(profiles[is_vein], prof)
            if not is_vein and r > 1.6:
                reflex = np.maximum(reflex, np.exp(-0.5 * (d / (0.22 * r)) ** 2))
    return mask, profiles[True], profiles[False], reflex


def _paint(rng, shape, yy, xx, fov, r_fov, radius, fovea, disc, disc_r, veins, arteries, reflex):
    """RGB rendering: pigmented background, vignetting, macula, disc, vessels, blur and noise."""
    h, w = shape
    base = np.array([rng.uniform(190, 225), 0, 0])
    base[1] = base[0] * rng.uniform(0.46, 0.58)
    base[2] = base[0] * rng.uniform(0.26, 0.34)
    img = np.broadcast_to(base.astype(np.float32), (h, w, 3)).copy()
    texture = smooth_noise(rng, shape, 0.05 * radius) * 0.025 + smooth_noise(rng, shape, 0.01 * radius) * 0.015
    img *= (1 + texture)[..., None]
    vignette = 1 - 0.3 * r_fov ** 4
    img *= vignette[..., None]

    d_fovea = np.hypot(yy - fovea[0], xx - fovea[1]) / radius
    macula = 1 - 0.22 * np.exp(-0.5 * (d_fovea / 0.13) ** 2) - 0.12 * np.exp(-0.5 * (d_fovea / 0.03) ** 2)
    img *= macula[..., None]

    d_disc = np.hypot(yy - disc[0], xx - disc[1]) / disc_r
    rim = 1 / (1 + np.exp((d_disc - 1) * 12))
    cup = 1 / (1 + np.exp((d_disc - 0.45) * 10))
    disc_colour = np.array([250, 200, 120], np.float32) * rng.uniform(0.92, 1.02)
    cup_colour = np.array([255, 240, 190], np.float32)
    img = img * (1 - rim[..., None]) + disc_colour * rim[..., None]
    img = img * (1 - cup[..., None] * 0.8) + cup_colour * (cup[..., None] * 0.8)
    halo = np.exp(-0.5 * ((d_disc - 1.2) / 0.25) ** 2) * 0.12
    img *= (1 + halo)[..., None]

    vein_dark = np.array([0.42, 0.62, 0.55], np.float32)
    artery_dark = np.array([0.25, 0.45, 0.40], np.float32)
    img *= 1 - veins[..., None] * vein_dark
    img *= 1 - arteries[..., None] * artery_dark
    img += (reflex * 25)[..., None] * np.array([1.0, 0.7, 0.5], np.float32)

    img = ndi.gaussian_filter(img, sigma=(0.7, 0.7, 0))
    img += rng.normal(0, 2.0, size=img.shape).astype(np.float32)
    edge = np.clip((1.0 - r_fov) * radius + 0.5, 0, 1)  # anti-aliased field-of-view edge
    img *= edge[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
