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

import numpy as np

from . import io, models
from ._demo import run_demo
from .cli_atlases import add_parser as add_atlases_parser
from .cli_atlases import print_atlas_use
from .engine.progress import terminal_progress
from .io import ReadError, WriteError
from .tasks.finetune import ANCHOR, FinetuneOptions, finetune
from .tasks.segment import SEGMENT_OVERLAP, segment
from .tasks.synthesis_tasks import TASKS
from .tasks.synthesize import synthesize


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

    seg = sub.add_parser("segment", help="segment an image with a model; writes a label map")
    seg.add_argument("input", nargs="?", help="image file or folder (or MR contrasts by --flair/--t1c/--t1/--t2)")
    seg.add_argument("-o", "--output", required=True, help="label map to write (.nii.gz, .nrrd, .mha, .ome.zarr, ...)")
    seg.add_argument("--model", required=True, help="model id (see `medvision models`) or checkpoint path")
    for contrast in ("flair", "t1c", "t1", "t2"):  # multi-contrast models; the first given sets the grid
        seg.add_argument(f"--{contrast}", help=f"{contrast.upper()} image of the subject (any subset)")
    seg.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    seg.add_argument("--overlap", type=float, default=SEGMENT_OVERLAP, help="sliding-window overlap, 0-0.9")
    seg.add_argument("--series", help="DICOM series to read when a folder holds several (index or UID)")
    seg.set_defaults(run=_segment)

    tune = sub.add_parser("finetune", help="fine-tune a model on corrected label maps; saves a new user model")
    tune.add_argument("model", help="model id (see `medvision models`), checkpoint path, or prompt-head for a "
                                    "new prompting head (pixel classifier trained on the corrections alone)")
    tune.add_argument("--image", action="append", required=True, help="image file or folder (repeat for several)")
    tune.add_argument("--labels", action="append", required=True,
                      help="corrected label map on that image's grid (one per --image, same order)")
    tune.add_argument("--slices", action="append", default=None,
                      help="corrected slice indices along axis 0, e.g. 3,7,12 (one per --image; default: "
                           "every labelled slice)")
    tune.add_argument("--steps", type=int, default=None, help="optimiser steps at most (default 200)")
    tune.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    tune.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    tune.add_argument("--freeze-encoder", action="store_true", help="with --method network: train the decoder only")
    tune.add_argument("--method", choices=("tail", "network"), default="tail",
                      help="tail (default): the output head on the frozen network's features, every uncorrected "
                           "voxel and untouched label held to the parent; network: the whole network")
    tune.add_argument("--corrected-labels", default=None,
                      help="the labels the corrections speak for, comma-separated ids or names (default: those painted)")
    tune.add_argument("--no-guard", action="store_true",
                      help="save even if the new model does not beat the parent on held-out corrected slices")
    tune.add_argument("--anchor", type=float, default=None,
                      help="L2-SP strength toward the parent's weights: less forgetting (0: off; default 0.3)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--id", dest="new_id", default=None, help="id of the new model (default <model>-ft-<time>)")
    tune.set_defaults(run=_finetune)

    pr = sub.add_parser("prompt", help="segment from a few annotated slices or from example scans; no training")
    pr.add_argument("input", help="image file or folder to segment")
    pr.add_argument("-o", "--output", required=True, help="label map to write (.nii.gz, .nrrd, .mha, .ome.zarr, ...)")
    given = pr.add_mutually_exclusive_group(required=True)
    given.add_argument("--annotations", help="label map on the input's grid with a few slices (axis 0) painted")
    given.add_argument("--example", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                       help="another scan and its label map; repeat for several")
    pr.add_argument("--slices", help="annotated slices, comma-separated (default: those with any label)")
    pr.add_argument("--labels", help="only these labels, comma-separated ids or names")
    pr.add_argument("--model", default=None, help="DINO backbone (model id or checkpoint) for extra features")
    pr.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    pr.set_defaults(run=_prompt)

    syn = sub.add_parser("synthesize", help="generate a new image (or label map) from an example pair: "
                         "another contrast, denoised, inpainted, segmented")
    syn.add_argument("input", nargs="?", help="image file or folder")
    syn.add_argument("-o", "--output", help="image to write (.nii.gz, .nrrd, .mha, .ome.zarr, .png, ...)")
    syn.add_argument("--model", default="mvg-generalist", help="MVG model id or checkpoint (default mvg-generalist)")
    syn.add_argument("--task", help="a named task (see --list-tasks): T1/T2/FLAIR run models fitted on real "
                     "brains, the others a simulated example for MVG")
    syn.add_argument("--example", nargs=2, action="append", metavar=("IMAGE", "TARGET"),
                     help="an image and what should become of it (the task, shown); repeat to average several")
    syn.add_argument("--mask", help="for inpainting: a mask on the input's grid, non-zero where to fill in")
    syn.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    syn.add_argument("--steps", type=int, default=1, help="1: one pass; more: generate autoregressively in chunks")
    syn.add_argument("--consistency", type=float, default=0.7,
                     help="smoothing along slices of 3D volumes, in slices (0: off)")
    syn.add_argument("--overlap", type=float, default=0.5, help="tile overlap, 0-0.9")
    syn.add_argument("--seed", type=int, default=0, help="seed of a named task's simulated example")
    syn.add_argument("--list-tasks", action="store_true", help="print the named tasks and exit")
    syn.set_defaults(run=_synthesize)

    meas = sub.add_parser("measure", help="per-label volume (mL), voxel count, mean intensity; Dice/HD95 "
                          "against a reference label map; CSV out")
    meas.add_argument("labels", help="label map file")
    meas.add_argument("--image", help="image on the same grid: adds each label's mean intensity")
    meas.add_argument("--reference", help="reference label map on the same grid: adds Dice and HD95 (mm)")
    meas.add_argument("-o", "--output", help="write the CSV here (default: print it)")
    meas.set_defaults(run=_measure)

    prefer = sub.add_parser("prefer-reader", help="make napari open NIfTI, DICOM, NRRD/MHA and vendor OCT files "
                            "with MedVision without asking which reader (writes napari's settings)")
    prefer.add_argument("--pictures", action="store_true", help="also PNG/JPEG/TIFF and plain zarr")
    prefer.set_defaults(run=_prefer_reader)

    models = sub.add_parser("models", help="list shipped and user models")
    models.add_argument("--modality", help="only models for this modality (CT, MR, OCT, fundus)")
    models.add_argument("--json", action="store_true", help="print the cards as JSON")
    models.add_argument("--markdown", action="store_true", help="print a Markdown table of the cards (docs/models.md)")
    models.add_argument("--versions", metavar="ID", help="list the versions in this model's line (parents, fine-tunes)")
    models.add_argument("--rollback", metavar="ID", help="make this version the current one of its line")
    models.set_defaults(run=_models)

    add_atlases_parser(sub)

    bat = sub.add_parser("batch", help="run segment / synthesize / prompt over a cohort on Dask; resumable, "
                         "a failed scan is an error row")
    bat.add_argument("inputs", help="folder of scans (a file, zarr store or DICOM series each), glob, or CSV with a path column")
    bat.add_argument("-o", "--output", required=True, help="output folder: a result per scan, results.csv")
    bat.add_argument("--task", default="segment", choices=("segment", "synthesize", "prompt"))
    bat.add_argument("--model", help="model id or checkpoint (segment: required)")
    bat.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786 (default: a "
                                          "local cluster on this machine)")
    bat.add_argument("--workers", type=int, help="local cluster workers (default: cores, one per 4 GiB)")
    bat.add_argument("--example", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                     help="prompt: an example scan and its label map, for every scan; repeat for several")
    bat.add_argument("--rtstruct", action="store_true", help="DICOM scans: write an RTSTRUCT beside the DICOM SEG")
    bat.add_argument("--no-resume", action="store_true", help="recompute scans already done for the same input and model")
    bat.add_argument("--device", default=None, help="cuda, mps or cpu on the workers (default: best available)")
    bat.set_defaults(run=_batch)

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
    options = _series_option(args)
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


def _series_option(args) -> dict:
    if getattr(args, "series", None) is None:
        return {}
    return {"series": int(args.series) if args.series.isdigit() else args.series}


def _segment(args) -> int:
    from .tasks.contrasts import contrasts_from_arguments

    volume = contrasts_from_arguments(args) or io.load(args.input, **_series_option(args))
    labels = segment(volume, model=args.model, device=args.device, overlap=args.overlap,
                     progress=terminal_progress("segment "))
    io.save(labels, args.output)
    found = sorted(labels.labels[v] for v in set(int(x) for x in _unique(labels.data)) if v in labels.labels)
    print(f"wrote {args.output}: {len(found)} structures found ({', '.join(found)})")
    print_atlas_use(labels.meta)
    for region, ml in labels.meta.get("volumes_ml", {}).items():
        print(f"  {region}: {ml} mL")
    return 0


def _prefer_reader(args) -> int:
    from ._napari.reader_preference import prefer_medvision_reader

    patterns = prefer_medvision_reader(pictures=args.pictures)
    print(f"napari now opens {', '.join(sorted(patterns))} with MedVision")
    return 0


def _measure(args) -> int:
    from .tasks.measure import measure, measure_csv

    labels = io.load(args.labels)
    image = io.load(args.image) if args.image else None
    reference = io.load(args.reference) if args.reference else None
    text = measure_csv(measure(labels, image=image, reference=reference))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def _finetune(args) -> int:
    if len(args.labels) != len(args.image):
        raise ValueError(f"{len(args.image)} --image but {len(args.labels)} --labels: give one label map per image")
    slices = None
    if args.slices:
        if len(args.slices) != len(args.image):
            raise ValueError(f"{len(args.image)} --image but {len(args.slices)} --slices: give one list per image")
        try:
            slices = [[int(s) for s in text.split(",") if s.strip()] for text in args.slices]
        except ValueError:
            raise ValueError(f"--slices takes comma-separated slice numbers such as 3,7,12, got {args.slices}")
    images = [io.load(path) for path in args.image]
    labels = [io.load(path) for path in args.labels]
    for volume, path in zip(images + labels, args.image + args.labels):
        volume.meta.setdefault("name", Path(path).name)
    corrected = [x.strip() for x in args.corrected_labels.split(",") if x.strip()] if args.corrected_labels else None
    options = FinetuneOptions(
        method=args.method, steps=args.steps, time_budget_s=args.time_budget, device=args.device,
        freeze_encoder=args.freeze_encoder, anchor=ANCHOR if args.anchor is None else args.anchor, seed=args.seed,
        new_id=args.new_id, corrected_labels=corrected, guard=not args.no_guard)
    # a refusal by the guard is a ValueError: one line with the figures, exit status 2, parent kept
    card = finetune(args.model, images, labels, slices, options, progress=terminal_progress("finetune "))
    print(f"saved model {card.id} in {card.weights_path.parent} ({card.training['steps']} steps, "
          f"{card.training['wall_time_s']} s)")
    for name, value in card.metrics.items():
        print(f"{name}: {value}")
    return 0


def _prompt(args) -> int:
    from .tasks.prompting import prompt

    volume = io.load(args.input)
    options = dict(model=args.model, device=args.device, progress=terminal_progress("prompt "))
    if args.labels:
        options["labels"] = [x.strip() for x in args.labels.split(",") if x.strip()]
    if args.annotations:
        if args.slices:
            options["annotated_slices"] = [int(x) for x in args.slices.split(",") if x.strip()]
        labels = prompt(volume, annotations=io.load(args.annotations), **options)
    else:
        labels = prompt(volume, examples=[(io.load(i), io.load(m)) for i, m in args.example], **options)
    io.save(labels, args.output)
    expected = ", ".join(f"{name} {'n/a' if d is None else f'{d:.2f}'}"
                         for name, d in labels.meta["expected_dice"].items())
    print(f"wrote {args.output}: {labels.meta['choice']}; expected Dice (leave-one-out): {expected}")
    return 0


def _synthesize(args) -> int:
    if args.list_tasks:
        for name in sorted(TASKS):
            print(f"{name:24s} {TASKS[name].description}")
        return 0
    if not args.input or not args.output:
        raise ValueError("give an input image and -o/--output (or --list-tasks)")
    if args.task is None and not args.example:
        raise ValueError("say what to synthesize: --task NAME (see --list-tasks) or --example IMAGE TARGET")
    volume = io.load(args.input)
    examples = [(io.load(image), io.load(target)) for image, target in args.example or ()]
    result = synthesize(volume, model=args.model, task=args.task, examples=examples or None,
                        mask=io.load(args.mask) if args.mask else None, device=args.device, steps=args.steps,
                        overlap=args.overlap, consistency=args.consistency, seed=args.seed,
                        progress=terminal_progress("synthesize "))
    io.save(result, args.output)
    shape = "x".join(str(n) for n in result.data.shape)
    if result.is_labels:
        found = sorted(result.labels[v] for v in set(int(x) for x in _unique(result.data)) if v in result.labels)
        print(f"wrote {args.output}: label map {shape}, {len(found)} structures ({', '.join(found)})")
    else:
        print(f"wrote {args.output}: image {shape}, values {float(result.data.min()):.4g} to "
              f"{float(result.data.max()):.4g}")
    return 0


def _unique(data):
    return np.unique(np.asarray(data))


def _models(args) -> int:
    if args.rollback:
        chosen = models.rollback(args.rollback)
        print(f"{chosen} is now the current version of {models.versions(chosen)[0]['id']}'s line")
        return 0
    if args.versions:
        for v in models.versions(args.versions):
            gain = "" if v["gain"] is None else f" gain {v['gain']:+.3f}"
            print(f"{'*' if v['current'] else ' '} {v['id']:36s} {v['source']:8s} parent {v['parent'] or '-'}"
                  f" {v['date'] or ''}{gain}")
        return 0
    cards = models.available(modality=args.modality)
    if args.json:
        print(json.dumps([c.to_json() for c in cards]))
        return 0
    if args.markdown:
        print(_markdown_index(cards))
        return 0
    if not cards:
        print("no models found")
    for card in cards:
        labels = ", ".join((card.labels or {}).values())
        print(f"{card.id:28s} {card.modality:7s} {card.source:8s} {card.architecture.get('name', '')}: {labels}")
    return 0


def _markdown_index(cards) -> str:
    """One short row per model, for docs/models.md; the card keeps the full figures."""
    lines = ["| model | what it does | modality | headline, on real data it never saw | trained on | licence |",
             "|---|---|---|---|---|---|"]
    for card in cards:
        training, metrics = card.training or {}, card.metrics or {}
        headline = metrics.get("headline") or next(
            (f"{name}: {_short_metric(value)}" for name, value in metrics.items() if name != "per_image"), "")
        cells = [f"`{card.id}`", _short_metric(card.description, first_clause=True), card.modality,
                 _short_metric(headline), _short_metric(training.get("summary") or training.get("data", "")),
                 _short_metric(card.license)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def _short_metric(value, words: int = 25, first_clause: bool = False) -> str:
    """A table cell: floats to 3 decimals, text cut to `words` words (and to its first clause if asked)."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        value = ", ".join(f"{k} ({_short_metric(v, words)})" if isinstance(v, dict) else f"{k} {_short_metric(v, words)}"
                          for k, v in value.items())
    text, depth = str(value), 0
    for i, ch in enumerate(text if first_clause else ""):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and text[i:i + 2] in ("; ", ": "):
            text = text[:i]
            break
    cut = text.split()
    return " ".join(cut[:words]) + (" …" if len(cut) > words else "")


def _batch(args) -> int:
    from .batch import batch
    options = {"examples": [tuple(pair) for pair in args.example]} if args.example else {}
    result = batch(args.inputs, args.output, task=args.task, model=args.model, scheduler=args.scheduler,
                   n_workers=args.workers, resume=not args.no_resume, rtstruct=args.rtstruct, device=args.device,
                   progress=terminal_progress("batch "), **options)
    print(result)
    for record in result.records:
        if record["status"] == "error":
            print(f"failed: {record['scan_id']}: {record['error']}", file=sys.stderr)
    return 1 if result.failed else 0


def _demo(args) -> int:
    result = run_demo(Path(args.output), headless=args.headless or not _display_available())
    print(json.dumps(result, indent=1))
    return 0


def _display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if __name__ == "__main__":
    sys.exit(main())
