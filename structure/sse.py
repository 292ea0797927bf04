"""Secondary structure from CA atoms alone: P-SEA (Labesse et al. 1997, CABIOS 13:291).

At residue i, with CA positions x:

    d2 = |x_{i-1} - x_{i+1}|,  d3 = |x_{i-1} - x_{i+2}|,  d4 = |x_{i-1} - x_{i+3}|,
    tau = angle(x_{i-1}, x_i, x_{i+1}),  alpha = dihedral(x_{i-1}, x_i, x_{i+1}, x_{i+2}).

A residue is a strict helix candidate when d3 and d4 lie in the helix windows (5.3 +- 0.5, 6.4 +- 0.6 A) or
tau and alpha do (89 +- 12 deg, 50 +- 20 deg); relaxed when d3 or tau does. Strict strand: d2, d3, d4 in
6.7 +- 0.6, 9.9 +- 0.9, 12.4 +- 1.1 A, or tau in 124 +- 14 deg with alpha in [-180, -125] or [145, 180] deg;
relaxed: d3 alone. Helices are runs of >= 5 strict candidates, strands runs of >= 4, or of 3 with at least
5 CA contacts at 4.2-5.2 A (a partner strand); each element then grows by one relaxed residue at each end.
Strand wins where both apply. The labels are DSSP's three states: ``H`` (helix), ``E`` (strand) and
``-`` (the rest).
"""

from __future__ import annotations

import numpy as np
import torch

SS_STATES = "-HE"  # the 3-state alphabet (coil, helix, strand), in the order of the model's labels
UNKNOWN_SS = len(SS_STATES)  # label index of a residue whose secondary structure is not given

_HELIX = {"d3": (4.8, 5.8), "d4": (5.8, 7.0), "tau": (77.0, 101.0), "alpha": (30.0, 70.0)}
_STRAND = {"d2": (6.1, 7.3), "d3": (9.0, 10.8), "d4": (11.3, 13.5), "tau": (110.0, 138.0)}
_STRAND_ALPHA = ((-180.0, -125.0), (145.0, 180.0))
_CONTACT = (4.2, 5.2)  # A: CA-CA distance of residues on paired strands
_MIN_CONTACTS = 5


def _within(v: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return (v >= window[0]) & (v <= window[1])  # NaN (undefined at the ends) is never within


def _shifted_distance(x: np.ndarray, k: int) -> np.ndarray:
    """d_k at residue i = |x_{i-1} - x_{i+k-1}| (NaN where either is outside the chain)."""
    n = len(x)
    out = np.full(n, np.nan)
    if n > k:
        out[1 : n - k + 1] = np.linalg.norm(x[k:] - x[:-k], axis=-1)
    return out


def ca_geometry(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-residue d2, d3, d4 (A), tau and alpha (degrees) of a CA trace [L, 3]; NaN where undefined."""
    n = len(x)
    geo = {f"d{k}": _shifted_distance(x, k) for k in (2, 3, 4)}
    tau, alpha = np.full(n, np.nan), np.full(n, np.nan)
    if n >= 3:
        u, v = x[:-2] - x[1:-1], x[2:] - x[1:-1]
        cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
        tau[1:-1] = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    if n >= 4:
        b1, b2, b3 = x[1:-2] - x[:-3], x[2:-1] - x[1:-2], x[3:] - x[2:-1]
        n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
        y = (np.cross(n1, n2) * b2).sum(-1) / np.linalg.norm(b2, axis=-1)
        alpha[1:-2] = np.degrees(np.arctan2(y, (n1 * n2).sum(-1)))
    return {**geo, "tau": tau, "alpha": alpha}


def _runs(mask: np.ndarray, length: int) -> np.ndarray:
    """True on every residue of a run of at least ``length`` consecutive True values."""
    out = np.zeros_like(mask)
    start = None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            if i - start >= length:
                out[start:i] = True
            start = None
    return out


def _grow(element: np.ndarray, relaxed: np.ndarray) -> np.ndarray:
    """Each run of ``element`` plus its flanking residue at either end where ``relaxed`` holds."""
    left = np.zeros_like(element)
    right = np.zeros_like(element)
    left[:-1] = element[1:] & ~element[:-1]  # residue just before a run starts
    right[1:] = element[:-1] & ~element[1:]  # residue just after a run ends
    return element | ((left | right) & relaxed)


def _paired(x: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Runs of ``candidate`` with at least ``_MIN_CONTACTS`` CA contacts at 4.2-5.2 A to any residue."""
    d = np.linalg.norm(x[:, None] - x[None, :], axis=-1)
    contacts = _within(d, _CONTACT).sum(1)
    out = np.zeros_like(candidate)
    padded = np.concatenate([[False], candidate, [False]]).astype(int)
    starts, ends = np.flatnonzero(np.diff(padded) == 1), np.flatnonzero(np.diff(padded) == -1)
    for a, b in zip(starts, ends):
        if contacts[a:b].sum() >= _MIN_CONTACTS:
            out[a:b] = True
    return out


def psea(ca: np.ndarray) -> str:
    """P-SEA 3-state string (``H``, ``E``, ``-``) of one unbroken CA trace [L, 3] in Angstrom."""
    x = np.asarray(ca, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"psea expects a CA trace [L, 3], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("psea expects finite CA coordinates (split the chain at missing residues)")
    g = ca_geometry(x)
    strict_helix = (_within(g["d3"], _HELIX["d3"]) & _within(g["d4"], _HELIX["d4"])) | (
        _within(g["tau"], _HELIX["tau"]) & _within(g["alpha"], _HELIX["alpha"])
    )
    relaxed_helix = _within(g["d3"], _HELIX["d3"]) | _within(g["tau"], _HELIX["tau"])
    strand_alpha = _within(g["alpha"], _STRAND_ALPHA[0]) | _within(g["alpha"], _STRAND_ALPHA[1])
    strict_strand = (
        _within(g["d2"], _STRAND["d2"]) & _within(g["d3"], _STRAND["d3"]) & _within(g["d4"], _STRAND["d4"])
    ) | (_within(g["tau"], _STRAND["tau"]) & strand_alpha)
    relaxed_strand = _within(g["d3"], _STRAND["d3"])
    helix = _grow(_runs(strict_helix, 5), relaxed_helix)
    strand = _grow(_runs(strict_strand, 4) | _paired(x, _runs(strict_strand, 3)), relaxed_strand)
    labels = np.full(len(x), "-")
    labels[helix] = "H"
    labels[strand] = "E"
    return "".join(labels)


def paired_strand(ca: np.ndarray, labels: str) -> np.ndarray:
    """[L] bool: strand residues (``E`` in ``labels``) with a CA of another strand residue, |i - j| >= 3, at a
    partner's distance (``_CONTACT``): the strands that form a sheet rather than lie alone, extended."""
    x = np.asarray(ca, dtype=np.float64)
    strand = np.array([c == "E" for c in labels], dtype=bool)
    d = np.linalg.norm(x[:, None] - x[None, :], axis=-1)
    offset = np.abs(np.arange(len(x))[:, None] - np.arange(len(x))[None, :])
    return strand & (_within(d, _CONTACT) & (offset >= 3) & strand[None, :]).any(1)


def encode_ss(ss: str) -> torch.Tensor:
    """Label indices of a 3-state string (``-`` or ``C`` coil, ``H`` helix, ``E`` strand)."""
    table = {"-": 0, "C": 0, "H": 1, "E": 2}
    bad = sorted(set(ss) - set(table))
    if bad:
        raise ValueError(f"secondary structure letters must be H, E and C (or -), got {bad}")
    return torch.tensor([table[c] for c in ss], dtype=torch.long)


def composition_of(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 3] fractions of coil, helix and strand among the unmasked residues of label indices [B, N]."""
    onehot = torch.nn.functional.one_hot(labels.clamp_max(UNKNOWN_SS), UNKNOWN_SS + 1)[..., :UNKNOWN_SS]
    counts = (onehot * mask[..., None]).sum(1).to(torch.float32)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
