"""Selection rules over a portfolio of scored designs: top-k, Pareto fronts, a greedy diversity filter.

All objectives are maximised. Point a dominates b when a_j >= b_j for every objective and a_j > b_j for at
least one; the first Pareto front is the set of points no other point dominates, front r + 1 is the first
front of what is left after removing fronts 0..r (non-dominated sorting, NSGA-II).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a >= b) and np.any(a > b))


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Bool mask [n] of the non-dominated rows of ``points`` [n, m] (maximisation; NaN counts as -inf)."""
    p = np.nan_to_num(np.asarray(points, dtype=np.float64), nan=-np.inf)
    if p.ndim != 2:
        raise ValueError(f"points must be [n, m], got shape {p.shape}")
    ge = (p[:, None, :] >= p[None, :, :]).all(-1)  # ge[i, j]: i >= j everywhere
    gt = (p[:, None, :] > p[None, :, :]).any(-1)
    dominated = (ge & gt).any(0)  # some i dominates j
    return ~dominated


def pareto_ranks(points: np.ndarray) -> np.ndarray:
    """Front index per row (0 = the Pareto front), by peeling fronts off one after another."""
    p = np.asarray(points, dtype=np.float64)
    ranks = np.full(len(p), -1, dtype=np.int64)
    left = np.arange(len(p))
    r = 0
    while len(left):
        front = pareto_front(p[left])
        ranks[left[front]] = r
        left = left[~front]
        r += 1
    return ranks


def order(score: np.ndarray, objectives: np.ndarray | None = None) -> np.ndarray:
    """Indices best first: by ``score`` (descending), or by Pareto front and then score when ``objectives``
    [n, m] are given. Ties keep the input order (stable), so a selection is deterministic."""
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    if objectives is None:
        return np.argsort(-s, kind="stable")
    ranks = pareto_ranks(objectives)
    return np.lexsort((-s, ranks))


def select(
    score: np.ndarray,
    k: int,
    *,
    objectives: np.ndarray | None = None,
    distance: Callable[[int, int], float] | None = None,
    min_distance: float | None = None,
) -> list[int]:
    """Up to ``k`` indices, best first (``order``); with ``min_distance`` a candidate is kept only if
    ``distance(candidate, kept) >= min_distance`` for every design kept before it (greedy max-min filter)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kept: list[int] = []
    for i in order(score, objectives).tolist():
        if min_distance is not None and distance is not None and any(distance(i, j) < min_distance for j in kept):
            continue
        kept.append(i)
        if len(kept) == k:
            break
    return kept


# ------------------------------------------------------------------------------------------------ distances
def hamming(a: str, b: str) -> float:
    """Normalised Hamming distance; sequences of different lengths count the overhang as mismatches."""
    n = max(len(a), len(b))
    if n == 0:
        return 0.0
    return (sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))) / n


def tanimoto_distances(smiles: Sequence[str]) -> Callable[[int, int], float]:
    """1 - Tanimoto similarity of Morgan fingerprints (radius 2, 2048 bits); an invalid SMILES is at distance 1
    from everything (it never blocks another design)."""
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = []
    for s in smiles:
        mol = Chem.MolFromSmiles(s) if s else None
        fps.append(gen.GetFingerprint(mol) if mol is not None else None)

    def dist(i: int, j: int) -> float:
        if fps[i] is None or fps[j] is None:
            return 1.0
        return 1.0 - float(DataStructs.TanimotoSimilarity(fps[i], fps[j]))

    return dist


def tm_distances(cas: Sequence[np.ndarray]) -> Callable[[int, int], float]:
    """1 - TM-score (TM-align, the mean of both normalisations) between CA traces; needs ``tmtools``."""
    from molgen.structure.metrics import tm_score

    def dist(i: int, j: int) -> float:
        return 1.0 - 0.5 * (tm_score(cas[i], cas[j]) + tm_score(cas[j], cas[i]))

    return dist
