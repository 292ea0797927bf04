"""Exact log-likelihoods of a diffusion model by its probability-flow ODE (Song et al. 2021, Sec. 4.3).

With x_t = alpha x_0 + sigma eps, f = alpha' / alpha and g^2 = 2 sigma sigma' - 2 f sigma^2, the
probability-flow ODE dx/dt = f x - g^2 / 2 s(x, t), s = (alpha D - x) / sigma^2 (D the denoised estimate), moves
samples of p_t into samples of p_s; along it d log p_t(x_t) / dt = -div v (the instantaneous change of variables).
It is integrated here in y = x / alpha and u = log rho, rho = sigma / alpha, where it reads

    dy/du = F(y, u) = y - D(alpha y, t(u)),   div_y F = d (1 - alpha c_x) - alpha c_out tr(d out / d x),

with the model's output out and D = c_x x + c_out out (``molgen.diffusion.parameterization``). The density of
y at u_0 = log rho(t_min) is p_0 convolved with N(0, rho_0^2 I), so it equals p_0(x_0) up to O(rho_0^2), and

    log p_0(x_0) = log p_prior(y_T) + int_{u_0}^{u_T} div_y F(y_u, u) du,   y_{u_0} = x_0,

with the prior x_T ~ N(0, prior_std^2 I) at t_max (y_T ~ N(0, (prior_std / alpha_T)^2 I)). The integration is a
fixed-step explicit Runge-Kutta method on equal steps in u (``method``: ``rk4``, ``heun``); the divergence is a
quadrature of the same stages, so its estimates enter linearly.

The trace tr(P J P) (P: the space's projection, J the Jacobian of the model output) is exact, by one
vector-Jacobian product per state entry with the projected basis vectors P e_j, or Hutchinson's estimate
mean_k u_k^T J u_k with Rademacher probes in an orthonormal basis of the space (``space.rademacher``: E[u u^T] = P
and |u|^2 = d, so the isotropic part of J costs no variance), fresh at every stage.
For zero-centre-of-mass states (``ZeroCoM``) the density lives on the subspace of dimension (n - 1) * 3 (+ the
other features) over the n real atoms: the prior's log-density and the dimension count are the subspace's
(``space.dim``); padded entries (``mask``) are not part of the state.

``bits_per_dim`` = -log p / (d log 2) in the units of the state (the likelihood of continuous coordinates depends
on their scale; compare models and samples in the same units).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion.parameterization import check_prediction
from molgen.diffusion.plan import Points, column, on, points
from molgen.diffusion.schedules import Schedule, get_schedule
from molgen.diffusion.spaces import Euclidean, ZeroCoM, expand_mask

EXACT_MAX_ENTRIES = 32  # exact divergence (one backward pass per entry) for states of at most this many entries


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stage nodes c, stage weights a (lower triangular) and weights b."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]


METHODS = {
    "heun": Tableau((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": Tableau((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


def stage_points(schedule: Schedule, t_min: float, t_max: float, steps: int, tableau: Tableau,
                 prediction: str) -> tuple[Points, float]:
    """The ``Points`` [1, steps * stages] of every stage (step i, stage j at column i * stages + j) on equal steps
    in u = log rho from t_min to t_max, and the step h (float64)."""
    u0, u1 = (float(torch.log(schedule.rho(torch.tensor(t, dtype=torch.float64)))) for t in (t_min, t_max))
    h = (u1 - u0) / steps
    u = u0 + h * (torch.arange(steps, dtype=torch.float64)[:, None] + torch.tensor(tableau.c, dtype=torch.float64))
    t = schedule.t_of_lam(-2.0 * u).clamp(t_min, t_max)
    return points(schedule, t.reshape(1, -1), prediction), h


def basis(x: Tensor, mask: Tensor | None, space: Any) -> list[Tensor]:
    """The projected basis vectors P e_j of every entry j of a state (the same entry in every sample)."""
    flat = torch.zeros(x[0].numel(), *x.shape, dtype=x.dtype, device=x.device)
    flat.view(flat.shape[0], x.shape[0], -1).diagonal(dim1=0, dim2=2).fill_(1.0)
    m = expand_mask(mask, x)
    return [space.project(e if m is None else e * m, mask) for e in flat]


def trace(out: Tensor, x: Tensor, probes: list[Tensor]) -> Tensor:
    """sum_k u_k^T (d out / d x) u_k per sample [B], one vector-Jacobian product per probe (samples independent)."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for k, u in enumerate(probes):
        (vjp,) = torch.autograd.grad(out, x, grad_outputs=u, retain_graph=k + 1 < len(probes))
        total = total + (vjp * u).flatten(1).sum(1)
    return total


def clean(v: Tensor, mask: Tensor | None, space: Any) -> Tensor:
    """A vector field's value zero at padding and in the space's subspace."""
    m = expand_mask(mask, v)
    return space.project(v if m is None else v * m, mask)


def flow_and_divergence(
    model: Callable[..., Tensor], at: Points, y: Tensor, mask: Tensor | None, cond: Mapping[str, Tensor],
    space: Any, probes: Callable[[Tensor], tuple[list[Tensor], float]],
) -> tuple[Tensor, Tensor]:
    """(F = y - D(alpha y), div_y F [B]) at one stage (``at``: [1, 1, ...] coefficients): the model output's
    trace from ``probes(x)`` (probe vectors and the factor that turns their sum into the trace)."""
    alpha, c_x, c_out = at.alpha, at.c_x, at.c_out
    t = at.t.reshape(-1).expand(y.shape[0])
    with torch.enable_grad():
        x = (alpha * y).detach().requires_grad_(True)
        out = model(x, t, **cond).to(y.dtype)
        vectors, scale = probes(x)
        tr = trace(out, x, vectors) * scale
    drift = clean((1.0 - alpha * c_x) * y - c_out * out.detach(), mask, space)
    gain = (1.0 - alpha * c_x).reshape(1)
    return drift, space.dim(y, mask).to(y.dtype) * gain - (alpha * c_out).reshape(1) * tr


def rk_step(tableau: Tableau, h: float, y: Tensor,
            field: Callable[[int, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One Runge-Kutta step of dy/du = F and of the integral of div F: (y + h sum_j b_j k_j, h sum_j b_j div_j),
    stage j evaluated by ``field(j, y_j)`` at y_j = y + h sum_l a_jl k_l."""
    slopes: list[Tensor] = []
    divs: list[Tensor] = []
    for j, weights in enumerate(tableau.a):
        stage = y
        for w, k in zip(weights, slopes):
            if w:
                stage = stage + (h * w) * k
        drift, div = field(j, stage)
        slopes.append(drift)
        divs.append(div)
    return (y + h * sum(b * k for b, k in zip(tableau.b, slopes)),
            h * sum(b * d for b, d in zip(tableau.b, divs)))


def prior_log_density(y: Tensor, scale: Tensor, dims: Tensor) -> Tensor:
    """log N(y; 0, scale^2 I) on a subspace of dimension ``dims`` [B] containing y."""
    sq = y.flatten(1).pow(2).sum(1)
    return -0.5 * sq / scale**2 - dims * (torch.log(scale) + 0.5 * math.log(2.0 * math.pi))


def log_likelihood(
    model: Callable[..., Tensor],
    schedule: Schedule | str,
    x0: Tensor,
    *,
    steps: int = 32,
    method: str = "rk4",
    exact_divergence: bool | None = None,
    hutchinson_samples: int = 1,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    space: Any = None,
    prediction: str | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    prior_std: float | None = None,
) -> Tensor:
    """log p(x0) [B] in nats under the model's probability-flow ODE (see the module docstring).

    ``steps`` Runge-Kutta steps of ``method`` (4 model calls each for rk4, 2 for heun) between ``t_min`` and
    ``t_max`` (default the schedule's), prior N(0, ``prior_std``^2) at t_max (default ``schedule.prior_std``, the
    samplers' x_T). ``exact_divergence``: True computes the trace by one backward pass per state entry, False by
    ``hutchinson_samples`` Rademacher probes per stage (drawn from ``generator``), None (default) chooses exact for
    states of at most ``EXACT_MAX_ENTRIES`` entries. ``mask``, ``cond`` and ``space`` as for the samplers (the
    model is called as ``model(x_t, t, **cond)`` with per-sample times [B])."""
    schedule = get_schedule(schedule)
    space = Euclidean() if space is None else space
    pred = prediction or getattr(model, "prediction", None)
    if pred is None:
        raise ValueError("the model declares no prediction (x0, eps, v, velocity): pass prediction=")
    pred = check_prediction(pred)
    if not torch.is_floating_point(x0):
        raise ValueError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {sorted(METHODS)}")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
        raise ValueError(f"hutchinson_samples must be an integer >= 1, got {hutchinson_samples!r}")
    expand_mask(mask, x0)  # validates the shape
    lo = schedule.t_min if t_min is None else t_min
    hi = schedule.t_max if t_max is None else t_max
    if not 0 <= lo < hi:
        raise ValueError(f"the likelihood integral needs 0 <= t_min < t_max, got t_min={lo}, t_max={hi}")
    if float(schedule.sigma(torch.tensor(lo, dtype=torch.float64))) <= 0:
        raise ValueError(f"t_min={lo} has sigma = 0 (rho = 0 is u = -inf): pass t_min > 0")
    exact = x0[0].numel() <= EXACT_MAX_ENTRIES if exact_divergence is None else exact_divergence
    if exact:
        def probes(x: Tensor) -> tuple[list[Tensor], float]:
            return basis(x, mask, space), 1.0
    else:
        def probes(x: Tensor) -> tuple[list[Tensor], float]:
            draws = [space.rademacher(x, mask, generator) for _ in range(hutchinson_samples)]
            return draws, 1.0 / hutchinson_samples

    tableau = METHODS[method]
    grid, h = stage_points(schedule, lo, hi, steps, tableau, pred)
    grid = on(grid, x0)
    cond = dict(cond or {})

    def field(first: int, j: int, y: Tensor) -> tuple[Tensor, Tensor]:
        return flow_and_divergence(model, column(grid, first + j), y, mask, cond, space, probes)

    y = clean(x0, mask, space)
    delta = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    for i in range(steps):
        y, increment = rk_step(tableau, h, y, functools.partial(field, i * len(tableau.c)))
        delta = delta + increment
    t_end = torch.tensor(hi, dtype=torch.float64)
    std = schedule.prior_std if prior_std is None else prior_std
    scale = torch.as_tensor(std / schedule.alpha(t_end), dtype=x0.dtype, device=x0.device)
    return prior_log_density(y, scale, space.dim(y, mask).to(x0.dtype)) + delta


def bits_per_dim(model: Callable[..., Tensor], schedule: Schedule | str, x0: Tensor, **kwargs: Any) -> Tensor:
    """-log p(x0) / (d log 2) [B], d the dimension of the state's space (the subspace for ``ZeroCoM``);
    ``kwargs`` as for ``log_likelihood``."""
    space = kwargs.get("space") or Euclidean()
    dims = space.dim(x0, kwargs.get("mask")).to(x0.dtype)
    return -log_likelihood(model, schedule, x0, **kwargs) / (dims * math.log(2.0))


def naturalness(
    model: Callable[..., Tensor], x0: Tensor, mask: Tensor | None = None, *, steps: int = 24,
    hutchinson_samples: int = 1, generator: torch.Generator | None = None, n_dims: int = 3, **kwargs: Any,
) -> Tensor:
    """Bits per dimension [B] of zero-centre-of-mass states x0 [B, N, F] (positions first, ``n_dims`` of them)
    under a loaded denoiser that carries its ``schedule`` and ``prediction`` (the molecule and backbone models):
    the model is called with ``mask=`` when one is given, the density lives on the ZeroCoM subspace over the real
    atoms, and the trace is Hutchinson's (``hutchinson_samples`` probes per stage). Lower is more natural to the
    model; ``kwargs`` as for ``log_likelihood``."""
    cond = {} if mask is None else {"mask": mask}
    return bits_per_dim(model, model.schedule, x0, steps=steps, exact_divergence=False,
                        hutchinson_samples=hutchinson_samples, generator=generator, mask=mask, cond=cond,
                        space=ZeroCoM(n_dims), **kwargs)
