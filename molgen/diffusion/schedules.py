"""Noise schedules: the path x_t = alpha(t) x_0 + sigma(t) eps for t in [0, 1] (t = 1 is noise).

Every schedule gives alpha(t), sigma(t), their time derivatives, the log signal-to-noise ratio
lambda(t) = log(alpha^2 / sigma^2) and its inverse. Solvers work in lambda (exponential integrators) or in
rho = sigma / alpha (the variance-exploding view, rho = exp(-lambda / 2)), so each schedule only has to say
how t maps to lambda. Computations run in the dtype of ``t``; solvers call them in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import softplus


@dataclass(frozen=True)
class Schedule:
    """Base class. Subclasses define ``log_alpha``/``log_sigma`` (or override), their derivatives and the
    inverse of lambda. ``t_max`` is where sampling starts, ``t_min`` the default last model evaluation."""

    name: str = "schedule"
    t_min: float = 1e-3
    t_max: float = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return self.log_sigma(t).exp()

    def lam(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2)."""
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def rho(self, t: Tensor) -> Tensor:
        """sigma / alpha, the noise level of the variance-exploding view x / alpha."""
        return (self.log_sigma(t) - self.log_alpha(t)).exp()

    def t_of_rho(self, rho: Tensor | float) -> Tensor:
        """The time where sigma / alpha = rho (lambda = -2 log rho), float64."""
        return self.t_of_lam(-2.0 * torch.log(torch.as_tensor(rho, dtype=torch.float64)))

    @property
    def prior_std(self) -> float:
        """Standard deviation of x at ``t_max`` for unit-variance data (VP: about 1, VE: sigma_max)."""
        t = torch.tensor(self.t_max, dtype=torch.float64)
        return float((self.alpha(t) ** 2 + self.sigma(t) ** 2).sqrt())

    # subclasses implement these four
    def log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def log_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_lam(self, lam: Tensor) -> Tensor:
        """Inverse of lambda(t)."""
        raise NotImplementedError

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha / dt, d sigma / dt)."""
        raise NotImplementedError


def _vp_log_sigma(log_alpha: Tensor) -> Tensor:
    """sigma = sqrt(1 - alpha^2) for variance-preserving schedules, stable near alpha = 1."""
    return 0.5 * torch.log((-torch.expm1(2.0 * log_alpha)).clamp_min(0.0))


def _vp_log_alpha_of_lam(lam: Tensor) -> Tensor:
    """VP: alpha^2 = sigmoid(lambda), so log alpha = -softplus(-lambda) / 2."""
    return -0.5 * softplus(-lam)


def _vp_d_sigma(alpha: Tensor, sigma: Tensor, d_alpha: Tensor) -> Tensor:
    return -alpha * d_alpha / sigma


@dataclass(frozen=True)
class VPLinear(Schedule):
    """Continuous-time DDPM: log alpha(t) = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2 (Song et al. 2021).
    At t = (i + 1) / 1000 it equals DDPM's discrete linear betas 1e-4 ... 0.02."""

    name: str = "vp_linear"
    beta_0: float = 0.1
    beta_1: float = 20.0

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * (self.beta_1 - self.beta_0) * t**2 - 0.5 * self.beta_0 * t

    def log_sigma(self, t: Tensor) -> Tensor:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_lam(self, lam: Tensor) -> Tensor:
        db = self.beta_1 - self.beta_0
        return (-self.beta_0 + torch.sqrt(self.beta_0**2 + 2.0 * db * softplus(-lam))) / db

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.alpha(t), self.sigma(t)
        d_alpha = alpha * (-0.5 * (self.beta_1 - self.beta_0) * t - 0.5 * self.beta_0)
        return d_alpha, _vp_d_sigma(alpha, sigma, d_alpha)


@dataclass(frozen=True)
class VPCosine(Schedule):
    """Improved-DDPM cosine: alpha(t) = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s)).
    ``t_max`` = 0.9946 keeps alpha away from 0 (as DPM-Solver does)."""

    name: str = "vp_cosine"
    s: float = 0.008
    t_max: float = 0.9946

    def _angle(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(torch.cos(self._angle(t))) - math.log(math.cos(0.5 * math.pi * self.s / (1 + self.s)))

    def log_sigma(self, t: Tensor) -> Tensor:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_lam(self, lam: Tensor) -> Tensor:
        log_cos = _vp_log_alpha_of_lam(lam) + math.log(math.cos(0.5 * math.pi * self.s / (1 + self.s)))
        return torch.arccos(log_cos.exp()) * 2.0 * (1.0 + self.s) / math.pi - self.s

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.alpha(t), self.sigma(t)
        d_alpha = alpha * -torch.tan(self._angle(t)) * 0.5 * math.pi / (1.0 + self.s)
        return d_alpha, _vp_d_sigma(alpha, sigma, d_alpha)


@dataclass(frozen=True)
class Polynomial2(Schedule):
    """EDM's (Hoogeboom et al. 2022) ``polynomial_2``: alpha^2 = (1 - 2s)(1 - t^2)^2 + s, sigma^2 = 1 - alpha^2.
    The continuous form, without the discrete clipping EDM applies to its 1000-step table."""

    name: str = "polynomial_2"
    s: float = 1e-5
    t_min: float = 0.0

    def _alpha2(self, t: Tensor) -> Tensor:
        return (1.0 - 2.0 * self.s) * (1.0 - t**2) ** 2 + self.s

    def log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(self._alpha2(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log1p(-self._alpha2(t))

    def t_of_lam(self, lam: Tensor) -> Tensor:
        alpha2 = torch.sigmoid(lam)
        inner = ((alpha2 - self.s) / (1.0 - 2.0 * self.s)).clamp(0.0, 1.0).sqrt()
        return (1.0 - inner).clamp(0.0, 1.0).sqrt()

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.alpha(t), self.sigma(t)
        d_alpha2 = (1.0 - 2.0 * self.s) * 2.0 * (1.0 - t**2) * (-2.0 * t)
        d_alpha = d_alpha2 / (2.0 * alpha)
        return d_alpha, _vp_d_sigma(alpha, sigma, d_alpha)


@dataclass(frozen=True)
class EDM(Schedule):
    """Variance exploding (Karras et al. 2022): alpha = 1, log sigma linear in t between sigma_min and
    sigma_max. Time grids (e.g. ``karras``) decide where steps go; t is only a coordinate here."""

    name: str = "edm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    t_min: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"edm schedule needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    @property
    def _span(self) -> float:
        return math.log(self.sigma_max) - math.log(self.sigma_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def log_sigma(self, t: Tensor) -> Tensor:
        return math.log(self.sigma_min) + t * self._span

    def t_of_lam(self, lam: Tensor) -> Tensor:
        return (-0.5 * lam - math.log(self.sigma_min)) / self._span

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), self.sigma(t) * self._span


@dataclass(frozen=True)
class LinearFlow(Schedule):
    """Rectified flow / linear interpolant: alpha = 1 - t, sigma = t; velocity u = eps - x_0.
    ``t_max`` = 0.999 keeps lambda finite at the start (x at 0.999 is noise to 1e-3)."""

    name: str = "linear_flow"
    t_max: float = 0.999

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-t)

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def t_of_lam(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * lam)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)


SCHEDULES: dict[str, type[Schedule]] = {
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "polynomial_2": Polynomial2,
    "edm": EDM,
    "linear_flow": LinearFlow,
}


def get_schedule(name: str | Schedule, **kwargs: float) -> Schedule:
    """Schedule by name (``vp_linear``, ``vp_cosine``, ``polynomial_2``, ``edm``, ``linear_flow``); keyword
    arguments set its parameters (e.g. ``get_schedule("edm", sigma_min=4e-4 * 16, sigma_max=160 * 16)``)."""
    if isinstance(name, Schedule):
        if kwargs:
            raise ValueError("schedule parameters can only be given with a schedule name")
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = set(cls.__dataclass_fields__) - {"name"}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"schedule {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(**kwargs)
