"""The segmentation training loop shared by the recipes (shipped models) and fine-tuning.

MONAI's Dice + cross-entropy loss, AdamW with cosine decay, AMP (bf16) on CUDA, optional frozen
encoder, periodic validation with early stopping that keeps the best weights, a time budget,
progress and cancel, and resumable checkpoints (safetensors for weights, JSON for the state).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .progress import CancelToken, Cancelled, ProgressFn, check, report


@dataclass
class TrainConfig:
    """steps: optimiser steps at most; batch_size: patches per step; lr: peak AdamW learning rate;
    val_every: steps between validations; patience: validations without improvement before
    stopping (None: never stop early); time_budget_s: stop after this many seconds;
    freeze_encoder: train only parameters whose name does not start with an encoder prefix;
    anchor: L2-SP strength alpha (Li et al., ICML 2018): adds alpha/2 * ||w - w_start||^2 over the
    trained parameters, pulling them toward the weights training started from (fine-tuning: the
    parent's) instead of toward zero, so the model forgets less of what it knew; 0 turns it off.
    With it, the AdamW weight decay toward zero is off (the anchor replaces it);
    seed: seeds numpy and torch so runs repeat."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    val_every: int = 100
    patience: Optional[int] = None
    time_budget_s: Optional[float] = None
    freeze_encoder: bool = False
    encoder_prefixes: tuple[str, ...] = ("encoder", "stem", "vit", "transformer")
    anchor: float = 0.0
    seed: int = 0
    amp: bool = True


@dataclass
class TrainResult:
    """What training produced: the best weights by validation score and the curves."""

    best_state: dict
    best_score: float
    steps_done: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped_because: str = "steps"


def train_segmentation(
    network,
    sample_batch: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    config: TrainConfig,
    validate: Optional[Callable[[object], float]] = None,
    device: str = "cpu",
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    checkpoint: Optional[Path] = None,
    on_validation: Optional[Callable[[dict], None]] = None,
) -> TrainResult:
    """Train ``network`` on batches from ``sample_batch``; return the best weights and curves.

    sample_batch(rng, batch_size) -> (images (B, C, *patch) float32, labels (B, 1, *patch) int), or
    a third array ``mask`` (B, 1, *patch) bool: only voxels where it is True count in the loss
    (fine-tuning on corrected slices ignores the rest). With deep supervision the network's first
    output (full resolution) is trained.
    validate(network) -> a score where higher is better (e.g. mean Dice); without it the last
    weights count as best. A cancel keeps the best weights so far (raised as ``Cancelled`` with
    ``.result`` attached). ``checkpoint``: a path prefix to resume from and save to.
    """
    import torch
    from monai.losses import DiceCELoss

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    network.to(device).train()
    trainable = [p for n, p in network.named_parameters()
                 if not (config.freeze_encoder and n.startswith(config.encoder_prefixes))]
    if not trainable:
        raise ValueError("freeze_encoder left no parameter to train")
    if config.freeze_encoder:
        for n, p in network.named_parameters():
            p.requires_grad_(not n.startswith(config.encoder_prefixes))
    # the starting weights, taken before a checkpoint is resumed: the anchor is always the parent
    start_weights = [p.detach().clone() for p in trainable] if config.anchor > 0 else None
    optimiser = torch.optim.AdamW(trainable, lr=config.lr,
                                  weight_decay=0.0 if start_weights else config.weight_decay)
    clock = {"elapsed": 0.0}  # seconds trained so far, read by the schedule
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(config, clock))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=False)
    masked_loss_fn = MaskedDiceCELoss()
    use_amp = config.amp and device.startswith("cuda")

    state = {"step": 0, "best_score": -math.inf, "history": [], "bad_validations": 0, "seconds": 0.0}
    best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    if checkpoint is not None and _checkpoint_files(checkpoint)[1].exists():
        state, best_state = _resume(checkpoint, network, optimiser, schedule, rng)
    start = time.perf_counter() - state["seconds"]
    stopped = "steps"
    losses: list[float] = []
    try:
        while state["step"] < config.steps:
            check(cancel)
            batch = sample_batch(rng, config.batch_size)
            x = torch.from_numpy(batch[0]).to(device)
            y = torch.from_numpy(batch[1]).to(device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = network(x)
            if isinstance(logits, (tuple, list)):  # deep supervision: the full-resolution head first
                logits = logits[0]
            if len(batch) > 2:
                loss = masked_loss_fn(logits.float(), y, torch.from_numpy(batch[2]).to(device))
            else:
                loss = loss_fn(logits.float(), y)
            objective = loss
            if start_weights:
                objective = loss + 0.5 * config.anchor * anchor_distance(trainable, start_weights)
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 12.0)
            optimiser.step()
            elapsed = clock["elapsed"] = time.perf_counter() - start
            schedule.step()
            state["step"] += 1
            losses.append(float(loss.detach()))
            report(progress, state["step"], config.steps, f"loss {np.mean(losses[-20:]):.3f}")
            at_end = state["step"] >= config.steps or (config.time_budget_s and elapsed >= config.time_budget_s)
            if state["step"] % config.val_every == 0 or at_end:
                score = _validate(network, validate)
                entry = {"step": state["step"], "loss": float(np.mean(losses[-config.val_every:])),
                         "score": score, "seconds": round(elapsed, 1)}
                state["history"].append(entry)
                if on_validation is not None:
                    on_validation(entry)
                if validate is None or score > state["best_score"]:
                    state["best_score"] = score
                    state["bad_validations"] = 0
                    best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
                else:
                    state["bad_validations"] += 1
                state["seconds"] = elapsed
                if checkpoint is not None:
                    _save_checkpoint(checkpoint, network, optimiser, schedule, state, best_state, rng)
                if config.patience is not None and state["bad_validations"] >= config.patience:
                    stopped = "early stopping"
                    break
            if config.time_budget_s and elapsed >= config.time_budget_s:
                stopped = "time budget"
                break
    except Cancelled as exc:
        exc.result = TrainResult(best_state, state["best_score"], state["step"], time.perf_counter() - start,
                                 state["history"], "cancelled")
        network.load_state_dict(best_state)
        network.eval()
        raise
    network.load_state_dict(best_state)
    network.eval()
    return TrainResult(best_state, state["best_score"], state["step"], time.perf_counter() - start,
                       state["history"], stopped)


def anchor_distance(parameters, start_weights):
    """||w - w_start||^2 summed over all parameters: the L2-SP penalty without its alpha/2."""
    import torch

    return torch.stack([(p - p0).pow(2).sum() for p, p0 in zip(parameters, start_weights)]).sum()


class MaskedDiceCELoss:
    """Dice (MONAI ``MaskedDiceLoss``, foreground classes) + cross-entropy over masked voxels only.

    logits (B, n_classes, *patch), labels (B, 1, *patch) int, mask (B, 1, *patch) bool. A batch
    with no masked voxel gives a zero loss that still has a gradient path (no NaN).
    """

    def __init__(self) -> None:
        from monai.losses import MaskedDiceLoss

        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True, include_background=False)

    def __call__(self, logits, labels, mask):
        import torch.nn.functional as F

        weight = mask.to(logits.dtype)
        ce = F.cross_entropy(logits, labels[:, 0], reduction="none")
        ce = (ce * weight[:, 0]).sum() / weight.sum().clamp(min=1.0)
        return self.dice(logits, labels, weight) + ce


def _validate(network, validate) -> float:
    if validate is None:
        return float("nan")
    import torch

    network.eval()
    with torch.no_grad():
        score = float(validate(network))
    network.train()
    return score


def _warmup_cosine(config: TrainConfig, clock: Optional[dict] = None):
    """Linear warm-up, then cosine decay to 2 % of the peak over the steps or, where the time
    budget will run out first, over the time: a run cut short by its budget (a GPU's lease, a
    CPU's afternoon) still ends at a low learning rate instead of at its peak."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.time_budget_s and clock is not None:
            progress = max(progress, clock["elapsed"] / config.time_budget_s)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _checkpoint_files(prefix: Path) -> tuple[Path, Path, Path, Path]:
    prefix = Path(prefix)
    return (prefix.with_name(prefix.name + ".weights.safetensors"),
            prefix.with_name(prefix.name + ".state.json"),
            prefix.with_name(prefix.name + ".best.safetensors"),
            prefix.with_name(prefix.name + ".optim.pt"))


def _save_checkpoint(prefix, network, optimiser, schedule, state, best_state, rng) -> None:
    """Write every file under a temporary name, then rename: a crash never leaves a torn checkpoint."""
    import torch
    from safetensors.torch import save_file

    weights, meta, best, optim = _checkpoint_files(prefix)
    payload = {**state, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state().tolist()}
    temps = []
    try:
        for path, write in (
            (weights, lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(p))),
            (best, lambda p: save_file({k: v.contiguous() for k, v in best_state.items()}, str(p))),
            (optim, lambda p: torch.save({"optimiser": optimiser.state_dict(), "schedule": schedule.state_dict()}, str(p))),
            (meta, lambda p: p.write_text(json.dumps(payload))),
        ):
            tmp = path.with_name(path.name + ".partial")
            write(tmp)
            temps.append((tmp, path))
        for tmp, path in temps:
            tmp.replace(path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def _resume(prefix, network, optimiser, schedule, rng):
    import torch
    from safetensors.torch import load_file

    weights, meta, best, optim = _checkpoint_files(prefix)
    payload = json.loads(meta.read_text())
    network.load_state_dict(load_file(str(weights)))
    saved = torch.load(str(optim), map_location="cpu", weights_only=True)
    optimiser.load_state_dict(saved["optimiser"])
    schedule.load_state_dict(saved["schedule"])
    rng.bit_generator.state = payload.pop("rng")
    torch.set_rng_state(torch.tensor(payload.pop("torch_rng"), dtype=torch.uint8))
    return payload, load_file(str(best))


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, classes) -> dict[int, float]:
    """Dice of each class id in ``classes`` (NaN where a class is absent from both)."""
    out = {}
    for c in classes:
        p, t = prediction == c, truth == c
        denom = p.sum() + t.sum()
        out[int(c)] = float(2 * (p & t).sum() / denom) if denom else float("nan")
    return out


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
