"""The ``medvision`` command: the API's operations on files, no GUI needed.

Exit status is 0 on success and 2 with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .io import ReadError, WriteError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        return int(args.run(args) or 0)
    except (ReadError, WriteError, ValueError, FileNotFoundError) as exc:
        print(f"medvision {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medvision {args.command}: cancelled", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvision", description="Medical images with true geometry: "
                                     "load, convert, segment, synthesize, prompt, fine-tune.")
    sub = parser.add_subparsers(dest="command")

    load = sub.add_parser("load", help="read an image, print its geometry, optionally convert it")
    load.add_argument("input", help="file or folder (NIfTI, DICOM, NRRD, MHA, zarr, OCT, PNG/JPG/TIFF)")
    load.add_argument("-o", "--output", help="write it here; the format comes from the suffix")
    load.add_argument("--series", help="DICOM series to read when a folder holds several (index or UID)")
    load.add_argument("--modality", help="override the guessed modality (CT, MR, OCT, fundus)")
    load.add_argument("--json", action="store_true", help="print the summary as JSON")
    load.set_defaults(run=_load)

    demo = sub.add_parser("demo", help="the quick-start job: open the sample CT, save it and a screenshot")
    demo.add_argument("-o", "--output", default="demo_output", help="folder for the result files")
    demo.add_argument("--headless", action="store_true", help="never open a napari window")
    demo.set_defaults(run=_demo)
    return parser


def _summary(path: str, volumes) -> dict:
    out = []
    for vol in volumes:
        out.append({
            "kind": "labels" if vol.is_labels else "image",
            "shape": list(vol.data.shape), "dtype": str(vol.data.dtype), "modality": vol.modality,
            "spacing_mm": [round(s, 6) for s in vol.spacing], "origin_mm": [round(o, 6) for o in vol.origin],
            "direction": [[round(x, 6) for x in row] for row in vol.direction.tolist()],
            "labels": vol.labels,
        })
    return {"input": path, "volumes": out}


def _load(args) -> int:
    from . import io

    options = {}
    if args.series is not None:
        options["series"] = int(args.series) if args.series.isdigit() else args.series
    if args.modality:
        options["modality"] = args.modality
    volumes = io.load_all(args.input, **options)
    summary = _summary(args.input, volumes)
    if args.json:
        print(json.dumps(summary))
    else:
        for v in summary["volumes"]:
            print(f"{v['kind']}: shape {v['shape']} {v['dtype']}, modality {v['modality']}, "
                  f"spacing {v['spacing_mm']} mm, origin {v['origin_mm']} mm")
    if args.output:
        io.save(volumes[0], args.output)
        print(f"wrote {args.output}")
    return 0


def _demo(args) -> int:
    from ._demo import run_demo

    result = run_demo(Path(args.output), headless=args.headless or not _display_available())
    print(json.dumps(result, indent=1))
    return 0


def _display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if __name__ == "__main__":
    sys.exit(main())
