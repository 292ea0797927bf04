"""Exact denoisers: test beds on which a solver's error can be measured against the true ODE solution.

For data x_0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = alpha x_0 + sigma eps, the posterior over components is
p(k | x_t) ∝ w_k N(x_t; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and
E[x_0 | x_t, k] = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k).
A finite data set is the limit s_k -> 0 with equal weights (the ideal denoiser of the training set).
Both are computed in float64 and returned in the dtype of x_t.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from molgen.diffusion.schedules import Schedule


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1))).expand(x.shape[0], *([1] * (x.ndim - 1)))


class GaussianMixtureDenoiser:
    """Exact x0 prediction E[x_0 | x_t] of an isotropic Gaussian mixture; ``prediction = "x0"``."""

    prediction = "x0"

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None, schedule: Schedule) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        w = w.to(torch.float64)
        if (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("mixture weights must be non-negative and sum to 1")
        self.log_w = w.log()
        self.schedule = schedule

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def x0_given(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """E[x_0 | x_t = x] for per-sample alpha, sigma [B] (x: [B, d])."""
        x64 = x.to(torch.float64)
        a, s = _bcast(alpha, x64), _bcast(sigma, x64)  # [B, 1]
        var = a**2 * self.stds**2 + s**2  # [B, K]
        # |x - a mu_k|^2 = |x|^2 - 2 a x.mu_k + a^2 |mu_k|^2, as matrix products
        sq = (x64**2).sum(1, keepdim=True) - 2.0 * a * (x64 @ self.means.T) + a**2 * (self.means**2).sum(1)
        log_p = self.log_w - 0.5 * sq / var - 0.5 * self.dim * torch.log(var)
        resp = torch.softmax(log_p, dim=1)  # [B, K]
        gain = resp * a * self.stds**2 / var  # resp_k * alpha s_k^2 / var_k
        # sum_k resp_k (mu_k + gain_k (x - a mu_k))
        out = resp @ self.means + gain.sum(1, keepdim=True) * x64 - a * (gain @ self.means)
        return out.to(x.dtype)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        return self.x0_given(x_t, self.schedule.alpha(t64), self.schedule.sigma(t64))

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z


class EmpiricalDenoiser(GaussianMixtureDenoiser):
    """The exact denoiser of a finite data set (equal weights, zero width): the ideal score of the training set."""

    def __init__(self, points: Tensor, schedule: Schedule) -> None:
        points = torch.as_tensor(points, dtype=torch.float64).flatten(1)
        super().__init__(points, 0.0, None, schedule)


def exact_ode_solution(
    denoiser: GaussianMixtureDenoiser,
    x_T: Tensor,
    schedule: Schedule,
    t_start: float | None = None,
    rho_end: float = 1e-5,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> Tensor:
    """The probability-flow ODE solution at sigma = 0 from x_T at ``t_start`` (default ``t_max``), by an
    adaptive 8th-order Runge-Kutta (DOP853) that shares no code with molgen's solvers.

    In y = x / alpha and u = log(sigma / alpha) the ODE reads dy/du = y - D(y); it is integrated to
    rho = sigma / alpha = ``rho_end`` and the result denoised (D at rho_end differs from the limit by
    O(rho_end^2))."""
    t0 = torch.tensor(schedule.t_max if t_start is None else t_start, dtype=torch.float64)
    alpha0, rho0 = schedule.alpha(t0), schedule.rho(t0)
    y0 = (x_T.to(torch.float64) / alpha0).flatten().numpy()
    shape = x_T.shape

    def d_given_rho(y: np.ndarray, rho: float) -> Tensor:
        a = 1.0 / math.sqrt(1.0 + rho**2)  # evaluate D in VP coordinates with the same rho
        yt = torch.from_numpy(y).reshape(shape)
        alpha = torch.full((shape[0],), a, dtype=torch.float64)
        return denoiser.x0_given(a * yt, alpha, alpha * rho)

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        return y - d_given_rho(y, math.exp(u)).flatten().numpy()

    sol = solve_ivp(rhs, (math.log(float(rho0)), math.log(rho_end)), y0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return d_given_rho(sol.y[:, -1], rho_end).to(x_T.dtype)
