"""Rigid geometry of point sets shared by every 3D modality: centring and optimal superposition (Kabsch).

Point sets are tensors [..., n, 3] with an optional bool mask [..., n] of real points.
"""

from __future__ import annotations

import torch
from torch import Tensor


def centre(pos: Tensor, mask: Tensor | None = None) -> Tensor:
    """pos minus its centre of mass over the real points; masked points are set to zero."""
    if mask is None:
        return pos - pos.mean(dim=-2, keepdim=True)
    m = mask.to(pos.dtype).unsqueeze(-1)
    com = (pos * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1.0)
    return (pos - com) * m


def kabsch(a: Tensor, b: Tensor) -> Tensor:
    """The rotation R in SO(3) minimising |a R - b|^2 for centred point sets a, b [..., n, 3] (Kabsch 1976):
    with the SVD a^T b = U S V^T, R = U diag(1, 1, d) V^T and d = sign det(U V^T) (no reflection).
    The SVD runs in float64; R has a's dtype."""
    u, _, vt = torch.linalg.svd((a.transpose(-1, -2) @ b).double())
    d = torch.sign(torch.det(u @ vt))
    flip = torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1)
    return ((u * flip.unsqueeze(-2)) @ vt).to(a.dtype)


def superpose(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation R [..., 3, 3] and translation c [..., 1, 3] minimising |src R + c - dst|^2."""
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    rot = kabsch(src - mu_s, dst - mu_d)
    return rot, mu_d - mu_s @ rot


def rmsd_superposed(src: Tensor, dst: Tensor) -> Tensor:
    """Root-mean-square deviation [...] of src from dst after optimal superposition."""
    rot, shift = superpose(src, dst)
    return ((src @ rot + shift - dst) ** 2).sum(-1).mean(-1).sqrt()
