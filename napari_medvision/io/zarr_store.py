"""Zarr and OME-Zarr (NGFF 0.4/0.5), read lazily with dask; pyramids become napari multiscale.

The NGFF metadata is a few JSON fields, written here with zarr directly: NGFF has no place for
a direction matrix, so the full Volume geometry also rides in the group's ``medvision``
attribute (other OME-Zarr readers still get scale and translation from the standard fields).
"""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..volume import Volume
from .errors import ReadError
from .limits import check_memory, declared_bytes
from .formats import register_reader, register_writer

GEOMETRY_KEY = "medvision"
ZARR_SUFFIXES = (".zarr",)
MAX_CHUNKS = 1 << 22  # about 4 million chunks per array
MIN_PYRAMID_SIDE = 512  # halve in-plane until the largest side is at most this


def _sniff(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json"))


@register_reader("Zarr", ZARR_SUFFIXES, sniff=_sniff, folders=True)
def read_zarr(path: Path, **_) -> list[Volume]:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise ReadError(path, f"is not a readable zarr store ({exc})") from exc
    if isinstance(node, zarr.Array):
        return [Volume(data=_lazy(path, node), spacing=(1.0,) * min(node.ndim, 3), meta={"spacing_known": False})]
    attrs = dict(node.attrs)
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"
    multiscales = ome.get("multiscales")
    if not multiscales:
        arrays = [name for name, _ in node.arrays()]
        if not arrays:
            raise ReadError(path, "is a zarr group with no arrays and no OME-Zarr multiscales metadata")
        arr = node[arrays[0]]
        return [Volume(data=_lazy(path, arr), spacing=(1.0,) * min(arr.ndim, 3), meta={"spacing_known": False})]
    volumes = [_multiscale_volume(path, node, multiscales[0], attrs.get(GEOMETRY_KEY), ome)]
    if "labels" in node and isinstance(node["labels"], zarr.Group):
        labels_group = node["labels"]
        for name in dict(labels_group.attrs).get("labels", dict(labels_group.attrs).get("ome", {}).get("labels", [])):
            sub = labels_group[name]
            sub_attrs = dict(sub.attrs)
            sub_ome = sub_attrs.get("ome", sub_attrs)
            vol = _multiscale_volume(path, sub, sub_ome["multiscales"][0], sub_attrs.get(GEOMETRY_KEY), sub_ome)
            if vol.labels is None:
                vol.labels = _label_names(sub_ome)
            vol.meta["name"] = name
            volumes.append(vol)
    return volumes


def _multiscale_volume(path: Path, group, multiscale: dict, geometry: dict | None, ome: dict) -> Volume:
    datasets = multiscale["datasets"]
    levels = [_lazy(path, group[d["path"]]) for d in datasets]
    axes = multiscale.get("axes") or [{"name": n, "type": "space"} for n in "zyx"[-levels[0].ndim:]]
    axes = [{"name": a, "type": "space" if a in "zyx" else "other"} if isinstance(a, str) else a for a in axes]
    if geometry is not None:
        vol = Volume.from_geometry(levels[0], geometry)
    else:
        scale, translation = _transforms(multiscale, datasets[0], len(axes))
        space = [i for i, a in enumerate(axes) if a.get("type") == "space"]
        channel = [i for i, a in enumerate(axes) if a.get("type") == "channel"]
        data = levels[0]
        rgb = bool(channel) and channel[0] == len(axes) - 1 and data.shape[-1] in (3, 4)
        if channel and not rgb and data.shape[channel[0]] == 1:
            levels = [lv.take(0, axis=channel[0]) for lv in levels]
            space = [i - (1 if i > channel[0] else 0) for i in space]
            scale = [s for i, s in enumerate(scale) if i != channel[0]]
            translation = [t for i, t in enumerate(translation) if i != channel[0]]
        units = {a.get("unit") for i, a in enumerate(axes) if a.get("type") == "space"}
        factor = _to_mm(units, path)
        vol = Volume(
            data=levels[0],
            spacing=tuple(scale[i] * factor for i in space),
            origin=tuple(translation[i] * factor for i in space),
            rgb=rgb,
            meta={"spacing_known": bool(units - {None})},
        )
    if len(levels) > 1:
        vol.meta["multiscale"] = levels
    vol.meta["ngff_version"] = ome.get("version", multiscale.get("version"))
    return vol


def _lazy(path: Path, array):
    """A dask view of a zarr array whose damaged chunks raise ReadError when they are read.

    ReadError at once when one chunk alone could not be decoded in memory (the array is read
    chunk by chunk, so its full size may exceed memory) or the first chunk does not decode.
    """
    import dask.array as da

    chunk = declared_bytes(array.chunks, array.dtype.itemsize)
    check_memory(path, f"one chunk {tuple(array.chunks)} of {array.dtype}", 2 * chunk)
    count = math.prod(-(-int(n) // max(int(c), 1)) for n, c in zip(array.shape, array.chunks))
    if count > MAX_CHUNKS:  # dask lists every chunk: billions of them never finish building
        raise ReadError(path, f"declares {count} chunks of {tuple(array.chunks)} for shape {tuple(array.shape)}; "
                              f"medvision opens stores of up to {MAX_CHUNKS} chunks")
    checked = _CheckedChunks(path, array)
    checked[tuple(slice(0, c) for c in array.chunks)]
    return da.from_array(checked, chunks=array.chunks, asarray=False, name=f"medvision-zarr-{uuid.uuid4().hex}")


class _CheckedChunks:
    """A zarr array whose read errors (a corrupt or missing-codec chunk) become ReadErrors naming the store."""

    def __init__(self, path: Path, array):
        self.path, self.array = path, array
        self.shape, self.dtype, self.ndim = tuple(array.shape), array.dtype, array.ndim

    def __getitem__(self, key):
        try:
            return np.asarray(self.array[key])
        except Exception as exc:
            raise ReadError(self.path, f"has a damaged chunk in array {self.array.path!r}: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _transforms(multiscale: dict, dataset: dict, n: int) -> tuple[list[float], list[float]]:
    scale, translation = [1.0] * n, [0.0] * n
    for transforms in (dataset.get("coordinateTransformations", []), multiscale.get("coordinateTransformations", [])):
        for t in transforms:
            if t.get("type") == "scale":
                scale = [a * b for a, b in zip(scale, t["scale"])]
            elif t.get("type") == "translation":
                translation = [a + b for a, b in zip(translation, t["translation"])]
    return scale, translation


def _to_mm(units: set, path: Path) -> float:
    factors = {None: 1.0, "millimeter": 1.0, "micrometer": 1e-3, "nanometer": 1e-6, "centimeter": 10.0, "meter": 1e3}
    known = [factors[u] for u in units if u in factors]
    if len(known) != len(units):
        raise ReadError(path, f"uses spatial units {sorted(map(str, units))} that medvision does not convert to mm")
    return known[0] if known else 1.0


def _label_names(ome: dict) -> dict[int, str]:
    props = ome.get("image-label", {}).get("properties", [])
    names = {int(p["label-value"]): str(p.get("name", p["label-value"])) for p in props if "label-value" in p}
    return names or {1: "label"}


@register_writer("OME-Zarr", ZARR_SUFFIXES)
def write_ome_zarr(vol: Volume, path: Path) -> None:
    """Write an OME-NGFF 0.4 image (zarr format 2, read by every current NGFF tool), a pyramid if large."""
    import zarr

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        _write_multiscale(root, vol)
        root.attrs[GEOMETRY_KEY] = vol.geometry()
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_multiscale(group, vol: Volume) -> None:
    data = np.asarray(vol.data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    n_lead = vol.n_leading
    axes = [{"name": "t", "type": "time"}] * n_lead + [
        {"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"[-vol.ndim:]
    ]
    if vol.rgb:
        axes.append({"name": "c", "type": "channel"})
    datasets = []
    level, factor = data, 1
    for index in range(8):
        chunks = tuple([1] * n_lead + ([1] if vol.ndim == 3 else []) + list(level.shape[n_lead + vol.ndim - 2:]))
        group.create_array(str(index), data=level, chunks=chunks)
        scale = [1.0] * n_lead + [s * (factor if i >= vol.ndim - 2 else 1) for i, s in enumerate(vol.spacing)]
        # Pyramid levels shift their first voxel centre by half the merged block.
        shift = [0.0] * n_lead + [o + (0.5 * (factor - 1) * s if i >= vol.ndim - 2 else 0.0)
                                  for i, (o, s) in enumerate(zip(vol.origin, vol.spacing))]
        if vol.rgb:
            scale.append(1.0)
            shift.append(0.0)
        datasets.append({"path": str(index), "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": shift}]})
        in_plane = level.shape[n_lead + vol.ndim - 2: n_lead + vol.ndim]
        if min(in_plane) < 4 or max(in_plane) <= MIN_PYRAMID_SIDE:
            break
        level = _halve(level, n_lead + vol.ndim - 2, labels=vol.is_labels)
        factor *= 2
    group.attrs["multiscales"] = [{"version": "0.4", "name": vol.meta.get("name", "image"), "axes": axes,
                                   "datasets": datasets, "type": "mean" if not vol.is_labels else "nearest"}]


def _halve(level: np.ndarray, first_axis: int, labels: bool) -> np.ndarray:
    """Half resolution over the two in-plane axes: every other voxel for labels, a 2x2 mean for images."""
    sl = [slice(None)] * level.ndim
    if labels:
        sl[first_axis] = slice(0, None, 2)
        sl[first_axis + 1] = slice(0, None, 2)
        return level[tuple(sl)]
    h = level.shape[first_axis] // 2 * 2
    w = level.shape[first_axis + 1] // 2 * 2
    sl[first_axis], sl[first_axis + 1] = slice(0, h), slice(0, w)
    cropped = level[tuple(sl)].astype(np.float32)
    shape = list(cropped.shape)
    shape[first_axis: first_axis + 2] = [h // 2, 2, w // 2, 2]
    mean = cropped.reshape(shape).mean(axis=(first_axis + 1, first_axis + 3))
    return mean.astype(level.dtype) if np.issubdtype(level.dtype, np.floating) else np.rint(mean).astype(level.dtype)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Swap a finished folder into place, keeping the old one until the new one is there."""
    if path.exists():
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
