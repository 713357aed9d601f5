"""Make napari open medical formats with MedVision without asking "Choose reader" each time.

napari's own reader claims every file name, so two readers always match and napari asks, unless
its settings name a preferred reader per file pattern (``plugins.extension2reader``; npe2 has no
way for a plugin to claim priority). This writes that preference, on the user's request only
(``medvision prefer-reader``), since it changes napari's settings file.
"""

from __future__ import annotations

from napari.settings import get_settings

PLUGIN = "napari-medvision"
# Formats napari's built-in reader cannot open as medical images (geometry, DICOM series, vendor OCT).
MEDICAL_PATTERNS = ("*.nii.gz", "*.nii", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.dcm", "*.dicom", "*.ima",
                    "*.vol", "*.fda", "*.fds", "*.e2e", "*.ome.zarr")
# Ordinary pictures: MedVision adds a fundus field-of-view mask and OME geometry, napari reads them plainly.
PICTURE_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.ome.tif", "*.ome.tiff", "*.zarr")


def prefer_medvision_reader(pictures: bool = False) -> dict[str, str]:
    """Set MedVision as napari's reader for medical formats (and pictures too when asked); saved.

    Returns the patterns now mapped to MedVision. Other patterns the user mapped stay as they are.
    """
    settings = get_settings()
    patterns = MEDICAL_PATTERNS + (PICTURE_PATTERNS if pictures else ())
    chosen = dict(settings.plugins.extension2reader)
    chosen.update({pattern: PLUGIN for pattern in patterns})
    settings.plugins.extension2reader = chosen
    settings.save()
    return {p: r for p, r in chosen.items() if r == PLUGIN}
