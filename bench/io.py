"""I/O benchmark: medvision's load against nibabel and SimpleITK alone, in one run, as ratios.

Generates a 300x512x512 int16 CT-like NIfTI and a 300-slice DICOM series (once, in a temp
folder), then times each reader ``--repeat`` times and keeps the best. Prints one JSON line per
measurement; the last line holds the ratios (aim: medvision / fastest reference <= 1.2).

    python bench/io.py [--slices 300] [--size 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_ct(slices: int, size: int):
    """A CT phantom of the requested size: built at a quarter of the voxels, enlarged, re-noised."""
    from scipy import ndimage

    from napari_medvision import Volume
    from napari_medvision.synthetic import ct_abdomen

    small, _ = ct_abdomen(seed=0, shape=(max(slices // 3, 8), size // 2, size // 2), spacing=(3.0, 1.4, 1.4))
    factors = (slices / small.data.shape[0], size / small.data.shape[1], size / small.data.shape[2])
    data = ndimage.zoom(small.data, factors, order=0)
    noise = np.random.default_rng(0).normal(0, 12, data.shape).astype(np.int16)
    return Volume(data + noise, spacing=(1.0, 0.7, 0.7), modality="CT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import nibabel as nib
    import SimpleITK as sitk

    import napari_medvision as mv
    from napari_medvision.io.dicom import write_dicom_series

    context = {"device": platform.processor() or platform.machine(), "date": date.today().isoformat(),
               "shape": [args.slices, args.size, args.size]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct = make_ct(args.slices, args.size)
        nifti = mv.save(ct, tmp / "ct.nii.gz")
        series = tmp / "dicom"
        series.mkdir()
        write_dicom_series(ct, series)

        def sitk_series():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
            return sitk.GetArrayFromImage(reader.Execute())

        runs = {
            "nifti_medvision": lambda: mv.load(nifti).data,
            "nifti_nibabel": lambda: np.asanyarray(nib.load(str(nifti)).dataobj),
            "nifti_simpleitk": lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(nifti))),
            "dicom_medvision": lambda: mv.load(series).data,
            "dicom_simpleitk": sitk_series,
        }
        for name, fn in runs.items():
            fn()  # warm the page cache so every reader sees the same disk state
            results[name] = best_time(fn, args.repeat)
            print(json.dumps({"benchmark": "io", "measure": name, "seconds": round(results[name], 3), **context}))
    ratios = {
        "nifti_vs_nibabel": results["nifti_medvision"] / results["nifti_nibabel"],
        "nifti_vs_simpleitk": results["nifti_medvision"] / results["nifti_simpleitk"],
        "dicom_vs_simpleitk": results["dicom_medvision"] / results["dicom_simpleitk"],
    }
    print(json.dumps({"benchmark": "io", "ratios": {k: round(v, 3) for k, v in ratios.items()}, "aim": 1.2, **context}))


if __name__ == "__main__":
    main()
