"""Recipe: our own medical DINO, a small ViT with 8 px patches trained self-supervised on medical slices.

Why: DINOv2/v3 were trained on natural photos at 14/16 px patches; prompting thin structures
(vessels, retinal layers, small organs) wants finer patches and medical texture. This recipe
follows DINOv2 in miniature:

- multi-crop: 2 global crops + several local crops per slice (random resized crops, flips,
  intensity gamma/contrast, blur, noise), grey slices replicated to RGB like at inference;
- DINO loss: the student's [CLS] distribution on every crop matches the EMA teacher's on the other
  global crop; the teacher output is centred (running mean) and sharpened (low temperature);
- iBOT loss: random patches of the student's global crops are replaced by a mask token and must
  predict the teacher's (centred, sharpened) patch distribution at those positions;
- teacher = exponential moving average of the student (momentum 0.996 -> 1, cosine).

Data: every 2D slice of every image under ``../shared/data`` that ``mv.load`` reads (volumes
are cut along all three axes, label maps skipped) plus synthetic CT/MR/OCT/fundus slices from
``napari_medvision.synthetic``. No labels are used; ``--hold-out`` files are kept out for the
evaluation (label transfer from one slice to the others by nearest class mean, Dice).

The shipped model is the CPU preset: ``--preset cpu --steps 1800 --batch-size 32 --threads 1``
(a 4-block ViT-Ti/8, 64 / 32 px crops, about an hour on one core). On the held-out real CT its
features lift the prompt's appearance head above a random ViT of the same shape (figures on the
card and in docs/evaluation/prompting.md). DINO's learning rate for 100-epoch runs (5e-4 per 256
images) with 65536 / 4096 prototypes leaves both losses at ln K, the uniform output, on short
runs; the CPU preset's higher rate, fewer prototypes and faster teacher (``DinoConfig.cpu``) do
not. A GPU run would use the full 12 blocks at 224 px, as long as the GPU allows (with more loader
workers, and probably the learning rate and prototype count of the CPU preset):

    python -m napari_medvision.recipes.medical_dino --steps 60000 --batch-size 128 --workers 14 --out weights

It writes ``weights/medical-dino-vitt8.safetensors`` with its card; ``mv.prompt(..., model=
"medical-dino-vitt8")`` and the Prompt panel then offer it (``models.dino.load_backbone``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import io
from ..engine.device import resolve_device
from ..models.card import ModelCard
from ..models.dino import Backbone, create_network, state_checksum
from ..synthetic import brain_mr, ct_abdomen, fundus_photo, oct_volume
from ..synthetic.ct import LABELS
from .common import data_dir, device_summary, recipe_arguments, save_shipped

MODEL_ID = "medical-dino-vitt8"
TIMM_NAME = "vit_small_patch14_reg4_dinov2"  # DINOv2's layout with 4 registers, built at patch 8
# ViT-Ti width (192, 3 heads): 5.5 M parameters, 22 MB in float32, inside the 25 MB weight budget
# (a ViT-S would be 87 MB).
OVERRIDES = {"patch_size": 8, "img_size": 224, "embed_dim": 192, "num_heads": 3}
HOLD_OUT = ("ct_mr_totalseg/example_ct_sm.nii.gz", "fundus_drive_train/images/40_training.tif")


@dataclass
class DinoConfig:
    """Sizes of one run; ``smoke()`` is the CPU check, the defaults a GPU run."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    prototypes: int = 65536
    patch_prototypes: int = 8192
    head_hidden: int = 2048
    bottleneck: int = 256
    student_temp: float = 0.1
    teacher_temp: tuple[float, float] = (0.04, 0.07)  # raised over the first 30 % of the run
    center_momentum: float = 0.9
    momentum: tuple[float, float] = (0.996, 1.0)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    ibot_weight: float = 1.0
    lr: float = 5e-4  # per 256 images
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    depth: int | None = None  # None: the full 12 blocks
    # DINOv2's Sinkhorn-Knopp teacher (each prototype used equally often in a batch) instead of
    # DINO's running centre, which can let a short run collapse to a uniform output.
    sinkhorn: bool = True
    freeze_last_layer: float = 0.05  # share of the run with the prototypes fixed (DINO's first epoch)

    @classmethod
    def smoke(cls) -> "DinoConfig":
        return cls(global_size=64, local_size=32, n_local=2, prototypes=512, patch_prototypes=256,
                   head_hidden=256, bottleneck=64, depth=4)

    @classmethod
    def cpu(cls) -> "DinoConfig":
        """What one CPU core can train in about an hour (``--preset cpu``, batch 32).

        With DINO's lr of 5e-4 per 256 images (6e-5 at batch 32) and 4096 prototypes the losses
        stay at ln K; at 1e-3 (8e-3 per 256), 256 / 128 prototypes and a faster teacher (momentum
        from 0.99) both fall below ln K within a few hundred steps.
        """
        return cls(global_size=64, local_size=32, n_local=2, prototypes=256, patch_prototypes=128,
                   head_hidden=512, bottleneck=128, depth=4, lr=8e-3, momentum=(0.99, 1.0),
                   freeze_last_layer=0.02, teacher_temp=(0.04, 0.05))


# --- data ------------------------------------------------------------------------------------

def _unit(volume) -> np.ndarray:
    """A Volume's data as float32 in [0, 1]: colour / 255, else its 0.5-99.5 percentiles."""
    data = np.asarray(volume.data, dtype=np.float32)
    if volume.rgb:
        return data / 255.0
    lo, hi = np.percentile(data[:: max(1, data.shape[0] // 16)], [0.5, 99.5])
    return np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1)


def _slices_of(volume, min_side: int = 32, stride: int = 1) -> list[np.ndarray]:
    """2D slices ``(H, W)`` or ``(H, W, 3)`` float16: a 3D scan along all three axes."""
    data = _unit(volume)
    if volume.n_leading:
        data = data[0]
    if volume.rgb or volume.ndim == 2:
        return [data.astype(np.float16)] if min(data.shape[:2]) >= min_side else []
    out = []
    for axis in range(3):
        moved = np.moveaxis(data, axis, 0)
        if min(moved.shape[1:]) < min_side:
            continue
        out += [s.astype(np.float16) for s in moved[::stride] if s.std() > 0.02]
    return out


def real_slices(root: Path, hold_out=HOLD_OUT, stride: int = 1, limit: int | None = None) -> list[np.ndarray]:
    """Slices of every image under ``root`` that ``mv.load`` reads, except label maps and ``hold_out``."""
    slices: list[np.ndarray] = []
    held = {str(root / h) for h in hold_out}
    for path in sorted(root.rglob("*")):
        if str(path) in held or path.name.startswith(".") or path.suffix in (".json", ".md", ".txt", ".csv"):
            continue
        if not path.is_file() and path.suffix != ".zarr":  # files one by one: a folder would repeat them
            continue
        if any(word in part.lower() for part in path.parts[-2:] for word in ("seg", "mask", "manual", "label")):
            continue  # label maps and DRIVE's vessel / field-of-view masks are not images
        try:
            volumes = io.load_all(path)
        except Exception:  # not an image (licences, headers, partial DICOM trees): skip it
            continue
        for volume in volumes:
            if not volume.is_labels:
                slices += _slices_of(volume, stride=stride)
        if limit and len(slices) >= limit:
            break
    return slices


def synthetic_slices(n_per_kind: int, seed: int = 0, stride: int = 4) -> list[np.ndarray]:
    """Slices of synthetic CT, MR (all contrasts), OCT and fundus images (seeds ``seed``...)."""
    out: list[np.ndarray] = []
    for i in range(n_per_kind):
        s = seed + i
        ct, _ = ct_abdomen(seed=s)
        mr, _ = brain_mr(seed=s)
        oct_, _ = oct_volume(seed=s)
        photo, _ = fundus_photo(seed=s)
        for volume in (ct, *mr.values(), oct_):
            out += _slices_of(volume, stride=stride)
        out += _slices_of(photo)
    return out


class MultiCrop(torch.utils.data.Dataset):
    """Global and local crops of one slice, each ``(3, size, size)`` in [0, 1]."""

    def __init__(self, slices: list[np.ndarray], config: DinoConfig, seed: int = 0):
        from torchvision.transforms import v2

        self.slices = slices
        self.config = config
        self.seed = seed
        self.global_crop = v2.RandomResizedCrop(config.global_size, scale=config.global_scale, antialias=True)
        self.local_crop = v2.RandomResizedCrop(config.local_size, scale=config.local_scale, antialias=True)
        self.flip = v2.RandomHorizontalFlip()
        self.blur = v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=0.5)

    def __len__(self) -> int:
        return len(self.slices)

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Scanner-like changes: gamma, contrast/brightness, noise (never colour hue on grey)."""
        gamma = math.exp(np.random.uniform(-0.4, 0.4))
        x = x.clamp(0, 1) ** gamma
        x = (x - 0.5) * np.random.uniform(0.7, 1.3) + 0.5 + np.random.uniform(-0.1, 0.1)
        if np.random.rand() < 0.3:
            x = x + torch.randn_like(x) * np.random.uniform(0, 0.05)
        return x.clamp(0, 1)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        image = torch.from_numpy(self.slices[i].astype(np.float32))
        image = image.permute(2, 0, 1) if image.ndim == 3 else image[None].expand(3, -1, -1)
        crops = [self._intensity(self.blur(self.flip(self.global_crop(image)))) for _ in range(2)]
        crops += [self._intensity(self.flip(self.local_crop(image))) for _ in range(self.config.n_local)]
        return crops


# --- model -----------------------------------------------------------------------------------

class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINO's projection head)."""

    def __init__(self, dim: int, prototypes: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DinoModel(nn.Module):
    """Backbone + image-level (DINO) and patch-level (iBOT) heads; the mask token for iBOT."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        overrides = dict(OVERRIDES, img_size=config.global_size)
        if config.depth:
            overrides["depth"] = config.depth
        self.backbone = create_network(TIMM_NAME, **overrides)
        dim = self.backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.dino_head = DinoHead(dim, config.prototypes, config.head_hidden, config.bottleneck)
        self.ibot_head = DinoHead(dim, config.patch_prototypes, config.head_hidden, config.bottleneck)

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``([CLS] (B, C), patch tokens (B, h*w, C))``; ``mask`` ``(B, h, w)`` hides patches."""
        net = self.backbone
        x = net.patch_embed(images)  # (B, h, w, C) with dynamic_img_size
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = net.norm_pre(net._pos_embed(x))
        x = net.norm(net.blocks(x))
        return x[:, 0], x[:, net.num_prefix_tokens:]


def _random_masks(batch: int, grid: tuple[int, int], ratio: tuple[float, float], generator=None) -> torch.Tensor:
    """Half of the images get a random share (``ratio``) of their patches masked, as in iBOT."""
    h, w = grid
    masks = torch.zeros(batch, h, w, dtype=torch.bool)
    for b in range(batch):
        if b % 2:
            continue
        share = float(torch.empty(1).uniform_(*ratio, generator=generator))
        chosen = torch.randperm(h * w, generator=generator)[: max(1, int(share * h * w))]
        masks[b].view(-1)[chosen] = True
    return masks


# --- losses ----------------------------------------------------------------------------------

class CenteredTeacher:
    """Teacher targets: centred by a running mean of its outputs, then sharpened by temperature.

    sinkhorn: DINOv2's alternative, three Sinkhorn-Knopp iterations over the batch (rows and
    columns of ``exp(logits / T)`` normalised in turn), so that no prototype can take every
    image and none is left unused; the running centre is then only kept for the record.
    """

    def __init__(self, dim: int, momentum: float, device, sinkhorn: bool = False):
        self.center = torch.zeros(1, dim, device=device)
        self.momentum = momentum
        self.sinkhorn = sinkhorn

    def targets(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.sinkhorn:
            return sinkhorn_knopp(logits, temperature)
        return F.softmax((logits - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        mean = logits.mean(0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """``(B, K)`` targets whose rows sum to 1 and whose columns are used equally (DINOv2's teacher)."""
    q = torch.exp((logits.float() - logits.max()) / temperature).T  # (K, B)
    q /= q.sum()
    prototypes, batch = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True).clamp_min(1e-30) * prototypes
        q /= q.sum(dim=0, keepdim=True) * batch
    return (q * batch).T


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Cross-entropy of each student crop against each teacher global crop of another view."""
    total, pairs = 0.0, 0
    for t_index, target in enumerate(teacher):
        for s_index, logits in enumerate(student):
            if s_index == t_index:
                continue
            total = total + torch.sum(-target * F.log_softmax(logits / student_temp, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def ibot_loss(student_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """Cross-entropy at the masked patches only (``(M, K)`` each), every masked image weighted equally."""
    flat = masks.flatten(1)
    if not flat.any():
        return student_logits.sum() * 0
    image_of = flat.nonzero()[:, 0]
    per_image = flat.sum(1).clamp(min=1).to(student_logits.dtype)
    per_patch = torch.sum(-teacher_targets * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1)
    return (per_patch / per_image[image_of]).sum() / int((flat.sum(1) > 0).sum())


def _cosine(start: float, end: float, step: float, total: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


# --- training --------------------------------------------------------------------------------

def train(slices: list[np.ndarray], config: DinoConfig, steps: int, batch_size: int, device: str,
          time_budget: float | None = None, seed: int = 0, workers: int = 0, log=print):
    """The EMA teacher (``DinoModel``) after ``steps`` optimiser steps, and the loss history."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    student = DinoModel(config).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    loader = torch.utils.data.DataLoader(MultiCrop(slices, config, seed), batch_size=batch_size, shuffle=True,
                                         drop_last=len(slices) >= batch_size, num_workers=workers,
                                         persistent_workers=workers > 0)
    lr = config.lr * batch_size / 256
    optimiser = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=config.weight_decay)
    centre_cls = CenteredTeacher(config.prototypes, config.center_momentum, device, config.sinkhorn)
    centre_patch = CenteredTeacher(config.patch_prototypes, config.center_momentum, device, config.sinkhorn)
    last_layers = [p for head in (student.dino_head, student.ibot_head) for p in head.last.parameters()]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    history, step, start = [], 0, time.perf_counter()
    patch = OVERRIDES["patch_size"]
    grid = (config.global_size // patch, config.global_size // patch)
    while step < steps:
        for crops in loader:
            crops = [c.to(device, non_blocking=True) for c in crops]
            glob = torch.cat(crops[:2])
            masks = _random_masks(glob.shape[0], grid, config.mask_ratio).to(device)
            # Schedules run over whichever ends first, the steps or the time budget, so that a run
            # stopped by the clock still finishes its warm-up and cosine decay.
            done = min(1.0, max(step / steps, (time.perf_counter() - start) / time_budget if time_budget else 0.0))
            t_temp = config.teacher_temp[1] + (config.teacher_temp[0] - config.teacher_temp[1]) * max(0.0, 1 - done / 0.3)
            for group in optimiser.param_groups:
                group["lr"] = lr * min(1.0, max(done, 1 / steps) / 0.1) * _cosine(1, 0.01, done, 1.0)  # 10 % warm-up
            with amp:
                with torch.no_grad():
                    t_cls, t_patches = teacher.tokens(glob)
                    t_logits = teacher.dino_head(t_cls).float()
                    t_patch_logits = teacher.ibot_head(t_patches[masks.flatten(1)]).float()
                s_cls, s_patches = student.tokens(glob, masks)
                s_logits = [student.dino_head(s_cls).float()]
                s_logits += [student.dino_head(student.tokens(local)[0]).float() for local in crops[2:]]
                s_patch_logits = student.ibot_head(s_patches[masks.flatten(1)]).float()
            teacher_targets = list(centre_cls.targets(t_logits, t_temp).chunk(2))
            student_views = list(s_logits[0].chunk(2)) + s_logits[1:]
            loss_dino = dino_loss(student_views, teacher_targets, config.student_temp)
            loss_ibot = ibot_loss(s_patch_logits, centre_patch.targets(t_patch_logits, t_temp), masks,
                                  config.student_temp)
            loss = loss_dino + config.ibot_weight * loss_ibot
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip_grad)
            if done < config.freeze_last_layer:
                for p in last_layers:
                    p.grad = None
            optimiser.step()
            centre_cls.update(t_logits)
            if len(t_patch_logits):
                centre_patch.update(t_patch_logits)
            momentum = _cosine(config.momentum[0], config.momentum[1], done, 1.0)
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), student.parameters()):
                    t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
            step += 1
            history.append({"step": step, "dino": round(float(loss_dino), 4), "ibot": round(float(loss_ibot), 4)})
            if step % 10 == 0 or step == 1:
                log(f"step {step}/{steps}: dino {float(loss_dino):.3f} ibot {float(loss_ibot):.3f} "
                    f"({time.perf_counter() - start:.0f} s)")
            if step >= steps or (time_budget and time.perf_counter() - start > time_budget):
                return teacher, history, time.perf_counter() - start
    return teacher, history, time.perf_counter() - start


# --- evaluation --------------------------------------------------------------------------------

def label_transfer_dice(backbone, image, labels, slices: list[int], label: int, short_side: int = 224) -> float:
    """Dice of ``label`` on ``slices[1:]`` predicted from ``slices[0]`` by nearest class mean of features."""
    from ..engine.embeddings import EmbeddingConfig, slice_features

    feats = slice_features(image, backbone, cache=False, config=EmbeddingConfig(short_side=short_side))
    truth = np.asarray(labels.data) == label
    ref = feats.at_pixels(slices[0])
    inside, outside = ref[:, torch.from_numpy(truth[slices[0]])], ref[:, torch.from_numpy(~truth[slices[0]])]
    means = torch.stack([outside.mean(1), inside.mean(1)])  # (2, C)
    dice = []
    for z in slices[1:]:
        pixels = feats.at_pixels(z)
        distance = torch.cdist(pixels.flatten(1).T, means)
        predicted = (distance.argmin(1) == 1).reshape(truth[z].shape).numpy()
        overlap = np.logical_and(predicted, truth[z]).sum()
        dice.append(2 * overlap / max(predicted.sum() + truth[z].sum(), 1))
    return float(np.mean(dice))


def main(argv: list[str] | None = None) -> int:
    parser = recipe_arguments(__doc__.splitlines()[0], steps=60000, batch_size=128, preset="small")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU check: a minute, nothing saved")
    parser.add_argument("--synthetic", type=int, default=8, help="synthetic scans of each kind")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cpu = args.preset == "cpu"
    config = DinoConfig.smoke() if args.smoke else DinoConfig.cpu() if cpu else DinoConfig()
    root = data_dir()
    slices = real_slices(root, stride=4 if args.smoke else 2 if cpu else 1, limit=200 if args.smoke else None)
    n_real = len(slices)
    synthetic = 1 if args.smoke else 4 if cpu else args.synthetic
    slices += synthetic_slices(synthetic, seed=args.seed, stride=8 if args.smoke else 4 if cpu else 2)
    print(f"{n_real} real + {len(slices) - n_real} synthetic slices; device {device}")
    teacher, history, seconds = train(slices, config, args.steps, args.batch_size, device,
                                      args.time_budget, args.seed, 0 if args.smoke or cpu else args.workers)
    first, last = history[0], history[-1]
    print(f"{len(history)} steps in {seconds:.0f} s: dino {first['dino']} -> {last['dino']}, "
          f"ibot {first['ibot']} -> {last['ibot']}")
    if args.smoke:
        print("smoke run: nothing saved")
        return 0
    command = "python -m napari_medvision.recipes.medical_dino " + " ".join(argv if argv is not None else sys.argv[1:])
    ship(teacher.backbone.cpu(), config, history, seconds, args.batch_size, device, args.seed, args.out, command)
    return 0


ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")


def prompting_dice(backbone, image, labels: np.ndarray, counts=(1, 2, 3),
                   variants=("appearance", None)) -> dict[str, float]:
    """Mean Dice of ``ORGANS`` from ``mv.prompt`` with this backbone's features, painting 1, 2, 3 slices.

    The issue's test of a medical DINO: the prompt's appearance head alone (where features
    matter most) and the whole method, slices spread evenly over the organs' extent.
    """
    from ..tasks.prompting import prompt

    ids = [k for k, v in LABELS.items() if v in ORGANS]
    kept = np.where(np.isin(labels, ids), labels, 0).astype(np.uint8)
    truth = image.with_data(kept, labels={k: LABELS[k] for k in ids})
    extent = np.flatnonzero(kept.reshape(kept.shape[0], -1).any(1))
    out = {}
    for n in counts:
        chosen = sorted({int(extent[0] + (i + 0.5) * (extent[-1] - extent[0] + 1) / n) for i in range(n)})
        painted = np.zeros_like(kept)
        painted[chosen] = kept[chosen]
        for variant in variants:
            result = np.asarray(prompt(image, annotations=truth.with_data(painted), model=backbone,
                                       variant=variant, device="cpu", cache=False).data)
            dice = [2 * ((result == k) & (kept == k)).sum() / ((result == k).sum() + (kept == k).sum())
                    for k in ids if (result == k).any() or (kept == k).any()]
            out[f"{n}_slices_{variant or 'method'}"] = round(float(np.mean(dice)), 3)
    return out


def ship(network, config: DinoConfig, history, seconds: float, batch_size: int, device: str, seed: int, out,
         command: str) -> None:
    """Card (metrics on the held-out real CT, against a random ViT of the same shape) and weights into ``out``."""
    from .ct_organs import LABELS, real_ct

    backbone = Backbone(network.eval(), TIMM_NAME, state_checksum(network.state_dict()))
    overrides = dict(OVERRIDES, img_size=config.global_size, **({"depth": config.depth} if config.depth else {}))
    torch.manual_seed(seed)
    untrained = create_network(TIMM_NAME, **overrides).eval()  # the same shape, never trained
    random_vit = Backbone(untrained, TIMM_NAME, state_checksum(untrained.state_dict()))
    ct, label_array = real_ct()  # TotalSegmentator ids mapped to ours, which name liver
    seg = ct.with_data(label_array)
    liver = next(k for k, v in LABELS.items() if v == "liver")
    z = [int(i) for i in np.flatnonzero((np.asarray(seg.data) == liver).reshape(seg.data.shape[0], -1).any(1))]
    chosen = z[len(z) // 2:: max(1, len(z) // 8)][:4]
    card = ModelCard(
        id=MODEL_ID, task="features", modality="any", sha256="",
        architecture={"name": "dino", "config": {"timm_name": TIMM_NAME, "overrides": overrides}},
        input={"normalisation": {"kind": "percentile", "low": 0.5, "high": 99.5}, "patch_size": 8,
               "channels": 3, "short_side": 448},
        training={"data": "all of ../shared/data except the held-out files, all three slice axes; synthetic "
                          "CT/MR/OCT/fundus", "held_out": list(HOLD_OUT), "steps": len(history),
                  "batch_size": batch_size, "device": device_summary(device), "wall_time_s": round(seconds),
                  "recipe": "napari_medvision.recipes.medical_dino", "command": command,
                  "config": dict(vars(config)),
                  "first_loss": history[0], "final_loss": history[-1], "date": date.today().isoformat()},
        metrics={"held_out": "ct_mr_totalseg/example_ct_sm.nii.gz (never seen in training), organs "
                             + ", ".join(ORGANS),
                 "prompt_dice": prompting_dice(backbone, ct, label_array),
                 "prompt_dice_random_vit_of_this_shape": prompting_dice(random_vit, ct, label_array),
                 "liver_label_transfer_dice_example_ct_sm": label_transfer_dice(backbone, ct, seg, chosen, liver),
                 "same_for_a_random_vit_of_this_shape": label_transfer_dice(random_vit, ct, seg, chosen, liver)},
        description="Self-supervised DINO+iBOT ViT-Ti/8 for medical slices (features for mv.prompt).",
    )
    save_shipped(backbone.network, card, out)


if __name__ == "__main__":
    sys.exit(main())
