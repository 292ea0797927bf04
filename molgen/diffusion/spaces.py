"""Symmetry hooks: how noise is drawn and states are projected, per modality.

Solvers call ``noise_like(x, mask, generator)`` and ``project(x, mask)`` and know nothing else about
molecules or proteins. A mask is bool [B, N] (or any leading shape of x); padded entries get zero noise.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
        pos = x[..., : self.n_dims]
        if mask is None:
            centred = pos - pos.mean(dim=1, keepdim=True)
        else:
            m = mask.to(x.dtype).unsqueeze(-1)
            com = (pos * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
            centred = (pos - com) * m
        return torch.cat([centred, x[..., self.n_dims :]], dim=-1)
