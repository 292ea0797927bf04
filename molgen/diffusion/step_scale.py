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
point, where the state's noise and the told noise agree (after a warm start, the level it ends at).

``Sampler(..., step_scale=eta)`` / ``sample(..., step_scale=eta)`` apply both: the grid (named or given) is the
told noise levels, and the output is the denoiser's x0 at the last of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from molgen.diffusion.parameterization import check_prediction, to_x0
from molgen.diffusion.schedules import Schedule


def scaled_rho(rho: Tensor, rho_0: Tensor | float, eta: float) -> Tensor:
    """s = rho_0 (rho / rho_0)^eta (its inverse is ``scaled_rho(s, rho_0, 1 / eta)``)."""
    return rho_0 * (rho / rho_0) ** eta


def scaled_times(schedule: Schedule, t_grid: Tensor, eta: float) -> Tensor:
    """State times of a step-scaled run for the told times ``t_grid`` ([n] or [B, n], decreasing along the last
    axis): rho(s_i) = rho_0 (rho(t_i) / rho_0)^eta with rho_0 = rho(t_0) of each row."""
    rho = schedule.rho(t_grid.to(torch.float64))
    return schedule.t_of_rho(scaled_rho(rho, rho[..., :1], eta))


class StepScaled:
    """A model whose plain PF-ODE is ``model``'s step-scaled one: a state at time t (noise s = rho(t)) is
    denoised by ``model`` at the time t_m with rho(t_m) = rho_0 (s / rho_0)^(1 / eta), on the input
    alpha(t_m) x / alpha(t). Returns x0 whatever ``model`` predicts (``prediction = "x0"``). ``rho_0``: [1] or
    [B], each sample's first grid point."""

    prediction = "x0"

    def __init__(self, model: Callable[..., Tensor], schedule: Schedule, eta: float, rho_0: Tensor,
                 prediction: str) -> None:
        if not eta > 0:
            raise ValueError(f"step_scale must be > 0, got {eta}")
        self.model, self.schedule, self.eta, self.rho_0 = model, schedule, eta, rho_0.to(torch.float64)
        self.model_prediction = check_prediction(prediction)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        sched = self.schedule
        t64 = t.to(torch.float64)
        t_m = sched.t_of_rho(scaled_rho(sched.rho(t64), self.rho_0.to(t.device), 1.0 / self.eta))
        alpha_m, sigma_m = sched.alpha(t_m), sched.sigma(t_m)
        shape = (-1, *([1] * (x.ndim - 1)))
        x_m = x * (alpha_m / sched.alpha(t64)).to(x.dtype).reshape(shape)
        out = self.model(x_m, t_m.to(t.dtype), **cond)
        derivs = sched.d_alpha_sigma(t_m) if self.model_prediction == "velocity" else (None, None)
        coef = [None if c is None else c.to(x.dtype).reshape(shape) for c in (alpha_m, sigma_m, *derivs)]
        return to_x0(self.model_prediction, out, x_m, *coef)
