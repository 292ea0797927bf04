"""Time grids: where a sampler evaluates the model, separate from the solver.

A grid is ``n`` descending times t_0 = t_max > ... > t_{n-1} = t_min of a schedule; the sampler evaluates the
model at each and, after the last, returns the denoised estimate (the step to sigma = 0 is always first
order, where higher-order extrapolation in lambda would blow up). All grids are computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from molgen.diffusion.schedules import Schedule


def _ends(schedule: Schedule, t_max: float | None, t_min: float | None) -> tuple[Tensor, Tensor]:
    hi = torch.tensor(schedule.t_max if t_max is None else t_max, dtype=torch.float64)
    lo = torch.tensor(schedule.t_min if t_min is None else t_min, dtype=torch.float64)
    if not hi > lo:
        raise ValueError(f"a time grid needs t_max > t_min, got t_max={float(hi)}, t_min={float(lo)}")
    return hi, lo


def _in_lambda(schedule: Schedule, hi: Tensor, lo: Tensor, fractions: Tensor) -> Tensor:
    """Times whose lambda sits at ``fractions`` (0 -> t_max, 1 -> t_min) of the way in lambda."""
    lam_hi, lam_lo = schedule.lam(hi), schedule.lam(lo)
    t = schedule.t_of_lam(lam_hi + fractions * (lam_lo - lam_hi))
    t[0], t[-1] = hi, lo  # exact ends despite round-off of the inverse
    return t


def time_uniform(schedule: Schedule, n: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """Equal steps in t."""
    hi, lo = _ends(schedule, t_max, t_min)
    return torch.linspace(float(hi), float(lo), n, dtype=torch.float64) if n > 1 else hi.reshape(1)


def logsnr(schedule: Schedule, n: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """Equal steps in lambda = log SNR (DPM-Solver's recommended grid)."""
    hi, lo = _ends(schedule, t_max, t_min)
    if n == 1:
        return hi.reshape(1)
    return _in_lambda(schedule, hi, lo, torch.linspace(0.0, 1.0, n, dtype=torch.float64))


def time_quadratic(schedule: Schedule, n: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """Equal steps in sqrt(t): dense near the data end."""
    hi, lo = _ends(schedule, t_max, t_min)
    if n == 1:
        return hi.reshape(1)
    return torch.linspace(float(hi.sqrt()), float(lo.sqrt()), n, dtype=torch.float64) ** 2


def karras(
    schedule: Schedule, n: int, t_max: float | None = None, t_min: float | None = None, rho: float = 7.0
) -> Tensor:
    """Karras et al. (2022): equal steps in (sigma/alpha)^(1/rho), rho = 7 by default. Any rho != 0 works:
    rho -> +-infinity is the logSNR (geometric) grid, rho < 0 puts more points at low noise than it."""
    if rho == 0:
        raise ValueError("the Karras grid needs rho != 0 (7 is EDM's; rho < 0 is denser at low noise)")
    hi, lo = _ends(schedule, t_max, t_min)
    if n == 1:
        return hi.reshape(1)
    r_hi, r_lo = schedule.rho(hi) ** (1.0 / rho), schedule.rho(lo) ** (1.0 / rho)
    r = (r_hi + torch.linspace(0.0, 1.0, n, dtype=torch.float64) * (r_lo - r_hi)) ** rho
    t = schedule.t_of_rho(r)
    t[0], t[-1] = hi, lo
    return t


def sigmoid(
    schedule: Schedule, n: int, t_max: float | None = None, t_min: float | None = None, slope: float = 3.0
) -> Tensor:
    """Steps in lambda spaced by a sigmoid of equal steps in [-slope, slope]: dense at both ends."""
    hi, lo = _ends(schedule, t_max, t_min)
    if n == 1:
        return hi.reshape(1)
    s = torch.sigmoid(torch.linspace(-slope, slope, n, dtype=torch.float64))
    return _in_lambda(schedule, hi, lo, (s - s[0]) / (s[-1] - s[0]))


GRIDS: dict[str, Callable[..., Tensor]] = {
    "time_uniform": time_uniform,
    "logsnr": logsnr,
    "time_quadratic": time_quadratic,
    "karras": karras,
    "sigmoid": sigmoid,
}


def get_grid(name: str, schedule: Schedule, n: int, **kwargs: float) -> Tensor:
    """``n`` descending evaluation times of grid ``name`` (float64)."""
    if name not in GRIDS:
        raise ValueError(f"unknown time grid {name!r}; choose one of {sorted(GRIDS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a time grid needs at least one point, got {n!r}")
    return GRIDS[name](schedule, n, **kwargs)
