"""Per-slice DINO features of a volume, computed once and cached on disk in zarr.

Prompting a volume reads the same features again each time the user paints one more slice, so
(as micro-sam does for SAM embeddings) they are stored under a key that changes when the pixels,
the model or the preprocessing change::

    $MEDVISION_HOME/cache/embeddings/<key>.zarr      one chunk per slice, float16

A store is written under a temporary name and renamed once complete; its ``medvision`` attribute
(the completion marker, written last) carries the shape and a CRC32 of every feature byte. On
open the marker, shape, dtype and checksum are verified; anything that does not match, or fails
to read, is deleted and recomputed: a cache entry is never trusted blindly.

    feats = slice_features(volume, backbone)     # FeatureVolume
    feats.features.shape                         # (n_slices, C, h, w) float16
    feats.at_pixels(12).shape                    # (C, H, W) float32, on slice 12's pixel grid
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import shutil
import threading
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device
from .progress import CancelToken, ProgressFn, check, report

CACHE_FORMAT = 2  # bump when the store layout or the preprocessing code changes meaning
MARKER = "medvision"


@dataclass(frozen=True)
class EmbeddingConfig:
    """How slices are prepared for the backbone; part of the cache key.

    short_side: pixels of the slice's shorter side after resizing (DINO sees detail at ~14-16 px
    per patch, so small slices are enlarged and large ones reduced to a steady token count).
    low/high: percentiles mapped to 0 and 1 over the whole volume (RGB images: divided by 255).
    """

    short_side: int = 448
    low: float = 0.5
    high: float = 99.5


@dataclass
class FeatureVolume:
    """Patch features of every slice and how they sit on the slice's pixel grid.

    features: ``(n_slices, C, h, w)`` float16 (a 2D image has one slice).
    image_shape: ``(H, W)`` pixels of one original slice.
    resized_shape: ``(H', W')`` the slice was resized to before the backbone (padded to ``h*p, w*p``).
    patch_size: backbone patch size ``p`` in resized pixels.
    """

    features: np.ndarray
    image_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    patch_size: int
    key: str = ""
    from_cache: bool = False
    config: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    @property
    def n_slices(self) -> int:
        return int(self.features.shape[0])

    @property
    def patch_grid(self) -> tuple[int, int]:
        return int(self.features.shape[2]), int(self.features.shape[3])

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    def _grid(self, ys: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-centre coordinates mapped into grid_sample's [-1, 1] over the padded patch grid."""
        (H, W), (rh, rw), (h, w) = self.image_shape, self.resized_shape, self.patch_grid
        p = self.patch_size
        gy = 2 * (ys + 0.5) * (rh / H) / (h * p) - 1
        gx = 2 * (xs + 0.5) * (rw / W) / (w * p) - 1
        return gy, gx

    def slice_tensor(self, slice_index: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Features of one slice ``(C, h, w)`` as float32 on ``device``."""
        return torch.from_numpy(np.asarray(self.features[slice_index])).to(device, torch.float32)

    def at_pixels(self, slice_index: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Features of slice ``slice_index`` bilinearly upsampled to its pixels: ``(C, H, W)`` float32."""
        H, W = self.image_shape
        grid_features = self.slice_tensor(slice_index, device)[None]
        gy, gx = self._grid(torch.arange(H, device=device, dtype=torch.float32),
                            torch.arange(W, device=device, dtype=torch.float32))
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
        return F.grid_sample(grid_features, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]

    def at_points(self, slice_index: int, points: np.ndarray | torch.Tensor,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """Features at pixel positions ``points`` ``(N, 2)`` as ``(y, x)`` of one slice: ``(N, C)``.

        Cheaper than :meth:`at_pixels` when only the annotated pixels are needed.
        """
        pts = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device).reshape(-1, 2)
        gy, gx = self._grid(pts[:, 0], pts[:, 1])
        grid = torch.stack([gx, gy], dim=-1)[None, None]
        grid_features = self.slice_tensor(slice_index, device)[None]
        out = F.grid_sample(grid_features, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[0, :, 0].T


# --- preparing slices ------------------------------------------------------------------------

def _as_slices(volume: Any) -> tuple[Any, bool]:
    """``(array (n, H, W[, 3]), rgb)`` from a Volume or array; 2D images become one slice."""
    from ..volume import Volume

    rgb = bool(volume.rgb) if isinstance(volume, Volume) else False
    data = volume.data if isinstance(volume, Volume) else volume  # numpy's own .data is a buffer
    if not hasattr(data, "shape"):
        data = np.asarray(data)
    spatial = data.ndim - (1 if rgb else 0)
    if spatial == 2:
        data = data[None]
    elif spatial != 3:
        raise ValueError(f"features need a 2D image or a 3D volume, got {data.ndim} axes "
                         f"(shape {tuple(data.shape)}); pick one time point of a series first")
    return data, rgb


def _intensity_range(data: Any, rgb: bool, config: EmbeddingConfig) -> tuple[float, float]:
    """The volume-wide values mapped to 0 and 1 (percentiles on a regular subsample)."""
    if rgb:
        return 0.0, 255.0
    sample = np.asarray(data[:: max(1, math.ceil(data.shape[0] / 64))]).reshape(-1)  # <= 64 slices
    flat = sample[:: max(1, math.ceil(sample.size / (1 << 22)))]  # ~4 M voxels estimate 0.5 % well
    lo, hi = np.percentile(flat.astype(np.float32), [config.low, config.high])
    return float(lo), float(hi)


def resized_shape(image_shape: tuple[int, int], short_side: int) -> tuple[int, int]:
    """``(H', W')`` with the shorter side at ``short_side`` and the aspect ratio kept."""
    H, W = image_shape
    scale = short_side / min(H, W)
    return max(1, round(H * scale)), max(1, round(W * scale))


def _prepare(block: np.ndarray, rgb: bool, lo: float, hi: float, size: tuple[int, int],
             device: str | torch.device = "cpu") -> torch.Tensor:
    """Slices ``(b, H, W[, 3])`` as ``(b, 1 or 3, H', W')`` float32 in [0, 1] on ``device``.

    The raw slices travel in their own dtype and are scaled and resized there: done on the CPU,
    scaling and the antialiased resize to 448 px took 0.55 s of the 2.8 s that embedding 300
    slices of 256² cost outside the network (one thread; the zarr write took 0.9 s).
    """
    x = torch.from_numpy(np.ascontiguousarray(block)).to(device, non_blocking=True).to(torch.float32)
    x = x.permute(0, 3, 1, 2) if rgb else x[:, None]
    x = ((x - lo) / max(hi - lo, 1e-6)).clamp_(0, 1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return x


# --- cache -----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$MEDVISION_HOME/cache/embeddings`` (default: the platform's user data folder)."""
    if os.environ.get("MEDVISION_HOME"):
        root = Path(os.environ["MEDVISION_HOME"])
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir("napari-medvision"))
    return root / "cache" / "embeddings"


def content_hash(data: Any, rgb: bool = False, slices_per_block: int = 16) -> str:
    """SHA-256 of every byte of ``data`` plus its shape and dtype (numpy or dask, read in blocks), 32 hex digits.

    A strided sample would miss a one-voxel edit (a user fixing a slice), so all bytes are hashed.
    SHA-256, not blake2b: CPUs with SHA instructions (x86 since Zen / Ice Lake, ARMv8) hash a
    300x512x512 int16 CT in 0.10 s against blake2b's 0.25 s, and the Prompt panel hashes it twice
    per painted slice (the preview, then the checked prompt).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([list(map(int, data.shape)), str(data.dtype), rgb]).encode())
    for start in range(0, data.shape[0], slices_per_block):
        block = np.ascontiguousarray(np.asarray(data[start:start + slices_per_block]))
        digest.update(memoryview(block).cast("B"))
    return digest.hexdigest()[:32]


def cache_key(data_hash: str, backbone_checksum: str, config: EmbeddingConfig) -> str:
    text = json.dumps([CACHE_FORMAT, data_hash, backbone_checksum, asdict(config)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _crc(features: np.ndarray) -> int:
    if features.ndim < 2:
        return zlib.crc32(memoryview(np.ascontiguousarray(features).reshape(-1)).cast("B"))
    crc = 0
    for one in features:  # slice by slice: no copy of a whole non-contiguous volume
        crc = zlib.crc32(memoryview(np.ascontiguousarray(one)).cast("B"), crc)
    return crc


def _read_cache(path: Path, expect: dict[str, Any]) -> Optional[np.ndarray]:
    """The cached features if the store is complete and intact, else ``None`` (and it is removed)."""
    _wait_for_write(path)
    arrays = read_arrays(path, expect["key"], {"features": (expect["shape"], "float16")})
    return None if arrays is None else arrays["features"]


# Writing the features is left to one background thread: on an H100 the 300-slice embedding took
# 2.0 s and writing its 225 MB store alone 0.76 s on the CPU, so the caller gets its features
# while they are stored. A read of the same entry waits for its write; the process waits for all
# of them at exit (``flush_cache_writes``), and an interrupted write leaves only a ``.partial``
# folder, never an entry that looks complete.
_writer: Optional[ThreadPoolExecutor] = None
_pending: dict[Path, Future] = {}
_pending_lock = threading.Lock()


def _write_cache(path: Path, features: np.ndarray, key: str) -> None:
    """Store ``features`` (not to be changed afterwards: the write may still be reading them)."""
    global _writer
    with _pending_lock:
        if _writer is None:
            _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvision-cache")
        _pending[path] = _writer.submit(write_arrays, path, key, {"features": features})


def _wait_for_write(path: Path) -> None:
    with _pending_lock:
        future = _pending.pop(path, None)
    _settle(future)


def flush_cache_writes() -> None:
    """Wait until every feature store queued for writing is on disk."""
    with _pending_lock:
        futures = list(_pending.values())
        _pending.clear()
    for future in futures:
        _settle(future)


def _settle(future: Optional[Future]) -> None:
    """Wait for a queued write; one that failed costs a recomputation next time, never the caller's result."""
    if future is None:
        return
    try:
        future.result()
    except Exception:  # the atomic write left no entry that looks complete
        pass


atexit.register(flush_cache_writes)


def _row_crcs(values: np.ndarray) -> list[int]:
    """CRC32 of every slice (row along axis 0): a part of a stack can be verified alone."""
    return [zlib.crc32(memoryview(np.ascontiguousarray(one)).cast("B")) for one in values]


def _checked(array, info: dict, rows: Optional[Sequence[int]]) -> Optional[np.ndarray]:
    """The stored ``array`` (or only its ``rows``; the others left unset), or None if a checksum fails."""
    per_row = info.get("crc32_rows")
    if rows is None or per_row is None:
        values = array[...]
        ok = _row_crcs(values) == per_row if per_row is not None else _crc(values) == info.get("crc32")
        return values if ok else None
    values = np.empty(array.shape, dtype=array.dtype)  # rows never written commit no memory
    wanted = sorted({int(r) for r in rows})
    for start, stop in _runs(wanted):
        values[start:stop] = array[start:stop]
    return values if all(_row_crcs(values[r:r + 1])[0] == per_row[r] for r in wanted) else None


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as ``[start, stop)`` runs of consecutive rows (one read each)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and r == runs[-1][1]:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def read_arrays(path: Path, key: str, expect: dict[str, tuple[Optional[Sequence[int]], str]],
                rows: Optional[dict[str, Sequence[int]]] = None) -> Optional[dict[str, np.ndarray]]:
    """Named arrays of a complete, intact store at ``path``, else ``None`` (and the store is removed).

    expect: ``{name: (shape, dtype)}``; the marker's key, every shape, dtype and CRC32 must match
    (a shape of ``None``: whatever the marker records, still checked against the stored array).
    rows: ``{name: slices}`` to read (and verify) only these rows of a stack of slices; the rest
    of that array is left unset. A preview of a 300x512x512 prompt needs the demons fields of a
    few slices, not the 0.6 GB of all of them.
    Shared by every cache of per-volume work (features here, prompt fields and features in
    ``tasks._prompt_cache``), so they all verify the same way.
    """
    if not path.exists():
        return None
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r")
        marker = dict(group.attrs.get(MARKER) or {})
        listed = marker.get("arrays") or {}
        ok = marker.get("complete") is True and marker.get("key") == key and set(listed) == set(expect)
        out = {}
        for name, (shape, dtype) in expect.items() if ok else ():
            array, info = group[name], listed[name]
            recorded = info.get("shape")
            if (recorded != list(array.shape) or (shape is not None and recorded != list(shape))
                    or array.dtype != np.dtype(dtype) or info.get("dtype") != np.dtype(dtype).str):
                break
            values = _checked(array, info, (rows or {}).get(name))
            if values is None:
                break
            out[name] = values
        else:
            if ok:
                _touch(path)
                return out
    except Exception:  # any read error means "not usable": recompute rather than trust it
        pass
    shutil.rmtree(path, ignore_errors=True)
    return None


def write_arrays(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays to ``path`` atomically: temporary store, marker last, then rename."""
    import zarr

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(tmp), mode="w")
        listed = {}
        for name, values in arrays.items():
            values = np.ascontiguousarray(values)
            # Features and fields are noise-like floats: compression saves little and costs read time.
            # One chunk per slice for stacks of slices, one in all for small tables (weights, a PCA basis).
            chunks = ((1,) + tuple(values.shape[1:]) if values.ndim >= 3 and values.shape[0]
                      else tuple(max(1, d) for d in values.shape))
            array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunks,
                                       compressors=None, fill_value=0)
            array[...] = values
            listed[name] = {"shape": list(values.shape), "dtype": values.dtype.str}
            if chunks[0] == 1 and values.ndim >= 3:
                listed[name]["crc32_rows"] = _row_crcs(values)
            else:
                listed[name]["crc32"] = _crc(values)
        group.attrs[MARKER] = {"complete": True, "key": key, "arrays": listed, "format": CACHE_FORMAT}
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        prune(path.parent, keep=path)
    except OSError:
        pass  # a read-only or full disk costs speed next time, never the result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_limit_bytes() -> int:
    """Size cap of the cache folder: ``$MEDVISION_CACHE_GB`` gigabytes (default 20)."""
    try:
        return int(float(os.environ.get("MEDVISION_CACHE_GB", "20")) * 1e9)
    except ValueError:
        return int(20e9)


def prune(folder: Path, keep: Optional[Path] = None, limit: Optional[int] = None) -> list[Path]:
    """Remove the least recently used entries until the folder fits ``limit`` bytes; return them.

    A 300x512x512 CT costs ~0.6 GB of demons fields plus its DINO features, so without a cap the
    cache grows with every new scan. ``keep`` (the entry just written) is never removed.
    """
    limit = cache_limit_bytes() if limit is None else limit
    entries = []
    for entry in folder.glob("*.zarr"):
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        entries.append((entry.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, entry in sorted(entries):
        if total <= limit:
            break
        if keep is not None and entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed


def _touch(path: Path) -> None:
    """Mark an entry as used now (the cap removes the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass


# --- public ----------------------------------------------------------------------------------

def slice_features(volume: Any, backbone, device: str | None = None, batch_size: int = 8, cache: bool = True,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                   config: EmbeddingConfig | None = None) -> FeatureVolume:
    """Backbone features of every slice (axis 0) of ``volume``; read from the cache when present.

    volume: a Volume or array, ``(z, y, x)``, ``(y, x)`` or RGB ``(y, x, 3)``.
    backbone: a :class:`napari_medvision.models.dino.Backbone` (anything with ``features``,
    ``patch_size``, ``embed_dim`` and ``checksum``).
    cache: read and write ``$MEDVISION_HOME/cache/embeddings``; ``False`` always computes.
    """
    config = config or EmbeddingConfig()
    data, rgb = _as_slices(volume)
    n, H, W = (int(s) for s in data.shape[:3])
    size = resized_shape((H, W), config.short_side)
    p = int(backbone.patch_size)
    grid = (math.ceil(size[0] / p), math.ceil(size[1] / p))
    shape = [n, int(backbone.embed_dim), grid[0], grid[1]]

    key, path = "", None
    if cache:
        key = cache_key(content_hash(data, rgb), backbone.checksum, config)
        path = cache_dir() / f"{key}.zarr"
        cached = _read_cache(path, {"shape": shape, "key": key})
        if cached is not None:
            report(progress, n, n, "features read from cache")
            return FeatureVolume(cached, (H, W), size, p, key, True, config)

    device = resolve_device(device)
    backbone.to(device)
    lo, hi = _intensity_range(data, rgb, config)
    # On a GPU the batches stay there and come to the host in one copy at the end: a copy per
    # batch makes the host wait for every batch before it can queue the next one.
    on_host = torch.device(device).type == "cpu"
    features = np.empty(shape, dtype=np.float16) if on_host else None
    batches = []
    report(progress, 0, n, "computing image features")
    for start in range(0, n, batch_size):
        check(cancel)
        stop = min(n, start + batch_size)
        images = _prepare(np.asarray(data[start:stop]), rgb, lo, hi, size, device)
        out = backbone.features(images).to(torch.float16)
        if on_host:
            features[start:stop] = out.numpy()
        else:
            batches.append(out)
        report(progress, stop, n, "computing image features")
    if not on_host:
        features = torch.cat(batches).cpu().numpy()
        del batches
    if cache and path is not None:
        _write_cache(path, features, key)
    return FeatureVolume(features, (H, W), size, p, key, False, config)
