"""DINO backbones: frozen ViTs that turn a slice into a grid of patch features.

The networks are timm's DINOv2 (``VisionTransformer``) and DINOv3 (``Eva`` with RoPE and storage
tokens) architectures, built with ``pretrained=False``: weights come only from a file the user
chose (an official release ``.pth`` or a ``.safetensors``) or a registered model card, never
from the internet. timm's own checkpoint filters translate the official key names
(``register_tokens``, ``storage_tokens``, ``ls1.gamma``, ``mlp.w12`` ...), so we do not keep a
second copy of that mapping.

    backbone = load_backbone("dinov2_vits14_pretrain.pth")      # architecture read from the tensors
    feats = backbone.features(images)                            # (B, 3 or 1, H, W) in [0, 1]
    feats.shape                                                  # (B, 384, ceil(H/14), ceil(W/14))
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io.errors import ReadError
from .card import CardError, sha256_of
from .registry import get_card, load_state_dict, register_architecture

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Random backbones of the two shapes we ship code for (tests, benchmarks, the recipe's student).
RANDOM_SOURCES = {
    "random-vits14": "vit_small_patch14_dinov2",
    "random-vits14-reg4": "vit_small_patch14_reg4_dinov2",
    "random-vits16": "vit_small_patch16_dinov3",
}
RANDOM_SEED = 0

_DINOV2_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_DINOV3_SIZES = {384: "small", 768: "base", 1024: "large", 1280: "huge_plus", 4096: "7b"}


class Backbone:
    """A frozen DINO ViT and how to feed it: patch size, feature width, identity for caches.

    network: a timm ViT (eval mode) whose ``forward_features`` returns prefix + patch tokens.
    name: the timm architecture name (``vit_small_patch14_dinov2`` ...).
    checksum: identifies the weights (sha256 of the file, or the random seed) for cache keys.
    """

    def __init__(self, network: torch.nn.Module, name: str, checksum: str, source: str = ""):
        self.network = network.eval().requires_grad_(False)
        self.name = name
        self.checksum = checksum
        self.source = source
        self.patch_size = int(network.patch_embed.patch_size[0])
        self.embed_dim = int(network.embed_dim)
        self.num_prefix_tokens = int(getattr(network, "num_prefix_tokens", 1))
        self.device = "cpu"
        self.calls = 0  # forward passes run; lets callers (and tests) see whether a cache was used

    def to(self, device: str) -> "Backbone":
        if device != self.device:
            self.network.to(device)
            self.device = device
        return self

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, C, ceil(H/p), ceil(W/p))`` of ``images`` ``(B, 3 or 1, H, W)`` in [0, 1].

        Grey images are replicated to three channels and everything is ImageNet-normalised, as
        the DINO models were trained. Sizes that are not a multiple of the patch are padded at
        the bottom/right by repeating the edge, so features of real pixels stay put.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        p = self.patch_size
        h, w = math.ceil(x.shape[-2] / p), math.ceil(x.shape[-1] / p)
        pad = (0, w * p - x.shape[-1], 0, h * p - x.shape[-2])
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        use_amp = x.device.type == "cuda"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            tokens = self.network.forward_features(x)
        self.calls += 1
        patches = tokens[:, self.num_prefix_tokens:].float()
        return patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)

    def __repr__(self) -> str:
        return f"Backbone({self.name}, patch={self.patch_size}, dim={self.embed_dim}, weights={self.checksum[:12]})"


def create_network(name: str, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised timm DINO ViT ``name`` that accepts any input size (no download).

    overrides: timm constructor arguments that differ from the release (``patch_size=8``,
    ``img_size=224`` for our medical DINO).
    """
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **overrides)


@register_architecture("dino")
def _from_card(config: dict[str, Any]) -> torch.nn.Module:
    """A card's DINO ViT (``{"timm_name": ..., "overrides": {...}}``), as ``load_model`` builds every network."""
    return create_network(config["timm_name"], **dict(config.get("overrides") or {}))


def architecture_of(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """``(timm name, overrides)`` matching an official-layout DINOv2/DINOv3 state dict's shapes.

    The releases use patch 14 (v2) or 16 (v3); another patch size (our 8 px medical DINO) or
    position grid becomes a ``patch_size`` / ``img_size`` override of the same family.
    """
    if "patch_embed.proj.weight" not in state:
        raise ValueError("no 'patch_embed.proj.weight' tensor: this is not a DINO ViT checkpoint")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    swiglu = "blocks.0.mlp.w12.weight" in state
    overrides: dict[str, Any] = {}
    if "storage_tokens" in state:  # DINOv3
        size = "small_plus" if dim == 384 and swiglu else _DINOV3_SIZES.get(dim)
        bias = state.get("blocks.0.attn.qkv.bias")
        qkvb = "_qkvb" if bias is not None and bool(bias.abs().sum() > 0) else ""
        name = f"vit_{size}_patch16_dinov3{qkvb}"
        if patch != 16:
            overrides["patch_size"] = int(patch)
    else:  # DINOv2
        size = _DINOV2_SIZES.get(dim)
        regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        name = f"vit_{size}_patch14{f'_reg{regs}' if regs else ''}_dinov2"
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)  # the release keeps the class position
        if patch != 14 or grid * patch != 518:
            overrides.update(patch_size=int(patch), img_size=int(grid * patch))
    import timm

    if size is None or name not in timm.list_models(name):
        raise ValueError(f"no known DINO architecture with width {dim} and patch {patch}")
    return name, overrides


def network_from_state(state: dict[str, torch.Tensor], name: str | None = None,
                       overrides: dict[str, Any] | None = None) -> tuple[torch.nn.Module, str]:
    """A timm network carrying ``state`` (official or timm key names), and its architecture name."""
    state = dict(state)
    for wrapper in ("teacher", "model", "state_dict"):  # training checkpoints nest the backbone
        if wrapper in state and isinstance(state[wrapper], dict):
            state = dict(state[wrapper])
    state = {re.sub(r"^(module\.|backbone\.)+", "", k): v for k, v in state.items()}
    official = "mask_token" in state or "storage_tokens" in state
    if official and name is None:
        name, overrides = architecture_of(state)
    if name is None:
        raise ValueError("a timm-layout state dict needs its architecture name")
    network = create_network(name, **(overrides or {}))
    if official:
        if "storage_tokens" in state:
            from timm.models.eva import checkpoint_filter_fn
            if not name.endswith("_qkvb"):  # all-zero biases the bias-free variant does not have
                state = {k: v for k, v in state.items() if not k.endswith("attn.qkv.bias")}
        else:
            from timm.models.vision_transformer import checkpoint_filter_fn
        state = checkpoint_filter_fn(state, network)
    missing, unexpected = network.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head", "fc_norm"))]
    if missing or unexpected:
        raise ValueError(f"weights do not fit {name}: {len(missing)} missing and {len(unexpected)} unexpected "
                         f"tensors (e.g. {(missing or unexpected)[0]})")
    return network, name


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("the file holds no state dict")
    return state


def load_backbone(source: str | os.PathLike) -> Backbone:
    """The DINO backbone named by ``source``, frozen, on the CPU.

    source: a path to an official ``.pth`` / ``.safetensors`` checkpoint (architecture inferred
    from tensor shapes; a model card beside it, if any, is checked), a registered model id with a
    card (architecture ``{"name": "dino", "config": {"timm_name": ..., "overrides": {...}}}``), or
    ``"random-vits14"`` / ``"random-vits14-reg4"`` / ``"random-vits16"`` for a seeded random ViT.
    """
    text = str(source)
    if text in RANDOM_SOURCES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            network = create_network(RANDOM_SOURCES[text])
        return Backbone(network, RANDOM_SOURCES[text], f"{text}-seed{RANDOM_SEED}", text)
    path = Path(text).expanduser()
    if path.suffix in (".pth", ".pt", ".safetensors") and not path.with_suffix(".json").exists():
        if not path.is_file():
            raise ReadError(path, "this DINO checkpoint file does not exist")
        try:
            state = _read_state(path)
            network, name = network_from_state(state)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ReadError(path, f"cannot be read as a DINOv2/DINOv3 checkpoint ({exc})") from exc
        return Backbone(network, name, sha256_of(path), str(path))
    card = get_card(source)
    config = card.architecture.get("config", {})
    state = load_state_dict(card)  # checks the card's sha256
    try:
        network, name = network_from_state(state, config.get("timm_name"), config.get("overrides"))
    except ValueError as exc:
        raise CardError(card.weights_path or card.id, str(exc)) from exc
    return Backbone(network, name, card.sha256, card.id)


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """A content digest of a state dict (for backbones built in memory, e.g. by the recipe)."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def official_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s weights renamed to the official DINOv2/DINOv3 release layout (export, tests).

    The inverse of timm's filters. DINOv2: ``reg_token`` -> ``register_tokens`` with the class
    token's position put back in front of ``pos_embed``. DINOv3: ``reg_token`` -> ``storage_tokens``,
    ``gamma_1/2`` -> ``ls1/ls2.gamma``, zero ``qkv.bias`` + ``bias_mask``, RoPE ``periods``.
    Both get the (zero) ``mask_token`` the releases carry.
    """
    state = {k: v.detach().clone() for k, v in network.state_dict().items()
             if not k.startswith(("head", "fc_norm"))}
    out: dict[str, torch.Tensor] = {}
    dim = state["cls_token"].shape[-1]
    if "pos_embed" not in state:  # DINOv3 (RoPE, no absolute positions)
        out["storage_tokens"] = state.pop("reg_token")
        heads = network.blocks[0].attn.num_heads
        out["rope_embed.periods"] = torch.ones(dim // heads // 4)
        for k, v in state.items():
            k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
            out[k] = v
            if k.endswith("attn.qkv.weight"):
                out[k.replace("weight", "bias")] = torch.zeros(v.shape[0])
                out[k.replace("weight", "bias_mask")] = torch.ones(v.shape[0])
    else:
        if "reg_token" in state:
            pos = state.pop("pos_embed")
            out["register_tokens"] = state.pop("reg_token")
            out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        out.update(state)
    out["mask_token"] = torch.zeros(1, dim)
    return out
