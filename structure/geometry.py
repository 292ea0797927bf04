"""Backbone geometry: N, C, O rebuilt from a CA trace, radius of gyration, Kabsch superposition.

Rebuild: each atom of residue i is placed at ``CA_i + sum_kf c_kf g_f b_k`` where ``b_k`` are unit vectors
built from neighbouring CA atoms (bond directions and their cross products, so the placement is
SE(3)-equivariant and chiral), ``g_f`` are invariant features of the CA trace (1, cos and sin of the virtual
CA dihedral i-1..i+2, cosines of the CA angles at i and i+1) and ``c_kf`` (Angstrom) are least-squares fits
over the TS50 chains (``fit_rebuild``; regenerate ``structure/_rebuild_coeffs.py`` with
``python -m molgen.structure.geometry``). The chain ends use their own bases with constant coefficients.
On held-out TS50 chains the rebuilt N, C, O lie about 0.2, 0.2 and 0.65 A from the deposited atoms.
"""

from __future__ import annotations

import numpy as np
import torch


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def _basis(ca: np.ndarray) -> dict[str, np.ndarray]:
    """Per position class, unit basis vectors [n_res, K, 3] for the residues of that class.

    middle (has i-1, i+1, i+2): u=CA(i-1)-CA(i), v=CA(i+1)-CA(i), w=CA(i+2)-CA(i+1), u x v, v x w;
    penultimate (no i+2): u, v, u x v; first: v, w, v x w; last: u, p=CA(i-2)-CA(i-1), u x p.
    """
    n = len(ca)
    d = ca[1:] - ca[:-1]  # d[i] = CA(i+1) - CA(i)
    out = {}
    i = np.arange(1, n - 2)
    u, v, w = -d[i - 1], d[i], d[i + 1]
    out["middle"] = np.stack([u, v, w, np.cross(u, v), np.cross(v, w)], axis=1)
    i = np.array([n - 2])
    u, v = -d[i - 1], d[i]
    out["penultimate"] = np.stack([u, v, np.cross(u, v)], axis=1)
    v, w = d[[0]], d[[1]]
    out["first"] = np.stack([v, w, np.cross(v, w)], axis=1)
    u, p = -d[[n - 2]], -d[[n - 3]]
    out["last"] = np.stack([u, p, np.cross(u, p)], axis=1)
    return {k: _unit(b) for k, b in out.items()}


def dihedral(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> np.ndarray:
    """Signed dihedral angle (radians) of the points p0-p1-p2-p3 (IUPAC sign convention)."""
    b1 = _unit(p2 - p1)
    v = (p0 - p1) - ((p0 - p1) * b1).sum(-1, keepdims=True) * b1
    w = (p3 - p2) - ((p3 - p2) * b1).sum(-1, keepdims=True) * b1
    return np.arctan2((np.cross(b1, v) * w).sum(-1), (v * w).sum(-1))


def _features(ca: np.ndarray) -> dict[str, np.ndarray]:
    """Invariant features g [n, F] per position class (only the middle class has more than a constant)."""
    n = len(ca)
    i = np.arange(1, n - 2)
    theta = dihedral(ca[i - 1], ca[i], ca[i + 1], ca[i + 2])
    cos_a = (_unit(ca[i - 1] - ca[i]) * _unit(ca[i + 1] - ca[i])).sum(-1)
    cos_b = (_unit(ca[i] - ca[i + 1]) * _unit(ca[i + 2] - ca[i + 1])).sum(-1)
    one = np.ones(1)
    middle = np.stack([np.ones_like(theta), np.cos(theta), np.sin(theta), cos_a, cos_b], axis=-1)
    return {"middle": middle, "penultimate": one[:, None], "first": one[:, None], "last": one[:, None]}


def _design(ca: np.ndarray) -> dict[str, np.ndarray]:
    """Design tensors [n, 3 xyz, K*F]: basis vectors times invariant features."""
    basis, feats = _basis(ca), _features(ca)
    return {c: np.einsum("nf,nkx->nxkf", feats[c], b).reshape(len(b), 3, -1) for c, b in basis.items()}


def _class_index(n: int) -> dict[str, np.ndarray]:
    return {
        "middle": np.arange(1, n - 2),
        "penultimate": np.array([n - 2]),
        "first": np.array([0]),
        "last": np.array([n - 1]),
    }


def fit_rebuild(backbones: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Least-squares coefficients [3 atoms (N, C, O), K] per position class from full backbones [L, 4, 3]."""
    rows: dict[str, list] = {}
    for bb in backbones:
        bb = np.asarray(bb, dtype=np.float64)
        idx, design = _class_index(len(bb)), _design(bb[:, 1])
        for cls, b in design.items():
            rel = bb[idx[cls]][:, [0, 2, 3]] - bb[idx[cls], 1][:, None]  # [n, 3 atoms, 3 xyz]
            ok = np.isfinite(rel).all(axis=(1, 2))
            rows.setdefault(cls, []).append((b[ok], rel[ok]))
    coeffs = {}
    for cls, parts in rows.items():
        b = np.concatenate([p[0] for p in parts])  # [n, 3 xyz, K*F]
        rel = np.concatenate([p[1] for p in parts])  # [n, 3 atoms, 3 xyz]
        a = b.reshape(-1, b.shape[-1])
        coeffs[cls] = np.stack([np.linalg.lstsq(a, rel[:, atom].reshape(-1), rcond=None)[0] for atom in range(3)])
    return coeffs


def rebuild_backbone(ca: np.ndarray, coeffs: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Backbone [L, 4, 3] (N, CA, C, O) from a CA trace [L, 3] (L >= 4) with fitted ideal geometry."""
    ca = np.asarray(ca, dtype=np.float64)
    if ca.ndim != 2 or ca.shape[1] != 3:
        raise ValueError(f"CA trace must be [L, 3], got {ca.shape}")
    if len(ca) < 4:
        raise ValueError(f"rebuilding a backbone needs at least 4 residues, got {len(ca)}")
    if coeffs is None:
        from molgen.structure._rebuild_coeffs import REBUILD_COEFFS

        coeffs = {k: np.asarray(v) for k, v in REBUILD_COEFFS.items()}
    out = np.repeat(ca[:, None], 4, axis=1)
    idx = _class_index(len(ca))
    for cls, x in _design(ca).items():
        rel = np.einsum("ak,nxk->nax", coeffs[cls], x)
        out[idx[cls], 0] += rel[:, 0]
        out[idx[cls], 2] += rel[:, 1]
        out[idx[cls], 3] += rel[:, 2]
    return out.astype(np.float32)


def project_ca_bonds(ca: torch.Tensor, bond: float = 3.80, tol: float = 1e-3, max_sweeps: int = 500) -> torch.Tensor:
    """SHAKE projection (Ryckaert et al. 1977, equal masses) of CA traces [..., L, 3] onto |CA_i+1 - CA_i| = bond.

    Each bond k moves its two atoms by -/+ (d_k - bond)/2 along its own direction; even and odd bonds share no
    atom, so they are corrected alternately (block Gauss-Seidel) until every |d_k - bond| < ``tol``. Moves are
    along bond vectors and equal and opposite: the projection is rotation/translation equivariant and keeps the
    centre of mass. Raises when ``max_sweeps`` sweeps do not converge (e.g. coincident consecutive atoms).
    """
    x = ca.clone()
    if x.shape[-2] < 2:
        return x
    for _ in range(max_sweeps):
        for parity in (0, 1):
            r = x[..., parity + 1 :: 2, :] - x[..., parity:-1:2, :]  # bonds parity, parity+2, ...
            n = r.shape[-2]
            d = r.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            corr = 0.5 * (d - bond) * r / d
            x[..., parity : parity + 2 * n : 2, :] += corr
            x[..., parity + 1 : parity + 1 + 2 * n : 2, :] -= corr
        dev = ((x[..., 1:, :] - x[..., :-1, :]).norm(dim=-1) - bond).abs()
        if float(dev.max()) < tol:
            return x
    worst = float(dev.max())
    raise ValueError(f"CA-CA bond projection did not converge in {max_sweeps} sweeps (max deviation {worst:.3g} A)")


def radius_of_gyration(ca: np.ndarray) -> float:
    """Rg = sqrt(mean_i |x_i - mean x|^2) in Angstrom."""
    ca = np.asarray(ca, dtype=np.float64)
    return float(np.sqrt(((ca - ca.mean(0)) ** 2).sum(-1).mean()))


def natural_rg(n: int) -> float:
    """Radius of gyration of a natural globular domain of ``n`` residues: about 3.3 N^0.31 A."""
    return 3.3 * n**0.31


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD between point sets [N, 3] after optimal proper rotation and translation (``molgen.geometry``)."""
    from molgen.geometry import rmsd_superposed

    return float(rmsd_superposed(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))


def _write_coeffs(folder: str, target: str) -> None:
    """Fit the rebuild coefficients on the chains in ``folder`` and write them as a Python module."""
    from molgen.structure.io import list_structure_files, read_backbone

    coeffs = fit_rebuild([read_backbone(p).coords for p in list_structure_files(folder)])
    lines = [
        f'"""Generated by ``python -m molgen.structure.geometry {folder}``: N, C, O rebuild coefficients."""',
        "",
        "REBUILD_COEFFS = {",
    ]
    for cls, c in coeffs.items():
        rows = ",\n".join("        [" + ", ".join(f"{x:.5f}" for x in row) + "]" for row in c)
        lines.append(f'    "{cls}": [\n{rows},\n    ],')
    lines.append("}")
    with open(target, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    _write_coeffs(
        sys.argv[1] if len(sys.argv) > 1 else "data/structure/ts50",
        str(Path(__file__).with_name("_rebuild_coeffs.py")),
    )
