"""Shipped sequence checkpoints: paths, loading and the model/process pair they define."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from molgen.checkpoints import card_config, load_checkpoint, load_weights
from molgen.diffusion.discrete import MaskedDiffusion
from molgen.sequences.alphabets import Alphabet, alphabet_from_card
from molgen.sequences.data import REPO_ROOT, LengthDistribution
from molgen.sequences.model import DenoiserConfig, SequenceDenoiser
from molgen.sequences.training import build_process

SHIPPED_DIR = REPO_ROOT / "data" / "sequences"


SHIPPED = {"rna": "rna_default.pt", "dna": "dna_default.pt", "rna_design": "rna_design.pt"}


def default_checkpoint(model: str) -> Path:
    """The shipped checkpoint of ``rna``, ``dna`` or ``rna_design`` (the structure-conditioned RNA model)."""
    if model not in SHIPPED:
        raise ValueError(f"no default checkpoint for {model!r}; choose one of {', '.join(SHIPPED)}")
    return SHIPPED_DIR / SHIPPED[model]


@dataclass
class Pretrained:
    model: SequenceDenoiser
    process: MaskedDiffusion
    alphabet: Alphabet
    lengths: LengthDistribution
    label_names: tuple[str, ...]
    card: dict

    def label_id(self, name: str) -> int:
        """Index of a condition label; an unknown label raises listing the known ones."""
        if name not in self.label_names:
            known = ", ".join(self.label_names) or "none (unconditional model)"
            raise ValueError(f"unknown condition label {name!r}; this model knows: {known}")
        return self.label_names.index(name)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Build the denoiser and process from a checkpoint written by ``molgen train rna|dna|sequences``."""
    state, card = load_checkpoint(path, map_location=device)
    cfg = card_config(card, path, ("denoiser", "alphabet"))
    model = load_weights(SequenceDenoiser(DenoiserConfig(**cfg["denoiser"])), state, path)
    model.eval().to(device)
    alphabet = alphabet_from_card(cfg["alphabet"])
    process = build_process(
        alphabet.size, alphabet.pad_id, alphabet.mask_id, cfg.get("schedule", "loglinear")
    )
    lengths = LengthDistribution.from_dict(cfg["length_distribution"])
    return Pretrained(model, process, alphabet, lengths, tuple(cfg.get("label_names", ())), card)
