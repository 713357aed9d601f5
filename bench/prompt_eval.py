"""Prompting evaluation: Dice against the number of annotated slices or example scans, on real data.

For each dataset the method (``mv.prompt``, leave-one-out choice), its parts alone (the spatial
prior: slice propagation or registered examples; the appearance head) and the baselines (slice
copy; affine registration of one example) are scored with Dice against the reference labels.
Prints one JSON line per measurement and, with ``--table``, writes a markdown table.

    python bench/prompt_eval.py                         # all datasets, CPU, about 30 minutes
    python bench/prompt_eval.py --only ct_slices --table docs/prompt_table.md
    python bench/prompt_eval.py --only fundus oct       # 2D examples against the shipped networks

Fundus: the targets are DRIVE training photos 36-40, which neither the shipped
``fundus-vessels-2d`` (trained on 21-33, checkpoint chosen on 34-35) nor the 2D prompting
features (chosen on targets 21-35) saw; the examples are photos 31-33. OCT: the real B-scan
``exampleOCTimage0001`` is the example for ``exampleOCTimage0002``, which ``oct-retinal-layers-2d``
did not train on; the reverse direction has no network to compare with (it trained on 0001).

Data: ``$MEDVISION_DATA`` or ``../shared/data`` (see tests/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import napari_medvision as mv  # noqa: E402
from napari_medvision.tasks.prompting.baselines import affine_registration, slice_copy  # noqa: E402
from napari_medvision.volume import Volume  # noqa: E402

DATA = Path(os.environ.get("MEDVISION_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ORGANS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left"}  # TotalSegmentator ids (CT and MR)


def mean_dice(pred, truth, ids, fov=None) -> float:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if fov is not None:
        pred, truth = np.where(fov, pred, 0), np.where(fov, truth, 0)
    out = []
    for k in ids:
        p, t = pred == k, truth == k
        if p.sum() + t.sum():
            out.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    return float(np.mean(out))


def spread(labels: np.ndarray, n: int) -> list[int]:
    """``n`` slices evenly spread over the extent of the labels (what a user would paint)."""
    z = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))
    return sorted({int(z[0] + (i + 0.5) * (z[-1] - z[0] + 1) / n) for i in range(n)})


def emit(rows, **row):
    row = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
    rows.append(row)
    print(json.dumps(row), flush=True)


# --- datasets ------------------------------------------------------------------------------------

def organs(kind: str):
    image = mv.load(DATA / "ct_mr_totalseg" / ("example_ct_sm.nii.gz" if kind == "CT" else "example_mr_sm.nii.gz"))
    seg = mv.load(DATA / "ct_mr_totalseg" / ("example_seg.nii.gz" if kind == "CT" else "example_seg_mr.nii.gz"))
    data = np.where(np.isin(seg.data, list(ORGANS)), seg.data, 0).astype(np.uint8)
    return image, seg.with_data(data, labels=dict(ORGANS))


def brain():
    """MNI152 T1 at 2 mm with grey / white matter (probability > 50 %) as labels 1 / 2."""
    folder = DATA / "mri_brain_mni152"
    t1 = mv.load(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = np.asarray(mv.load(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").data)[::2, ::2, ::2]
    wm = np.asarray(mv.load(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").data)[::2, ::2, ::2]
    geometry = dict(spacing=tuple(2 * s for s in t1.spacing), origin=t1.origin, direction=t1.direction)
    image = Volume(np.asarray(t1.data)[::2, ::2, ::2], modality="MR", **geometry)
    labels = np.zeros(gm.shape, np.uint8)
    labels[gm > 127] = 1
    labels[wm > 127] = 2
    return image, Volume(labels, labels={1: "grey_matter", 2: "white_matter"}, **geometry)


def drive_full(i: int):
    """DRIVE photo ``i`` at full resolution (565 x 584), its manual vessels and field of view."""
    folder = DATA / "fundus_drive_train"
    image = mv.load(folder / f"images/{i}_training.tif")
    vessels = np.asarray(mv.load(folder / f"1st_manual/{i}_manual1.gif").data) > 0
    fov = np.asarray(mv.load(folder / f"mask/{i}_training_mask.gif").data) > 0
    return image, Volume(vessels.astype(np.uint8), spacing=image.spacing, labels={1: "vessel"}), fov


OCT_LAYERS = {1: "RNFL", 2: "GCL+IPL", 3: "INL", 4: "OPL", 5: "ONL+IS", 6: "OS+RPE"}


def oct_bscan(name: str):
    """A real B-scan (modality OCT), its six layers from the stored boundaries, and its columns with
    every boundary defined (Dice is taken there, as in the model card)."""
    from napari_medvision.recipes.oct_layers import BOUNDARIES, regions_from_boundaries

    folder = DATA / "oct_bscans_layers"
    image = mv.load(folder / name)
    image = Volume(np.asarray(image.data), spacing=image.spacing, modality="OCT")
    table = json.loads((folder / "boundaries_row_per_column.json").read_text())[name]
    rows = {b: np.array([np.nan if v is None else v for v in table[b]], dtype=float) for b in BOUNDARIES}
    valid = np.all([np.isfinite(r) for r in rows.values()], axis=0)
    layers = regions_from_boundaries({b: np.nan_to_num(r, nan=-1) for b, r in rows.items()}, image.data.shape[0])
    return image, Volume(layers.astype(np.uint8), spacing=image.spacing, labels=dict(OCT_LAYERS)), valid


def phantom(seed: int):
    from napari_medvision.synthetic import ct_abdomen

    image, labels = ct_abdomen(seed=seed, shape=(40, 100, 120), spacing=(3.0, 3.0, 3.0))
    keep = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
    return image, labels.with_data(np.where(np.isin(labels.data, list(keep)), labels.data, 0).astype(np.uint8),
                                   labels=keep)


# --- experiments ---------------------------------------------------------------------------------

def slices_experiment(rows, name, image, truth, counts):
    ids = sorted(int(k) for k in np.unique(truth.data) if k)
    for n in counts:
        chosen = spread(np.asarray(truth.data), n)
        painted = np.zeros_like(truth.data)
        painted[chosen] = np.asarray(truth.data)[chosen]
        annotations = truth.with_data(painted)
        common = dict(dataset=name, prompts=f"{n} slices", n=n)
        start = time.time()
        result = mv.prompt(image, annotations=annotations, device="cpu")
        seconds = time.time() - start
        expected = [d for d in result.meta["expected_dice"].values() if d is not None]
        emit(rows, **common, method="prompt", dice=mean_dice(result.data, truth.data, ids), seconds=seconds,
             choice=result.meta["choice"], expected=float(np.mean(expected)) if expected else None)
        for variant in ("propagation", "appearance"):
            part = mv.prompt(image, annotations=annotations, variant=variant, device="cpu")
            emit(rows, **common, method=f"{variant} alone", dice=mean_dice(part.data, truth.data, ids))
        emit(rows, **common, method="slice copy", dice=mean_dice(slice_copy(annotations).data, truth.data, ids))


def examples_experiment(rows, name, target, truth, examples, counts, fov=None, parts=("registration", "appearance"),
                        every_subset=False):
    """Dice with the first ``n`` examples for each ``n`` in ``counts``.

    every_subset: instead, the mean over every choice of ``n`` of the examples (each row also
    lists the subsets' Dice), so that one poor example in a fixed order does not decide the curve.
    """
    ids = sorted(int(k) for k in np.unique(truth.data) if k)
    names = [truth.labels[k] for k in ids]
    affine = [mean_dice(_renamed(affine_registration(target, *pair), truth).data, truth.data, ids, fov)
              for pair in (examples if every_subset else examples[:1])]
    emit(rows, dataset=name, prompts="1 example", n=1, method="affine registration", dice=float(np.mean(affine)),
         **({"subsets": [round(d, 3) for d in affine]} if every_subset else {}))
    for n in counts:
        common = dict(dataset=name, prompts=f"{n} example{'s' * (n > 1)}", n=n)
        chosen = list(combinations(range(len(examples)), n)) if every_subset else [tuple(range(n))]
        runs = {"prompt": [], **{f"{v} alone": [] for v in parts}}
        choices, expected, start = [], [], time.time()
        for subset in chosen:
            given = [examples[i] for i in subset]
            result = _renamed(mv.prompt(target, examples=given, labels=names, device="cpu"), truth)
            runs["prompt"].append(mean_dice(result.data, truth.data, ids, fov))
            choices.append(result.meta["choice"])
            found = [d for d in result.meta["expected_dice"].values() if d is not None]
            expected.append(float(np.mean(found)) if found else None)
            for variant in parts:
                part = _renamed(mv.prompt(target, examples=given, labels=names, variant=variant, device="cpu"), truth)
                runs[f"{variant} alone"].append(mean_dice(part.data, truth.data, ids, fov))
        seconds = (time.time() - start) / len(chosen)
        known = [e for e in expected if e is not None]
        for method, dice in runs.items():
            extra = dict(seconds=seconds, choice="/".join(sorted(set(choices))),
                         expected=float(np.mean(known)) if known else None) if method == "prompt" else {}
            if every_subset:
                extra["subsets"] = [round(d, 3) for d in dice]
            emit(rows, **common, method=method, dice=float(np.mean(dice)), **extra)


def fundus_experiment(rows, targets, example_ids, counts):
    """Vessels of each target photo from the first ``n`` of ``example_ids``, against the shipped network."""
    examples = [drive_full(i)[:2] for i in example_ids]
    per_count = {n: [] for n in counts}
    network = []
    for target_id in targets:
        target, truth, fov = drive_full(target_id)
        name = f"fundus vessels, DRIVE {example_ids[0]}-{example_ids[-1]} -> {target_id} (full res.)"
        for n in counts:
            start = time.time()
            result = mv.prompt(target, examples=examples[:n], device="cpu")
            dice = mean_dice(result.data, truth.data, [1], fov)
            per_count[n].append(dice)
            expected = result.meta["expected_dice"].get("vessel")
            emit(rows, dataset=name, prompts=f"{n} example{'s' * (n > 1)}", n=n, method="prompt", dice=dice,
                 seconds=time.time() - start, choice=f"threshold {result.meta['threshold']}", expected=expected)
        segmented = mv.segment(target, model="fundus-vessels-2d", device="cpu")
        network.append(mean_dice(segmented.data, truth.data, [1], fov))
        emit(rows, dataset=name, prompts="none", n=0, method="fundus-vessels-2d (network)", dice=network[-1])
    name = f"fundus vessels, DRIVE {example_ids[0]}-{example_ids[-1]} -> mean of {targets[0]}-{targets[-1]} (full res.)"
    for n in counts:
        emit(rows, dataset=name, prompts=f"{n} example{'s' * (n > 1)}", n=n, method="prompt",
             dice=float(np.mean(per_count[n])), per_target=[round(d, 3) for d in per_count[n]])
    emit(rows, dataset=name, prompts="none", n=0, method="fundus-vessels-2d (network)", dice=float(np.mean(network)),
         per_target=[round(d, 3) for d in network])


def oct_experiment(rows, example_name, target_name, network=True):
    """Layers of one real B-scan from the other, Dice per layer on the target's defined columns."""
    example, example_layers, _ = oct_bscan(example_name)
    target, truth, valid = oct_bscan(target_name)
    name = f"OCT layers, real B-scan {example_name[-8:-4]} -> {target_name[-8:-4]}"

    def per_layer(pred):
        pred, ref = np.asarray(pred)[:, valid], np.asarray(truth.data)[:, valid]
        return {layer: mean_dice(pred, ref, [k]) for k, layer in OCT_LAYERS.items()}

    start = time.time()
    result = mv.prompt(target, examples=[(example, example_layers)], device="cpu")
    layers = per_layer(result.data)
    emit(rows, dataset=name, prompts="1 example", n=1, method="prompt", dice=float(np.mean(list(layers.values()))),
         seconds=time.time() - start, choice="layered" if result.meta["layered"] else "", layers=layers)
    if network:
        segmented = mv.segment(target, model="oct-retinal-layers-2d", device="cpu")
        layers = per_layer(segmented.data)
        emit(rows, dataset=name, prompts="none", n=0, method="oct-retinal-layers-2d (network)",
             dice=float(np.mean(list(layers.values()))), layers=layers)


def _renamed(result, truth):
    """``result`` with its label ids changed to ``truth``'s, matched by name."""
    by_name = {v: k for k, v in truth.labels.items()}
    lookup = np.zeros(max(result.labels) + 1, dtype=np.uint8)
    for k, v in result.labels.items():
        lookup[k] = by_name.get(v, 0)
    return result.with_data(lookup[np.asarray(result.data)], labels=dict(truth.labels))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="datasets to run (default: all)")
    parser.add_argument("--table", help="write a markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    run = lambda key: not args.only or key in args.only  # noqa: E731
    if run("ct_slices"):
        slices_experiment(rows, "CT organs, in-volume (real)", *organs("CT"), (1, 2, 3, 5))
    if run("mr_slices"):
        slices_experiment(rows, "MR organs, in-volume (real)", *organs("MR"), (1, 2, 3, 5))
    if run("brain_slices"):
        slices_experiment(rows, "brain GM/WM, in-volume (MNI152, 2 mm)", *brain(), (1, 2, 3, 5))
    if run("fundus"):  # photos neither the network nor the photo features were tuned on
        fundus_experiment(rows, (36, 37, 38, 39, 40), (31, 32, 33), (1, 2, 3))
    if run("oct"):
        oct_experiment(rows, "exampleOCTimage0001.tif", "exampleOCTimage0002.tif")
        oct_experiment(rows, "exampleOCTimage0002.tif", "exampleOCTimage0001.tif", network=False)
    if run("ct_mr_cross"):  # the two real labelled scans, each the example for the other
        (ct, ct_truth), (mr, mr_truth) = organs("CT"), organs("MR")
        examples_experiment(rows, "organs, real CT -> real MR", mr, mr_truth, [(ct, ct_truth)], (1,),
                            parts=("registration", "appearance", "adapted"))
        examples_experiment(rows, "organs, real MR -> real CT", ct, ct_truth, [(mr, mr_truth)], (1,),
                            parts=("registration", "appearance", "adapted"))
    if run("ct_cross"):
        phantoms = [phantom(s) for s in (1, 2, 3, 5)]
        parts = ("registration", "appearance", "adapted")
        examples_experiment(rows, "CT organs, phantoms -> real CT (mean over every choice of 4)", *organs("CT"),
                            phantoms, (1, 2, 3), parts=parts, every_subset=True)
        target, truth = phantom(4)
        examples_experiment(rows, "CT organs, real CT -> phantom", target, truth, [organs("CT")], (1,), parts=parts)
    if args.table:
        write_table(rows, Path(args.table))
    return 0


def write_table(rows, path: Path) -> None:
    lines = ["| dataset | prompt | method | Dice | LOO estimate | choice | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = "" if r.get("expected") is None else f"{r['expected']:.3f}"
        sec = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['dataset']} | {r['prompts']} | {r['method']} | {r['dice']:.3f} | {est} | "
                     f"{r.get('choice', '')} | {sec} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
