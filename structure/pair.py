"""Pair track for the backbone denoiser: a pair representation z_ij refined by triangle multiplicative updates
(Jumper et al. 2021, Algorithms 11-12), as in Genie2, FrameFlow and Proteina, at a width that trains on CPU.

    z_ij = E_off(clip(j - i)) + W_d rbf(|x_i - x_j|) + W_t c_noise                     (inputs)
    z_ij += sigmoid(g(z)_ij) * W_o LN(sum_k a_ik b_jk) / n        (outgoing edges; incoming: sum_k a_ki b_kj)
    a = sigmoid(W_ga z) * W_a z,  b likewise, both masked to real residues,

with ``x`` the (preconditioned) noisy CA positions. Each EGNN layer reads the pair track through its own
zero-initialised projection ``z -> message pre-activation``, so adding the track to a trained model leaves
its function unchanged at step 0 (a warm start).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAIR_RBF = 16
PAIR_RBF_RANGE = (3.0, 21.0)  # Angstrom: sequence neighbours to the far side of a small domain


def radial_basis(x: Tensor, count: int, lo: float, hi: float) -> Tensor:
    """[B, N, N, count] Gaussian radial basis of the pairwise distances of x [B, N, 3], centres evenly over
    [lo, hi] with the spacing as width."""
    d = torch.sqrt(((x[:, :, None] - x[:, None, :]) ** 2).sum(-1) + 1e-8)
    width = (hi - lo) / (count - 1)
    return torch.exp(-(((d[..., None] - torch.linspace(lo, hi, count, dtype=x.dtype, device=x.device)) / width) ** 2))


class TriangleMultiplication(nn.Module):
    """One gated triangle multiplicative update of z [B, N, N, C] (``outgoing`` or incoming edges)."""

    def __init__(self, c: int, outgoing: bool) -> None:
        super().__init__()
        self.outgoing = outgoing
        self.norm_in, self.norm_out = nn.LayerNorm(c), nn.LayerNorm(c)
        self.project = nn.Linear(c, 4 * c)  # a, b and their gates
        self.gate, self.out = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, z: Tensor, pair_mask: Tensor) -> Tensor:
        zn = self.norm_in(z)
        a, b, ga, gb = self.project(zn).chunk(4, dim=-1)
        m = pair_mask[..., None]
        a, b = a * torch.sigmoid(ga) * m, b * torch.sigmoid(gb) * m
        n = pair_mask.any(-1).sum(-1).clamp_min(1).to(z.dtype)[:, None, None, None]
        rule = "bikc,bjkc->bijc" if self.outgoing else "bkic,bkjc->bijc"
        update = torch.einsum(rule, a, b) / n
        return z + torch.sigmoid(self.gate(zn)) * self.out(self.norm_out(update)) * m


class PairTrack(nn.Module):
    """Pair features of a CA trace, refined by ``blocks`` (outgoing, incoming) triangle updates, and one
    zero-initialised projection to the message width per EGNN layer."""

    def __init__(self, c: int, blocks: int, hidden: int, layers: int, max_offset: int) -> None:
        super().__init__()
        self.max_offset = max_offset
        self.offset = nn.Embedding(2 * max_offset + 1, c)
        self.rbf = nn.Linear(PAIR_RBF, c, bias=False)
        self.noise = nn.Linear(hidden, c)
        self.triangles = nn.ModuleList(TriangleMultiplication(c, outgoing=k % 2 == 0) for k in range(2 * blocks))
        self.norm = nn.LayerNorm(c)
        self.to_message = nn.ModuleList(nn.Linear(c, hidden, bias=False) for _ in range(layers))
        for proj in self.to_message:
            nn.init.zeros_(proj.weight)

    def forward(self, pos: Tensor, temb: Tensor, offset: Tensor, pair_mask: Tensor,
                extra: Tensor | None = None) -> list[Tensor]:
        """Per-layer message terms [B, N, N, hidden] from positions [B, N, 3], the noise embedding [B, hidden],
        clipped residue offsets (as indices) [B, N, N], the mask of real pairs [B, N, N] and an optional input
        term [B, N, N, c] (the self-conditioning estimate's features)."""
        rbf = radial_basis(pos, PAIR_RBF, *PAIR_RBF_RANGE)
        z = self.offset(offset) + self.rbf(rbf) + self.noise(temb)[:, None, None]
        if extra is not None:
            z = z + extra
        real = pair_mask.bool()
        for tri in self.triangles:
            z = tri(z, real)
        z = self.norm(z)
        return [proj(z) for proj in self.to_message]
