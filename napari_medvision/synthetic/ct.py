"""Abdominal CT phantom: an adult abdomen in Hounsfield units with organ labels.

Anatomy is laid out in an adult "template" frame in mm (x towards the patient's left, y
posterior, z superior: the LPS axes of the Volume), scaled to fit the field of view and bent by
a smooth random displacement field, so that every seed gives a different but plausible body.
Organ names follow TotalSegmentator where it has them, so models trained here can be compared
with its labels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..volume import Volume
from .shapes import (
    centred_grid,
    centred_origin,
    curve_network,
    displacement_field,
    ellipsoid,
    make_rng,
    smooth_noise,
    tube,
)

LABELS = {
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "stomach",
    6: "pancreas",
    7: "aorta",
    8: "inferior_vena_cava",
    9: "gallbladder",
    10: "vertebrae",
    11: "ribs",
    12: "lung_right",
    13: "lung_left",
    14: "colon",
    15: "small_bowel",
}
_ID = {name: i for i, name in LABELS.items()}

# Mean HU per tissue without contrast and in the portal-venous phase (about 70 s after
# injection), from typical clinical values; bone is split into cancellous and cortical.
HU = {
    "air": (-1000, -1000), "lung": (-860, -850), "fat": (-100, -100), "skin": (20, 30),
    "muscle": (45, 55), "liver": (60, 110), "liver_vessel": (38, 170), "spleen": (48, 120),
    "kidney_cortex": (32, 180), "kidney_medulla": (28, 120), "renal_sinus": (-40, -20),
    "stomach_wall": (45, 95), "gastric_fluid": (10, 12), "pancreas": (42, 100),
    "aorta": (42, 170), "ivc": (40, 145), "gallbladder": (8, 10), "bowel_wall": (40, 90),
    "bowel_fluid": (15, 18), "stool": (-60, -60), "gas": (-950, -950), "cancellous": (230, 240),
    "cortical": (750, 760), "disc": (85, 90), "canal": (20, 25), "cartilage": (110, 115),
    "heart": (42, 160), "couch": (250, 250),
}


def ct_abdomen(
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 160, 160),
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
    contrast: str | None = None,
    noise_hu: float = 12.0,
) -> tuple[Volume, Volume]:
    """An abdominal CT (int16 HU) and its organ label map (uint8), both as Volumes.

    seed: the anatomy, texture and noise are a pure function of it.
    shape, spacing: grid in napari order ``(z, y, x)``, mm; the body is scaled to fit.
    contrast: ``None`` (no contrast, the default) or ``"venous"`` (portal-venous phase).
    noise_hu: standard deviation of the quantum noise in HU.
    """
    if contrast not in (None, "venous"):
        raise ValueError(f"contrast must be None or 'venous', not {contrast!r}")
    phase = 0 if contrast is None else 1
    rng = make_rng(seed)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)

    coords, scale = _template_coords(rng, shape, spacing)
    tissue, labels = _anatomy(rng, coords, shape, spacing, scale)
    hu = _render(rng, tissue, labels, coords, shape, spacing, scale, phase, noise_hu)

    geometry = dict(spacing=spacing, origin=centred_origin(shape, spacing))
    meta = {"synthetic": "ct_abdomen", "seed": seed, "contrast": contrast or "none",
            "body_scale": round(float(scale), 3)}
    image = Volume(hu, modality="CT", meta=meta, **geometry)
    label_map = Volume(labels, modality="CT", labels=dict(LABELS), meta=dict(meta), **geometry)
    return image, label_map


def _template_coords(rng, shape, spacing):
    """Template-frame mm coordinates (x, y, z full arrays) of every voxel, and the body scale."""
    zw, yw, xw = centred_grid(shape, spacing)
    half_y = (shape[1] - 1) / 2 * spacing[1]
    half_x = (shape[2] - 1) / 2 * spacing[2]
    # An adult abdomen is about 330 x 240 mm; shrink it to fit a smaller field of view.
    scale = min(half_x / 172.0, half_y / 128.0, 1.25) * rng.uniform(0.9, 1.0)
    angle = np.deg2rad(rng.uniform(-4, 4))
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    x = (ca * xw + sa * yw) / np.float32(scale) + np.float32(rng.uniform(-6, 6))
    y = (-sa * xw + ca * yw) / np.float32(scale) + np.float32(rng.uniform(-4, 4))
    z = zw / np.float32(scale) + np.float32(rng.uniform(-10, 10))
    full = np.broadcast_shapes(x.shape, z.shape)
    corr_vox = tuple(70.0 * scale / s for s in spacing)
    dz, dy, dx = displacement_field(rng, full, corr_vox, 6.0)
    return [z + dz, y + dy, x + dx], scale


def _anatomy(rng, coords, shape, spacing, scale):
    """Tissue names per voxel (as small ints into ``tissue_names``) and the label map."""
    z, y, x = coords
    full = z.shape
    tissue = np.zeros(full, dtype=np.uint8)
    labels = np.zeros(full, dtype=np.uint8)
    names = list(HU)
    tid = {n: i for i, n in enumerate(names)}

    def paint(mask, name, label=None):
        tissue[mask] = tid[name]
        if label is not None:
            labels[mask] = _ID[label]

    def vox(mm):  # template mm to a noise correlation length in voxels per axis
        return tuple(mm * scale / s for s in spacing)

    lobulation = smooth_noise(rng, full, vox(18.0)) * np.float32(0.06)

    def organ(centre, radii, rotations=(), jitter=4.0, spread=0.1):
        c = [m + rng.normal(0, jitter) for m in centre]
        r = [m * rng.uniform(1 - spread, 1 + spread) for m in radii]
        return ellipsoid((x, y, z), c, r, rotations) + lobulation

    # Body outline: a rounded rectangle (superellipse) whose size varies with the seed.
    a, b, yc = 160 * rng.uniform(0.92, 1.05), 115 * rng.uniform(0.9, 1.06), 5.0
    p = np.float32(2.4)
    rho = (np.abs(x / a) ** p + np.abs((y - yc) / b) ** p) ** (1 / p)
    radius = np.sqrt(x ** 2 + (y - yc) ** 2) / np.maximum(rho, 1e-3)
    depth = (1 - rho) * radius  # mm under the skin
    fat_t = (13 + 9 * rng.uniform()) * (1 + 0.3 * smooth_noise(rng, full, vox(80.0)))
    fat_t = fat_t * (1 + 0.35 * np.clip(-(y - yc) / b, 0, 1))  # more fat anteriorly
    wall_t = np.float32(11.0)
    body = depth > 0
    # Couch under the patient's back, where the field of view reaches it.
    couch_y = yc + b + 2 - 0.0008 * x ** 2
    body &= y < couch_y - 3  # the back lies flat on the couch
    paint((np.abs(y - couch_y) < 2.5) & (np.abs(x) < 230), "couch")
    cavity = body & (depth > fat_t + wall_t)
    paint(body, "skin")
    paint(body & (depth > 2), "fat")
    paint(body & (depth > fat_t) & ~cavity, "muscle")
    paint(cavity, "fat")

    # Diaphragm domes: lungs above, liver / spleen / stomach below.
    dome_r = 100 - 55 * ((x + 70) / 110) ** 2 - 45 * ((y - 10) / 100) ** 2 + rng.normal(0, 5)
    dome_l = 92 - 55 * ((x - 70) / 110) ** 2 - 45 * ((y - 10) / 100) ** 2 + rng.normal(0, 5)
    dome = np.where(x < 0, dome_r, dome_l)
    heart = (organ((15, -35, 150), (70, 55, 60)) < 1) & (z > dome - 4) & cavity
    mediastinum = ((np.abs(x) < 32) & (y < 25)) | ((np.abs(x) < 26) & (y < 80))
    thorax = cavity & (z > dome) & ~heart & ~mediastinum
    paint(cavity & (z > dome - 5) & (z <= dome), "muscle")  # the diaphragm itself
    paint(heart, "heart")
    paint(thorax & (x < 0), "lung", "lung_right")
    paint(thorax & (x >= 0), "lung", "lung_left")
    below_l = cavity & (z < dome_l - 5)

    # Back muscles and psoas.
    para = (ellipsoid((x, y), (-30, 82), (25, 23)) < 1) | (ellipsoid((x, y), (30, 82), (25, 23)) < 1)
    paint(para & body & (z < dome + 40), "muscle")
    psoas_r = np.clip(7 + 0.16 * (15 - z), 0, 26)
    psoas = (z < 15) & ((((np.abs(x) - 38) / np.maximum(psoas_r, 1e-3)) ** 2
                         + ((y - 36) / np.maximum(0.8 * psoas_r, 1e-3)) ** 2) < 1)
    paint(psoas & cavity, "muscle")

    # Liver (right lobe, left lobe, caudate) under the right dome, with a fat plane at the kidney.
    liver = np.minimum.reduce([
        organ((-62, 5, 45), (82, 88, 72)),
        organ((8, -45, 66), (62, 36, 36)),
        organ((-15, 32, 45), (20, 18, 30)),
    ]) < 1
    kid_r_c = (-72 + rng.normal(0, 4), 58 + rng.normal(0, 3), -25 + rng.normal(0, 6))
    kid_l_c = (72 + rng.normal(0, 4), 56 + rng.normal(0, 3), -12 + rng.normal(0, 6))
    kid_radii = (26 * rng.uniform(0.9, 1.1), 23 * rng.uniform(0.9, 1.1), 52 * rng.uniform(0.9, 1.1))
    kid_r = ellipsoid((x, y, z), kid_r_c, kid_radii, [(-25, (0, 1)), (15, (0, 2))]) + lobulation / 2
    kid_l = ellipsoid((x, y, z), kid_l_c, kid_radii, [(25, (0, 1)), (-15, (0, 2))]) + lobulation / 2
    liver &= cavity & (z < dome - 5) & (kid_r > 1.15)
    paint(liver, "liver", "liver")
    vessels = curve_network(smooth_noise(rng, full, vox(22.0)), smooth_noise(rng, full, vox(22.0)), 0.12)
    paint(liver & vessels, "liver_vessel")
    paint((organ((-42, -40, 2), (14, 16, 30), [(30, (0, 2))], spread=0.15) < 1) & cavity,
          "gallbladder", "gallbladder")

    # Stomach: fundus and body on the left, antrum crossing to the right; gas rises anteriorly.
    stomach_body = organ((50, -22, 58), (42, 36, 44), [(20, (0, 1))])
    antrum = tube((x, y, z), 0, -15, 45, lambda t: (-48 + 0 * t, 25 + 0.4 * (t - 45)), 17.0) + lobulation
    stomach_rho = np.minimum(stomach_body, antrum)
    stomach = (stomach_rho < 1) & below_l & ~liver
    paint(stomach, "stomach_wall", "stomach")
    lumen = stomach & (stomach_rho < 0.85)
    gas_level = -22 - 36 * rng.uniform(0.2, 0.6)
    paint(lumen, "gastric_fluid")
    paint(lumen & (y < gas_level), "gas")

    # Spleen against the left posterolateral wall.
    spleen = (organ((86, 52, 42), (22, 50, 46), [(35, (0, 1))]) < 1) & below_l
    paint(spleen, "spleen", "spleen")

    # Kidneys: cortex, medulla, and the fatty renal sinus at the hilum.
    for kid, centre, side, name in ((kid_r, kid_r_c, 1, "kidney_right"), (kid_l, kid_l_c, -1, "kidney_left")):
        mask = (kid < 1) & cavity
        paint(mask, "kidney_cortex", name)
        paint(mask & (kid < 0.78), "kidney_medulla")
        sinus = ellipsoid((x, y, z), (centre[0] + side * 14, centre[1] - 4, centre[2]), (11, 10, 26))
        paint(mask & (sinus < 1), "renal_sinus")

    # Colon: ascending, transverse (sagging) and descending, with haustra; mostly gas.
    hx = lambda r: (lambda t: np.float32(r) * (1 + 0.12 * np.sin(t / 4.0)))  # noqa: E731
    asc = tube((x, y, z), 2, -115, -5, lambda t: (-105 + 0 * t, 10 + 0 * t), hx(21))
    trans = tube((x, y, z), 2, -105, 100,
                 lambda t: (-55 + 0 * t, -5 + 35 * (t + 105) / 205 - 40 * (1 - (t / 105) ** 2)), hx(18))
    desc = tube((x, y, z), 2, -115, 30, lambda t: (100 + 0 * t, 22 + 0 * t), hx(15))
    colon_rho = np.minimum.reduce([asc, trans, desc]) + lobulation
    colon = (colon_rho < 1) & cavity & ~liver & ~stomach & ~spleen & (kid_r > 1) & (kid_l > 1)
    paint(colon, "bowel_wall", "colon")
    stool = smooth_noise(rng, full, vox(8.0))
    paint(colon & (colon_rho < 0.85), "stool")
    paint(colon & (colon_rho < 0.85) & (stool < -0.4), "gas")

    # Small bowel loops fill the lower anterior abdomen.
    region = cavity & (z < -12) & (np.abs(x) < 95) & (y < 30) & ~colon & (kid_r > 1.1) & (kid_l > 1.1) & ~psoas
    loops = smooth_noise(rng, full, vox(16.0))
    bowel = region & (loops > -0.7)
    paint(bowel, "bowel_wall", "small_bowel")
    paint(bowel & (loops > -0.35), "bowel_fluid")
    paint(bowel & (loops > -0.35) & (smooth_noise(rng, full, vox(10.0)) > 2.0), "gas")

    # Pancreas: head by the duodenum, body over the aorta, tail at the splenic hilum.
    panc_rho = tube((x, y, z), 0, -38, 82,
                    lambda t: (-2 + 0.32 * (t + 38), -4 + 0.2 * (t + 38)),
                    lambda t: np.float32(10) + 6 * np.clip(-(t + 5) / 30, 0, 1)) + lobulation
    pancreas = (panc_rho < 1) & cavity & ~stomach & ~spleen & (kid_l > 1) & ~liver
    paint(pancreas, "pancreas", "pancreas")

    # Great vessels in front of the spine.
    aorta = ((x - 14) ** 2 + (y - 5) ** 2) < (np.float32(10.5) + 0.012 * z) ** 2
    ivc = (((x + 23) / 14) ** 2 + ((y - 9) / 10) ** 2) < 1
    paint(ivc & body, "ivc", "inferior_vena_cava")
    paint(aorta & body, "aorta", "aorta")

    # Vertebrae: bodies with a cortical shell, discs every 34 mm, arch and processes.
    level = np.mod(z - rng.uniform(0, 34), 34.0)
    disc = level < 8
    vb = ellipsoid((x, y), (0, 38), (24, 19))
    canal = np.sqrt(x ** 2 + (y - 68) ** 2)
    arch = (canal > 10) & (canal < 17) & (y > 56)
    spinous = (np.abs(x) < 4) & (y > 74) & (y < 100)
    transverse = (np.abs(x) < 40) & (y > 61) & (y < 66) & (level > 16) & (level < 24)
    bone = ((vb < 1) & ~disc) | ((arch | spinous | transverse) & (level > 10))
    paint(bone & body, "cortical", "vertebrae")
    paint(bone & (vb < 0.85), "cancellous")
    paint((vb < 1) & disc, "disc")
    paint(canal <= 10, "canal")

    # Ribs 8-12: curved bars inside the wall that run down towards the front.
    around = np.abs(np.arctan2(x, y - yc)) / np.pi  # 0 at the spine, 1 at the front
    rib_depth = fat_t + 6
    for z0, reach in zip((108, 80, 54, 28, 4), (0.9, 0.85, 0.72, 0.55, 0.4)):
        z0 = z0 + rng.normal(0, 3)
        zk = z0 - 85 * around
        bar = (((z - zk) / 5.5) ** 2 + ((depth - rib_depth) / 4) ** 2 < 1) & (around < reach) & (np.abs(x) > 32)
        paint(bar & (around >= 0.72), "cartilage")
        rib = bar & (around < 0.72)
        paint(rib, "cortical", "ribs")
        paint(rib & (((z - zk) / 3.5) ** 2 + ((depth - rib_depth) / 2.5) ** 2 < 1), "cancellous")
    return tissue, labels


def _render(rng, tissue, labels, coords, shape, spacing, scale, phase, noise_hu):
    """HU image: tissue means, organ texture, blur of the scanner and correlated quantum noise."""
    z, y, x = coords
    full = tissue.shape
    means = np.array([v[phase] for v in HU.values()], dtype=np.float32)
    hu = means[tissue]

    def vox(mm):
        return tuple(mm * scale / s for s in spacing)

    # Texture: fine parenchymal mottle everywhere, stronger in fat and muscle, and lung vessels.
    tex = smooth_noise(rng, full, vox(4.0))
    amp = np.full(len(HU), 6.0, dtype=np.float32)
    for name, a in (("fat", 14), ("muscle", 8), ("lung", 25), ("cancellous", 60), ("cortical", 120),
                    ("air", 0), ("gas", 20), ("bowel_fluid", 10), ("couch", 0), ("stool", 110)):
        amp[list(HU).index(name)] = a
    hu += amp[tissue] * tex
    lung = tissue == list(HU).index("lung")
    lung_vessels = curve_network(smooth_noise(rng, full, vox(16.0)), smooth_noise(rng, full, vox(16.0)), 0.1)
    hu[lung & lung_vessels] = -150
    hu[lung] += 60 * np.clip(y[lung] / 120.0, 0, 1)  # dependent lung is denser
    strands = curve_network(smooth_noise(rng, full, vox(14.0)), smooth_noise(rng, full, vox(14.0)), 0.08)
    fat = tissue == list(HU).index("fat")
    hu[fat & strands] = 20  # mesenteric vessels and septa in the fat

    # The scanner's point spread function gives partial volume at every edge.
    hu = ndi.gaussian_filter(hu, sigma=(0.45 * 2.5 / spacing[0], 0.6, 0.6))
    noise = ndi.gaussian_filter(rng.standard_normal(full).astype(np.float32), sigma=(0.0, 0.7, 0.7))
    hu += noise * np.float32(noise_hu / max(noise.std(), 1e-6))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
