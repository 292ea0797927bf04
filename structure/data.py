"""Training chains: CA traces of real proteins, unbroken segments with their secondary structure, a held-out
split by sequence cluster, random contiguous crops, padded batches.

Sources (``default_sources``): TS50 (committed in ``data/structure/ts50``), and, read from the data path
(default ``../shared/data`` or ``$MOLGEN_DATA``, never committed), Pfam40 domains, PoseBusters monomers and
the CA-only SCOPe 40 % chains (``scop40_chains_ca.cal.gz``). A source is a folder of PDB/mmCIF files or a
``.cal`` file of CA traces.
"""

from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from molgen.structure.io import Backbone, list_structure_files, read_backbones, read_cal
from molgen.structure.sse import UNKNOWN_SS, encode_ss, psea

REPO = Path(__file__).resolve().parent.parent
TS50_DIR = REPO / "data" / "structure" / "ts50"
SCOP_FILE = Path("proteins") / "scop40_chains_ca.cal.gz"
ROUNDED_SIGMA = 0.15  # A: below this noise level, coordinates rounded to 0.1 A are not training targets


@dataclass(frozen=True)
class Segment:
    """An unbroken CA trace ``ca`` [L, 3] (float32, Angstrom) with its P-SEA labels ``ss`` and its source.
    ``rounded``: the coordinates are rounded to 0.1 A (the CA-only sets), so they are no target below
    ``ROUNDED_SIGMA`` (their rounding error, 0.03 A per coordinate, would be learned as structure)."""

    ca: np.ndarray
    ss: str
    name: str
    rounded: bool = False


def default_data_path() -> Path:
    """``$MOLGEN_DATA`` if set, else ``../shared/data`` beside the repository (where the shared data live)."""
    return Path(os.environ.get("MOLGEN_DATA", REPO.parent / "shared" / "data"))


def default_sources(data_path: str | Path | None = None, scop: bool = True) -> list[Path]:
    """Training sources: committed TS50 plus Pfam40, PoseBusters monomers and (``scop``) the SCOPe 40 % CA
    traces from the data path."""
    root = Path(data_path) if data_path else default_data_path()
    extra = [root / "proteins" / "pfam40", root / "proteins" / "posebusters_monomers"]
    extra += [root / SCOP_FILE] if scop else []
    missing = [str(p) for p in extra if not p.exists()]
    if missing:
        raise FileNotFoundError(f"training data not found: {missing} (set --data-path or $MOLGEN_DATA)")
    return [TS50_DIR, *extra]


def load_backbones(sources: list[Path]) -> list[Backbone]:
    """Every chain of every source: PDB/mmCIF folders (read with ``strict=False``) and ``.cal`` files. A file
    of a folder that cannot be read is left out with a warning naming it and the reason."""
    chains: list[Backbone] = []
    for source in sources:
        if source.is_dir():
            found, skipped = read_backbones(list_structure_files(source), min_length=1)
            chains += found
            for s in skipped:
                if "no CA atom" not in s.reason:  # a residue without CA is a chain break, not a loss
                    warnings.warn(f"left out of the training data: {s}", stacklevel=2)
        else:
            chains += read_cal(source)
    return chains


def is_rounded(ca: np.ndarray, step: float = 0.1) -> bool:
    """Whether every coordinate is a multiple of ``step`` (to float32 precision)."""
    scaled = np.asarray(ca, dtype=np.float64) / step
    return bool(np.abs(scaled - np.round(scaled)).max() < 1e-3)


def segments_of(chains: list[Backbone], min_length: int = 40) -> list[Segment]:
    """Every unbroken segment of at least ``min_length`` residues, with P-SEA labels of the segment; a
    ValueError when there is none."""
    out = []
    for bb in chains:
        for a, b in bb.segments():
            if b - a >= min_length:
                ca = bb.ca[a:b].astype(np.float32)
                out.append(Segment(ca, psea(ca), f"{bb.name}:{a}-{b}", is_rounded(ca)))
    if not out:
        raise ValueError(f"no chain segments of >= {min_length} residues in {len(chains)} chain(s)")
    return out


def load_segments(sources: list[Path], min_length: int = 40) -> list[Segment]:
    """``segments_of`` every chain of ``sources``."""
    return segments_of(load_backbones(sources), min_length)


def load_chains(sources: list[Path]) -> list[np.ndarray]:
    """Whole-chain CA traces [L, 3] of every chain of ``sources`` (reference sets for novelty)."""
    return [bb.ca for bb in load_backbones(sources)]


def kmers(sequence: str, k: int = 4) -> set[str]:
    return {sequence[i : i + k] for i in range(len(sequence) - k + 1)} - {"X" * k}


def sequence_clusters(sequences: list[str], k: int = 4, shared: float = 0.3) -> list[int]:
    """Single-linkage clusters: two chains join when ``shared`` of the shorter one's distinct k-mers occur in
    the other (about 40 % identity and above for k = 4; unrelated chains share a few per cent). Returns a
    cluster label per chain (the index of its cluster's first chain)."""
    sets = [kmers(s, k) for s in sequences]
    parent = list(range(len(sets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            small = min(len(sets[i]), len(sets[j]))
            if small and len(sets[i] & sets[j]) >= shared * small:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(sets))]


def held_out_split(chains: list[Backbone], fraction: float = 0.05) -> tuple[list[Backbone], list[Backbone]]:
    """(training, held-out) chains: whole sequence clusters are held out, chosen by a hash of the cluster's
    first chain name (stable when sources are added), until ``fraction`` of the chains are held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    labels = sequence_clusters([bb.sequence for bb in chains])
    clusters: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        clusters.setdefault(c, []).append(i)
    order = sorted(clusters, key=lambda c: zlib.crc32(chains[c].name.encode()))
    held: set[int] = set()
    for c in order:
        if len(held) >= fraction * len(chains):
            break
        held.update(clusters[c])
    return [bb for i, bb in enumerate(chains) if i not in held], [bb for i, bb in enumerate(chains) if i in held]


@dataclass
class CropBatch:
    """A padded batch: ``x`` [B, L, 3] centred crops, ``mask`` [B, L], ``ss`` [B, L] labels
    (``UNKNOWN_SS`` on padding) and ``rounded`` [B] (the chain's coordinates are rounded)."""

    x: torch.Tensor
    mask: torch.Tensor
    ss: torch.Tensor
    rounded: torch.Tensor


def crop_batch(
    segments: list[Segment],
    rng: np.random.Generator,
    min_length: int = 40,
    max_length: int = 128,
    edge_budget: int = 40_000,
) -> CropBatch:
    """A padded batch of random contiguous crops: length L ~ U[min, max], about ``edge_budget / L^2`` chains.

    Each chain is a random window of L residues (the whole segment when shorter), centred at zero."""
    length = int(rng.integers(min_length, max_length + 1))
    size = max(1, edge_budget // length**2)
    x = torch.zeros(size, length, 3)
    mask = torch.zeros(size, length, dtype=torch.bool)
    ss = torch.full((size, length), UNKNOWN_SS, dtype=torch.long)
    rounded = torch.zeros(size, dtype=torch.bool)
    for k, i in enumerate(rng.integers(0, len(segments), size)):
        seg = segments[i]
        n = min(length, len(seg.ca))
        start = int(rng.integers(0, len(seg.ca) - n + 1))
        ca = seg.ca[start : start + n]
        x[k, :n] = torch.from_numpy(ca - ca.mean(0))
        mask[k, :n] = True
        ss[k, :n] = encode_ss(seg.ss[start : start + n])
        rounded[k] = seg.rounded
    return CropBatch(x, mask, ss, rounded)
