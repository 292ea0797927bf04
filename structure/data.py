"""Training chains: CA traces of real proteins, unbroken segments, random contiguous crops, padded batches.

Sources (``default_sources``): TS50 (committed in ``data/structure/ts50``), and, read from the data path
(default ``../shared/data`` or ``$MOLGEN_DATA``, never committed), Pfam40 domains and PoseBusters monomers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from molgen.structure.io import list_structure_files, read_backbone

REPO = Path(__file__).resolve().parent.parent
TS50_DIR = REPO / "data" / "structure" / "ts50"


def default_data_path() -> Path:
    """``$MOLGEN_DATA`` if set, else ``../shared/data`` beside the repository (where the shared data live)."""
    return Path(os.environ.get("MOLGEN_DATA", REPO.parent / "shared" / "data"))


def default_sources(data_path: str | Path | None = None) -> list[Path]:
    """Folders of training chains: committed TS50 plus Pfam40 and PoseBusters monomers from the data path."""
    root = Path(data_path) if data_path else default_data_path()
    extra = [root / "proteins" / "pfam40", root / "proteins" / "posebusters_monomers"]
    missing = [str(p) for p in extra if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"training data folders not found: {missing} (set --data-path or $MOLGEN_DATA)")
    return [TS50_DIR, *extra]


def load_segments(folders: list[Path], min_length: int = 40) -> tuple[list[np.ndarray], list[str]]:
    """CA traces [L, 3] (float32) of every unbroken segment of at least ``min_length`` residues, with names.

    Files are read with ``strict=False``: non-standard residues and residues without CA become chain breaks.
    """
    segments, names = [], []
    for folder in folders:
        for path in list_structure_files(folder):
            bb = read_backbone(path, strict=False)
            for a, b in bb.segments():
                if b - a >= min_length:
                    segments.append(bb.ca[a:b].astype(np.float32))
                    names.append(f"{bb.name}:{a}-{b}")
    if not segments:
        raise ValueError(f"no chain segments of >= {min_length} residues in {[str(f) for f in folders]}")
    return segments, names


def load_chains(folders: list[Path]) -> list[np.ndarray]:
    """Whole-chain CA traces [L, 3] of every structure file in ``folders`` (reference sets for novelty)."""
    return [read_backbone(p, strict=False).ca for folder in folders for p in list_structure_files(folder)]


def crop_batch(
    segments: list[np.ndarray],
    rng: np.random.Generator,
    min_length: int = 40,
    max_length: int = 128,
    edge_budget: int = 40_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of random contiguous crops: length L ~ U[min, max], about ``edge_budget / L^2`` chains.

    Each chain is a random window of L residues (the whole segment when shorter), centred at zero.
    Returns ``x`` [B, L, 3] and ``mask`` [B, L].
    """
    length = int(rng.integers(min_length, max_length + 1))
    size = max(1, edge_budget // length**2)
    x = torch.zeros(size, length, 3)
    mask = torch.zeros(size, length, dtype=torch.bool)
    for k, i in enumerate(rng.integers(0, len(segments), size)):
        seg = segments[i]
        n = min(length, len(seg))
        start = int(rng.integers(0, len(seg) - n + 1))
        ca = seg[start : start + n]
        x[k, :n] = torch.from_numpy(ca - ca.mean(0))
        mask[k, :n] = True
    return x, mask
