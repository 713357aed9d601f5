"""Zeiss Cirrus HD-OCT ``.img`` cubes: raw uint8 voxels with no header.

The cube size is not in the file. It comes from ``shape=`` if given, else from the scan name
Cirrus writes into the file name ("Macular Cube 512x128_..._cube_z.img": 512 A-scans by 128
B-scans), else from the file size of the known cube protocols. Layout and orientation follow
the AURA toolbox's ``octCirrusReader`` (Lang et al.): each B-scan is stored row by row, and the
cube is stored upside down, mirrored left-right and with the B-scans in reverse order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..volume import Volume
from .errors import ReadError
from .formats import register_reader

DEPTH = 1024  # samples per A-scan in every Cirrus cube protocol
CUBE_MM = (6.0, 2.0, 6.0)  # B-scan direction, depth, A-scan direction: Macular and Optic Disc cubes
# (A-scans per B-scan, B-scans) of the cube protocols, keyed by file size.
PROTOCOLS = {
    512 * 128 * DEPTH: (512, 128),  # Macular Cube 512x128
    200 * 200 * DEPTH: (200, 200),  # Macular / Optic Disc Cube 200x200
}
_NAME_SIZE = re.compile(r"(\d+)x(\d+)")


def _is_cirrus_cube(path: Path) -> bool:
    return path.suffix.lower() == ".img" and not _analyze_header(path).exists() and path.stat().st_size in PROTOCOLS


def _analyze_header(path: Path) -> Path:
    return path.with_suffix(".hdr")


@register_reader("Zeiss Cirrus IMG", (".img",), sniff=_is_cirrus_cube)
def read_cirrus(path: Path, shape: tuple[int, int, int] | None = None, **_options) -> list[Volume]:
    """The OCT cube of a Zeiss Cirrus ``.img`` file, axes (B-scans, depth, A-scans), in mm.

    shape: ``(n_bscans, depth, width)`` for cubes whose size is neither in the file name nor
    one of the known protocols.
    """
    path = Path(path)
    if shape is None and _analyze_header(path).exists():
        raise ReadError(path, "has an Analyze .hdr beside it, so it is an Analyze image, not a Zeiss Cirrus cube")
    size = path.stat().st_size
    n, depth, width = _cube_shape(path, size, shape)
    data = np.fromfile(path, dtype=np.uint8).reshape(n, depth, width)[::-1, ::-1, ::-1].copy()
    # AURA's convention: the cube's edges pass through the first and last voxel centres.
    spacing = tuple(mm / max(count - 1, 1) for mm, count in zip(CUBE_MM, (n, depth, width)))
    eye = re.search(r"_(OD|OS)_", path.name)
    meta = {"laterality": eye.group(1) if eye else "", "cube_mm": CUBE_MM}
    return [Volume(data=data, spacing=spacing, modality="OCT", meta=meta)]


def _cube_shape(path: Path, size: int, shape) -> tuple[int, int, int]:
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or np.prod(shape) != size:
            raise ReadError(path, f"holds {size} bytes, which does not fit shape={shape} (B-scans, depth, width)")
        return shape
    named = _NAME_SIZE.search(path.name)
    if named:
        width, n = int(named.group(1)), int(named.group(2))
        if width * n * DEPTH == size:
            return n, DEPTH, width
    if size in PROTOCOLS:
        width, n = PROTOCOLS[size]
        return n, DEPTH, width
    known = ", ".join(f"{w}x{b}x{DEPTH}" for w, b in PROTOCOLS.values())
    raise ReadError(path, f"holds {size} bytes, which matches no Zeiss Cirrus cube ({known}); "
                          "pass shape=(n_bscans, depth, width)")
