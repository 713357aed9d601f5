"""Recipe: the shipped atlas sets in ``weights/atlases/`` from the real labelled scans in the data folder.

    python -m napari_medvision.recipes.atlases            # writes weights/atlases/<name>/

- ``totalseg-ct-abdomen``: TotalSegmentator's example abdominal CT with its 41 structures mapped
  onto the 15 labels of ``ct-abdomen-organs-3d`` (vertebrae, ribs and lung lobes merged); backs
  that model.
- ``totalseg-mr-abdomen``: TotalSegmentator's example abdominal MR with its structures (names of
  TotalSegmentator's ``total_mr`` task); segments MR alone (no network).

- ``aseg-brain-mr``: voxelmorph's real skull-stripped brain T1 with its FreeSurfer aseg grouped as
  CSF, grey and white matter, at 1.5 mm; backs ``mr-brain-tissue-3d`` (its warped brain is where
  brain may be).

All are Apache-2.0 (the source repository's licence, copied beside each set). Their labels are
algorithmic (TotalSegmentator's predictions, FreeSurfer's aseg), not manual contours; the cards say so.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from .. import io
from ..atlases import CARD_NAME, shipped_dir
from ..models.card import sha256_of
from ..volume import Volume
from .common import data_dir
from .ct_organs import LABELS, totalsegmentator_to_ours

TOTALSEG_SOURCE = ("TotalSegmentator test reference files (github.com/wasserth/TotalSegmentator, tests/reference_files), "
                   "labels = TotalSegmentator's predictions")
# Organs that are one piece of tissue: the atlas path keeps the largest connected piece of each.
SINGLE_PIECE = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "aorta",
                "inferior_vena_cava", "gallbladder", "lung_right", "lung_left", "urinary_bladder", "prostate",
                "heart", "esophagus", "trachea", "spinal_cord", "brain", "adrenal_gland_right", "adrenal_gland_left")
# Labels whose tissue holds air (below -500 HU on CT); every other label is removed from such voxels.
AIR_HOLDING = ("lung_right", "lung_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
               "lung_middle_lobe_right", "lung_lower_lobe_right", "trachea", "colon", "small_bowel", "duodenum")


def build(out: Path) -> list[Path]:
    root = data_dir() / "ct_mr_totalseg"
    class_maps = json.loads((root / "class_map_total_and_total_mr.json").read_text())
    licence = root / "LICENSE_code_Apache2.txt"
    written = []

    ct = io.load(root / "example_ct_sm.nii.gz")
    ct_labels = totalsegmentator_to_ours(np.asarray(io.load(root / "example_seg.nii.gz").data), class_maps["total"])
    present = {int(k): LABELS[int(k)] for k in np.unique(ct_labels) if k}
    written.append(_write(out / "totalseg-ct-abdomen", ct, ct_labels, present, licence, {
        "modality": "CT", "models": ["ct-abdomen-organs-3d"],
        "description": "One real abdominal CT (30x101x122, 3 mm) with 15 structures: the spatial prior of "
                       "ct-abdomen-organs-3d",
        "labels_from": "TotalSegmentator 'total' classes mapped by napari_medvision.recipes.ct_organs."
                       "totalsegmentator_to_ours (vertebrae, ribs, lung lobes merged; duodenum as small_bowel)",
    }))

    mr = io.load(root / "example_mr_sm.nii.gz")
    mr_seg = np.asarray(io.load(root / "example_seg_mr.nii.gz").data)
    names = {int(k): class_maps["total_mr"][str(int(k))] for k in np.unique(mr_seg) if k}
    written.append(_write(out / "totalseg-mr-abdomen", mr, mr_seg, names, licence, {
        "modality": "MR", "models": [],
        "description": f"One real abdominal MR (20x91x117, 3 mm) with {len(names)} structures; segments MR scans "
                       "without a network",
        "labels_from": "TotalSegmentator 'total_mr' classes as stored",
    }))
    brain = data_dir() / "mri_brain_aseg_voxelmorph"
    image, tissue = aseg_brain(brain / "test_scan.npz")
    written.append(_write(out / "aseg-brain-mr", image, tissue, {1: "CSF", 2: "grey matter", 3: "white matter"},
                          brain / "LICENSE_repo.txt", {
        "modality": "MR", "models": ["mr-brain-tissue-3d"],
        "description": "One real skull-stripped brain T1 (voxelmorph's test scan) at 1.5 mm with CSF, grey and "
                       "white matter: the spatial prior (and brain mask) of mr-brain-tissue-3d",
        "labels_from": "FreeSurfer aseg (algorithmic) grouped by napari_medvision.recipes.atlases.ASEG_TISSUE; "
                       "axes read as (left, inferior, anterior) from the labels' anatomy, spacing 1 mm as stated",
        "source": "voxelmorph test data (github.com/voxelmorph/voxelmorph, data/test_scan.npz); subject not stated",
        "skull_stripped": True,
    }))
    return written


# FreeSurfer aseg ids grouped as the tissue classes of mr-brain-tissue-3d (deep grey nuclei are grey matter).
ASEG_TISSUE = {
    1: (4, 5, 14, 15, 24, 43, 44, 72, 31, 63),  # ventricles, CSF, choroid plexus
    2: (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 28, 60),
    3: (2, 41, 7, 46, 16, 77, 85, 251, 252, 253, 254, 255, 80, 30, 62),
}


def aseg_brain(path: Path, spacing: float = 1.5):
    """The voxelmorph scan as an MR Volume at ``spacing`` mm (uint8 grey) and its aseg grouped as CSF/GM/WM.

    Its array axes run toward the patient's left, inferior and anterior (left cortex at high
    axis-0 indices, brainstem at high axis-1, cerebellum at low axis-2): LPS direction columns
    (0, 0, 1), (-1, 0, 0), (0, -1, 0) in the Volume's reversed (S, P, L) order.
    """
    from ..engine.resample import to_model_grid
    data = np.load(path)
    grey = np.clip(np.asarray(data["vol"], np.float32) * 255, 0, 255)
    seg = np.asarray(data["seg"]).astype(np.int32)
    tissue = np.zeros(seg.shape, np.uint8)
    for label, ids in ASEG_TISSUE.items():
        tissue[np.isin(seg, ids)] = label
    direction = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float)
    image = Volume(grey, spacing=(1.0, 1.0, 1.0), direction=direction, modality="MR")
    image = to_model_grid(image, (spacing,) * 3)
    labels = to_model_grid(image.__class__(tissue, spacing=(1.0, 1.0, 1.0), direction=direction,
                                           labels={1: "CSF", 2: "grey matter", 3: "white matter"}), (spacing,) * 3)
    image = image.with_data(np.round(np.asarray(image.data)).astype(np.uint8))
    return image, np.asarray(labels.data)


def _write(folder: Path, image, labels: np.ndarray, names: dict[int, str], licence: Path, card: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    io.save(image, folder / "image.nii.gz")
    io.save(image.with_data(labels.astype(np.uint8), labels=names, modality=None), folder / "labels.nii.gz")
    shutil.copyfile(licence, folder / "LICENSE")
    full = {"name": folder.name, "modality": card["modality"],
            "labels": {str(k): v for k, v in sorted(names.items())},
            "members": [{"image": "image.nii.gz", "labels": "labels.nii.gz", "shape": list(image.spatial_shape),
                         "spacing": list(image.spacing), "image_sha256": sha256_of(folder / "image.nii.gz"),
                         "labels_sha256": sha256_of(folder / "labels.nii.gz")}],
            "models": card["models"], "description": card["description"], "source": card.get("source", TOTALSEG_SOURCE),
            "labels_from": card["labels_from"], "license": "Apache-2.0 (LICENSE beside this card)",
            "single_piece": [n for n in names.values() if n in SINGLE_PIECE],
            "air_holding": [n for n in names.values() if n in AIR_HOLDING],
            "skull_stripped": bool(card.get("skull_stripped", False))}
    (folder / CARD_NAME).write_text(json.dumps(full, indent=2) + "\n")
    return folder


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else shipped_dir()
    for path in build(out):
        print(path)
