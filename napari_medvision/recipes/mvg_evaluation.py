"""Held-out evaluation of an MVG network against plain baselines, with pictures for docs/evaluation/synthesis-mvg.md.

Nothing here was trained on: simulated MR subjects 1000-1002 (the recipe trains on 100-109), the
real CT's slices 20-29 and the DICOM CT phantom (denoising, organs), DRIVE 36-40, OCT B-scan 0002.
PSNR and SSIM are computed in the truth's unit space (``engine.synthesis.unit_scale``), where 0-1
spans the truth's 0.5-99.5 percentiles (MR) or -1000..1000 HU (CT).

    python -m napari_medvision.recipes.mvg_evaluation --weights weights/mvg-generalist.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .. import io
from ..engine.synthesis import resize_slice, unit_scale
from ..models import registry
from ..synthetic import brain_mr
from ..synthetic.ct import LABELS as CT_LABELS
from ..tasks.synthesis_baselines import histogram_matching, identity, intensity_map, linear_map
from ..tasks.synthesis_tasks import TASKS, inpainting_holes, low_dose_ct
from ..tasks.synthesize import _run as run_pairs
from ..tasks.synthesize import _self_inpainting_pairs
from ..volume import Volume
from .common import data_dir
from .ct_organs import real_ct
from .oct_layers import LABELS as OCT_LABELS
from .oct_layers import real_bscan

MR_TASKS = (("T1", "T2"), ("T1", "PD"), ("T2", "T1"))
LOW_DOSE_PHOTONS = 2e4


def image_metrics(output: np.ndarray, truth: np.ndarray, scale, region: np.ndarray | None = None) -> dict:
    """PSNR (dB) and mean per-slice SSIM of ``output`` against ``truth`` in ``scale``'s unit space."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out, ref = scale.to_unit(output), scale.to_unit(truth)
    if region is not None:
        return {"psnr": round(float(peak_signal_noise_ratio(ref[region], out[region], data_range=1.0)), 2)}
    out3, ref3 = np.atleast_3d(out.T).T, np.atleast_3d(ref.T).T
    ssim = np.mean([structural_similarity(r, o, data_range=1.0) for r, o in zip(ref3, out3)])
    return {"psnr": round(float(peak_signal_noise_ratio(ref, out, data_range=1.0)), 2), "ssim": round(float(ssim), 4)}


def _run(network, device, query: Volume, pairs, mask=None) -> Volume:
    hole = None if mask is None else (mask[None] if mask.ndim == 2 else mask)
    return run_pairs(network, query, pairs, hole, device, steps=1, overlap=0.5, batch_size=32,
                     consistency=0.7, progress=None, cancel=None)


def _middle(volume: Volume, keep: float = 0.6) -> Volume:
    n = volume.data.shape[0]
    lo, hi = int(n * (1 - keep) / 2), int(n * (1 + keep) / 2)
    return volume.with_data(np.asarray(volume.data, dtype=np.float32)[lo:hi])


def evaluate_mr(network, device, pictures) -> dict:
    template = data_dir() / "mri_brain_mni152"
    subjects = [brain_mr(seed=s, shape=(80, 112, 96), spacing=(1.8, 1.6, 1.6), template=template)[0]
                for s in (1000, 1001, 1002)]
    results = {}
    for source, target in MR_TASKS:
        prompt = (_middle(subjects[2][source]), _middle(subjects[2][target]))
        scores = {"mvg": [], "identity": [], "histogram matching": [], "linear map": [], "intensity map": []}
        for subject in subjects[:2]:
            query, truth = _middle(subject[source]), _middle(subject[target])
            scale = unit_scale(np.asarray(truth.data), "MR")
            outputs = {
                "mvg": np.asarray(_run(network, device, query, [prompt]).data),
                "identity": identity(np.asarray(query.data), scale, "MR"),
                "histogram matching": histogram_matching(np.asarray(query.data), np.asarray(prompt[1].data)),
                "linear map": linear_map(np.asarray(query.data), np.asarray(prompt[0].data), np.asarray(prompt[1].data)),
                "intensity map": intensity_map(np.asarray(query.data), np.asarray(prompt[0].data),
                                               np.asarray(prompt[1].data), "MR"),
            }
            for name, out in outputs.items():
                scores[name].append(image_metrics(out, np.asarray(truth.data), scale))
            if pictures is not None and subject is subjects[0]:
                _picture(pictures / f"mr_{source}_to_{target}.png",
                         [np.asarray(query.data), np.asarray(prompt[0].data), np.asarray(prompt[1].data),
                          outputs["mvg"], np.asarray(truth.data), outputs["linear map"]])
        results[f"{source}->{target}"] = {k: _mean(v) for k, v in scores.items()}
    return results


def evaluate_ct_denoising(network, device, pictures) -> dict:
    rng = np.random.default_rng(7)
    real, _ = real_ct()
    phantom_dicom = io.load(data_dir() / "dicom_ct_phantom" / "volume.dcm")
    cases = {"TotalSegmentator CT slices 20-29": real.with_data(np.asarray(real.data, np.float32)[20:30]),
             "DICOM CT phantom (7 slices, 512x512)": phantom_dicom.with_data(np.asarray(phantom_dicom.data, np.float32))}
    prompt = TASKS["denoise-ct"].make_examples(0)[0]
    scale = unit_scale(np.zeros(1), "CT")
    results = {}
    for name, clean in cases.items():
        data = np.asarray(clean.data, np.float32)
        noisy = clean.with_data(np.stack([low_dose_ct(s, clean.spacing[-1], LOW_DOSE_PHOTONS, rng) for s in data]))
        outputs = {
            "mvg": np.asarray(_run(network, device, noisy, [prompt]).data),
            "identity": np.asarray(noisy.data),
            "histogram matching": histogram_matching(np.asarray(noisy.data), np.asarray(prompt[1].data)),
            "linear map": linear_map(np.asarray(noisy.data), np.asarray(prompt[0].data), np.asarray(prompt[1].data)),
            "intensity map": intensity_map(np.asarray(noisy.data), np.asarray(prompt[0].data),
                                           np.asarray(prompt[1].data), "CT"),
        }
        # most of a phantom scan is air: PSNR inside the body says more about the tissue
        body = data > -900
        results[name] = {k: {**image_metrics(v, data, scale),
                             "psnr_body": image_metrics(v, data, scale, region=body)["psnr"]}
                         for k, v in outputs.items()}
        if pictures is not None:
            k = len(data) // 2
            _picture(pictures / f"ct_denoise_{'real' if 'Total' in name else 'phantom'}.png",
                     [np.asarray(noisy.data)[k], np.asarray(prompt[0].data)[6], np.asarray(prompt[1].data)[6],
                      outputs["mvg"][k], data[k], outputs["linear map"][k]], ct=True)
    return results


def evaluate_inpainting(network, device, pictures) -> dict:
    from skimage.restoration import inpaint_biharmonic

    rng = np.random.default_rng(11)
    t2 = _middle(brain_mr(seed=1001, shape=(80, 112, 96), spacing=(1.8, 1.6, 1.6),
                          template=data_dir() / "mri_brain_mni152")[0]["T2"])
    real, _ = real_ct()
    cases = {"simulated T2 (subject 1001)": (t2.with_data(np.asarray(t2.data)[::6]), "MR"),
             "TotalSegmentator CT slices 20-29": (real.with_data(np.asarray(real.data, np.float32)[20:30]), "CT")}
    results = {}
    for name, (volume, modality) in cases.items():
        data = np.asarray(volume.data, np.float32)
        holes = np.stack([inpainting_holes(s.shape, rng, area=(0.05, 0.1)) for s in data])
        scale = unit_scale(data, modality)
        query = volume.with_data(data, modality=modality)
        pairs = _self_inpainting_pairs(query, holes, seed=0)
        mvg = np.asarray(_run(network, device, query, pairs, mask=holes).data)
        filled_constant = np.where(holes, scale.from_unit(np.zeros(1))[0], data)
        biharmonic = np.stack([inpaint_biharmonic(s, h) for s, h in zip(data, holes)])
        results[name] = {
            "mvg": image_metrics(mvg, data, scale, region=holes),
            "identity (hole left empty)": image_metrics(filled_constant, data, scale, region=holes),
            "biharmonic inpainting (scikit-image)": image_metrics(biharmonic, data, scale, region=holes),
        }
        if pictures is not None:
            k = len(data) // 2
            _picture(pictures / f"inpaint_{modality.lower()}.png",
                     [filled_constant[k], np.asarray(pairs[0][0].data)[k], np.asarray(pairs[0][1].data)[k], mvg[k],
                      data[k], biharmonic[k]], ct=modality == "CT")
    return results


def _shipped_metric(model_id: str, key_start: str, field: str | None = None):
    """The shipped TransUNet's own held-out number on the same images, read from its card (None without
    the model): MVG's segmentation is compared with the specialist, not with a remembered figure."""
    cards = {card.id: card for card in registry.available() if card.source == "shipped"}
    if model_id not in cards:
        return None
    value = next(v for k, v in cards[model_id].metrics.items() if k.startswith(key_start))
    return value[field] if field is not None else value


def evaluate_segmentation(network, device, pictures) -> dict:
    from .fundus_vessels import HELD_OUT_IDS, load_drive
    results = {}
    root = data_dir() / "fundus_drive_train"
    prompt_photo = io.load(root / "images" / "21_training.tif")
    prompt_vessels = io.load(root / "1st_manual" / "21_manual1.gif")
    prompt_vessels = prompt_vessels.with_data((np.asarray(prompt_vessels.data) > 0).astype(np.uint8), labels={1: "vessel"})
    _, vessels, fovs = load_drive(root, HELD_OUT_IDS)
    dice = []
    for i, truth, fov in zip(HELD_OUT_IDS, vessels, fovs):
        photo = io.load(root / "images" / f"{i}_training.tif")
        out = np.asarray(_run(network, device, photo, [(prompt_photo, prompt_vessels)]).data)
        dice.append(_dice(out[fov] == 1, truth[fov] == 1))
        if pictures is not None and i == HELD_OUT_IDS[0]:
            _picture(pictures / "segment_fundus.png", [np.asarray(photo.data)[..., 1], np.asarray(prompt_photo.data)[..., 1],
                                                      np.asarray(prompt_vessels.data), out, truth], labels_from=2)
    results["fundus vessels, DRIVE 36-40 in the field of view (prompt: DRIVE 21)"] = {
        "dice": round(float(np.mean(dice)), 4),
        "transunet fundus-vessels-2d dice": _shipped_metric("fundus-vessels-2d", "DRIVE training images 36-40", "dice")}

    def oct_volume(name, downsample):
        image, labels = real_bscan(name)
        image, labels = image[0][::downsample, ::downsample], labels[::downsample, ::downsample]
        spacing = (float(downsample), float(downsample))
        return (Volume(image.astype(np.float32), spacing=spacing, modality="OCT"),
                Volume(labels.astype(np.uint8), spacing=spacing, labels=dict(OCT_LABELS), modality="OCT"))

    prompt = oct_volume("exampleOCTimage0001.tif", 2)
    query, truth = oct_volume("exampleOCTimage0002.tif", 1)
    out = np.asarray(_run(network, device, query, [prompt]).data)
    per_layer = {name: round(_dice(out == k, np.asarray(truth.data) == k), 4) for k, name in OCT_LABELS.items()}
    results["OCT layers, real B-scan 0002 (prompt: B-scan 0001)"] = {
        "dice": per_layer, "mean dice": round(float(np.mean(list(per_layer.values()))), 4),
        "transunet oct-retinal-layers-2d mean dice": _shipped_metric("oct-retinal-layers-2d",
                                                                     "mean dice, real held-out B-scan")}
    if pictures is not None:
        _picture(pictures / "segment_oct.png", [np.asarray(query.data), np.asarray(prompt[0].data),
                                                np.asarray(prompt[1].data), out, np.asarray(truth.data)], labels_from=2)

    image, labels = real_ct()
    spacing = image.spacing
    prompt_pair = (image.with_data(np.asarray(image.data, np.float32)[0:17]),
                   Volume(labels[0:17].astype(np.uint8), spacing=spacing, labels=dict(CT_LABELS), modality="CT"))
    query = image.with_data(np.asarray(image.data, np.float32)[20:30])
    out = np.asarray(_run(network, device, query, [prompt_pair]).data)
    truth = labels[20:30]
    ids = {name: i for i, name in CT_LABELS.items()}
    organs = {name: round(_dice(out == ids[name], truth == ids[name]), 4)
              for name in ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta", "vertebrae")
              if (truth == ids[name]).any()}
    results["CT organs, real CT slices 20-29 (prompt: slices 0-16 of the same scan)"] = {
        "dice": organs, "transunet ct-abdomen-organs-3d liver dice": _shipped_metric(
            "ct-abdomen-organs-3d", "dice, TotalSegmentator example_ct_sm slices 20-29", "liver")}
    if pictures is not None:
        k = 5
        _picture(pictures / "segment_ct.png", [np.asarray(query.data)[k], np.asarray(prompt_pair[0].data)[8],
                                               np.asarray(prompt_pair[1].data)[8], out[k], truth[k]], ct=True, labels_from=2)
    return results


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denominator = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denominator) if denominator else float("nan")


def _mean(scores: list[dict]) -> dict:
    return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}


def _picture(path: Path, panels: list[np.ndarray], ct: bool = False, labels_from: int | None = None) -> None:
    """One PNG row: query, prompt image, prompt target, MVG output, truth[, baseline], each scaled for viewing."""
    import imageio.v3 as iio

    height = 192
    tiles = []
    for k, panel in enumerate(panels):
        panel = np.asarray(panel, np.float32)
        if panel.ndim == 3:
            panel = panel[len(panel) // 2]
        if labels_from is not None and k >= labels_from:
            panel = panel / max(float(panel.max()), 1.0)
        elif ct:
            panel = np.clip((panel + 250) / 700, 0, 1)
        else:
            panel = unit_scale(panel).to_unit(panel).clip(0, 1)
        width = max(8, int(round(panel.shape[1] * height / panel.shape[0])))
        tiles.append(resize_slice(panel.clip(0, 1), (height, width)))
        tiles.append(np.ones((height, 4), np.float32))
    iio.imwrite(path, (np.concatenate(tiles[:-1], axis=1) * 255).astype(np.uint8))


def evaluate(network, device: str, pictures: Path | None = None, log=print) -> dict:
    """All held-out metrics of ``network`` (an MVG in eval mode) as a card-ready dict."""
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for name, run in (("MR contrast synthesis, simulated subjects 1000-1001 (prompt: subject 1002)", evaluate_mr),
                      ("CT denoising, simulated low dose (2e4 photons; prompt: the denoise-ct phantom pair)",
                       evaluate_ct_denoising),
                      ("inpainting, PSNR inside the holes (prompt: the image itself with other holes)",
                       evaluate_inpainting),
                      ("segmentation as generation", evaluate_segmentation)):
        metrics[name] = run(network, device, pictures)
        log(json.dumps({name: metrics[name]}))
    return metrics


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from ..models.mvg import build_mvg

    parser = argparse.ArgumentParser(description="Evaluate MVG weights on held-out data")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--pictures", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    network = build_mvg({"preset": args.preset})
    network.load_state_dict(load_file(str(args.weights)))
    network.to(args.device).eval()
    print(json.dumps(evaluate(network, args.device, args.pictures), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
