"""Prompt-independent work on one volume, kept on disk so that painting one more slice is quick.

Prompting a volume again (one more slice painted, another label) repeats work that depends on the
pixels only: the demons fields between neighbouring slices and the PCA of the DINO features
(the per-pixel filter responses are cheaper to recompute than to store). They are stored beside the DINO embeddings, in the same verified zarr
format (``engine.cache.read_arrays``: marker written last, shapes, dtypes and a CRC32 of every
byte checked; anything that does not match is deleted and recomputed, never trusted)::

    $MEDVISION_HOME/cache/embeddings/<key>.zarr

The key joins the volume's content hash (every voxel), its modality (it sets the normalisation)
and what was computed with which settings (``kind`` and ``params``, with a version string that is
bumped when the code changes meaning).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional

import numpy as np

from ...engine import cache
from ...volume import Volume
from .features import intensity_ranges

Expect = dict[str, tuple[Optional[tuple[int, ...]], str]]


class VolumeCache:
    """Read-or-compute of named arrays for one volume; ``enabled=False`` always computes.

    hits / misses: the kinds read from the cache and those computed in this prompt (for tests
    and the benchmark).
    """

    def __init__(self, volume: Volume, enabled: bool = True):
        self.volume, self.enabled = volume, enabled
        self.hits: list[str] = []
        self.misses: list[str] = []
        self._hash: Optional[str] = None
        self._ranges: Optional[tuple] = None

    def content_hash(self) -> str:
        """``cache.content_hash`` of every voxel of the volume (computed once)."""
        if self._hash is None:
            self._hash = cache.content_hash(self.volume.data, bool(self.volume.rgb))
        return self._hash

    def intensity_ranges(self):
        """``_features.intensity_ranges`` of the volume (computed once: a preview normalises a few
        slices of it several times)."""
        if self._ranges is None:
            self._ranges = (intensity_ranges(self.volume),)
        return self._ranges[0]

    def key(self, kind: str, params: dict) -> str:
        text = json.dumps([cache.CACHE_FORMAT, kind, self.content_hash(), self.volume.modality,
                           bool(self.volume.rgb), params], sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def get(self, kind: str, params: dict, expect: Expect, compute: Callable[[], dict[str, np.ndarray]],
            rows: Optional[dict[str, list[int]]] = None) -> dict[str, np.ndarray]:
        """``compute()``'s arrays, read from the cache when an intact entry exists, else computed and stored.

        expect: ``{name: (shape or None, dtype)}``; ``None`` takes the shape recorded in the entry
        (still checked against the stored array and its checksum).
        rows: read only these rows of the named stacks from an existing entry (the others are
        left unset); a miss still computes and returns everything.
        """
        if not self.enabled:
            return compute()
        key = self.key(kind, params)
        path = cache.cache_dir() / f"{key}.zarr"
        found = cache.read_arrays(path, key, expect, rows)
        if found is not None:
            self.hits.append(kind)
            return found
        arrays = {n: np.asarray(a, dtype=expect[n][1]) for n, a in compute().items()}
        cache.write_arrays(path, key, arrays)
        self.misses.append(kind)
        return arrays

