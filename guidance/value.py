"""SVDD-MC: a value network v(x_t, t) ~ E[r(x_0) | x_t], fitted by Monte-Carlo regression.

Draw clean samples x_0 from the pretrained model (unguided), score them once, noise them with the forward
process at random times and regress the reward on the noisy state: the minimiser of
E |v(x_t, t) - r(x_0)|^2 is the conditional expectation, the soft value at alpha -> 0 (Li et al. 2024).
Then ``svdd_sample(..., value=as_value(net))`` uses it instead of the reward of the denoised estimate
(no reward calls inside the loop).

    net = TokenValueNet(vocab=6, pad_id=4)          # sequences; PointValueNet (molecules, backbones); VectorValueNet
    fit_value(net, x0, rewards, noise=masking_noise(process), steps=500)

``python -m molgen.guidance.train_value`` records the whole recipe (unguided samples of a shipped model, their
rewards, the fit) in a checkpoint card.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from molgen.progress import progress


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
    """Token embedding -> two dilated convolutions -> masked mean and max pools (+ t) -> scalar (the max pool
    suits rewards carried by one site, such as a motif's best window)."""

    def __init__(self, vocab: int, hidden: int = 64, pad_id: int | None = None) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.emb = nn.Embedding(vocab, hidden)
        self.conv = nn.Sequential(nn.Conv1d(hidden, hidden, 5, padding=2), nn.SiLU(),
                                  nn.Conv1d(hidden, hidden, 5, padding=4, dilation=2), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(2 * hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        keep = (x != self.pad_id).float() if self.pad_id is not None else torch.ones_like(x, dtype=torch.float32)
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
        mean = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)
        top = h.masked_fill(keep[..., None] == 0, -1e4).amax(1)
        return self.head(torch.cat([mean, top, t.float()[:, None]], -1)).squeeze(-1)


class PointValueNet(nn.Module):
    """E(3)-invariant value of a point-cloud state x [B, N, 3 + F] (positions first, then per-point features)
    with a padding mask [B, N].

    Positions are rescaled by c_in = sigma_d / sqrt(alpha^2 sigma_d^2 + sigma^2) (unit scale at every noise
    level, VP or VE); each point gets its features, a radial histogram of its distances to the other points
    (Gaussian basis) and the logSNR; an MLP per point, masked mean and max pools, an MLP to a scalar.
    ``schedule`` is the diffusion model's (not saved with the weights: pass the same one when loading)."""

    def __init__(self, features: int, schedule, sigma_data: float = 1.0, hidden: int = 64, n_rbf: int = 16,
                 r_max: float = 3.0) -> None:
        super().__init__()
        self.schedule, self.sigma_data = schedule, float(sigma_data)
        self.register_buffer("centres", torch.linspace(0.0, r_max, n_rbf))
        self.width = r_max / n_rbf
        self.point = nn.Sequential(nn.Linear(features + n_rbf + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                   nn.SiLU())
        self.head = nn.Sequential(nn.Linear(2 * hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n = x.shape[:2]
        mask = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        t64 = t.double()
        a, s = self.schedule.alpha(t64), self.schedule.sigma(t64)
        c_in = (self.sigma_data / torch.sqrt(a**2 * self.sigma_data**2 + s**2)).float()
        lam = (self.schedule.lam(t64).clamp(-20.0, 20.0) / 10.0).float()
        m = mask.float()
        pos = x[..., :3].float() * c_in[:, None, None]
        dist = torch.cdist(pos, pos)
        pair = (m[:, :, None] * m[:, None, :]) * (1.0 - torch.eye(n, device=x.device))
        rbf = torch.exp(-(((dist[..., None] - self.centres) / self.width) ** 2))  # [B, N, N, R]
        hist = (rbf * pair[..., None]).sum(2) / (m.sum(1)[:, None, None] - 1.0).clamp_min(1.0)
        feats = torch.cat([x[..., 3:].float(), hist, lam[:, None, None].expand(b, n, 1)], -1)
        h = self.point(feats)
        mean = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        top = h.masked_fill(~mask[..., None], -1e4).amax(1)
        return self.head(torch.cat([mean, top, lam[:, None]], -1)).squeeze(-1)


Noise = Callable[[Tensor, Tensor, torch.Generator | None, Tensor | None], Tensor]


def gaussian_noise(schedule, space=None) -> Noise:
    """x_t = alpha(t) x_0 + sigma(t) eps for continuous states; eps from ``space.noise_like`` (zero centre of
    mass, zero on padding) when a space is given."""

    def noise(x0: Tensor, t: Tensor, generator: torch.Generator | None, mask: Tensor | None = None) -> Tensor:
        shape = (-1, *[1] * (x0.ndim - 1))
        t64 = t.double()
        a, s = schedule.alpha(t64).reshape(shape).to(x0.dtype), schedule.sigma(t64).reshape(shape).to(x0.dtype)
        if space is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        else:
            eps = space.noise_like(x0, mask, generator)
        return a * x0 + s * eps

    return noise


def masking_noise(process) -> Noise:
    """The masked-diffusion forward process q(x_t | x_0) (padding tokens stay)."""

    def noise(x0: Tensor, t: Tensor, generator: torch.Generator | None, mask: Tensor | None = None) -> Tensor:
        return process.corrupt(x0, t, generator)

    return noise


def fit_value(
    net: nn.Module,
    x0: Tensor,
    rewards: Tensor,
    noise: Noise,
    *,
    mask: Tensor | None = None,
    steps: int = 500,
    batch: int = 128,
    lr: float = 2e-3,
    t_range: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> list[float]:
    """Adam on E |v(x_t, t) - r|^2 with fresh (t, x_t) per step; returns the loss trace. Rewards are
    standardised internally and the scale is stored on the net (``as_value`` undoes it). With a padding
    ``mask`` [B, N] the net is called as ``net(x_t, t, mask)``."""
    if x0.shape[0] != rewards.shape[0] or x0.shape[0] < 2:
        raise ValueError(f"need matching x0 [{x0.shape[0]}] and rewards [{rewards.shape[0]}], at least 2")
    r = rewards.double()
    mean, std = float(r.mean()), float(r.std().clamp_min(1e-8))
    net.value_shift, net.value_scale = mean, std
    target = ((r - mean) / std).float()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    lo, hi = t_range
    for _ in progress(range(steps), "fitting value net"):
        idx = torch.randint(0, x0.shape[0], (batch,), generator=generator)
        t = lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)
        if mask is None:
            pred = net(noise(x0[idx], t, generator, None), t.float())
        else:
            pred = net(noise(x0[idx], t, generator, mask[idx]), t.float(), mask[idx])
        loss = torch.mean((pred - target[idx]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def as_value(net: nn.Module) -> Callable[..., Tensor]:
    """The SVDD ``value(x_t, t, x0, mask=None)`` hook of a fitted net (in reward units)."""

    @torch.no_grad()
    def value(x_t: Tensor, t: Tensor, x0: Tensor, mask: Tensor | None = None) -> Tensor:
        out = net(x_t, t.float()) if mask is None else net(x_t, t.float(), mask)
        return out.double() * net.value_scale + net.value_shift

    return value
