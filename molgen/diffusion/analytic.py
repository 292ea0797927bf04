"""Exact denoisers: test beds on which a solver's error can be measured against the true ODE solution.

For data x_0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = alpha x_0 + sigma eps, the posterior over components is
p(k | x_t) ∝ w_k N(x_t; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and
E[x_0 | x_t, k] = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k).
A finite data set is the limit s_k -> 0 with equal weights (the ideal denoiser of the training set).
Both are computed in float64 and returned in the dtype of x_t.

``GaussianMoments`` is the Gaussian approximation N(m, C) of any data set, whose probability-flow ODE has a
closed-form solution: the engine's ``warm_start`` uses it to skip the high-noise part of a sampling run, and its
``linear_part`` to integrate that linear flow exactly at every step (the solver extrapolates only D - D_G).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from molgen.diffusion.defaults import ends_as_times, warm_start_ends
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

    def moments(self) -> GaussianMoments:
        """Mean and covariance of the mixture: m = sum_k w_k mu_k, C = sum_k w_k ((mu_k - m)(mu_k - m)^T + s_k^2 I)."""
        w = self.log_w.exp()
        m = w @ self.means
        dev = self.means - m
        cov = dev.T @ (w[:, None] * dev) + float(w @ self.stds**2) * torch.eye(self.dim, dtype=torch.float64)
        return GaussianMoments.from_covariance(m, cov)

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
    from scipy.integrate import solve_ivp  # only the reference solve needs scipy

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


@dataclass(frozen=True, eq=False)
class GaussianMoments:
    """The Gaussian approximation N(m, C) of the data, C = U diag(lam) U^T (+ ``residual`` I off span U).

    Its probability-flow ODE is solved in closed form: in y = x / alpha and rho = sigma / alpha the exact
    denoiser of N(m, C) is m + C (C + rho^2 I)^{-1} (y - m) and the flow keeps (C + rho^2 I)^{-1/2} (y - m)
    fixed, so each eigen-coordinate of y - m scales by sqrt((lam_k + rho_1^2) / (lam_k + rho_0^2)). At noise
    levels well above the data's spread every denoiser is close to this one (its error falls like 1/rho^2:
    Wang & Vastola 2023, "the hidden linear structure"), so a sampler can start there without a model call."""

    mean: Tensor  # [*event]
    eigvals: Tensor  # [k]
    eigvecs: Tensor  # [d, k], orthonormal columns
    residual: float = 0.0  # variance per direction orthogonal to eigvecs

    @classmethod
    def from_covariance(cls, mean: Tensor, cov: Tensor) -> GaussianMoments:
        mean = torch.as_tensor(mean, dtype=torch.float64)
        lam, vecs = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
        if lam.shape[0] != mean.numel():
            raise ValueError(f"covariance of size {tuple(cov.shape)} does not match a mean of {mean.numel()} entries")
        return cls(mean, lam.clamp_min(0.0), vecs)

    @classmethod
    def from_data(cls, x: Tensor, rank: int | None = None) -> GaussianMoments:
        """Moments of data x [N, *event] (training samples); ``rank`` keeps the top eigenpairs only (large d)
        and spreads the remaining variance evenly over the other directions."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(f"GaussianMoments.from_data needs [N >= 2, ...] samples, got shape {tuple(x.shape)}")
        mean = x.mean(0)
        centred = (x - mean).flatten(1)
        if rank is None:
            return cls.from_covariance(mean, centred.T @ centred / x.shape[0])
        _, s, v = torch.svd_lowrank(centred, q=rank, niter=4)
        lam = s**2 / x.shape[0]
        d = centred.shape[1]
        rest = (float((centred**2).sum()) / x.shape[0] - float(lam.sum())) / max(d - rank, 1)
        return cls(mean, lam, v, max(rest, 0.0))

    @property
    def sigma_data(self) -> float:
        """Root mean variance per coordinate, sqrt(tr C / d)."""
        d = self.mean.numel()
        return math.sqrt((float(self.eigvals.sum()) + self.residual * (d - self.eigvals.numel())) / d)

    @property
    def variances(self) -> Tensor:
        """[k + 1]: the eigenvalues, then the variance of the complement of the eigenvectors (float64)."""
        return torch.cat([self.eigvals.to(torch.float64), torch.tensor([float(self.residual)], dtype=torch.float64)])

    def gain(self, ell: Tensor) -> Tensor:
        """[..., k + 1] diagonal of the linear denoiser's slope dD/dy = C (C + rho^2)^{-1} at ell = -log rho [...]."""
        lam = self.variances.to(ell.device)
        return lam / (lam + torch.exp(-2.0 * ell)[..., None])

    def log_phi(self, ell: Tensor) -> Tensor:
        """[..., k + 1] log Phi with Phi = sqrt(lam + rho^2): per direction, z = y - m moves as Phi along the flow
        of the linear part (d log Phi / d ell = gain - 1)."""
        lam = self.variances.to(ell.device)
        return 0.5 * torch.log(lam + torch.exp(-2.0 * ell)[..., None])

    def flow(self, x: Tensor, schedule: Schedule, t_from: Tensor | float, t_to: Tensor | float) -> Tensor:
        """Carry x [B, *event] from time ``t_from`` to ``t_to`` (scalars or [B]) along the exact PF-ODE of the
        linear part (for N(m, C): each eigen-coordinate of y - m scales by Phi(t_to) / Phi(t_from))."""
        if x.shape[1:] != self.mean.shape:
            raise ValueError(
                f"warm start moments are for states of shape {tuple(self.mean.shape)}, got {tuple(x.shape[1:])}"
            )
        f64 = {"dtype": torch.float64, "device": x.device}
        t0, t1 = (torch.as_tensor(t, **f64).reshape(-1) for t in (t_from, t_to))
        mean, vecs = (v.to(**f64) for v in (self.mean.flatten(), self.eigvecs))
        ratio = torch.exp(self.log_phi(0.5 * schedule.lam(t1)) - self.log_phi(0.5 * schedule.lam(t0)))  # [B or 1, k+1]
        z = x.to(torch.float64).flatten(1) / schedule.alpha(t0)[:, None] - mean
        keep = ratio[:, -1:]
        out = schedule.alpha(t1)[:, None] * (keep * z + ((z @ vecs) * (ratio[:, :-1] - keep)) @ vecs.T + mean)
        return out.reshape(x.shape).to(x.dtype)

    def grid_ends(self, schedule: Schedule, nfe: int) -> dict[str, float]:
        """Grid options {t_max, t_min} of a warm-started run of ``nfe`` model calls (``warm_start_ends``)."""
        if not self.sigma_data > 0:
            raise ValueError("moments with zero covariance give no scale for the grid ends: pass t_max, t_min")
        first, last = (self.sigma_data * r for r in warm_start_ends(nfe))
        return ends_as_times(schedule, first, last)


class ProductMixtureLogits:
    """Exact masked-diffusion denoiser of a mixture of product laws over K letters (a discrete test bed):
    p(x) = sum_c w_c prod_i q_c(x_i), so given the unmasked letters U, p(x0^i | x_t) = sum_c r_c q_c(x0^i)
    with r_c ∝ w_c prod_{j in U} q_c(x_j). Its NELBO is exactly -log p(x), and a sampler that unmasks many
    letters at once from the first, uninformed state mixes the components: the cost the grid decides.
    ``model(x_t, t) -> logits [B, L, K]`` (log-probabilities); letters are 0..K-1, anything else is masked."""

    def __init__(self, letter_probs: Tensor, weights: Tensor | None = None) -> None:
        self.log_q = torch.as_tensor(letter_probs, dtype=torch.float64).log()  # [C, K]
        c = self.log_q.shape[0]
        w = torch.full((c,), 1.0 / c, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        self.log_w = w.to(torch.float64).log()

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) [B] of letter sequences x [B, L]."""
        per = self.log_q[:, x].sum(-1)  # [C, B]
        return torch.logsumexp(self.log_w[:, None] + per, dim=0)

    def __call__(self, x_t: Tensor, t: Tensor, **_: Tensor) -> Tensor:
        k = self.log_q.shape[1]
        letter = x_t < k
        seen = torch.where(letter[None], self.log_q[:, x_t.clamp(max=k - 1)], 0.0).sum(-1)  # [C, B]
        log_r = torch.log_softmax(self.log_w[:, None] + seen, dim=0)  # [C, B]
        logits = torch.logsumexp(log_r[:, :, None] + self.log_q[:, None, :], dim=0)  # [B, K]: the same everywhere
        return logits[:, None, :].expand(-1, x_t.shape[1], -1).float()
