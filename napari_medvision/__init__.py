"""napari-medvision: 3D medical imaging with true geometry, headless first.

``import napari_medvision as mv`` gives the same operations the napari panels run::

    vol = mv.load("scan.nii.gz")
    seg = mv.segment(vol, model="ct-abdomen-organs-3d")
    t2 = mv.synthesize(t1, task="t1-to-t2")          # or examples=[(an_image, its_target)]
    mv.save(seg, "organs.nii.gz")
"""

from __future__ import annotations

import importlib

from . import io
from .io import load, load_all, save
from .volume import Volume

__version__ = "0.1.0"

__all__ = ["Volume", "load", "load_all", "save", "segment", "synthesize", "synthesis_tasks", "prompt", "finetune",
           "InteractiveSession", "measure", "measure_csv", "models", "atlases", "io", "batch", "__version__"]


def __getattr__(name: str):
    # Models and tasks import torch: load them on first use so `import napari_medvision` stays fast.
    if name in ("models", "atlases"):
        return importlib.import_module(f"{__name__}.{name}")
    if name == "segment":
        from .tasks.segment import segment

        return segment
    if name == "synthesize":
        from .tasks.synthesize import synthesize

        return synthesize
    if name == "synthesis_tasks":
        from .tasks.synthesis_tasks import task_names

        return task_names
    if name == "prompt":
        from .tasks.prompting import prompt

        return prompt
    if name in ("measure", "measure_csv"):
        from .tasks import measure

        return getattr(measure, name)
    if name == "InteractiveSession":
        from .tasks.interactive import InteractiveSession

        return InteractiveSession
    if name == "finetune":
        from .tasks.finetune import finetune

        return finetune
    if name == "batch":  # imports dask.distributed
        from .batch import batch

        return batch
    raise AttributeError(f"module 'napari_medvision' has no attribute {name!r}")
