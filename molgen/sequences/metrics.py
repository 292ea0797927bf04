"""Sequence metrics: k-mer spectra, ViennaRNA folding statistics, JASPAR motif hit rates."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from molgen.sequences.alphabets import DNA, Alphabet


def kmer_frequencies(seqs: Sequence[str], alphabet: Alphabet, k: int) -> np.ndarray:
    """Normalised counts of all ``K^k`` k-mers (lexicographic in ``alphabet.letters``) over ``seqs``."""
    K = alphabet.size
    lookup = np.full(256, -1, dtype=np.int64)
    for i, c in enumerate(alphabet.letters):
        lookup[ord(c)] = i
    counts = np.zeros(K**k, dtype=np.float64)
    for s in seqs:
        ids = lookup[np.frombuffer(alphabet.normalise(s).encode(), dtype=np.uint8)]
        if len(ids) < k:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ids, k)
        windows = windows[(windows >= 0).all(1)]
        codes = windows @ (K ** np.arange(k - 1, -1, -1))
        counts += np.bincount(codes, minlength=K**k)
    total = counts.sum()
    return counts / total if total > 0 else counts


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either vector is constant."""
    a, b = np.asarray(a, float) - np.mean(a), np.asarray(b, float) - np.mean(b)
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def fold_stats(seqs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """ViennaRNA MFE per nucleotide (kcal/mol/nt) and base-paired fraction ``2 pairs / length``."""
    import RNA

    mfe, bp = [], []
    for s in seqs:
        structure, energy = RNA.fold(s.upper().replace("T", "U"))
        mfe.append(energy / len(s))
        bp.append(structure.count("(") * 2 / len(s))
    return np.array(mfe), np.array(bp)


# --------------------------------------------------------------------------------------------- motifs
@lru_cache(maxsize=2)
def jaspar_pwms(
    release: str = "JASPAR2024", pseudocount: float = 0.8
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """CORE vertebrate motifs as log2-odds PWMs vs a uniform background, zero-padded to the longest.

    Returns ``(ids, pwm [M, 4, W], widths [M])``; ``p = (count + pc/4) / (n + pc)``.
    """
    from pyjaspar import jaspardb

    motifs = jaspardb(release=release).fetch_motifs(collection="CORE", tax_group=["vertebrates"])
    width = max(m.length for m in motifs)
    pwm = np.zeros((len(motifs), 4, width))
    for i, m in enumerate(motifs):
        counts = np.array([m.counts[c] for c in "ACGT"], dtype=np.float64)
        p = (counts + pseudocount / 4) / (counts.sum(0, keepdims=True) + pseudocount)
        pwm[i, :, : m.length] = np.log2(p / 0.25)
    return tuple(f"{m.matrix_id} {m.name}" for m in motifs), pwm, np.array([m.length for m in motifs])


def motif_hits(
    seqs: Sequence[str], pwm: np.ndarray, widths: np.ndarray, rel_threshold: float = 0.85, chunk: int = 64
) -> np.ndarray:
    """Per sequence and motif: 1 when some window on either strand scores >= ``min + rel (max - min)``.

    Scores by a 1-D convolution of the one-hot sequence with each PWM; windows running past a sequence's end
    are excluded. Returns ``[N, M]`` booleans.
    """
    w = torch.from_numpy(pwm).float()
    rc = w.flip(1).flip(2)  # reverse complement: A<->T, C<->G (rows ACGT reversed) and positions reversed
    shift = torch.from_numpy(pwm.shape[2] - widths)  # rc of a zero-padded PWM starts after the padding
    lo = np.where(np.arange(pwm.shape[2])[None] < widths[:, None], pwm.min(1), 0).sum(1)
    hi = pwm.max(1).sum(1)
    thr = torch.from_numpy(lo + rel_threshold * (hi - lo)).float()
    W, out = pwm.shape[2], []
    for i in range(0, len(seqs), chunk):
        batch = seqs[i : i + chunk]
        L = max(len(s) for s in batch)
        ids = torch.full((len(batch), L + 2 * W), -1, dtype=torch.long)
        for j, s in enumerate(batch):
            ids[j, W : W + len(s)] = DNA.encode(s, f"sequence {i + j + 1}")
        onehot = torch.nn.functional.one_hot(ids.clamp(min=0), 4).float() * (ids >= 0)[..., None].float()
        x = onehot.transpose(1, 2)
        fwd, rev = torch.nn.functional.conv1d(x, w), torch.nn.functional.conv1d(x, rc)  # [B, M, P]
        pos = torch.arange(fwd.shape[2])[None, None, :]
        lens = torch.tensor([len(s) for s in batch])[:, None, None]
        # forward window start = pos - W (0-based in the sequence), needs start >= 0 and start + width <= len
        start_f = pos - W
        ok_f = (start_f >= 0) & (start_f + torch.from_numpy(widths)[None, :, None] <= lens)
        start_r = pos - W + shift[None, :, None]
        ok_r = (start_r >= 0) & (start_r + torch.from_numpy(widths)[None, :, None] <= lens)
        best = torch.maximum(
            torch.where(ok_f, fwd, torch.full_like(fwd, -1e9)).amax(-1),
            torch.where(ok_r, rev, torch.full_like(rev, -1e9)).amax(-1),
        )
        out.append((best >= thr[None, :] - 1e-6).numpy())
    return np.concatenate(out, axis=0)
