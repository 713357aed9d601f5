"""Where models live and how they load: shipped ``weights/`` and the user model folder.

Shipped models are ``weights/<id>.safetensors`` + ``weights/<id>.json``. User and fine-tuned
models live in ``$MEDVISION_HOME/models`` (default: the platform's user data folder), never in
``weights/``. Every load checks the weights' sha256 against the card; weights are read only
through safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .card import CardError, ModelCard, read_card, sha256_of, write_card

if TYPE_CHECKING:  # torch is imported only when a model is built
    import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]
ARCHITECTURES: dict[str, Callable[[dict[str, Any]], "torch.nn.Module"]] = {}
_ARCHITECTURE_MODULES = ("transunet", "mvg", "appearance_head", "dino", "contrast_mlp")


_LISTENERS: list[Callable[[str, str], None]] = []


def on_change(callback: Callable[[str, str], None]) -> Callable[[], None]:
    """Call ``callback(event, model_id)`` whenever a model is ``"saved"``, ``"removed"`` or made
    ``"current"`` in its line of versions; returns a function that stops the calls.

    Panels listen here so that every open model list updates at once. Callbacks run on the thread
    that saved the model (a worker's, for a fine-tune): a GUI hands them to its own thread.
    """
    _LISTENERS.append(callback)

    def stop() -> None:
        if callback in _LISTENERS:
            _LISTENERS.remove(callback)

    return stop


def notify(event: str, model_id: str) -> None:
    """Tell every listener; a failing listener never stops a save."""
    for callback in list(_LISTENERS):
        try:
            callback(event, model_id)
        except Exception:  # a closed panel must not break saving models
            pass


def register_architecture(name: str):
    """Decorator: ``builder(config) -> nn.Module`` becomes buildable from a card's architecture name."""

    def deco(builder):
        ARCHITECTURES[name] = builder
        return builder

    return deco


def build_model(architecture: dict[str, Any]) -> "torch.nn.Module":
    """A freshly initialised network from a card's ``architecture`` entry ``{name, config}``."""
    for module in _ARCHITECTURE_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise CardError("<card>", f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name](dict(architecture.get("config", {})))


def weights_dir() -> Path:
    """The shipped weights: ``$MEDVISION_WEIGHTS``, the repository's ``weights/``, or the wheel's copy."""
    if os.environ.get("MEDVISION_WEIGHTS"):
        return Path(os.environ["MEDVISION_WEIGHTS"])
    repo = PACKAGE_DIR.parent / "weights"
    return repo if repo.is_dir() else PACKAGE_DIR / "_weights"


def user_dir() -> Path:
    """The user model folder (created on demand)."""
    if os.environ.get("MEDVISION_HOME"):
        root = Path(os.environ["MEDVISION_HOME"])
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir("napari-medvision"))
    return root / "models"


def available(modality: str | None = None, task: str | None = None) -> list[ModelCard]:
    """Cards of the shipped and user models, optionally only those for ``modality`` / ``task``."""
    cards = []
    for source, folder in (("shipped", weights_dir()), ("user", user_dir())):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                card = read_card(path)
            except CardError:
                continue  # a stray JSON file is not a model
            card.source = source
            cards.append(card)
    return [c for c in cards if (modality is None or _same_modality(c.modality, modality))
            and (task is None or c.task == task)]


def _same_modality(card_modality: str, wanted: str) -> bool:
    return card_modality.lower() == wanted.lower()


def get_card(model: str | os.PathLike | ModelCard) -> ModelCard:
    """The card for a model id, a path to ``<id>.safetensors``/``<id>.json``, or a card itself."""
    if isinstance(model, ModelCard):
        return model
    text = str(model)
    path = Path(text).expanduser()
    if path.suffix in (".json", ".safetensors", ".pt", ".pth") or path.exists():
        card_path = path.with_suffix(".json")
        if not card_path.exists():
            raise CardError(path, "a checkpoint needs its model card beside it (same name, .json)")
        card = read_card(card_path)
        card.weights_path = path if path.suffix in (".safetensors", ".pt", ".pth") else card.weights_path
        card.source = "path"
        return card
    for card in available():
        if card.id == text:
            return card
    known = ", ".join(c.id for c in available()) or "none installed"
    raise CardError(text, f"no model with this id; available: {known}")


def load_state_dict(card: ModelCard) -> dict[str, "torch.Tensor"]:
    """The weights of ``card`` after checking their sha256 against the card."""
    path = card.weights_path
    if path is None or not Path(path).exists():
        raise CardError(path or card.id, "weights file not found")
    actual = sha256_of(path)
    if actual != card.sha256:
        raise CardError(path, f"weights checksum {actual[:12]}… does not match the model card's "
                              f"{card.sha256[:12]}…: the file is corrupt or not this model")
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_model(model: str | os.PathLike | ModelCard, device: str = "cpu") -> tuple["torch.nn.Module", ModelCard]:
    """The network for ``model`` (id, path or card) with checked weights, in eval mode on ``device``."""
    card = get_card(model)
    network = build_model(card.architecture)
    state = load_state_dict(card)
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CardError(card.weights_path, f"weights do not fit architecture {card.architecture.get('name')}: "
                                           f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
                                           f"(e.g. {(missing or unexpected)[0]})")
    return network.to(device).eval(), card


def save_model(network: "torch.nn.Module", card: ModelCard, folder: Path | None = None) -> ModelCard:
    """Write weights and card into ``folder`` (default: the user folder) atomically; return the card.

    Refuses the shipped weights folder: fine-tuning never overwrites shipped models.
    """
    from safetensors.torch import save_file

    folder = Path(folder) if folder is not None else user_dir()
    if folder.resolve() == weights_dir().resolve() and card.source != "shipped-recipe":
        raise CardError(folder, "models are not written into the shipped weights folder; use the user folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CardError(folder, f"cannot create the model folder ({exc.strerror})") from exc
    weights = folder / f"{card.id}.safetensors"
    tmp = folder / f".{card.id}.{uuid.uuid4().hex[:8]}.partial"
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    # Weights first, card last: a model is visible only once its card exists, so an
    # interrupted save never leaves a loadable half-model behind.
    try:
        save_file(state, str(tmp))
        card.sha256 = sha256_of(tmp)
        tmp.chmod(0o644)  # safetensors creates private files; models are meant to be shared
        tmp.replace(weights)
        try:
            write_card(card, folder / f"{card.id}.json")
        except OSError:
            weights.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CardError(folder, f"could not write the model ({exc.strerror or exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    card.weights_path = weights
    notify("saved", card.id)
    return card


def remove_model(model_id: str) -> None:
    """Delete a user model (card first, so it is never listed half-removed); shipped ones are refused."""
    card = get_card(model_id)
    if card.source != "user":
        raise CardError(model_id, f"only user models can be removed; this one is {card.source}")
    folder = user_dir()
    (folder / f"{card.id}.json").unlink(missing_ok=True)
    (folder / f"{card.id}.safetensors").unlink(missing_ok=True)
    notify("removed", card.id)
