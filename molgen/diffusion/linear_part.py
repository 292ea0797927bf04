"""Solvers with an exact Gaussian part (``Sampler(linear_part=moments)``): the flow of N(m, C) is integrated
exactly, the multistep polynomial extrapolates only the residual.

With moments N(m, C), C = sum_k lam_k u_k u_k^T (+ lam_perp off span U), write y = x / alpha, z = y - m and the
denoiser D = D_G + R with D_G = m + C (C + rho^2)^{-1} z, the exact denoiser of N(m, C). In l = log(alpha/sigma)
the probability-flow ODE dy/dl = D - y reads, per eigen-direction k,

    dz_k/dl = -rho^2 / (lam_k + rho^2) z_k + R_k,

solved by variation of constants with Phi_k = sqrt(lam_k + rho^2):

    z_k(t) = Phi_k(t) / Phi_k(s) z_k(s) + int_{l_s}^{l_t} Phi_k(t) / Phi_k(l) R_k(l) dl.

The residual weights are moments of the kernel Phi_k(t) / Phi_k(l) (Gauss-Legendre in l, float64, once per
plan). With lam = 0 and m = 0 the kernel is e^{-(l_t - l)} and R = D: exactly the data-prediction exponential
integrators (ddim, dpmpp_2m/3m, unipc). The rho-Adams-Bashforth family (euler, deis) extrapolates eps_R = -R / rho
as a polynomial in rho instead; its kernel tends to 1 as lam -> infinity (D_G -> y), where it is exactly deis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from molgen.diffusion.plan import STATIC, Model, Move, Points, Row, State, Step, denoised
from molgen.diffusion.schedules import Schedule
from molgen.diffusion.solvers import half_lam, stack, unipc_weights, vandermonde_weights

GAUSS_LEGENDRE_NODES = 64


@dataclass(frozen=True, eq=False)
class Gaussian:
    """Per direction [.., E + 1] (the last entry: the complement of the eigenvectors), at t_i (``_s``) and
    t_{i+1} (``_t``): gain = lam / (lam + rho^2) (D_G = m + gain z), ratio = alpha_t Phi(t) / Phi(s), and the
    residual weights (times alpha_t) ``w`` [B, T, E + 1, width], or ``wp`` / ``wc`` for UniPC's predictor and
    corrector. Acts on flattened [B, d] states; ``mean`` [d] and ``vecs`` [d, E] span the moments' basis."""

    flat: ClassVar[bool] = True

    gain_s: Tensor
    gain_t: Tensor
    ratio: Tensor
    inv_alpha_s: Tensor
    inv_alpha_t: Tensor
    alpha_t: Tensor
    mean: Tensor = field(metadata=STATIC)
    vecs: Tensor = field(metadata=STATIC)
    w: Tensor | None = None
    wp: Tensor | None = None
    wc: Tensor | None = None


@functools.cache
def _legendre(n: int) -> tuple[Tensor, Tensor]:
    return tuple(torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(n))


def _quadrature(lo: Tensor, hi: Tensor, n: int = GAUSS_LEGENDRE_NODES) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights [..., n] on [lo, hi] (lo, hi: [...])."""
    x, w = (v.to(lo) for v in _legendre(n))
    half = 0.5 * (hi - lo)[..., None]
    return lo[..., None] + half * (x + 1.0), half * w


def gaussian(schedule: Schedule, grid: Points, orders: list[int], moments: Any, variable: str) -> Gaussian:
    """The plan for residual polynomials in ``variable``: "l", "rho" (eps_R = -R / rho in rho) or "unipc"."""
    t, alpha = grid.t, grid.alpha
    ell = half_lam(schedule, t)
    log_phi = moments.log_phi(ell)  # [B, n, E + 1]
    gain = moments.gain(ell)
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
            wp.append(scale * unipc_weights(r[1:], mom, new=False))
            wc.append(scale * unipc_weights(r[1:], mom, new=True))
            continue
        weights = vandermonde_weights(torch.stack(r, -1), mom)
        if variable == "rho":  # weights on R_m = -rho_m eps_R,m
            weights = weights / torch.stack([g[:, i - m] for m in range(k)], -1)[:, None, :]
        w.append(scale * weights)
    weights = {"wp": stack(wp, width), "wc": stack(wc, width + 1)} if variable == "unipc" else {"w": stack(w, width)}
    inv_alpha = 1.0 / alpha
    return Gaussian(
        gain_s=gain[:, :-1], gain_t=gain[:, 1:], ratio=alpha[:, 1:, None] * torch.exp(log_phi[:, 1:] - log_phi[:, :-1]),
        inv_alpha_s=inv_alpha[:, :-1], inv_alpha_t=inv_alpha[:, 1:], alpha_t=alpha[:, 1:],
        mean=moments.mean.to(torch.float64).flatten(), vecs=moments.eigvecs.to(torch.float64), **weights,
    )


def _compose(offset: Tensor, terms: list[tuple[Tensor, Tensor, Tensor]], eigvecs: Tensor) -> Tensor:
    """offset + sum_j c_j (.) v_j for maps diagonal in the eigenbasis: c_j [B, E + 1] (last: the complement),
    v_j [B, d] with eigen-coordinates v_j U [B, E]."""
    out = offset + sum(c[:, -1:] * v for c, v, _ in terms)
    return out + sum((c[:, :-1] - c[:, -1:]) * ve for c, _, ve in terms) @ eigvecs.T


def _residual(p: Gaussian, x: Tensor, d: Tensor, inv_alpha: Tensor, gain: Tensor) -> tuple[Tensor, ...]:
    """(z, z U, R, R U): z = x / alpha - m and R = D - D_G(x), flattened to [B, d]."""
    z = x.flatten(1) * inv_alpha[:, None] - p.mean
    ze, dm = z @ p.vecs, d.flatten(1) - p.mean
    r = dm - _compose(torch.zeros_like(z), [(gain, z, ze)], p.vecs)
    return z, ze, r, dm @ p.vecs - gain[:, :-1] * ze


def linear_step(row: Row, state: State, model: Model, noise: Callable[[], Tensor]) -> Move:
    """x_{i+1} = alpha_{i+1} (m + Phi(t)/Phi(s) z_i + sum_m w_m R_{i-m}), diagonal in the eigenbasis; the
    history holds (R, R U) pairs, newest first."""
    p, x = row.coef, state.x
    z, ze, r, re = _residual(p, x, denoised(row, state, model), p.inv_alpha_s, p.gain_s)
    hist = (r, re, *state.hist)
    width = p.w.shape[-1]
    terms = [(p.ratio, z, ze)]
    terms += [(p.w[..., m], hist[2 * m], hist[2 * m + 1]) for m in range(min(width, len(hist) // 2))]
    x_next = _compose(p.alpha_t[:, None] * p.mean, terms, p.vecs).reshape(x.shape)
    return Move(x_next, hist=hist[: 2 * (width - 1)])


def unipc_step(row: Row, state: State, model: Model, noise: Callable[[], Tensor]) -> Move:
    """UniPC on the residual: predictor, one model call at the predicted point, corrector with its residual.
    The carried estimate at x_{i+1} is D_G(x_{i+1}) + R(predicted point), so the next step's residual is the
    corrector's (as plain UniPC reuses D at the predicted point)."""
    p, x = row.coef, state.x
    z, ze, r, re = _residual(p, x, denoised(row, state, model), p.inv_alpha_s, p.gain_s)
    hist = (r, re, *state.hist)
    offset, base = p.alpha_t[:, None] * p.mean, [(p.ratio, z, ze)]
    past = [(m, hist[2 * m], hist[2 * m + 1]) for m in range(len(hist) // 2)]
    x_pred = _compose(offset, base + [(p.wp[..., m], v, ve) for m, v, ve in past if m < p.wp.shape[-1]], p.vecs)
    x_pred = x_pred.reshape(x.shape)
    if not model.affine:
        x_pred = model.point(x_pred)
    d_new = model.denoise(x_pred, row.next, carried=True)
    _, _, r_new, re_new = _residual(p, x_pred, d_new, p.inv_alpha_t, p.gain_t)
    terms = base + [(p.wc[..., 0], r_new, re_new)]
    terms += [(p.wc[..., m + 1], v, ve) for m, v, ve in past if m + 1 < p.wc.shape[-1]]
    x_next = _compose(offset, terms, p.vecs).reshape(x.shape)
    z_next = x_next.flatten(1) * p.inv_alpha_t[:, None] - p.mean
    x0 = _compose(p.mean + r_new, [(p.gain_t, z_next, z_next @ p.vecs)], p.vecs).reshape(x.shape)
    return Move(x_next, hist=hist[: 2 * (p.wp.shape[-1] - 1)], x0=x0)


def step_for(variable: str) -> Step:
    """The step of the exact-linear-part form of a solver whose residual polynomial is in ``variable``."""
    return unipc_step if variable == "unipc" else linear_step
