"""``medvision atlases list|add|remove``: the atlas sets that ``segment`` registers onto a scan."""

from __future__ import annotations

import json

import numpy as np

from . import atlases
from .io import load


def add_parser(sub) -> None:
    """Add the ``atlases`` subcommand to the ``medvision`` parser's subparsers."""
    atl = sub.add_parser("atlases", help="list, add or remove atlas sets (labelled scans segment() registers)")
    commands = atl.add_subparsers(dest="atlas_command")
    listing = commands.add_parser("list", help="shipped and user atlas sets, and the models they back")
    listing.add_argument("--json", action="store_true", help="print the sets as JSON")
    add = commands.add_parser("add", help="store labelled scans as a user atlas set; then segment --model NAME")
    add.add_argument("name", help="name of the new set (letters, digits, - _ .)")
    add.add_argument("folder", nargs="?", help="a folder with images/ and labels/ holding files of the same names")
    add.add_argument("--image", action="append", default=[], help="image file (repeat; one --labels each)")
    add.add_argument("--labels", action="append", default=[], help="its label map on the image's grid")
    add.add_argument("--modality", help="CT, MR, ... (default: from the images)")
    add.add_argument("--overwrite", action="store_true", help="replace a user set of that name")
    remove = commands.add_parser("remove", help="delete a user atlas set")
    remove.add_argument("name")
    atl.set_defaults(run=_run)


def _run(args) -> int:
    command = args.atlas_command or "list"
    if command == "list":
        sets = atlases.available()
        if getattr(args, "json", False):
            print(json.dumps([s.summary() for s in sets]))
            return 0
        if not sets:
            print("no atlas sets found")
        for s in sets:
            backs = f" backs {', '.join(s.models)}" if s.models else " (segments alone)"
            print(f"{s.name:24s} {s.modality or '?':4s} {s.source:8s} {len(s)} scan(s), {len(s.labels)} labels;"
                  f"{backs}; {s.card.get('license', '')}")
        return 0
    if command == "add":
        if args.folder and (args.image or args.labels):
            raise ValueError("give a folder or --image/--labels pairs, not both")
        if args.folder:
            pairs = args.folder
        else:
            if not args.image or len(args.image) != len(args.labels):
                raise ValueError("give one --labels per --image (or a folder with images/ and labels/)")
            pairs = [(load(i), _as_labels(load(l))) for i, l in zip(args.image, args.labels)]
        atlas = atlases.add(args.name, pairs, modality=args.modality, overwrite=args.overwrite)
        print(f"added atlas set {atlas.name}: {len(atlas)} scan(s), labels {', '.join(atlas.labels.values())}; "
              f"segment with: medvision segment IMAGE -o OUT --model {atlas.name}")
        return 0
    atlases.remove(args.name)
    print(f"removed atlas set {args.name}")
    return 0


def _as_labels(volume):
    """A label map read from a file without label names gets generic ones ("label k")."""
    if volume.labels is not None:
        return volume
    data = np.asarray(volume.data)
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
        raise ValueError(f"{volume.meta.get('source', 'labels')}: not a label map (non-integer values)")
    data = data.astype(np.int32)
    return volume.with_data(data, labels={int(v): f"label {int(v)}" for v in np.unique(data) if v})


def print_atlas_use(meta: dict) -> None:
    """After ``medvision segment``: which atlases were registered and how, and any fallback."""
    for entry in meta.get("atlases") or []:
        deformable = f"; {entry['deformable']}" if entry.get("deformable") else ""
        print(f"  atlas {entry['atlas']} #{entry['member'] + 1}: {entry.get('registration')}{deformable}")
    if meta.get("fallback"):
        print(f"  fallback: {meta['fallback']}")
