"""Equivariant optimal-transport coupling of prior noise to molecules (Klein et al. 2023, as in SemlaFlow).

For one molecule with zero-CoM positions X [n, 3] and noise E [n, F] (positions E[:, :3], zero CoM, then
features), the coupling looks for a permutation P and a rotation R in SO(3) that make the squared transport cost
c(P, R) = sum_i |X_i - (P E)_i,:3 R|^2 small, and returns P E with its positions rotated by R (features only
permuted). It alternates the two exact partial minimisations, starting from a rotation so that the result is
equivariant:

    R <- kabsch(E, X);   repeat ``rounds`` times:  P <- hungarian(|X_i - (E R)_j|^2);  R <- kabsch(P E, X).

Each step minimises c over one of P, R with the other fixed, so c never exceeds the identity coupling's.
Rotating X by Q turns every R into R Q and leaves every cost matrix unchanged, so the coupled noise turns by Q.
Rows are permuted, never mixed, and rotations about the origin keep the centre of mass at zero. The prior carries
no discrete atom types (its type channels are Gaussian), so atoms are matched on positions alone.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from molgen.geometry import kabsch


def hungarian(x: Tensor, y: Tensor) -> Tensor:
    """The permutation p minimising sum_i |x_i - y_{p(i)}|^2 for x, y [n, 3] (scipy's linear_sum_assignment)."""
    cost = torch.cdist(x, y).pow(2).numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.from_numpy(np.asarray(cols, dtype=np.int64))


def couple_one(x: Tensor, noise: Tensor, rounds: int = 2) -> Tensor:
    """OT-coupled noise [n, F] for one molecule's positions x [n, 3] (both zero-CoM; see the module docstring)."""
    a, b = noise[:, :3].double(), x.double()
    perm = torch.arange(len(x))
    rot = kabsch(a, b)
    for _ in range(rounds):
        perm = hungarian(b, a @ rot)
        rot = kabsch(a[perm], b)
    out = noise[perm].clone()
    out[:, :3] = (a[perm] @ rot).to(noise.dtype)
    return out


@torch.no_grad()
def ot_couple(x0: Tensor, noise: Tensor, mask: Tensor, rounds: int = 2) -> Tensor:
    """``couple_one`` per molecule of a padded batch: positions ``x0[..., :3]``, noise [B, N, F], mask [B, N];
    padded rows of the noise are returned unchanged."""
    out = noise.clone()
    for i in range(len(x0)):
        idx = torch.nonzero(mask[i]).flatten()
        out[i, idx] = couple_one(x0[i, idx, :3].cpu(), noise[i, idx].cpu(), rounds).to(noise.device)
    return out


def transport_cost(x0: Tensor, noise: Tensor, mask: Tensor) -> Tensor:
    """Squared position transport cost per molecule, sum_i |x0_i - noise_i|^2 over real atoms: [B]."""
    return ((x0[..., :3] - noise[..., :3]).pow(2).sum(-1) * mask).sum(-1)
