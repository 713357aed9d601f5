"""OCT vendor formats: importing this module registers their readers.

Every reader returns the OCT volume first, axes ``(B-scans, depth, width)`` with spacing in mm
(B-scan distance, axial pixel size, lateral pixel size), then any layer label map stored with
it (boundary rows kept in ``meta["boundaries"]``); a fundus/SLO image rides in ``meta["slo"]``.

- Heidelberg: ``.vol``, Heyex XML export (file or folder), ``.E2E``
- Topcon: ``.fda``, ``.fds``
- Zeiss Cirrus: ``.img`` raw cubes
"""

from __future__ import annotations

from . import oct_e2e, oct_heidelberg, oct_topcon, oct_zeiss  # noqa: F401  (registration)
from .oct_layers import boundaries_volume, region_labels  # noqa: F401

__all__ = ["boundaries_volume", "region_labels"]
