"""ODE and SDE solvers for the probability-flow ODE / reverse SDE, as coefficient tables plus a step.

Notation: point i has time t_i, alpha_i, sigma_i, l_i = log(alpha_i / sigma_i) (half the schedule's logSNR
lambda), rho_i = sigma_i / alpha_i = e^{-l_i}; D_i is the x0 estimate there and eps_i = (x_i - alpha_i D_i) / sigma_i.
From i (s) to i + 1 (t), h = l_t - l_s.

Four families, each derived once:

* exponential integrators in l (ddim, dpmpp_2m/3m, dpm_solver_2/3, unipc, and with kappa = 2 the SDE
  forms ddpm_ancestral, dpmpp_2m_sde). The ODE solution is exactly
      x_t = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^{-(h-u)} D(l_s + u) du,
  and each method replaces D by a polynomial through known values. Its weights come from moment matching:
  sum_m w_m r_m^j = M_j(h) = int_0^h e^{-kappa (h-u)} (u/h)^j kappa du, with r_m the node offsets in units of h
  (M_0 = 1 - e^{-kappa h}, M_j = 1 - j M_{j-1} / (kappa h)). The SDE form
      x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t int_0^h 2 e^{-2(h-u)} D du + sigma_t sqrt(1 - e^{-2h}) z
  is the same with kappa = 2 (first order = DDPM's ancestral step).
* Adams-Bashforth in rho on eps (euler, deis, ghvb): x / alpha moves by int eps d rho (the variance-exploding
  view, where Euler is exactly DDIM); ghvb adds heavy-ball momentum to the AB slope.
* Heun in rho (EDM's second-order method), Euler-Maruyama in t (reverse SDE), and the AF3 / EDM stochastic
  sampler (churn to rho_hat = rho_i (1 + gamma), then a scaled Euler step).

With ``linear_part`` (data moments N(m, C)), ddim, dpmpp_2m/3m, unipc, euler and deis integrate the flow of
N(m, C) exactly and extrapolate only the residual D - D_G (``gaussian_tables``, below).

All tables are float64, batch-first ([B or 1, ...]); steps only read them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molgen.diffusion.sampling import Sampler, State
from molgen.diffusion.schedules import Schedule

Tables = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------- maths helpers
def points(schedule: Schedule, t: Tensor, prefix: str = "") -> Tables:
    """Schedule quantities at times ``t`` (any shape), keyed ``prefix + name``."""
    d_alpha, d_sigma = schedule.d_alpha_sigma(t)
    return {
        prefix + "t": t, prefix + "alpha": schedule.alpha(t), prefix + "sigma": schedule.sigma(t),
        prefix + "d_alpha": d_alpha, prefix + "d_sigma": d_sigma,
    }


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


def _stack(columns: list[Tensor], width: int) -> Tensor:
    """Per-transition weight vectors of varying length -> [B, T, width], zero-padded."""
    padded = [torch.nn.functional.pad(c, (0, width - c.shape[-1])) for c in columns]
    return torch.stack(padded, 1)


def _col(tab: Tables, name: str, i: int) -> Tensor:
    """Column i of a table, shaped to broadcast against the state (``Sampler.init`` shapes the tables)."""
    return tab[name][:, i]


def _combine(tab: Tables, i: int, **terms: Tensor) -> Tensor:
    """sum_k tab[k][:, i] * terms[k], the coefficients broadcast over the state."""
    return sum(_col(tab, name, i) * v for name, v in terms.items())


# ------------------------------------------------------------------------------------------- linear multistep
def exp_multistep_tables(kappa: float, stochastic: bool):
    """ddim / dpmpp_2m / dpmpp_3m (kappa = 1) and ddpm_ancestral / dpmpp_2m_sde (kappa = 2, with noise)."""

    def build(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
        tab = points(schedule, t)
        lam, alpha, sigma = half_lam(schedule, t), tab["alpha"], tab["sigma"]
        a, c, w = [], [], []
        for i, order in enumerate(orders):
            k = min(order, i + 1)
            h = lam[:, i + 1] - lam[:, i]
            r = torch.stack([(lam[:, i - m] - lam[:, i]) / h for m in range(k)], -1)
            w.append(alpha[:, i + 1, None] * vandermonde_weights(r, exp_moments(h, k, kappa)))
            decay = torch.exp(-h) if stochastic else torch.ones_like(h)
            a.append(sigma[:, i + 1] / sigma[:, i] * decay)
            c.append(sigma[:, i + 1] * torch.sqrt(-torch.expm1(-2.0 * h)))
        tab.update(a=torch.stack(a, 1), w=_stack(w, max(orders, default=1)))
        if stochastic:
            tab["c"] = torch.stack(c, 1)
        return tab

    return build


def ab_rho_weights(rho: Tensor, i: int, k: int) -> tuple[Tensor, Tensor]:
    """Adams-Bashforth in rho: (weights [B, k] on eps_{i-m}, step H = rho_{i+1} - rho_i)."""
    step = rho[:, i + 1] - rho[:, i]
    r = torch.stack([(rho[:, i - m] - rho[:, i]) / step for m in range(k)], -1)
    moments = torch.stack([step / (j + 1) for j in range(k)], -1)
    return vandermonde_weights(r, moments), step


def ab_rho_tables(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
    """euler (k = 1) and deis (k = 3): x_{i+1} = alpha_{i+1} (x_i / alpha_i + sum_m w_m eps_{i-m})."""
    tab = points(schedule, t)
    rho, alpha = schedule.rho(t), tab["alpha"]
    a, w = [], []
    for i, order in enumerate(orders):
        weights, _ = ab_rho_weights(rho, i, min(order, i + 1))
        w.append(alpha[:, i + 1, None] * weights)
        a.append(alpha[:, i + 1] / alpha[:, i])
    tab.update(a=torch.stack(a, 1), w=_stack(w, max(orders, default=1)))
    return tab


def euler_maruyama_tables(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
    """Reverse SDE dx = [f x - g^2 score] dt + g dW, score = -(x - alpha D) / sigma^2, with
    f = alpha'/alpha and g^2 = 2 sigma sigma' - 2 f sigma^2, one Euler-Maruyama step per transition."""
    tab = points(schedule, t)
    alpha, sigma, d_alpha, d_sigma = tab["alpha"], tab["sigma"], tab["d_alpha"], tab["d_sigma"]
    f = d_alpha / alpha
    g2 = 2.0 * sigma * d_sigma - 2.0 * f * sigma**2
    dt = t[:, 1:] - t[:, :-1]
    f, g2, alpha, sigma = f[:, :-1], g2[:, :-1], alpha[:, :-1], sigma[:, :-1]
    tab.update(
        a=1.0 + dt * (f + g2 / sigma**2),
        w=(-dt * g2 * alpha / sigma**2)[..., None],
        c=torch.sqrt(g2 * -dt),
    )
    return tab


def linear_step(feature: str, stochastic: bool):
    """x_{i+1} = a_i x_i + sum_m w_{i,m} F_{i-m} (+ c_i z), F = D (x0) or eps.

    Affine fast path (plain R^d, no mask, nothing cached): F_i = f_x x_i + f_out out_i is linear in the raw
    model output, so x_{i+1} = A_i x_i + B_i out_i + sum_{m>=1} w_{i,m} F_{i-m} with A = a + w_0 f_x and
    B = w_0 f_out precomputed (``linear_fuse``): one multiply and one multiply-add per term, F_i itself only
    formed when a later step needs it."""
    fx, fo = ("c_x", "c_out") if feature == "x0" else ("e_x", "e_out")

    def step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
        x, tab = state.x, state.tab
        width = tab["w"].shape[2]
        if state.x0 is None and sampler.affine(state):
            out, nan_step = sampler.model_out(state, x, "", i)
            x_next = torch.mul(x, _col(tab, "A", i))
            x_next.addcmul_(_col(tab, "B", i), out)
            hist: tuple[Tensor, ...] = ()
            if width > 1:
                w = tab["w"][:, i]
                for m in range(1, min(width, len(state.hist) + 1)):
                    x_next.addcmul_(w[:, m], state.hist[m - 1])
                f = torch.mul(x, _col(tab, fx, i))
                hist = (f.addcmul_(_col(tab, fo, i), out), *state.hist)
        else:
            w = tab["w"][:, i]
            d, nan_step = _denoised(sampler, state, i)
            f = d if feature == "x0" else _eps(tab, i, x, d)
            hist = (f, *state.hist)
            x_next = _col(tab, "a", i) * x  # a fresh tensor: the in-place updates below touch nothing else
            for m in range(min(width, len(hist))):
                x_next.addcmul_(w[:, m], hist[m])
        if stochastic:
            x_next.addcmul_(_col(tab, "c", i), sampler.noise(state, generator))
        return sampler.advance(state, x_next, hist=hist[: width - 1], nan_step=nan_step)

    return step


def linear_fuse(feature: str) -> Callable[[Tables], Tables]:
    """Fused coefficients of ``linear_step``'s fast path: A = a + w_0 f_x, B = w_0 f_out."""
    fx, fo = ("c_x", "c_out") if feature == "x0" else ("e_x", "e_out")

    def fuse(tab: Tables) -> Tables:
        w0 = tab["w"][..., 0]
        return {"A": tab["a"] + w0 * tab[fx][:, :-1], "B": w0 * tab[fo][:, :-1]}

    return fuse


def _eps(tab: Tables, i: int, x: Tensor, d: Tensor) -> Tensor:
    """eps = (x - alpha D) / sigma at grid point i."""
    alpha, sigma = _col(tab, "alpha", i), _col(tab, "sigma", i)
    return torch.addcmul(x / sigma, d, -alpha / sigma)


def _denoised(sampler: Sampler, state: State, i: int) -> tuple[Tensor, tuple]:
    """x0 at the current grid point: the cached one if a previous step (or guidance) computed it."""
    if state.x0 is not None:
        return state.x0, state.nan_step
    return sampler.denoise_at(state, state.x, "", i)


# ---------------------------------------------------------------------------------------------- ghvb momentum
def ghvb_tables(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
    """Generalised heavy ball (Wizadwongsa & Suwajanakorn 2024) of order q in [1, 2], beta = q - 1, in rho:
    v_i = (1 - beta) v_{i-1} + beta eps_i (v_0 = eps_0) and the slope
    s_i = eps_i + beta H_i / (2 H_{i-1}) (eps_i - v_{i-1}), x_{i+1} / alpha_{i+1} = x_i / alpha_i + H_i s_i.
    beta = 0 is Euler, beta = 1 the variable-step Adams-Bashforth 2; on equal steps this is the authors' GHVB."""
    tab = points(schedule, t)
    rho, alpha = schedule.rho(t), tab["alpha"]
    step = rho[:, 1:] - rho[:, :-1]
    ratio = torch.cat([torch.zeros_like(step[:, :1]), step[:, 1:] / (2.0 * step[:, :-1])], 1)
    tab.update(a=alpha[:, 1:] / alpha[:, :-1], H=alpha[:, 1:] * step, ratio=ratio)
    return tab


def ghvb_step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
    x, tab = state.x, state.tab
    d, nan_step = _denoised(sampler, state, i)
    eps = _eps(tab, i, x, d)
    beta = sampler.options["order"] - 1.0
    if i == 0:
        slope, velocity = eps, eps
    else:
        slope = eps + beta * _col(tab, "ratio", i) * (eps - state.extra[0])
        velocity = (1.0 - beta) * state.extra[0] + beta * eps
    x_next = _combine(tab, i, a=x, H=slope)
    return sampler.advance(state, x_next, extra=(velocity,), nan_step=nan_step)


# ---------------------------------------------------------------------------------------------- singlestep
SINGLESTEP_R = {2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def dpm_singlestep_tables(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
    """DPM-Solver-2/3 (singlestep, data prediction). Order 2: one point at lambda_s + h/2; order 3: points at
    h/3 and 2h/3, the second reached at order 2, the end using only the last difference (r2 = 2/3 cancels the
    second-derivative error). Intermediate points are stored as ``m1_*``/``m2_*`` (unused ones repeat t_s)."""
    tab = points(schedule, t)
    lam, alpha, sigma = half_lam(schedule, t), tab["alpha"], tab["sigma"]
    cols: dict[str, list[Tensor]] = {k: [] for k in ("a", "b_s", "b_last", "a1", "p1_s", "a2", "p2_s", "p2_1")}
    mids: dict[str, list[Tensor]] = {"m1": [], "m2": []}
    for i, order in enumerate(orders):
        s, e = lam[:, i], lam[:, i + 1]
        h = e - s
        rs = SINGLESTEP_R.get(order, ())
        t_mid = [schedule.t_of_lam(2.0 * (s + r * h)) for r in rs] + [t[:, i]] * (2 - len(rs))
        for name, tm in zip(("m1", "m2"), t_mid):
            mids[name].append(tm)
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
    tab.update({k: torch.stack(v, 1) for k, v in cols.items()})
    for name, ts in mids.items():
        tab.update(points(schedule, torch.stack(ts, 1), prefix=name + "_"))
    return tab


def dpm_singlestep_step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
    x, tab = state.x, state.tab
    order = sampler.orders[i]
    d, nan_step = _denoised(sampler, state, i)
    state_ = _with_nan(state, nan_step)
    last = d
    if order >= 2:
        x1 = _inner(sampler, state, _combine(tab, i, a1=x, p1_s=d))
        last, nan_step = sampler.denoise_at(state_, x1, "m1_", i, step=i)
        state_ = _with_nan(state, nan_step)
    if order == 3:
        x2 = _combine(tab, i, a2=x, p2_s=d, p2_1=last)
        last, nan_step = sampler.denoise_at(state_, _inner(sampler, state, x2), "m2_", i, step=i)
    x_next = _combine(tab, i, a=x, b_s=d, b_last=last)
    return sampler.advance(state, x_next, nan_step=nan_step)


def heun_tables(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
    """EDM's Heun in rho: Euler to t_{i+1}, evaluate there, step with the mean of both slopes."""
    tab = points(schedule, t)
    rho, alpha = schedule.rho(t), tab["alpha"]
    tab.update(a=alpha[:, 1:] / alpha[:, :-1], H=alpha[:, 1:] * (rho[:, 1:] - rho[:, :-1]))
    return tab


def heun_fuse(tab: Tables) -> Tables:
    """Heun's fast path: with eps_i = e_x x + e_out out, the Euler point is x_e = (a + H e_x) x + H e_out out
    and x_{i+1} = a x + H (eps_i + eps_e) / 2 = (1/2 + H e_x' / 2) x_e + (a / 2) x + (H e_out' / 2) out_e."""
    h, half_h = tab["H"], 0.5 * tab["H"]
    return {
        "A": tab["a"] + h * tab["e_x"][:, :-1], "B": h * tab["e_out"][:, :-1],
        "k_e": 0.5 + half_h * tab["e_x"][:, 1:], "k_x": 0.5 * tab["a"], "k_out": half_h * tab["e_out"][:, 1:],
    }


def heun_step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
    x, tab = state.x, state.tab
    if state.x0 is None and sampler.affine(state):
        out, nan_step = sampler.model_out(state, x, "", i)
        x_euler = torch.mul(x, _col(tab, "A", i))
        x_euler.addcmul_(_col(tab, "B", i), out)
        if sampler.orders[i] == 1:
            return sampler.advance(state, x_euler, nan_step=nan_step)
        out, nan_step = sampler.model_out(_with_nan(state, nan_step), x_euler, "", i + 1, step=i)
        x_next = torch.mul(x_euler, _col(tab, "k_e", i))
        x_next.addcmul_(_col(tab, "k_x", i), x).addcmul_(_col(tab, "k_out", i), out)
        return sampler.advance(state, x_next, nan_step=nan_step)
    a, step = _col(tab, "a", i), _col(tab, "H", i)
    d, nan_step = _denoised(sampler, state, i)
    eps = _eps(tab, i, x, d)
    x_euler = a * x + step * eps
    if sampler.orders[i] == 1:
        return sampler.advance(state, x_euler, nan_step=nan_step)
    x_euler = _inner(sampler, state, x_euler)
    d2, nan_step = sampler.denoise_at(_with_nan(state, nan_step), x_euler, "", i + 1, step=i)
    eps2 = _eps(tab, i + 1, x_euler, d2)
    return sampler.advance(state, a * x + step * 0.5 * (eps + eps2), nan_step=nan_step)


def _inner(sampler: Sampler, state: State, x: Tensor) -> Tensor:
    """An intermediate state, projected and with padding kept, ready for a model call."""
    return sampler._keep(sampler.space.project(x, state.mask), state.mask, state.keep)


def _with_nan(state: State, nan_step: tuple) -> State:
    return replace(state, nan_step=nan_step)


# ---------------------------------------------------------------------------------------------- UniPC
def unipc_tables(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
    """UniPC with B(h) = e^{-h} - 1 (bh2), data prediction (Zhao et al. 2023). Differences
    Delta_m = (D_m - D_s) / r_m enter as alpha_t M_0 sum_m rho_m Delta_m with sum_m rho_m r_m^j = M_{j+1} / M_0;
    a one-difference predictor (and the first corrector) use rho = 1/2 as bh2 prescribes. The corrector adds the
    model value at the predicted point (r = 1), which the next step reuses, so it costs no extra call."""
    tab = points(schedule, t)
    lam, alpha, sigma = half_lam(schedule, t), tab["alpha"], tab["sigma"]
    p = orders[0] if orders else 1
    a, wp, wc = [], [], []
    for i in range(len(orders)):
        k = min(p, i + 1)
        h = lam[:, i + 1] - lam[:, i]
        m = exp_moments(h, k + 1)
        r_prev = [(lam[:, i - j] - lam[:, i]) / h for j in range(1, k)]
        a.append(sigma[:, i + 1] / sigma[:, i])
        wp.append(alpha[:, i + 1, None] * _unipc_weights(r_prev, m, new=False))
        wc.append(alpha[:, i + 1, None] * _unipc_weights(r_prev, m, new=True))
    tab.update(a=torch.stack(a, 1), wp=_stack(wp, p), wc=_stack(wc, p + 1))
    return tab


def _unipc_weights(r_prev: list[Tensor], m: Tensor, new: bool) -> Tensor:
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


def unipc_step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
    x, tab = state.x, state.tab
    d, nan_step = _denoised(sampler, state, i)
    hist = (d, *state.hist)
    wp, wc, a = tab["wp"][:, i], tab["wc"][:, i], _col(tab, "a", i)
    x_pred = torch.mul(x, a)  # fresh tensors, updated in place
    for m in range(min(wp.shape[1], len(hist))):
        x_pred.addcmul_(wp[:, m], hist[m])
    if not sampler.affine(state):
        x_pred = _inner(sampler, state, x_pred)
    d_new, nan_step = sampler.denoise_at(_with_nan(state, nan_step), x_pred, "", i + 1)
    x_next = torch.mul(x, a)
    x_next.addcmul_(wc[:, 0], d_new)
    for m in range(min(wc.shape[1] - 1, len(hist))):
        x_next.addcmul_(wc[:, m + 1], hist[m])
    return sampler.advance(state, x_next, x0=d_new, hist=hist[: wp.shape[1] - 1], nan_step=nan_step)


# ---------------------------------------------------------------------------------------------- Gaussian linear part
# With moments N(m, C), C = sum_k lam_k u_k u_k^T (+ lam_perp off span U), write y = x / alpha, z = y - m and the
# denoiser D = D_G + R with D_G = m + C (C + rho^2)^{-1} z, the exact denoiser of N(m, C). In l = log(alpha/sigma)
# the probability-flow ODE dy/dl = D - y reads, per eigen-direction k,
#     dz_k/dl = -rho^2 / (lam_k + rho^2) z_k + R_k,   solved by variation of constants with Phi_k = sqrt(lam_k + rho^2):
#     z_k(t) = Phi_k(t) / Phi_k(s) z_k(s) + int_{l_s}^{l_t} Phi_k(t) / Phi_k(l) R_k(l) dl.
# The Gaussian part is integrated exactly; the multistep polynomial acts on the residual R only, with weights
# from the moments of the kernel Phi_k(t) / Phi_k(l) (Gauss-Legendre in l, float64, once per plan). With
# lam = 0 and m = 0 the kernel is e^{-(l_t - l)} and R = D: exactly the data-prediction exponential integrators
# (ddim, dpmpp_2m/3m, unipc). The rho-Adams-Bashforth family (euler, deis) extrapolates eps_R = -R / rho as a
# polynomial in rho instead; its kernel tends to 1 as lam -> infinity (D_G -> y), where it is exactly deis.
GAUSS_LEGENDRE_NODES = 64


@functools.cache
def _legendre(n: int) -> tuple[Tensor, Tensor]:
    return tuple(torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(n))


def _quadrature(lo: Tensor, hi: Tensor, n: int = GAUSS_LEGENDRE_NODES) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights [..., n] on [lo, hi] (lo, hi: [...])."""
    x, w = (v.to(lo) for v in _legendre(n))
    half = 0.5 * (hi - lo)[..., None]
    return lo[..., None] + half * (x + 1.0), half * w


def gaussian_tables(
    schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any], moments: Any, variable: str
) -> Tables:
    """Tables of the exact-linear-part solvers (keys ``lin_*``, per direction [.., E + 1], the last entry
    for the complement of the eigenvectors): gain = lam / (lam + rho^2) (D_G = m + gain z), ratio =
    alpha_t Phi(t) / Phi(s), and residual weights (times alpha_t) ``lin_w`` [B, T, E + 1, width], or
    ``lin_wp`` / ``lin_wc`` for UniPC's predictor and corrector. ``variable``: "l" (residual polynomial in l),
    "rho" (eps_R = -R / rho polynomial in rho) or "unipc"."""
    ell, alpha = half_lam(schedule, t), schedule.alpha(t)
    log_phi = moments.log_phi(ell)  # [B, n, E + 1]
    tab = {
        "lin_gain": moments.gain(ell), "lin_ratio": alpha[:, 1:, None] * torch.exp(log_phi[:, 1:] - log_phi[:, :-1]),
        "lin_alpha": alpha, "lin_inv_alpha": 1.0 / alpha,
    }
    g = torch.exp(-ell) if variable == "rho" else ell  # the polynomial's variable at the grid points
    width = max(orders, default=1)
    w, wp, wc = [], [], []
    for i, order in enumerate(orders):
        k = min(order, i + 1)
        lq, wq = _quadrature(ell[:, i], ell[:, i + 1])  # [B, Q]
        kernel = torch.exp(log_phi[:, i + 1, None, :] - moments.log_phi(lq))  # [B, Q, E + 1]
        gq = torch.exp(-lq) if variable == "rho" else lq
        span = g[:, i + 1] - g[:, i]
        v = (gq - g[:, i, None]) / span[:, None]
        density = kernel * (wq * gq if variable == "rho" else wq)[..., None]
        n_mom = k + 1 if variable == "unipc" else k
        mom = torch.stack([(density * (v**j)[..., None]).sum(-2) for j in range(n_mom)], -1)  # [B, E + 1, n_mom]
        r = [((g[:, i - m] - g[:, i]) / span)[:, None].expand_as(mom[..., 0]) for m in range(k)]
        scale = alpha[:, i + 1, None, None]
        if variable == "unipc":
            wp.append(scale * _unipc_weights(r[1:], mom, new=False))
            wc.append(scale * _unipc_weights(r[1:], mom, new=True))
            continue
        weights = vandermonde_weights(torch.stack(r, -1), mom)
        if variable == "rho":  # weights on R_m = -rho_m eps_R,m
            weights = weights / torch.stack([g[:, i - m] for m in range(k)], -1)[:, None, :]
        w.append(scale * weights)
    if variable == "unipc":
        tab.update(lin_wp=_stack(wp, width), lin_wc=_stack(wc, width + 1))
    else:
        tab["lin_w"] = _stack(w, width)
    return tab


def _compose(offset: Tensor, terms: list[tuple[Tensor, Tensor, Tensor]], eigvecs: Tensor) -> Tensor:
    """offset + sum_j c_j (.) v_j for maps diagonal in the eigenbasis: c_j [B, E + 1] (last: the complement),
    v_j [B, d] with eigen-coordinates v_j U [B, E]."""
    out = offset + sum(c[:, -1:] * v for c, v, _ in terms)
    return out + sum((c[:, :-1] - c[:, -1:]) * ve for c, _, ve in terms) @ eigvecs.T


def _residual(tab: Tables, basis: tuple[Tensor, Tensor], x: Tensor, d: Tensor, i: int) -> tuple[Tensor, ...]:
    """(z, z U, R, R U) at grid point i: z = x / alpha_i - m and R = D - D_G(x), flattened to [B, d]."""
    mean, vecs = basis
    z = x.flatten(1) * tab["lin_inv_alpha"][:, i, None] - mean
    ze, dm = z @ vecs, d.flatten(1) - mean
    gain = tab["lin_gain"][:, i]
    r = dm - _compose(torch.zeros_like(z), [(gain, z, ze)], vecs)
    return z, ze, r, dm @ vecs - gain[:, :-1] * ze


def _denoised_at(tab: Tables, basis: tuple[Tensor, Tensor], x: Tensor, r: Tensor, re: Tensor, i: int) -> Tensor:
    """D_G(x) + R at grid point i, shaped like x."""
    mean, vecs = basis
    z = x.flatten(1) * tab["lin_inv_alpha"][:, i, None] - mean
    gain = tab["lin_gain"][:, i]
    return _compose(mean + r, [(gain, z, z @ vecs)], vecs).reshape(x.shape)


def gaussian_linear_step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
    """x_{i+1} = alpha_{i+1} (m + Phi(t)/Phi(s) z_i + sum_m w_m R_{i-m}), diagonal in the eigenbasis; the
    history holds (R, R U) pairs, newest first."""
    x, tab, basis = state.x, state.tab, sampler.basis(state.x)
    d, nan_step = _denoised(sampler, state, i)
    z, ze, r, re = _residual(tab, basis, x, d, i)
    hist = (r, re, *state.hist)
    w = tab["lin_w"][:, i]
    width = w.shape[-1]
    terms = [(tab["lin_ratio"][:, i], z, ze)]
    terms += [(w[..., m], hist[2 * m], hist[2 * m + 1]) for m in range(min(width, len(hist) // 2))]
    x_next = _compose(tab["lin_alpha"][:, i + 1, None] * basis[0], terms, basis[1]).reshape(x.shape)
    return sampler.advance(state, x_next, hist=hist[: 2 * (width - 1)], nan_step=nan_step)


def gaussian_unipc_step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
    """UniPC on the residual: predictor, one model call at the predicted point, corrector with its residual.
    The cached denoised estimate at x_{i+1} is D_G(x_{i+1}) + R(predicted point), so the next step's residual
    is the corrector's (as plain UniPC reuses D at the predicted point)."""
    x, tab, basis = state.x, state.tab, sampler.basis(state.x)
    d, nan_step = _denoised(sampler, state, i)
    z, ze, r, re = _residual(tab, basis, x, d, i)
    hist = (r, re, *state.hist)
    wp, wc = tab["lin_wp"][:, i], tab["lin_wc"][:, i]
    offset, base = tab["lin_alpha"][:, i + 1, None] * basis[0], [(tab["lin_ratio"][:, i], z, ze)]
    past = [(m, hist[2 * m], hist[2 * m + 1]) for m in range(len(hist) // 2)]
    x_pred = _compose(offset, base + [(wp[..., m], v, ve) for m, v, ve in past if m < wp.shape[-1]], basis[1])
    x_pred = x_pred.reshape(x.shape)
    if not sampler.affine(state):
        x_pred = _inner(sampler, state, x_pred)
    d_new, nan_step = sampler.denoise_at(_with_nan(state, nan_step), x_pred, "", i + 1)
    _, _, r_new, re_new = _residual(tab, basis, x_pred, d_new, i + 1)
    terms = base + [(wc[..., 0], r_new, re_new)]
    terms += [(wc[..., m + 1], v, ve) for m, v, ve in past if m + 1 < wc.shape[-1]]
    x_next = _compose(offset, terms, basis[1]).reshape(x.shape)
    x0 = _denoised_at(tab, basis, x_next, r_new, re_new, i + 1)
    return sampler.advance(state, x_next, x0=x0, hist=hist[: 2 * (wp.shape[-1] - 1)], nan_step=nan_step)


# ---------------------------------------------------------------------------------------------- AF3 / EDM churn
def af3_tables(schedule: Schedule, t: Tensor, orders: list[int], options: Mapping[str, Any]) -> Tables:
    """AF3 / EDM stochastic sampler in rho: gamma_i = gamma_0 if rho_i > gamma_min else 0,
    rho_hat = rho_i (1 + gamma_i), y_hat = x_i / alpha_i + noise_scale sqrt(rho_hat^2 - rho_i^2) z,
    y_{i+1} = y_hat + step_scale (rho_{i+1} - rho_hat) (y_hat - D(y_hat, rho_hat)) / rho_hat."""
    tab = points(schedule, t)
    rho, alpha = schedule.rho(t)[:, :-1], tab["alpha"]
    gamma = torch.where(rho > options["gamma_min"], options["gamma_0"], 0.0)
    rho_hat = rho * (1.0 + gamma)
    t_hat = schedule.t_of_rho(rho_hat)
    tab.update(points(schedule, t_hat, prefix="hat_"))
    tab["hat_t"] = torch.where(gamma > 0, t_hat, t[:, :-1])  # exact grid time when there is no churn
    k = options["step_scale"] * (schedule.rho(t)[:, 1:] - rho_hat) / rho_hat
    tab.update(
        inv_alpha=1.0 / alpha[:, :-1],
        churn=options["noise_scale"] * torch.sqrt(rho_hat**2 - rho**2),
        y_coef=alpha[:, 1:] * (1.0 + k),
        d_coef=-alpha[:, 1:] * k,
    )
    return tab


def af3_step(sampler: Sampler, state: State, i: int, generator: torch.Generator | None) -> State:
    x, tab = state.x, state.tab
    y_hat = _combine(tab, i, inv_alpha=x, churn=sampler.noise(state, generator))
    x_hat = _inner(sampler, state, _col(tab, "hat_alpha", i) * y_hat)
    d, nan_step = sampler.denoise_at(state, x_hat, "hat_", i, step=i)
    x_next = _combine(tab, i, y_coef=y_hat, d_coef=d)
    return sampler.advance(state, x_next, nan_step=nan_step)


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SolverSpec:
    """A solver: its coefficient tables, its step, and what it costs."""

    name: str
    kind: str  # "multistep": one model call per grid point; "singlestep": ``order`` calls per transition
    tables: Callable[[Schedule, Tensor, list[int], Mapping[str, Any]], Tables]
    step: Callable[[Sampler, State, int, torch.Generator | None], State]
    stochastic: bool
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    max_order: float = 1  # the highest ``order`` option the tables support
    fractional_order: bool = False  # whether ``order`` may lie between integers (ghvb)
    fuse: Callable[[Tables], Tables] | None = None  # fused coefficients of the affine fast path, from the tables
    linear_part: str | None = None  # with an exact Gaussian part: the residual polynomial's variable (gaussian_tables)

    @property
    def linear_step(self) -> Callable[[Sampler, State, int, torch.Generator | None], State]:
        """The step of the exact-linear-part form (``Sampler(linear_part=...)``)."""
        return gaussian_unipc_step if self.linear_part == "unipc" else gaussian_linear_step

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
        SolverSpec("euler", "multistep", ab_rho_tables, linear_step("eps", False), False,
                   "Euler in (x/alpha, sigma/alpha); algebraically identical to DDIM", {"order": 1}, max_order=1,
                   fuse=linear_fuse("eps"), linear_part="rho"),
        SolverSpec("heun", "singlestep", heun_tables, heun_step, False,
                   "EDM's Heun (2nd order, 2 calls per step)", {"order": 2}, max_order=2, fuse=heun_fuse),
        SolverSpec("ddim", "multistep", exp_multistep_tables(1.0, False), linear_step("x0", False), False,
                   "DDIM = first-order exponential integrator", {"order": 1}, max_order=1, fuse=linear_fuse("x0"),
                   linear_part="l"),
        SolverSpec("dpm_solver_2", "singlestep", dpm_singlestep_tables, dpm_singlestep_step, False,
                   "DPM-Solver-2, singlestep, data prediction", {"order": 2}, max_order=2),
        SolverSpec("dpm_solver_3", "singlestep", dpm_singlestep_tables, dpm_singlestep_step, False,
                   "DPM-Solver-3, singlestep, data prediction", {"order": 3}, max_order=3),
        SolverSpec("dpmpp_2m", "multistep", exp_multistep_tables(1.0, False), linear_step("x0", False), False,
                   "DPM-Solver++(2M), exact integration of the linear interpolant", {"order": 2}, max_order=2,
                   fuse=linear_fuse("x0"), linear_part="l"),
        SolverSpec("dpmpp_3m", "multistep", exp_multistep_tables(1.0, False), linear_step("x0", False), False,
                   "DPM-Solver++(3M), exact integration of the quadratic interpolant", {"order": 3}, max_order=3,
                   fuse=linear_fuse("x0"), linear_part="l"),
        SolverSpec("unipc", "multistep", unipc_tables, unipc_step, False,
                   "UniPC bh2 predictor-corrector (order 2 predictor + corrector)", {"order": 2}, max_order=3,
                   linear_part="unipc"),
        SolverSpec("deis", "multistep", ab_rho_tables, linear_step("eps", False), False,
                   "DEIS rho-AB: Adams-Bashforth on eps in rho (order 3)", {"order": 3}, max_order=4,
                   fuse=linear_fuse("eps"), linear_part="rho"),
        SolverSpec("ghvb", "multistep", ghvb_tables, ghvb_step, False,
                   "Generalised heavy-ball momentum on rho-AB (fractional order)", {"order": 1.5},
                   max_order=2, fractional_order=True),
        SolverSpec("euler_maruyama", "multistep", euler_maruyama_tables, linear_step("x0", True), True,
                   "Euler-Maruyama on the reverse SDE in t", {"order": 1}, max_order=1, fuse=linear_fuse("x0")),
        SolverSpec("ddpm_ancestral", "multistep", exp_multistep_tables(2.0, True), linear_step("x0", True), True,
                   "DDPM ancestral sampling (= first-order SDE exponential integrator)", {"order": 1}, max_order=1,
                   fuse=linear_fuse("x0")),
        SolverSpec("dpmpp_2m_sde", "multistep", exp_multistep_tables(2.0, True), linear_step("x0", True), True,
                   "DPM-Solver++(2M) SDE", {"order": 2}, max_order=2, fuse=linear_fuse("x0")),
        SolverSpec("af3", "multistep", af3_tables, af3_step, True,
                   "AlphaFold 3 / EDM stochastic sampler (churn gamma_0, gamma_min, noise_scale, step_scale)", _AF3,
                   max_order=1),
    ]
}


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]
