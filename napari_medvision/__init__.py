"""napari-medvision: 3D medical imaging with true geometry, headless first.

``import napari_medvision as mv`` gives the same operations the napari panels run.
"""

from __future__ import annotations

from . import io
from .io import load, load_all, save
from .volume import Volume

__version__ = "0.1.0"

__all__ = ["Volume", "load", "load_all", "save", "io", "__version__"]
