"""Modalities behind one protocol (``Modality``) and one registry: every entry point reads them from here.

    from molgen.modalities import get_modality, names
    mod = get_modality("molecules")            # molecules, rna, dna, backbones, sequences (any alphabet)
    model = mod.load()                          # the shipped checkpoint
    mols = mod.sample(model, 8, preset=mod.preset("default"), seed=0)

A new modality is one module in this package (a ``Modality`` subclass) plus its ``register`` call below.
"""

from __future__ import annotations

from molgen.modalities.backbones import Backbones
from molgen.modalities.base import Design, Modality, Preset, choose
from molgen.modalities.molecules import Molecules
from molgen.modalities.sequences import Sequences

_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Add ``modality`` under its name (it then appears in every command and in campaigns)."""
    if modality.name in _REGISTRY:
        raise ValueError(f"a modality named {modality.name!r} is already registered")
    _REGISTRY[modality.name] = modality
    return modality


def names() -> tuple[str, ...]:
    """The registered modality names, in registration order."""
    return tuple(_REGISTRY)


def get_modality(name: str) -> Modality:
    """The registered modality ``name``; an unknown name raises listing the registered ones."""
    return _REGISTRY[choose("modality", name, _REGISTRY)]


for _m in (Molecules(), Sequences("rna"), Sequences("dna"), Backbones(), Sequences("sequences")):
    register(_m)

__all__ = ["Design", "Modality", "Preset", "choose", "get_modality", "names", "register"]
