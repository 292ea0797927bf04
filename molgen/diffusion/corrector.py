"""Langevin corrector steps for predictor-corrector sampling (Song et al. 2021, "Score-based generative
modeling through stochastic differential equations", Algorithm 4).

After the predictor has moved the state to grid point t_{i+1}, each corrector step runs one step of Langevin
dynamics on the marginal p_{t_{i+1}}, which leaves it invariant in the limit of small steps:

    x <- x + e s(x) + sqrt(2 e) z,   s(x) = (alpha D(x) - x) / sigma^2,   z ~ N(0, I) (the space's noise),

with the step e set per sample from a signal-to-noise ratio r, e = 2 a (r |z| / |s|)^2, where
a = alpha_i^2 / alpha_{i+1}^2 is the signal kept over the transition just taken (DDPM's 1 - beta_i; 1 for
variance-exploding schedules). Each step costs one model call; the first reuses the estimate the predictor
carried to t_{i+1} when it has one (UniPC), so every solver pays ``steps`` extra calls per transition.
Norms run over the real entries only (the score is zero at padding).

The steps are unadjusted (no Metropolis test), and the per-sample step correlates with |x - mean|: on a Gaussian
marginal N(m, v I) in d dimensions one step from the exact law gives E|x' - m|^2 / (d v) =
1 + 16 a r^2 / (d - 2) + 4 a^2 r^4 (d + 2) / (d - 2), and many steps settle near (1 + a r^2)(d + 2) / (d - 2) (the
tests check both): the marginal is kept to O(r^2), closely only in high dimension or at small r.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion.plan import Model, Points, Row
from molgen.diffusion.spaces import expand_mask

CORRECTORS = ("langevin",)


@dataclass(frozen=True)
class Langevin:
    """``steps`` Langevin steps at signal-to-noise ratio ``snr`` after every predictor step."""

    snr: float = 0.16
    steps: int = 1

    def __post_init__(self) -> None:
        if not self.snr > 0:
            raise ValueError(f"the Langevin corrector's snr must be > 0, got {self.snr}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"the Langevin corrector's steps must be an integer >= 1, got {self.steps!r}")


def get_corrector(name: str, options: Mapping[str, Any] | None = None) -> Langevin:
    """The corrector ``name`` with ``options`` (``langevin``: snr, steps)."""
    if name not in CORRECTORS:
        raise ValueError(f"unknown corrector {name!r}; choose one of {list(CORRECTORS)}")
    unknown = set(options or {}) - set(Langevin.__dataclass_fields__)
    if unknown:
        raise ValueError(f"corrector {name!r} has no option(s) {sorted(unknown)}; it takes snr, steps")
    return Langevin(**(options or {}))


def score(at: Points, x: Tensor, x0: Tensor, mask: Tensor | None) -> Tensor:
    """s = (alpha x0 - x) / sigma^2, zero at padded entries."""
    s = torch.addcmul(-x / at.sigma**2, x0, at.alpha / at.sigma**2)
    m = expand_mask(mask, s)
    return s if m is None else s * m


def step_size(s: Tensor, z: Tensor, snr: float, kept: Tensor) -> Tensor:
    """e = 2 a (snr |z| / |s|)^2 per sample, shaped to broadcast against the state (``kept`` = a)."""
    ratio = z.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)
    e = 2.0 * (snr * ratio) ** 2
    return e.reshape(-1, *([1] * (s.ndim - 1))) * kept


def langevin(corrector: Langevin, row: Row, x: Tensor, x0: Tensor | None, mask: Tensor | None, model: Model,
             noise: Callable[[], Tensor]) -> Tensor:
    """``corrector.steps`` Langevin steps at t_{i+1} (``row.next``) from the predicted state ``x``; ``x0``: the
    estimate the predictor carried there (or None). Every step's state is projected, its padding kept."""
    at = row.next
    kept = (row.at.alpha / at.alpha) ** 2
    for _ in range(corrector.steps):
        d = x0 if x0 is not None else model.denoise(x, at, carried=True)
        s, z = score(at, x, d, mask), noise()
        e = step_size(s, z, corrector.snr, kept)
        x = model.point(x + e * s + torch.sqrt(2.0 * e) * z)
        x0 = None
    return x
