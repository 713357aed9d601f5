"""Volume <-> napari layer data, with no viewer needed.

napari places a layer in the world as ``world = A @ (translate + scale * index) + b``; a Volume
as ``world = origin + D @ (spacing * index)``. With ``scale = spacing`` the two agree when
``A = D`` and ``translate = D^T @ origin`` (D orthonormal), or ``A = [D | origin]`` otherwise.
The Volume geometry also rides in ``layer.metadata["medvision"]`` so a save restores it exactly.

napari slices only along world axes: a scan whose array axes are permuted relative to the world
(a sagittal or coronal acquisition, NIfTI stored LSA, ...) would show wrong slices. Such arrays
are shown transposed (a view, no copy) so each layer axis runs along the world axis it is
closest to; ``metadata["medvision"]["layer_axes"]`` records the order and saving undoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..volume import Volume

METADATA_KEY = "medvision"
# Abdominal soft-tissue window (level 40 HU, width 400 HU): what a radiologist looks at first.
CT_WINDOW = (-160.0, 240.0)
# Percentiles of the intensities used as display range for other modalities.
DISPLAY_PERCENTILES = (0.5, 99.5)
# At most this many voxels are looked at to choose a display range (fast on big/dask arrays).
DISPLAY_SAMPLE = 2_000_000

LayerDataTuple = tuple[Any, dict[str, Any], str]


# --- geometry ------------------------------------------------------------------------------
def layer_transform(vol: Volume) -> dict[str, np.ndarray]:
    """``scale``, ``translate`` and (for a rotated grid) ``affine`` placing ``vol`` in the world.

    Leading non-spatial axes (the time axis of a 4D series) get scale 1 and no offset.
    """
    n, lead = vol.ndim, vol.n_leading
    spacing = np.asarray(vol.spacing, dtype=float)
    origin = np.asarray(vol.origin, dtype=float)
    d = np.asarray(vol.direction, dtype=float)
    scale = np.concatenate([np.ones(lead), spacing])
    if np.allclose(d, np.eye(n), atol=1e-12):
        return {"scale": scale, "translate": np.concatenate([np.zeros(lead), origin])}
    affine = np.eye(lead + n + 1)
    if np.allclose(d.T @ d, np.eye(n), atol=1e-9):
        translate = d.T @ origin
        affine[lead:lead + n, lead:lead + n] = d
    else:  # sheared grid (e.g. tilted CT gantry): D has no transpose inverse, keep origin in the affine
        translate = np.zeros(n)
        affine[lead:lead + n, lead:lead + n] = d
        affine[lead:lead + n, -1] = origin
    return {"scale": scale, "translate": np.concatenate([np.zeros(lead), translate]), "affine": affine}


def axis_names_and_units(vol: Volume) -> dict[str, tuple[str, ...]]:
    """napari ``axis_labels`` (``t``, ``z``, ``y``, ``x``) and ``units`` (``mm`` on spatial axes).

    The layer's scale is in millimetres, so the status bar and scale bar say so; a leading axis
    (the time points of a series) counts steps and keeps napari's ``pixel``.
    """
    spatial = ("z", "y", "x")[3 - vol.ndim:] if vol.ndim <= 3 else tuple(f"axis {i}" for i in range(vol.ndim))
    lead = ("t",) if vol.n_leading == 1 else tuple(f"t{i}" for i in range(vol.n_leading))
    return {"axis_labels": lead + spatial, "units": ("pixel",) * vol.n_leading + ("mm",) * vol.ndim}


def geometry_from_transform(
    n_spatial: int,
    scale: Any,
    translate: Any = None,
    affine: Any = None,
    rotate: Any = None,
    shear: Any = None,
) -> dict[str, Any]:
    """Volume ``spacing``, ``origin``, ``direction`` of a layer placed by napari's transform.

    Used for layers without medvision metadata (a labels layer the user created). Only the last
    ``n_spatial`` axes are spatial; leading axes are assumed not to mix with them.
    """
    scale = np.asarray(scale, dtype=float)
    ndim = scale.size
    translate = np.zeros(ndim) if translate is None else np.asarray(translate, dtype=float)
    # napari's own composition (rotate/shear included) gives the data -> world matrix.
    from napari.utils.transforms import Affine

    inner = Affine(scale=scale, translate=translate, rotate=rotate, shear=shear, ndim=ndim).affine_matrix
    affine = getattr(affine, "affine_matrix", affine)
    full = inner if affine is None else np.asarray(affine, dtype=float) @ inner
    block = full[ndim - n_spatial:ndim, ndim - n_spatial:ndim]
    origin = full[ndim - n_spatial:ndim, -1]
    spacing = np.linalg.norm(block, axis=0)
    return {"spacing": tuple(spacing), "origin": tuple(origin), "direction": block / spacing[None, :]}


def layer_axes(vol: Volume) -> list[int] | None:
    """Spatial array axes in the order of the world axes they run closest to; None when already so.

    ``layer_axes[i]`` is the array axis shown as layer axis ``i``. Flips need no transposing
    (napari handles a negative direction); only permutations do.
    """
    closest = np.argmax(np.abs(vol.direction), axis=0)  # world axis each array axis runs along
    if sorted(closest.tolist()) != list(range(vol.ndim)) or np.all(closest == np.arange(vol.ndim)):
        return None  # already in world order, or too oblique for any order to help
    return np.argsort(closest).tolist()


def in_layer_order(vol: Volume, axes: list[int] | None) -> Volume:
    """``vol`` with spatial axes transposed to ``axes`` (leading and colour axes stay put)."""
    if axes is None:
        return vol
    lead = vol.n_leading
    order = list(range(lead)) + [lead + a for a in axes] + list(range(lead + vol.ndim, vol.data.ndim))
    meta = dict(vol.meta)
    if isinstance(meta.get("multiscale"), (list, tuple)):
        meta["multiscale"] = [level.transpose(order) for level in meta["multiscale"]]
    return Volume(
        data=vol.data.transpose(order),
        spacing=tuple(vol.spacing[a] for a in axes),
        origin=vol.origin,
        direction=vol.direction[:, axes],
        modality=vol.modality,
        labels=vol.labels,
        rgb=vol.rgb,
        meta=meta,
    )


def _undo_layer_order(data: Any, axes: list[int] | None, rgb: bool) -> Any:
    """Array back in the stored (file) axis order, from napari's layer order."""
    if not axes:
        return data
    n = len(axes)
    lead = data.ndim - n - (1 if rgb else 0)
    inverse = np.argsort(axes).tolist()
    order = list(range(lead)) + [lead + a for a in inverse] + list(range(lead + n, data.ndim))
    return data.transpose(order)


# --- Volume -> layer -----------------------------------------------------------------------
def volume_to_layer(vol: Volume, name: str | None = None, **overrides: Any) -> LayerDataTuple:
    """A napari LayerDataTuple showing ``vol`` at its true position and size.

    Label maps become ``labels`` layers whose ``features`` hold the label names (napari shows
    them in the status bar under the mouse); images become ``image`` layers in grey with a
    display range suited to the modality.
    """
    axes = layer_axes(vol)
    shown = in_layer_order(vol, axes)
    multiscale = shown.meta.get("multiscale")
    data = list(multiscale) if isinstance(multiscale, (list, tuple)) and len(multiscale) > 1 else shown.data
    meta = {
        **vol.geometry(),
        "layer_axes": axes,
        "source": vol.meta.get("source"),
        "format": vol.meta.get("format"),
    }
    kwargs: dict[str, Any] = {
        "name": name or _default_name(vol),
        "metadata": {METADATA_KEY: meta},
        **layer_transform(shown),
        **axis_names_and_units(shown),
    }
    if isinstance(data, list):
        kwargs["multiscale"] = True
    if is_label_map(vol):
        kwargs["features"] = label_features(vol.labels or {})
        layer_type = "labels"
        if not np.issubdtype(np.dtype(vol.data.dtype), np.integer):
            data = _as_label_dtype(np.asarray(shown.data))
    else:
        layer_type = "image"
        kwargs["rgb"] = bool(vol.rgb)
        if not vol.rgb:
            kwargs["colormap"] = "gray"
            limits = display_range(vol, data[-1] if isinstance(data, list) else data)
            if limits is not None:
                kwargs["contrast_limits"] = limits
    kwargs.update(overrides)
    return data, kwargs, layer_type


def is_label_map(vol: Volume) -> bool:
    """True for label maps: named labels, or integers marked SEG (formats without label names)."""
    return vol.is_labels or (vol.modality == "SEG" and np.issubdtype(np.dtype(vol.data.dtype), np.integer))


def label_features(labels: dict[int, str]) -> dict[str, list]:
    """Feature table napari shows for each label value: ``index`` (the value) and ``name``."""
    values = sorted(labels)
    return {"index": values, "name": [labels[v] for v in values]}


def display_range(vol: Volume, data: Any = None) -> list[float] | None:
    """Contrast limits: the soft-tissue window for CT in HU, else robust percentiles."""
    data = vol.data if data is None else data
    sample = _sample(data)
    if sample.size == 0:
        return None
    lo, hi = float(np.min(sample)), float(np.max(sample))
    if vol.modality == "CT" and lo < -200:  # stored in HU (air near -1000)
        return list(CT_WINDOW)
    if np.issubdtype(sample.dtype, np.integer) and hi - lo <= 255:
        return [lo, hi] if hi > lo else [lo, lo + 1.0]
    finite = sample[np.isfinite(sample)] if np.issubdtype(sample.dtype, np.floating) else sample
    if finite.size == 0:
        return None
    p_lo, p_hi = (float(v) for v in np.percentile(finite, DISPLAY_PERCENTILES))
    if p_hi <= p_lo:
        p_lo, p_hi = float(finite.min()), float(finite.max())
    return [p_lo, p_hi] if p_hi > p_lo else [p_lo, p_lo + 1.0]


def boundaries_to_shapes(vol: Volume, name: str | None = None) -> LayerDataTuple | None:
    """OCT layer boundaries (``meta["boundaries"]``: name -> rows per B-scan column) as paths.

    Each boundary of each B-scan becomes one path ``(bscan, row, column)`` in data coordinates,
    placed with the label map's own transform so it overlays the image.
    """
    boundaries = vol.meta.get("boundaries")
    if not boundaries or vol.ndim != 3 or vol.n_leading:
        return None
    paths, names = [], []
    for boundary, rows in boundaries.items():
        rows = np.atleast_2d(np.asarray(rows, dtype=float))
        for b, row in enumerate(rows):
            cols = np.flatnonzero(np.isfinite(row))
            if cols.size < 2:
                continue
            paths.append(np.column_stack([np.full(cols.size, b, float), row[cols], cols.astype(float)]))
            names.append(str(boundary))
    if not paths:
        return None
    axes = layer_axes(vol)
    if axes is not None:  # the label map is shown transposed: so are its boundaries
        paths = [p[:, axes] for p in paths]
        vol = in_layer_order(vol, axes)
    kwargs = {
        "name": name or f"{_default_name(vol)} boundaries",
        "shape_type": "path",
        "edge_width": 0.5 * min(vol.spacing[1:]),
        "edge_color": "name",
        "features": {"name": names},
        "metadata": {METADATA_KEY: vol.geometry()},
        **layer_transform(vol),
    }
    return paths, kwargs, "shapes"


def volume_to_layers(vols: list[Volume], stem: str | None = None) -> list[LayerDataTuple]:
    """LayerDataTuples for what ``napari_medvision.io.load_all`` returned: image first, then labels."""
    layers: list[LayerDataTuple] = []
    used: set[str] = set()
    for i, vol in enumerate(vols):
        base = stem or _default_name(vol)
        name = base if i == 0 else f"{base} {vol.meta.get('name') or _kind(vol)}"
        if name in used:
            name = f"{name} {i}"
        used.add(name)
        layers.append(volume_to_layer(vol, name=name))
        shapes = boundaries_to_shapes(vol, name=f"{name} boundaries")
        if shapes is not None:
            layers.append(shapes)
    return layers


# --- layer -> Volume -----------------------------------------------------------------------
def layer_to_volume(data: Any, meta: dict[str, Any], layer_type: str) -> Volume:
    """The Volume a napari layer holds, to be saved with ``napari_medvision.io.save``.

    Geometry comes from ``meta["metadata"]["medvision"]`` when the layer carries it (loaded by
    this plugin, or given a scan's grid by :func:`adopt_geometry`), else from the layer's own
    scale / translate / rotate / shear / affine. Labels are saved as integers, with their names.
    """
    if isinstance(data, (list, tuple)):  # multiscale: level 0 is the full-resolution data
        data = data[0]
    is_labels = layer_type == "labels"
    rgb = bool(meta.get("rgb", False)) and not is_labels
    if is_labels:
        data = _as_label_dtype(np.asarray(data))
    stored = (meta.get("metadata") or {}).get(METADATA_KEY)
    if stored and "spacing" in stored and data.ndim - (1 if rgb else 0) >= len(stored["spacing"]):
        geometry = dict(stored)
        geometry["rgb"] = rgb
        data = _undo_layer_order(data, stored.get("layer_axes"), rgb)
    else:
        n_spatial = min(3, data.ndim - (1 if rgb else 0))
        n_layer = data.ndim - (1 if rgb else 0)
        geometry = {
            **geometry_from_transform(
                n_spatial,
                meta.get("scale", np.ones(n_layer)),
                meta.get("translate"),
                meta.get("affine"),
                meta.get("rotate"),
                meta.get("shear"),
            ),
            "modality": None,
            "labels": None,
            "rgb": rgb,
        }
    vol = Volume.from_geometry(data, geometry, meta={"name": meta.get("name")})
    if is_labels:
        names = _names_from_features(meta.get("features"))
        if names is None:
            names = vol.labels or {}
        if vol.labels is None and geometry.get("modality"):
            vol.modality = "SEG"  # the grid came from an image: this map is a segmentation of it
        vol.labels = names
    else:
        vol.labels = None
    return vol


def adopt_geometry(labels_layer: Any, image_layer: Any) -> None:
    """Put ``labels_layer`` on ``image_layer``'s grid (transform and medvision metadata).

    For a labels layer drawn over a loaded scan: saving it then writes the scan's geometry.
    Raises ValueError when the spatial shapes differ, as the labels then cannot lie on that grid.
    """
    image_shape = tuple(image_layer.data.shape[: image_layer.ndim])
    if tuple(labels_layer.data.shape) != image_shape:
        raise ValueError(
            f"labels {labels_layer.name!r} have shape {tuple(labels_layer.data.shape)}, "
            f"image {image_layer.name!r} has {image_shape}: they do not share a grid"
        )
    labels_layer.scale = image_layer.scale
    labels_layer.translate = image_layer.translate
    labels_layer.rotate = image_layer.rotate
    labels_layer.shear = image_layer.shear
    labels_layer.affine = image_layer.affine
    stored = (image_layer.metadata or {}).get(METADATA_KEY)
    if stored:
        names = _names_from_features(getattr(labels_layer, "features", None))
        own = (labels_layer.metadata or {}).get(METADATA_KEY) or {}
        labels = {str(k): v for k, v in (names or {}).items()} or own.get("labels") or {}
        labels_layer.metadata = {
            **labels_layer.metadata,
            METADATA_KEY: {**stored, "labels": labels, "rgb": False, "modality": "SEG"},
        }


def scan_metadata_for(shape: tuple[int, ...], meta: dict[str, Any], layers: Any) -> dict[str, Any] | None:
    """medvision metadata of the one loaded scan in ``layers`` a layer without metadata lies on.

    ``shape``/``meta`` describe the layer (its napari transform in ``meta``); a scan matches when
    its layer has the same spatial shape and places its voxels at the same world positions.
    """
    n_spatial = min(3, len(shape))
    own = geometry_from_transform(n_spatial, meta.get("scale", np.ones(len(shape))), meta.get("translate"),
                                  meta.get("affine"), meta.get("rotate"), meta.get("shear"))
    found = []
    for layer in layers:
        stored = (getattr(layer, "metadata", None) or {}).get(METADATA_KEY)
        if not stored or stored.get("labels") is not None or getattr(layer, "rgb", False):
            continue
        if tuple(layer.data.shape[-n_spatial:]) != tuple(shape[-n_spatial:]):
            continue
        theirs = geometry_from_transform(n_spatial, layer.scale, layer.translate, layer.affine.affine_matrix,
                                         layer.rotate, layer.shear)
        if all(np.allclose(own[k], theirs[k], atol=1e-4) for k in ("spacing", "origin", "direction")):
            found.append(stored)
    return found[0] if len(found) == 1 else None


# --- helpers -------------------------------------------------------------------------------
def label_names(layer: Any) -> dict[int, str]:
    """``{id: name}`` a labels layer carries in its features (empty for a layer painted from scratch)."""
    return _names_from_features(getattr(layer, "features", None)) or {}


def _names_from_features(features: Any) -> dict[int, str] | None:
    if features is None:
        return None
    try:
        index, names = list(features["index"]), list(features["name"])
    except (KeyError, TypeError, IndexError):
        return None
    return {int(i): str(n) for i, n in zip(index, names)}


def _as_label_dtype(data: np.ndarray) -> np.ndarray:
    """Integer label values: bool -> uint8, float -> the smallest integer type that holds them."""
    if np.issubdtype(data.dtype, np.integer):
        return data
    if data.dtype == bool:
        return data.astype(np.uint8)
    rounded = np.rint(np.nan_to_num(data)).astype(np.int64)
    lo, hi = (int(rounded.min()), int(rounded.max())) if rounded.size else (0, 0)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return rounded.astype(dtype)
    return rounded


def _sample(data: Any) -> np.ndarray:
    """Up to DISPLAY_SAMPLE voxels, strided evenly, as numpy (computes only those of a dask array)."""
    size = int(np.prod(data.shape))
    step = max(1, int(np.ceil((size / DISPLAY_SAMPLE) ** (1.0 / max(1, data.ndim)))))
    return np.asarray(data[(slice(None, None, step),) * data.ndim]).ravel()


def _kind(vol: Volume) -> str:
    return "labels" if is_label_map(vol) else (vol.modality or "image")


def _default_name(vol: Volume) -> str:
    source = vol.meta.get("source")
    if source:
        name = Path(source).name
        for suffix in (".nii.gz", ".ome.zarr", ".nrrd.gz"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return Path(name).stem or name
    return _kind(vol)
