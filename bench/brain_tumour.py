"""Brain tumour model speed: ``mv.segment`` on whole 240x240x155 BraTS cases, per contrast subset.

Prints one JSON line per case and subset: wall seconds and the process's CPU seconds (on a shared
machine the wall time counts other people's work; CPU seconds over threads is the time on an idle
machine), and the whole-tumour volume in mL.

    OMP_NUM_THREADS=2 python bench/brain_tumour.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mr-brain-tumour-3d")
    parser.add_argument("--patients", nargs="*", default=None, help="BraTS folders (default: all four)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import napari_medvision as mv
    from napari_medvision.recipes.brain_tumour import PATIENTS, SUBSETS, patient

    for name in args.patients or PATIENTS:
        contrasts, _ = patient(name)
        for subset in SUBSETS:
            wall, cpu = time.perf_counter(), time.process_time()
            seg = mv.segment({c: contrasts[c] for c in subset}, model=args.model, device=args.device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(json.dumps({"bench": "brain_tumour_segment", "case": name, "shape": list(seg.data.shape),
                              "contrasts": list(subset), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                              "threads": args.threads, "whole_tumour_ml": seg.meta["volumes_ml"]["whole tumour"],
                              "device": f"{args.device} ({platform.machine()})", "date": date.today().isoformat()}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
