"""The step-scaled probability-flow ODE: AlphaFold 3's ``step_scale`` eta, integrated by any solver.

In y = x / alpha and rho = sigma / alpha the probability-flow ODE is dy/drho = (y - D(y, rho)) / rho. AlphaFold 3
(and Protenix) scale its step by eta = 1.5, which integrates

    dy/drho = eta (y - D(y, rho)) / rho:

for eta > 1 the noise left in the state falls faster than the level the denoiser is told, so every call removes a
little more than it sees (a lower-temperature sampler; AF3's chains owe their precise bonds to it). With
s = rho_0 (rho / rho_0)^eta this is the ordinary PF-ODE in s,

    dy/ds = (y - D(y, rho(s))) / s,   rho(s) = rho_0 (s / rho_0)^(1 / eta),

so any solver integrates it to its own order on the grid s_i = rho_0 (rho_i / rho_0)^eta with the denoiser asked
at rho_i; AF3's step y + eta (rho' - rho) (y - D) / rho is its first-order (Euler) form. rho_0 is the first grid
point (after a warm start, the level it ends at), or ``step_scale_below`` when that is lower: above it the run is
the plain ODE (AF3's churn keeps its high-noise steps from over-denoising in the same way), below it the scaled
one, and the state's noise and the told noise agree at rho_0.

``Sampler(..., step_scale=eta, step_scale_below=rho)`` / ``sample(...)`` apply both: the grid (named or given) is
the told noise levels, and the output is the denoiser's x0 at the last of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from molgen.diffusion.parameterization import check_prediction, to_x0
from molgen.diffusion.schedules import Schedule
from molgen.diffusion.solvers import get_solver


def applies(solver: str) -> bool:
    """Whether ``solver`` takes the engine's step scale: its ODE (deterministic) solvers do."""
    return not get_solver(solver).stochastic


def scaled_rho(rho: Tensor, rho_0: Tensor | float, eta: float) -> Tensor:
    """s = rho below rho_0 scaled: rho_0 (rho / rho_0)^eta for rho < rho_0, rho above (its inverse is
    ``scaled_rho(s, rho_0, 1 / eta)``)."""
    rho_0 = torch.as_tensor(rho_0, dtype=rho.dtype, device=rho.device)
    return torch.where(rho < rho_0, rho_0 * (rho / rho_0) ** eta, rho)


def anchor(schedule: Schedule, t_grid: Tensor, below: float | None) -> Tensor:
    """rho_0 of each row of ``t_grid`` ([B or 1, n]): its first point, or ``below`` when that is lower."""
    first = schedule.rho(t_grid[..., :1].to(torch.float64))
    return first if below is None else first.clamp(max=below)


def scaled_times(schedule: Schedule, t_grid: Tensor, eta: float, below: float | None = None) -> Tensor:
    """State times of a step-scaled run for the told times ``t_grid`` ([B or 1, n], decreasing along the last
    axis): rho(s_i) = scaled_rho(rho(t_i), rho_0, eta) with rho_0 = ``anchor``."""
    rho = schedule.rho(t_grid.to(torch.float64))
    return schedule.t_of_rho(scaled_rho(rho, anchor(schedule, t_grid, below), eta))


class StepScaled:
    """A model whose plain PF-ODE is ``model``'s step-scaled one: a state at time t (noise s = rho(t)) is
    denoised by ``model`` at the time t_m with rho(t_m) = scaled_rho(s, rho_0, 1 / eta), on the input
    alpha(t_m) x / alpha(t). Returns x0 whatever ``model`` predicts (``prediction = "x0"``). ``rho_0``: [1] or
    [B] (``anchor``)."""

    prediction = "x0"

    def __init__(self, model: Callable[..., Tensor], schedule: Schedule, eta: float, rho_0: Tensor,
                 prediction: str) -> None:
        self.model, self.schedule, self.eta = model, schedule, eta
        self.rho_0 = rho_0.to(torch.float64).reshape(-1)
        self.model_prediction = check_prediction(prediction)
        self._rho_0_on: dict[torch.device, Tensor] = {}  # per-device copies: no host copy inside the loop

    def anchor_on(self, device: torch.device) -> Tensor:
        """rho_0 on ``device`` (copied once: a CUDA graph cannot hold a host-to-device copy)."""
        if device not in self._rho_0_on:
            self._rho_0_on[device] = self.rho_0.to(device)
        return self._rho_0_on[device]

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        sched = self.schedule
        t64 = t.to(torch.float64)
        t_m = sched.t_of_rho(scaled_rho(sched.rho(t64), self.anchor_on(t.device), 1.0 / self.eta))
        alpha_m, sigma_m = sched.alpha(t_m), sched.sigma(t_m)
        shape = (-1, *([1] * (x.ndim - 1)))
        x_m = x * (alpha_m / sched.alpha(t64)).to(x.dtype).reshape(shape)
        out = self.model(x_m, t_m.to(t.dtype), **cond)
        derivs = sched.d_alpha_sigma(t_m) if self.model_prediction == "velocity" else (None, None)
        coef = [None if c is None else c.to(x.dtype).reshape(shape) for c in (alpha_m, sigma_m, *derivs)]
        return to_x0(self.model_prediction, out, x_m, *coef)
