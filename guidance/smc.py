"""Sequential Monte Carlo core: log-weights, effective sample size, resampling, adaptive schedules.

Particles come in G independent groups of K (one group per requested output), flattened group-major:
particle ``g * K + k``. Log-weights are [G, K]; every function is batched over groups, runs on the
weights' device and never synchronises with the host. Random draws go through the caller's generator.

With normalised weights w_k = exp(l_k) / sum_j exp(l_j):

* ESS = (sum_k w_k)^2 / sum_k w_k^2 = exp(2 logsumexp(l) - logsumexp(2 l)), in [1, K].
* multinomial: K i.i.d. draws from w.
* stratified: one uniform in each stratum [k/K, (k+1)/K), inverted through the CDF of w.
* systematic: a single uniform u, points (u + k) / K.
* residual: floor(K w_k) deterministic copies, the remaining R = K - sum floor(K w) by multinomial on the
  residuals K w_k - floor(K w_k).

All four are unbiased: E[#copies of k] = K w_k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion import select


def normalise(log_w: Tensor) -> Tensor:
    """Log-weights shifted so that each group's weights sum to one."""
    return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size per group, [G] (float in [1, K])."""
    return torch.exp(2.0 * torch.logsumexp(log_w, -1) - torch.logsumexp(2.0 * log_w, -1))


def _weights(log_w: Tensor) -> Tensor:
    return torch.softmax(log_w.double(), dim=-1)


def _invert_cdf(w: Tensor, u: Tensor) -> Tensor:
    """Indices k with CDF_{k-1} <= u < CDF_k, for sorted points u [G, K] in [0, 1)."""
    cdf = torch.cumsum(w, -1)
    cdf = cdf / cdf[..., -1:]  # exact 1 at the end against rounding
    return torch.searchsorted(cdf, u, right=True).clamp_max(w.shape[-1] - 1)


def multinomial(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    w = _weights(log_w)
    return torch.multinomial(w, w.shape[-1], replacement=True, generator=generator)


def stratified(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    w = _weights(log_w)
    g, k = w.shape
    u = torch.rand(g, k, generator=generator, dtype=w.dtype, device=w.device)
    return _invert_cdf(w, (torch.arange(k, dtype=w.dtype, device=w.device) + u) / k)


def systematic(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    w = _weights(log_w)
    g, k = w.shape
    u = torch.rand(g, 1, generator=generator, dtype=w.dtype, device=w.device)
    return _invert_cdf(w, (torch.arange(k, dtype=w.dtype, device=w.device) + u) / k)


def residual(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    w = _weights(log_w)
    g, k = w.shape
    expected = k * w
    copies = torch.floor(expected)
    left = (k - copies.sum(-1)).round().long()  # [G] residual draws per group
    res = (expected - copies).clamp_min(0.0)
    res = torch.where(left[:, None] > 0, res, torch.ones_like(res))  # any valid row when nothing is left
    draws = torch.multinomial(res, k, replacement=True, generator=generator)  # [G, K]; first `left` used
    used = torch.arange(k, device=w.device)[None] < left[:, None]
    copies = copies + torch.zeros_like(copies).scatter_add_(-1, draws, used.to(copies.dtype))
    return _invert_cdf(copies, (torch.arange(k, dtype=w.dtype, device=w.device) + 0.5)[None].expand(g, k) / k)


RESAMPLERS: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {
    "multinomial": multinomial, "stratified": stratified, "systematic": systematic, "residual": residual,
}


def get_resampler(name: str) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    if name not in RESAMPLERS:
        raise ValueError(f"unknown resampling method {name!r}; choose one of {sorted(RESAMPLERS)}")
    return RESAMPLERS[name]


def global_index(local: Tensor) -> Tensor:
    """Ancestors [G, K] within groups -> indices into the flattened [G * K] population."""
    g, k = local.shape
    return (local + k * torch.arange(g, device=local.device)[:, None]).reshape(-1)


@dataclass(frozen=True)
class ResamplePolicy:
    """When to resample: at every ``every``-th step (1 = each step), and there only the groups whose
    ESS / K is below ``ess_threshold`` (None = always). ``every=None`` never resamples before the end.
    Weights accumulate between resampling events; a resampled group restarts from equal weights."""

    method: str = "systematic"
    every: int | None = 1
    ess_threshold: float | None = 0.5

    def __post_init__(self) -> None:
        get_resampler(self.method)
        if self.every is not None and (isinstance(self.every, bool) or int(self.every) != self.every
                                       or self.every < 1):
            raise ValueError(f"resample every must be an integer >= 1 or None, got {self.every!r}")
        if self.ess_threshold is not None and not 0.0 < self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must lie in (0, 1], got {self.ess_threshold}")

    def due(self, step: int) -> bool:
        return self.every is not None and (step + 1) % self.every == 0


def resample(
    log_w: Tensor, policy: ResamplePolicy, generator: torch.Generator | None = None, force: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """One resampling event: (index [G * K] into the population, new log-weights [G, K], resampled [G]).

    Groups that need no resampling keep their particles (identity index) and their accumulated weights."""
    g, k = log_w.shape
    need = torch.ones(g, dtype=torch.bool, device=log_w.device)
    if policy.ess_threshold is not None and not force:
        need = ess(log_w) < policy.ess_threshold * k
    local = get_resampler(policy.method)(log_w, generator)
    local = torch.where(need[:, None], local, torch.arange(k, device=log_w.device)[None])
    new_w = torch.where(need[:, None], torch.zeros_like(log_w), log_w)
    return global_index(local), new_w, need


def log_mean_weight(log_w: Tensor) -> Tensor:
    """log (1/K sum_k exp l_k) per group: the factor a resampling event contributes to log Z."""
    return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])


@dataclass
class Particles:
    """A population: sampler state [G * K], log-weights [G, K] and per-particle tensors that move with it
    (running potentials, rewards). ``log_z`` accumulates the normalising-constant estimate per group."""

    state: Any
    log_w: Tensor
    carry: dict[str, Tensor]
    log_z: Tensor
    resamples: Tensor  # [G] resampling events so far
    selector: Callable[[Any, Tensor], Any] = select  # state, index -> state (the engine's ``select``)

    @classmethod
    def start(cls, state: Any, groups: int, selector: Callable[[Any, Tensor], Any] = select) -> Particles:
        batch = state.x.shape[0]
        if batch % groups:
            raise ValueError(f"a population of {batch} does not split into {groups} groups")
        k = batch // groups
        dev = state.x.device
        zeros = torch.zeros(groups, k, dtype=torch.float64, device=dev)
        return cls(state, zeros, {}, torch.zeros(groups, dtype=torch.float64, device=dev),
                   torch.zeros(groups, dtype=torch.long, device=dev), selector)

    @property
    def groups(self) -> int:
        return self.log_w.shape[0]

    @property
    def per_group(self) -> int:
        return self.log_w.shape[1]

    def reweight(self, delta: Tensor) -> None:
        """Add log-potential increments [G * K] (or [G, K])."""
        self.log_w = self.log_w + delta.reshape(self.log_w.shape).to(self.log_w.dtype)

    def resample(self, policy: ResamplePolicy, generator: torch.Generator | None = None,
                 force: bool = False) -> Tensor:
        """Resample per ``policy``; returns the [G] mask of groups that were resampled."""
        before = self.log_w
        index, self.log_w, done = resample(before, policy, generator, force)
        self.log_z = self.log_z + torch.where(done, log_mean_weight(before), torch.zeros_like(self.log_z))
        self.resamples = self.resamples + done.long()
        self.state = self.selector(self.state, index)
        self.carry = {name: v.index_select(0, index) for name, v in self.carry.items()}
        return done

    def log_evidence(self) -> Tensor:
        """Estimate of log of the normalising constant (resampled factors times the current mean weight)."""
        return self.log_z + log_mean_weight(self.log_w)
