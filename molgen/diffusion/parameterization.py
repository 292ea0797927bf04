"""The one place that converts a model's prediction to the others.

With x_t = alpha x_0 + sigma eps:
  x0:        x_0 itself
  eps:       x_0 = (x_t - sigma eps) / alpha
  v:         v = alpha eps - sigma x_0          =>  x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
  velocity:  u = dx_t/dt = alpha' x_0 + sigma' eps  =>  x_0 = (sigma' x_t - sigma u) / (sigma' alpha - sigma alpha')
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("x0", "eps", "v", "velocity")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown model prediction {prediction!r}; choose one of {PREDICTIONS}")
    return prediction


def x0_coefficients(
    prediction: str, alpha: Tensor, sigma: Tensor, d_alpha: Tensor | None = None, d_sigma: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Every parameterisation is linear: x_0 = c_x x_t + c_out out. Returns (c_x, c_out) (see the table above),
    so that samplers precompute them per grid point and convert with one fused multiply-add."""
    if prediction == "x0":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if prediction == "eps":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v":
        norm = alpha**2 + sigma**2
        return alpha / norm, -sigma / norm
    if prediction == "velocity":
        if d_alpha is None or d_sigma is None:
            raise ValueError("velocity prediction needs the schedule's derivatives")
        det = d_sigma * alpha - sigma * d_alpha
        return d_sigma / det, -sigma / det
    raise ValueError(f"unknown model prediction {prediction!r}; choose one of {PREDICTIONS}")


def to_x0(
    prediction: str,
    out: Tensor,
    x: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    d_alpha: Tensor | None = None,
    d_sigma: Tensor | None = None,
) -> Tensor:
    """x_0 estimate from a model output; ``alpha``/``sigma`` (and their t-derivatives for ``velocity``)
    broadcast against ``x``."""
    c_x, c_out = x0_coefficients(prediction, alpha, sigma, d_alpha, d_sigma)
    return out * c_out if prediction == "x0" else torch.addcmul(c_x * x, c_out, out)


def eps_from_x0(x0: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha x_0) / sigma."""
    return (x - alpha * x0) / sigma


def from_x0(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor,
            d_alpha: Tensor | None = None, d_sigma: Tensor | None = None) -> Tensor:
    """Training target of a parameterisation from the clean sample and the noise."""
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "velocity":
        if d_alpha is None or d_sigma is None:
            raise ValueError("velocity prediction needs the schedule's derivatives")
        return d_alpha * x0 + d_sigma * eps
    raise ValueError(f"unknown model prediction {prediction!r}; choose one of {PREDICTIONS}")
