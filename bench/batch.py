"""Cohort throughput: scans per minute of ``mv.batch`` with 1 and 2 (or more) Dask workers.

The shipped ``ct-abdomen-organs-3d`` model segments ``--scans`` synthetic CT phantoms (seeds
1000+, which no recipe trains on) of ``--slices x --size x --size`` voxels at 2.5 x 1.5 x 1.5 mm.
For each worker count: a LocalCluster as ``mv.batch`` makes it (processes, one thread each), a
warm-up run of one scan per worker (imports and model loading, once per worker), then the timed
run into a fresh output folder. Prints one JSON line per worker count and one with the speed-up.

    python bench/batch.py                        # 1 and 2 workers, 8 scans of 48x128x128
    python bench/batch.py --workers 1 2 4 --scans 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "ct-abdomen-organs-3d"


def make_scans(folder: Path, n: int, shape: tuple[int, int, int], first_seed: int) -> Path:
    import napari_medvision as mv
    from napari_medvision.synthetic import ct_abdomen

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = ct_abdomen(seed=first_seed + i, shape=shape, spacing=(2.5, 1.5, 1.5))
        mv.save(image, folder / f"ct{first_seed + i}.nii.gz")
    return folder


def measure(n_workers: int, scans: Path, warm: Path, work: Path) -> dict:
    from distributed import Client

    import napari_medvision as mv
    from napari_medvision.batch import local_cluster

    quiet = dict(log=lambda line: None)
    with local_cluster(n_workers=n_workers, dashboard_address=":0") as cluster, Client(cluster) as client:
        start = time.perf_counter()
        mv.batch(warm, work / f"warm{n_workers}", model=MODEL, scheduler=client, **quiet)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        report = mv.batch(scans, work / f"out{n_workers}", model=MODEL, scheduler=client, **quiet)
        wall = time.perf_counter() - start
    runtimes = [r["runtime_s"] for r in report.records if r["status"] == "ok"]
    return {"bench": "batch", "model": MODEL, "workers": n_workers, "scans": len(report.records),
            "computed": len(report.computed), "failed": len(report.failed), "wall_s": round(wall, 2),
            "scans_per_min": round(60 * len(report.computed) / wall, 2),
            "mean_scan_s": round(sum(runtimes) / max(len(runtimes), 1), 2), "warm_up_s": round(warm_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scans", type=int, default=8)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shape = (args.slices, args.size, args.size)
    with tempfile.TemporaryDirectory(prefix="medvision-bench-batch-") as tmp:
        work = Path(tmp)
        scans = make_scans(work / "scans", args.scans, shape, first_seed=1000)
        warm = make_scans(work / "warm", max(args.workers), shape, first_seed=2000)
        lines = []
        for n in args.workers:
            line = measure(n, scans, warm, work)
            line.update(shape=list(shape), device=f"{os.cpu_count()}-core {platform.machine()} CPU",
                        date=str(date.today()), load_average=round(os.getloadavg()[0], 1))
            print(json.dumps(line), flush=True)
            lines.append(line)
        if len(lines) > 1:
            base = lines[0]["scans_per_min"]
            print(json.dumps({"bench": "batch-speedup", "workers": [l["workers"] for l in lines],
                              "speedup": [round(l["scans_per_min"] / base, 2) for l in lines]}), flush=True)


if __name__ == "__main__":
    main()
