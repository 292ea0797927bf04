"""Shipped checkpoints: a weights file loaded with ``torch.load(weights_only=True)`` plus a JSON card.

A checkpoint ``NAME.pt`` holds a plain ``state_dict``; ``NAME.json`` beside it holds the model config and the
provenance every shipped model must have: training command, data, code version, hardware, metrics.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from molgen.errors import InputError


def code_version() -> str:
    """Git commit of the working tree (with ``+dirty`` when it has changes), or the package version."""
    from molgen import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return f"{__version__}+{head}{'.dirty' if dirty.strip() else ''}"
    except (OSError, subprocess.CalledProcessError):
        return __version__


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def save_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    provenance: Mapping[str, Any],
) -> Path:
    """Write ``path`` (.pt weights) and ``path.with_suffix('.json')`` (config + provenance) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {"config": dict(config), "provenance": {"code_version": code_version(), **provenance}}
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    tmp.replace(path)
    card_path = path.with_suffix(".json")
    card_tmp = card_path.with_suffix(".json.tmp")
    card_tmp.write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    card_tmp.replace(card_path)
    return path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(path: str | Path) -> dict:
    """The JSON card (config and provenance) beside checkpoint ``path``."""
    card_path = Path(path).with_suffix(".json")
    if not card_path.exists():
        raise FileNotFoundError(f"checkpoint {path} has no card {card_path} (config and provenance)")
    try:
        card = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"not a JSON card ({err})", str(card_path)) from None
    if not isinstance(card, dict):
        raise InputError("a card must be a JSON object", str(card_path))
    return card


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return ``(state_dict, card)``; the weights are read with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    card = read_card(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - unpickling errors of any kind: nothing in the file was run
        raise InputError("not a molgen checkpoint: not a torch file of tensors only (nothing in it was run)",
                         str(path)) from None
    if not isinstance(state, dict):
        raise InputError(f"a checkpoint must hold a state dict, not {type(state).__name__}", str(path))
    return state, card


def read_init(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, model config, summary) of a molgen checkpoint to warm-start a new run from; the summary (path,
    steps, training wall time including that of the checkpoint's own init) goes on the new run's card."""
    state, card = load_checkpoint(path)
    prov = card.get("provenance", {})
    own = prov.get("train_wall_s", prov.get("train_wall_s_total", 0.0))  # molecule / sequence cards
    total = float(prov.get("init", {}).get("train_wall_s", 0.0)) + float(own)
    return state, card["config"], {"path": str(path), "global_step": prov.get("global_step"),
                                   "train_wall_s": round(total, 1)}


def card_config(card: Mapping[str, Any], path: str | Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The card's ``config`` holding ``keys``; a card of another kind of model is an ``InputError``."""
    config = card.get("config")
    missing = [k for k in keys if not isinstance(config, dict) or k not in config]
    if not isinstance(config, dict) or missing:
        raise InputError(f"the card has no model config{' with ' + ', '.join(missing) if missing else ''}: a "
                         "checkpoint of another kind of model?", str(Path(path).with_suffix(".json")))
    return config


def load_weights(module: torch.nn.Module, state: Mapping[str, Any], path: str | Path) -> torch.nn.Module:
    """``module.load_state_dict(state)``; weights of another architecture are an ``InputError`` naming the
    checkpoint and the first missing, unexpected or misshapen keys."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
        raise InputError(f"weights of another architecture ({'; '.join(lines)[:300]})", str(path)) from None
    return module
