"""Symmetry hooks: how noise is drawn and states are projected, per modality.

Solvers call ``noise_like(x, mask, generator)`` and ``project(x, mask)`` and know nothing else about
molecules or proteins; likelihoods also ask ``dim(x, mask)`` (the dimension of each sample's space) and
``rademacher(x, mask, generator)`` (trace probes in it). A mask is bool [B, N] (or any leading shape of x);
padded entries get zero noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molgen.geometry import centre


def expand_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """Mask reshaped to broadcast against ``x`` (trailing singleton dimensions added)."""
    if mask is None:
        return None
    if mask.shape != x.shape[: mask.ndim]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the leading dims of x {tuple(x.shape)}")
    return mask.reshape(*mask.shape, *([1] * (x.ndim - mask.ndim)))


class Euclidean:
    """Plain R^d: Gaussian noise, no projection beyond zeroing padded entries' noise."""

    def noise_like(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        m = expand_mask(mask, x)
        return z if m is None else z * m

    def project(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return x

    def rademacher(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """A Rademacher vector in an orthonormal basis of the space (entries +-1 at the real entries here):
        E[u u^T] is the projection onto the space and |u|^2 its dimension (Hutchinson's trace probes)."""
        r = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype).mul_(2.0).sub_(1.0)
        m = expand_mask(mask, x)
        return r if m is None else r * m

    def dim(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """[B] long: the dimension of each sample's space, its real entries."""
        m = expand_mask(mask, x)
        per_sample = x[0].numel()
        if m is None:
            return torch.full((x.shape[0],), per_sample, dtype=torch.long, device=x.device)
        return m.expand_as(x).flatten(1).sum(1)


class ZeroCoM(Euclidean):
    """Positions (the first ``n_dims`` channels of x [B, N, F]) live in the zero-centre-of-mass subspace over
    the unmasked atoms: noise is drawn there and states are projected there (EDM, backbone diffusion)."""

    def __init__(self, n_dims: int = 3) -> None:
        self.n_dims = n_dims

    def noise_like(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        return self.project(super().noise_like(x, mask, generator), mask)

    def project(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"ZeroCoM expects x of shape [batch, atoms, features], got {tuple(x.shape)}")
        return torch.cat([centre(x[..., : self.n_dims], mask), x[..., self.n_dims :]], dim=-1)

    def rademacher(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Rademacher coordinates r_1..r_{n-1} per axis in the Helmert basis of the zero-CoM subspace over the n
        real atoms (h_k = (1, ..., 1, -k, 0, ...) / sqrt(k (k + 1)), k ones, in atom order), plain ones for the
        other features. For the atom of rank j (0-based), with r_k drawn at the atom of rank k,
        u_j = sum_{k > j} r_k / sqrt(k (k + 1)) - r_j sqrt(j / (j + 1))."""
        r = super().rademacher(x, mask, generator)
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
        rank = (real.cumsum(1) - 1).clamp_min(0).to(x.dtype).unsqueeze(-1)  # [B, N, 1]
        w = torch.where(real.unsqueeze(-1) & (rank > 0), (rank * (rank + 1)).clamp_min(1.0).rsqrt(), 0.0)
        r_pos = r[..., : self.n_dims]
        c = r_pos * w
        tail = c.flip(1).cumsum(1).flip(1) - c  # sum over the atoms of higher rank
        pos = (tail - r_pos * torch.sqrt(rank / (rank + 1))) * real.unsqueeze(-1).to(x.dtype)
        return torch.cat([pos, r[..., self.n_dims :]], dim=-1)

    def dim(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """[B] long: the real entries less the ``n_dims`` fixed by the centre of mass, (n - 1) * n_dims + the other
        features of the n real atoms."""
        return super().dim(x, mask) - self.n_dims
