"""ODE and SDE solvers for the probability-flow ODE / reverse SDE: per family a plan (frozen dataclass of float64
coefficients), its builder and its step.

Notation: point i has time t_i, alpha_i, sigma_i, l_i = log(alpha_i / sigma_i) (half the schedule's logSNR
lambda), rho_i = sigma_i / alpha_i = e^{-l_i}; D_i is the x0 estimate there and eps_i = (x_i - alpha_i D_i) / sigma_i.
From i (s) to i + 1 (t), h = l_t - l_s.

* Linear multistep, x_{i+1} = a_i x_i + sum_m w_{i,m} F_{i-m} (+ c_i z) with F = D or eps (``Linear``):
  - exponential integrators in l (ddim, dpmpp_2m/3m; with kappa = 2 the SDE forms ddpm_ancestral, dpmpp_2m_sde).
    The ODE solution is exactly x_t = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^{-(h-u)} D(l_s + u) du, and
    each method replaces D by a polynomial through known values, with weights from moment matching:
    sum_m w_m r_m^j = M_j(h) = int_0^h e^{-kappa (h-u)} (u/h)^j kappa du, r_m the node offsets in units of h
    (M_0 = 1 - e^{-kappa h}, M_j = 1 - j M_{j-1} / (kappa h)). The SDE form
    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t int_0^h 2 e^{-2(h-u)} D du + sigma_t sqrt(1 - e^{-2h}) z
    is the same with kappa = 2 (first order = DDPM's ancestral step);
  - Adams-Bashforth in rho on eps (euler, deis): x / alpha moves by int eps d rho (Euler is exactly DDIM);
  - Euler-Maruyama in t on the reverse SDE.
* Heavy-ball momentum on rho-AB (ghvb), ``Ghvb``.
* Heun in rho (EDM's second-order method), ``Heun``; DPM-Solver-2/3 (singlestep), ``Singlestep``.
* UniPC (bh2 predictor-corrector), ``UniPC``.
* The AF3 / EDM stochastic sampler (churn to rho_hat = rho_i (1 + gamma), then a scaled Euler step), ``AF3``.

With ``linear_part`` (data moments N(m, C)) the families with ``SolverSpec.linear_part`` integrate the flow of
N(m, C) exactly and extrapolate only the residual (``molgen.diffusion.linear_part``).

Builders take the grid ``Points`` [B or 1, n] (float64) and return the plan; steps only read their row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from molgen.diffusion.plan import Model, Move, Points, Row, State, Step, denoised, eps, points
from molgen.diffusion.schedules import Schedule

Noise = Callable[[], Tensor]
Builder = Callable[[Schedule, Points, list[int], Mapping[str, Any]], Any]


# ---------------------------------------------------------------------------------------------- maths helpers
def half_lam(schedule: Schedule, t: Tensor) -> Tensor:
    """log(alpha / sigma) = lambda / 2, the variable of the exponential integrators."""
    return 0.5 * schedule.lam(t)


def exp_moments(h: Tensor, k: int, kappa: float = 1.0) -> Tensor:
    """[..., k] with M_j = int_0^h kappa e^{-kappa (h - u)} (u / h)^j du, j < k."""
    moments = [-torch.expm1(-kappa * h)]
    for j in range(1, k):
        moments.append(1.0 - j * moments[-1] / (kappa * h))
    return torch.stack(moments, -1)


def vandermonde_weights(r: Tensor, moments: Tensor) -> Tensor:
    """Weights w [..., k] with sum_m w_m r_m^j = moments_j (exact for polynomials of degree < k)."""
    k = r.shape[-1]
    powers = torch.stack([r**j for j in range(k)], -2)  # [..., j, m]
    w, _ = torch.linalg.solve_ex(powers, moments)
    return w


def stack(columns: list[Tensor], width: int) -> Tensor:
    """Per-transition weight vectors of varying length -> [B, T, width], zero-padded."""
    padded = [torch.nn.functional.pad(c, (0, width - c.shape[-1])) for c in columns]
    return torch.stack(padded, 1)


# ------------------------------------------------------------------------------------------- linear multistep
@dataclass(frozen=True, eq=False)
class Linear:
    """x_{i+1} = a_i x_i + sum_m w_{i,m} F_{i-m} (+ c_i z), F = D (``feature`` "x0") or eps. The affine fast
    path uses F_i = f_x x_i + f_out out_i: x_{i+1} = A_i x_i + B_i out_i + sum_{m>=1} w_{i,m} F_{i-m} with
    A = a + w_0 f_x and B = w_0 f_out."""

    a: Tensor  # [B, T]
    w: Tensor  # [B, T, K]
    A: Tensor
    B: Tensor
    feature: str
    c: Tensor | None = None  # noise scale of the SDE forms


def linear(feature: str, grid: Points, a: Tensor, w: Tensor, c: Tensor | None = None) -> Linear:
    """The ``Linear`` plan with its fused coefficients."""
    fx, fo = (grid.c_x, grid.c_out) if feature == "x0" else (grid.e_x, grid.e_out)
    w0 = w[..., 0]
    return Linear(a, w, a + w0 * fx[:, :-1], w0 * fo[:, :-1], feature, c)


def compensate(plan: Linear, grid: Points, ratios: Tensor) -> Linear:
    """DC-Solver-style compensation of a linear multistep plan: transition i's higher-order correction scaled by
    ratios [1, T], w_i <- W_i e_0 + r_i (w_i - W_i e_0) with W_i = sum_m w_{i,m} (the first-order weight, matched
    by every order). r = 1 is the solver itself, r = 0 its first-order step (DDIM / Euler)."""
    first = torch.zeros_like(plan.w)
    first[..., 0] = plan.w.sum(-1)
    return linear(plan.feature, grid, plan.a, first + ratios[..., None] * (plan.w - first), plan.c)


def exp_multistep(kappa: float, stochastic: bool) -> Builder:
    """ddim / dpmpp_2m / dpmpp_3m (kappa = 1) and ddpm_ancestral / dpmpp_2m_sde (kappa = 2, with noise)."""

    def build(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> Linear:
        t, alpha, sigma = grid.t, grid.alpha, grid.sigma
        lam = half_lam(schedule, t)
        a, c, w = [], [], []
        for i, order in enumerate(orders):
            k = min(order, i + 1)
            h = lam[:, i + 1] - lam[:, i]
            r = torch.stack([(lam[:, i - m] - lam[:, i]) / h for m in range(k)], -1)
            w.append(alpha[:, i + 1, None] * vandermonde_weights(r, exp_moments(h, k, kappa)))
            decay = torch.exp(-h) if stochastic else torch.ones_like(h)
            a.append(sigma[:, i + 1] / sigma[:, i] * decay)
            c.append(sigma[:, i + 1] * torch.sqrt(-torch.expm1(-2.0 * h)))
        weights = stack(w, max(orders, default=1))
        return linear("x0", grid, torch.stack(a, 1), weights, torch.stack(c, 1) if stochastic else None)

    return build


def ab_rho_weights(rho: Tensor, i: int, k: int) -> tuple[Tensor, Tensor]:
    """Adams-Bashforth in rho: (weights [B, k] on eps_{i-m}, step H = rho_{i+1} - rho_i)."""
    step = rho[:, i + 1] - rho[:, i]
    r = torch.stack([(rho[:, i - m] - rho[:, i]) / step for m in range(k)], -1)
    moments = torch.stack([step / (j + 1) for j in range(k)], -1)
    return vandermonde_weights(r, moments), step


def ab_rho(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> Linear:
    """euler (k = 1) and deis (k = 3): x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_m w_m eps_{i-m})."""
    rho, alpha = schedule.rho(grid.t), grid.alpha
    a, w = [], []
    for i, order in enumerate(orders):
        weights, _ = ab_rho_weights(rho, i, min(order, i + 1))
        w.append(alpha[:, i + 1, None] * weights)
        a.append(alpha[:, i + 1] / alpha[:, i])
    return linear("eps", grid, torch.stack(a, 1), stack(w, max(orders, default=1)))


def euler_maruyama(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> Linear:
    """Reverse SDE dx = [f x - g^2 score] dt + g dW, score = -(x - alpha D) / sigma^2, with
    f = alpha'/alpha and g^2 = 2 sigma sigma' - 2 f sigma^2, one Euler-Maruyama step per transition."""
    t, alpha, sigma = grid.t, grid.alpha, grid.sigma
    f = grid.d_alpha / alpha
    g2 = 2.0 * sigma * grid.d_sigma - 2.0 * f * sigma**2
    dt = t[:, 1:] - t[:, :-1]
    f, g2, alpha, sigma = f[:, :-1], g2[:, :-1], alpha[:, :-1], sigma[:, :-1]
    return linear("x0", grid, 1.0 + dt * (f + g2 / sigma**2), (-dt * g2 * alpha / sigma**2)[..., None],
                  torch.sqrt(g2 * -dt))


def linear_step(row: Row, state: State, model: Model, noise: Noise) -> Move:
    """``Linear``; on the fast path (nothing cached) one multiply and one multiply-add per term, F_i itself
    only formed when a later step needs it."""
    p, x = row.coef, state.x
    width = p.w.shape[1]
    if state.x0 is None and model.affine:
        out = model.output(x, row.at)
        x_next = torch.mul(x, p.A)
        x_next.addcmul_(p.B, out)
        hist: tuple[Tensor, ...] = ()
        if width > 1:
            for m in range(1, min(width, len(state.hist) + 1)):
                x_next.addcmul_(p.w[:, m], state.hist[m - 1])
            fx, fo = (row.at.c_x, row.at.c_out) if p.feature == "x0" else (row.at.e_x, row.at.e_out)
            f = torch.mul(x, fx)
            hist = (f.addcmul_(fo, out), *state.hist)
    else:
        d = denoised(row, state, model)
        hist = (d if p.feature == "x0" else eps(row.at, x, d), *state.hist)
        x_next = p.a * x  # a fresh tensor: the in-place updates below touch nothing else
        for m in range(min(width, len(hist))):
            x_next.addcmul_(p.w[:, m], hist[m])
    if p.c is not None:
        x_next.addcmul_(p.c, noise())
    return Move(x_next, hist=hist[: width - 1])


# ---------------------------------------------------------------------------------------------- ghvb momentum
@dataclass(frozen=True, eq=False)
class Ghvb:
    """Generalised heavy ball (Wizadwongsa & Suwajanakorn 2024) of order q in [1, 2], beta = q - 1, in rho:
    v_i = (1 - beta) v_{i-1} + beta eps_i (v_0 = eps_0) and the slope
    s_i = eps_i + beta H_i / (2 H_{i-1}) (eps_i - v_{i-1}), x_{i+1} = a_i x_i + H_i s_i with a_i = alpha_{i+1} /
    alpha_i and H_i = alpha_{i+1} (rho_{i+1} - rho_i). beta = 0 is Euler, beta = 1 the variable-step
    Adams-Bashforth 2; on equal steps this is the authors' GHVB."""

    a: Tensor
    H: Tensor
    ratio: Tensor  # H_i / (2 H_{i-1}), 0 at i = 0
    beta: float


def ghvb(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> Ghvb:
    rho, alpha = schedule.rho(grid.t), grid.alpha
    step = rho[:, 1:] - rho[:, :-1]
    ratio = torch.cat([torch.zeros_like(step[:, :1]), step[:, 1:] / (2.0 * step[:, :-1])], 1)
    return Ghvb(alpha[:, 1:] / alpha[:, :-1], alpha[:, 1:] * step, ratio, options["order"] - 1.0)


def ghvb_step(row: Row, state: State, model: Model, noise: Noise) -> Move:
    p, x = row.coef, state.x
    e = eps(row.at, x, denoised(row, state, model))
    if state.extra:
        slope = e + p.beta * p.ratio * (e - state.extra[0])
        velocity = (1.0 - p.beta) * state.extra[0] + p.beta * e
    else:
        slope, velocity = e, e
    return Move(p.a * x + p.H * slope, extra=(velocity,))


# ---------------------------------------------------------------------------------------------- Heun
@dataclass(frozen=True, eq=False)
class Heun:
    """EDM's Heun in rho: the Euler point x_e = a x + H eps_i (a = alpha_{i+1} / alpha_i,
    H = alpha_{i+1} (rho_{i+1} - rho_i)), then x_{i+1} = a x + H (eps_i + eps_e) / 2. Fast path, with
    eps = e_x x + e_out out: x_e = A x + B out and x_{i+1} = k_e x_e + k_x x + k_out out_e with A = a + H e_x,
    B = H e_out, k_e = 1/2 + H e_x' / 2, k_x = a / 2, k_out = H e_out' / 2 (' : at t_{i+1})."""

    a: Tensor
    H: Tensor
    A: Tensor
    B: Tensor
    k_e: Tensor
    k_x: Tensor
    k_out: Tensor


def heun(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> Heun:
    rho, alpha = schedule.rho(grid.t), grid.alpha
    a, h = alpha[:, 1:] / alpha[:, :-1], alpha[:, 1:] * (rho[:, 1:] - rho[:, :-1])
    half_h = 0.5 * h
    return Heun(a, h, a + h * grid.e_x[:, :-1], h * grid.e_out[:, :-1], 0.5 + half_h * grid.e_x[:, 1:], 0.5 * a,
                half_h * grid.e_out[:, 1:])


def heun_step(row: Row, state: State, model: Model, noise: Noise) -> Move:
    p, x = row.coef, state.x
    if state.x0 is None and model.affine:
        x_euler = torch.mul(x, p.A)
        x_euler.addcmul_(p.B, model.output(x, row.at))
        if row.order == 1:
            return Move(x_euler)
        out = model.output(x_euler, row.next)
        x_next = torch.mul(x_euler, p.k_e)
        x_next.addcmul_(p.k_x, x).addcmul_(p.k_out, out)
        return Move(x_next)
    e = eps(row.at, x, denoised(row, state, model))
    x_euler = p.a * x + p.H * e
    if row.order == 1:
        return Move(x_euler)
    x_euler = model.point(x_euler)
    e2 = eps(row.next, x_euler, model.denoise(x_euler, row.next))
    return Move(p.a * x + p.H * 0.5 * (e + e2))


# ---------------------------------------------------------------------------------------------- singlestep
SINGLESTEP_R = {2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


@dataclass(frozen=True, eq=False)
class Singlestep:
    """DPM-Solver-2/3 (singlestep, data prediction). Order 2: one point m1 at l_s + h/2; order 3: points at
    h/3 and 2h/3, the second reached at order 2, the end using only the last difference (r2 = 2/3 cancels the
    second-derivative error):
        x_1 = a1 x + p1_s D_s,  x_2 = a2 x + p2_s D_s + p2_1 D_1,  x_{i+1} = a x + b_s D_s + b_last D_last.
    Unused intermediate points repeat t_s."""

    a: Tensor
    b_s: Tensor
    b_last: Tensor
    a1: Tensor
    p1_s: Tensor
    a2: Tensor
    p2_s: Tensor
    p2_1: Tensor
    m1: Points
    m2: Points


def singlestep(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> Singlestep:
    t, alpha, sigma = grid.t, grid.alpha, grid.sigma
    lam = half_lam(schedule, t)
    cols: dict[str, list[Tensor]] = {k: [] for k in ("a", "b_s", "b_last", "a1", "p1_s", "a2", "p2_s", "p2_1")}
    mids: list[list[Tensor]] = [[], []]
    for i, order in enumerate(orders):
        s, e = lam[:, i], lam[:, i + 1]
        h = e - s
        rs = SINGLESTEP_R.get(order, ())
        t_mid = [schedule.t_of_lam(2.0 * (s + r * h)) for r in rs] + [t[:, i]] * (2 - len(rs))
        for ts, tm in zip(mids, t_mid):
            ts.append(tm)
        a_mid = [schedule.alpha(tm) for tm in t_mid]
        s_mid = [schedule.sigma(tm) for tm in t_mid]
        m = exp_moments(h, 2)
        cols["a"].append(sigma[:, i + 1] / sigma[:, i])
        r_last = rs[-1] if rs else 1.0
        last = m[..., 1] / r_last if rs else torch.zeros_like(h)
        cols["b_s"].append(alpha[:, i + 1] * (m[..., 0] - last))
        cols["b_last"].append(alpha[:, i + 1] * last)
        r1 = rs[0] if rs else 1.0
        cols["a1"].append(s_mid[0] / sigma[:, i])
        cols["p1_s"].append(a_mid[0] * exp_moments(r1 * h, 1)[..., 0])
        cols["a2"].append(s_mid[1] / sigma[:, i])
        if order == 3:
            m2 = exp_moments(rs[1] * h, 2)
            slope = m2[..., 1] * rs[1] / rs[0]
            cols["p2_s"].append(a_mid[1] * (m2[..., 0] - slope))
            cols["p2_1"].append(a_mid[1] * slope)
        else:
            cols["p2_s"].append(torch.zeros_like(h))
            cols["p2_1"].append(torch.zeros_like(h))
    m1, m2 = (points(schedule, torch.stack(ts, 1), grid.prediction) for ts in mids)
    return Singlestep(**{k: torch.stack(v, 1) for k, v in cols.items()}, m1=m1, m2=m2)


def singlestep_step(row: Row, state: State, model: Model, noise: Noise) -> Move:
    p, x = row.coef, state.x
    d = denoised(row, state, model)
    last = d
    if row.order >= 2:
        last = model.denoise(model.point(p.a1 * x + p.p1_s * d), row.coef.m1)
    if row.order == 3:
        last = model.denoise(model.point(p.a2 * x + p.p2_s * d + p.p2_1 * last), row.coef.m2)
    return Move(p.a * x + p.b_s * d + p.b_last * last)


# ---------------------------------------------------------------------------------------------- UniPC
@dataclass(frozen=True, eq=False)
class UniPC:
    """UniPC with B(h) = e^{-h} - 1 (bh2), data prediction (Zhao et al. 2023):
        predictor x_p = a x + sum_m wp_m D_{i-m},  corrector x_{i+1} = a x + wc_0 D(x_p) + sum_m wc_{m+1} D_{i-m}.
    Differences Delta_m = (D_m - D_s) / r_m enter as alpha_t M_0 sum_m rho_m Delta_m with
    sum_m rho_m r_m^j = M_{j+1} / M_0; a one-difference predictor (and the first corrector) use rho = 1/2 as bh2
    prescribes. The corrector's model value at the predicted point (r = 1) is the next step's D_s: no extra call."""

    a: Tensor
    wp: Tensor  # [B, T, p]
    wc: Tensor  # [B, T, p + 1]


def unipc(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> UniPC:
    t, alpha, sigma = grid.t, grid.alpha, grid.sigma
    lam = half_lam(schedule, t)
    p = orders[0] if orders else 1
    a, wp, wc = [], [], []
    for i in range(len(orders)):
        k = min(p, i + 1)
        h = lam[:, i + 1] - lam[:, i]
        m = exp_moments(h, k + 1)
        r_prev = [(lam[:, i - j] - lam[:, i]) / h for j in range(1, k)]
        a.append(sigma[:, i + 1] / sigma[:, i])
        wp.append(alpha[:, i + 1, None] * unipc_weights(r_prev, m, new=False))
        wc.append(alpha[:, i + 1, None] * unipc_weights(r_prev, m, new=True))
    return UniPC(torch.stack(a, 1), stack(wp, p), stack(wc, p + 1))


def unipc_weights(r_prev: list[Tensor], m: Tensor, new: bool) -> Tensor:
    """Weights on [D_new (corrector only), D_s, D_prev1, ...] for difference nodes r (new point: r = 1)."""
    m0 = m[..., 0]
    r = ([torch.ones_like(m0)] if new else []) + r_prev
    if not r:
        return m0[..., None]
    nodes = torch.stack(r, -1)
    if len(r) == 1:
        rho = torch.full_like(nodes, 0.5)
    else:
        rho = vandermonde_weights(nodes, m[..., 1 : len(r) + 1] / m0[..., None])
    per_node = m0[..., None] * rho / nodes
    w_s = (m0 - per_node.sum(-1))[..., None]
    if new:
        return torch.cat([per_node[..., :1], w_s, per_node[..., 1:]], -1)
    return torch.cat([w_s, per_node], -1)


def unipc_step(row: Row, state: State, model: Model, noise: Noise) -> Move:
    p, x = row.coef, state.x
    hist = (denoised(row, state, model), *state.hist)
    x_pred = torch.mul(x, p.a)  # fresh tensors, updated in place
    for m in range(min(p.wp.shape[1], len(hist))):
        x_pred.addcmul_(p.wp[:, m], hist[m])
    if not model.affine:
        x_pred = model.point(x_pred)
    d_new = model.denoise(x_pred, row.next, carried=True)
    x_next = torch.mul(x, p.a)
    x_next.addcmul_(p.wc[:, 0], d_new)
    for m in range(min(p.wc.shape[1] - 1, len(hist))):
        x_next.addcmul_(p.wc[:, m + 1], hist[m])
    return Move(x_next, hist=hist[: p.wp.shape[1] - 1], x0=d_new)


# ---------------------------------------------------------------------------------------------- AF3 / EDM churn
@dataclass(frozen=True, eq=False)
class AF3:
    """AF3 / EDM stochastic sampler in rho: gamma_i = gamma_0 if rho_i > gamma_min else 0,
    rho_hat = rho_i (1 + gamma_i), y_hat = x_i / alpha_i + noise_scale sqrt(rho_hat^2 - rho_i^2) z,
    y_{i+1} = y_hat + step_scale (rho_{i+1} - rho_hat) (y_hat - D(y_hat, rho_hat)) / rho_hat, i.e.
    x_{i+1} = y_coef y_hat + d_coef D. ``hat``: the churned points (the grid time itself where gamma = 0)."""

    hat: Points
    inv_alpha: Tensor
    churn: Tensor
    y_coef: Tensor
    d_coef: Tensor


def af3(schedule: Schedule, grid: Points, orders: list[int], options: Mapping[str, Any]) -> AF3:
    t, alpha = grid.t, grid.alpha
    rho = schedule.rho(t)[:, :-1]
    gamma = torch.where(rho > options["gamma_min"], options["gamma_0"], 0.0)
    rho_hat = rho * (1.0 + gamma)
    t_hat = schedule.t_of_rho(rho_hat)
    hat = points(schedule, t_hat, grid.prediction)
    k = options["step_scale"] * (schedule.rho(t)[:, 1:] - rho_hat) / rho_hat
    return AF3(
        hat=replace(hat, t=torch.where(gamma > 0, t_hat, t[:, :-1])),  # the grid time itself without churn
        inv_alpha=1.0 / alpha[:, :-1],
        churn=options["noise_scale"] * torch.sqrt(rho_hat**2 - rho**2),
        y_coef=alpha[:, 1:] * (1.0 + k),
        d_coef=-alpha[:, 1:] * k,
    )


def af3_step(row: Row, state: State, model: Model, noise: Noise) -> Move:
    p = row.coef
    y_hat = p.inv_alpha * state.x + p.churn * noise()
    d = model.denoise(model.point(p.hat.alpha * y_hat), p.hat)
    return Move(p.y_coef * y_hat + p.d_coef * d)


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SolverSpec:
    """A solver: its plan builder, its step, and what it costs."""

    name: str
    kind: str  # "multistep": one model call per grid point; "singlestep": ``order`` calls per transition
    plan: Builder
    step: Step
    stochastic: bool
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    max_order: float = 1  # the highest ``order`` option the plan supports
    fractional_order: bool = False  # whether ``order`` may lie between integers (ghvb)
    linear_part: str | None = None  # with an exact Gaussian part: the residual polynomial's variable
    compensable: bool = False  # a higher-order linear multistep ODE plan: ``compensate`` scales its correction

    @property
    def calls_per_step(self) -> int:
        return int(self.defaults["order"]) if self.kind == "singlestep" else 1

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"solver {self.name!r} has no option(s) {sorted(unknown)}; it takes {sorted(self.defaults)}"
            )
        merged = {**self.defaults, **options}
        order = merged["order"]
        if self.fractional_order:
            if not 1.0 <= float(order) <= self.max_order:
                raise ValueError(f"solver {self.name!r} order must lie in [1, {self.max_order:g}], got {order}")
            return {**merged, "order": float(order)}
        if int(order) != order or not 1 <= order <= self.max_order:
            raise ValueError(f"solver {self.name!r} supports order 1..{self.max_order:g}, got {order}")
        return {**merged, "order": int(order)}


_AF3 = {"order": 1, "gamma_0": 0.8, "gamma_min": 1.0, "noise_scale": 1.003, "step_scale": 1.5}

SOLVERS: dict[str, SolverSpec] = {
    s.name: s
    for s in [
        SolverSpec("euler", "multistep", ab_rho, linear_step, False,
                   "Euler in (x/alpha, sigma/alpha); algebraically identical to DDIM", {"order": 1}, max_order=1,
                   linear_part="rho"),
        SolverSpec("heun", "singlestep", heun, heun_step, False,
                   "EDM's Heun (2nd order, 2 calls per step)", {"order": 2}, max_order=2),
        SolverSpec("ddim", "multistep", exp_multistep(1.0, False), linear_step, False,
                   "DDIM = first-order exponential integrator", {"order": 1}, max_order=1, linear_part="l"),
        SolverSpec("dpm_solver_2", "singlestep", singlestep, singlestep_step, False,
                   "DPM-Solver-2, singlestep, data prediction", {"order": 2}, max_order=2),
        SolverSpec("dpm_solver_3", "singlestep", singlestep, singlestep_step, False,
                   "DPM-Solver-3, singlestep, data prediction", {"order": 3}, max_order=3),
        SolverSpec("dpmpp_2m", "multistep", exp_multistep(1.0, False), linear_step, False,
                   "DPM-Solver++(2M), exact integration of the linear interpolant", {"order": 2}, max_order=2,
                   linear_part="l", compensable=True),
        SolverSpec("dpmpp_3m", "multistep", exp_multistep(1.0, False), linear_step, False,
                   "DPM-Solver++(3M), exact integration of the quadratic interpolant", {"order": 3}, max_order=3,
                   linear_part="l", compensable=True),
        SolverSpec("unipc", "multistep", unipc, unipc_step, False,
                   "UniPC bh2 predictor-corrector (order 2 predictor + corrector)", {"order": 2}, max_order=3,
                   linear_part="unipc"),
        SolverSpec("deis", "multistep", ab_rho, linear_step, False,
                   "DEIS rho-AB: Adams-Bashforth on eps in rho (order 3)", {"order": 3}, max_order=4,
                   linear_part="rho", compensable=True),
        SolverSpec("ghvb", "multistep", ghvb, ghvb_step, False,
                   "Generalised heavy-ball momentum on rho-AB (fractional order)", {"order": 1.5},
                   max_order=2, fractional_order=True),
        SolverSpec("euler_maruyama", "multistep", euler_maruyama, linear_step, True,
                   "Euler-Maruyama on the reverse SDE in t", {"order": 1}, max_order=1),
        SolverSpec("ddpm_ancestral", "multistep", exp_multistep(2.0, True), linear_step, True,
                   "DDPM ancestral sampling (= first-order SDE exponential integrator)", {"order": 1}, max_order=1),
        SolverSpec("dpmpp_2m_sde", "multistep", exp_multistep(2.0, True), linear_step, True,
                   "DPM-Solver++(2M) SDE", {"order": 2}, max_order=2),
        SolverSpec("af3", "multistep", af3, af3_step, True,
                   "AlphaFold 3 / EDM stochastic sampler (churn gamma_0, gamma_min, noise_scale, step_scale)", _AF3,
                   max_order=1),
    ]
}


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]
