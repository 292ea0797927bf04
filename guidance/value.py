"""SVDD-MC: a value network v(x_t, t) ~ E[r(x_0) | x_t], fitted by Monte-Carlo regression.

Draw clean samples x_0 from the pretrained model (unguided), score them once, noise them with the forward
process at random times and regress the reward on the noisy state: the minimiser of
E |v(x_t, t) - r(x_0)|^2 is the conditional expectation, the soft value at alpha -> 0 (Li et al. 2024).
Then ``svdd_sample(..., value=as_value(net))`` uses it instead of the reward of the denoised estimate
(no reward calls inside the loop).

    net = TokenValueNet(vocab=6, length=100)                       # or VectorValueNet(dim)
    fit_value(net, x0, rewards, noise=masking_noise(process), steps=500)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


class VectorValueNet(nn.Module):
    """MLP on a flattened continuous state and a Fourier embedding of t."""

    def __init__(self, dim: int, hidden: int = 128, n_freq: int = 8) -> None:
        super().__init__()
        self.register_buffer("freq", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(dim + 2 * n_freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        ang = t.float()[:, None] * self.freq
        return self.net(torch.cat([x.flatten(1).float(), ang.sin(), ang.cos()], -1)).squeeze(-1)


class TokenValueNet(nn.Module):
    """Token embedding -> two dilated convolutions -> masked mean pool (+ t) -> scalar."""

    def __init__(self, vocab: int, hidden: int = 64, pad_id: int | None = None) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.emb = nn.Embedding(vocab, hidden)
        self.conv = nn.Sequential(nn.Conv1d(hidden, hidden, 5, padding=2), nn.SiLU(),
                                  nn.Conv1d(hidden, hidden, 5, padding=4, dilation=2), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        keep = (x != self.pad_id).float() if self.pad_id is not None else torch.ones_like(x, dtype=torch.float32)
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(torch.cat([pooled, t.float()[:, None]], -1)).squeeze(-1)


def gaussian_noise(schedule) -> Callable[[Tensor, Tensor, torch.Generator | None], Tensor]:
    """x_t = alpha(t) x_0 + sigma(t) eps for continuous states."""

    def noise(x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        shape = (-1, *[1] * (x0.ndim - 1))
        t64 = t.double()
        a, s = schedule.alpha(t64).reshape(shape).to(x0.dtype), schedule.sigma(t64).reshape(shape).to(x0.dtype)
        return a * x0 + s * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)

    return noise


def masking_noise(process) -> Callable[[Tensor, Tensor, torch.Generator | None], Tensor]:
    """The masked-diffusion forward process q(x_t | x_0)."""

    def noise(x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        return process.corrupt(x0, t, generator)

    return noise


def fit_value(
    net: nn.Module,
    x0: Tensor,
    rewards: Tensor,
    noise: Callable[[Tensor, Tensor, torch.Generator | None], Tensor],
    *,
    steps: int = 500,
    batch: int = 128,
    lr: float = 2e-3,
    t_range: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> list[float]:
    """Adam on E |v(x_t, t) - r|^2 with fresh (t, x_t) per step; returns the loss trace. Rewards are
    standardised internally and the scale is stored on the net (``as_value`` undoes it)."""
    if x0.shape[0] != rewards.shape[0] or x0.shape[0] < 2:
        raise ValueError(f"need matching x0 [{x0.shape[0]}] and rewards [{rewards.shape[0]}], at least 2")
    r = rewards.double()
    mean, std = float(r.mean()), float(r.std().clamp_min(1e-8))
    net.value_shift, net.value_scale = mean, std
    target = ((r - mean) / std).float()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    lo, hi = t_range
    for _ in range(steps):
        idx = torch.randint(0, x0.shape[0], (batch,), generator=generator)
        t = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
        pred = net(noise(x0[idx], t, generator), t.float())
        loss = torch.mean((pred - target[idx]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def as_value(net: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The SVDD ``value(x_t, t, x0)`` hook of a fitted net (in reward units)."""

    @torch.no_grad()
    def value(x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return net(x_t, t.float()).double() * net.value_scale + net.value_shift

    return value
