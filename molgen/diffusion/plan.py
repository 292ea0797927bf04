"""Typed solver plans and the step protocol.

A plan is the float64 part of a sampler, computed once before the loop: the grid points ``Points`` [B or 1, n]
and one frozen dataclass of coefficients per solver family, [B or 1, n - 1, ...] (B rows for per-sample grids).
Three pure maps act on every tensor field of a plan (nested plans included, other fields pass through):
``on(plan, x)`` copies it into a state's device and dtype shaped to broadcast against x, ``column(plan, i)`` is
transition i's row and ``pick(plan, index, batch)`` selects particles. Fields marked ``STATIC`` have no batch
or time axis (a basis) and are only moved; a plan with ``flat = True`` acts on flattened [B, d] states.

A solver step is a function ``step(row, state, model, noise) -> Move`` of its ``Row``, the ``State``, the
model's denoised estimate (``Model``: bound by the sampler to the state's conditioning, mask and finiteness
record) and a noise draw; the sampler projects the move and keeps the padding. Samplers themselves, continuous
and masked, share one protocol, ``StepSampler`` (init, estimate, step, select, finish), which guidance drives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from molgen.diffusion.parameterization import x0_coefficients
from molgen.diffusion.schedules import Schedule

STATIC = {"static": True}


@dataclass(frozen=True, eq=False)
class Points:
    """Schedule quantities at some times and the model output's linear maps there (``prediction``):
    x0 = c_x x + c_out out and eps = e_x x + e_out out."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor
    c_x: Tensor
    c_out: Tensor
    e_x: Tensor
    e_out: Tensor
    prediction: str


def points(schedule: Schedule, t: Tensor, prediction: str) -> Points:
    """``Points`` at times ``t`` (any shape) for a model predicting ``prediction``;
    eps = (x - alpha x0) / sigma gives e_x = (1 - alpha c_x) / sigma and e_out = -alpha c_out / sigma."""
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    d_alpha, d_sigma = schedule.d_alpha_sigma(t)
    c_x, c_out = x0_coefficients(prediction, alpha, sigma, d_alpha, d_sigma)
    return Points(t, alpha, sigma, d_alpha, d_sigma, c_x, c_out, (1.0 - alpha * c_x) / sigma,
                  -alpha * c_out / sigma, prediction)


def _map(plan: Any, fn: Callable[[Tensor, bool, bool], Tensor], flat: bool = False) -> Any:
    """``plan`` with ``fn(tensor, static, flat)`` applied to every tensor field, recursively."""
    if not is_dataclass(plan):
        return plan
    flat = getattr(plan, "flat", flat)
    changes = {}
    for f in fields(plan):
        v = getattr(plan, f.name)
        if isinstance(v, Tensor):
            changes[f.name] = fn(v, f.metadata.get("static", False), flat)
        elif is_dataclass(v):
            changes[f.name] = _map(v, fn, flat)
    return replace(plan, **changes)


def on(plan: Any, x: Tensor) -> Any:
    """``plan`` in x's device and dtype, each [B or 1, T, ...] tensor shaped to broadcast against x."""
    trailing = [1] * (x.ndim - 1)

    def move(v: Tensor, static: bool, flat: bool) -> Tensor:
        v = v.to(x.device, x.dtype)
        return v if static or flat else v.reshape(*v.shape, *trailing)

    return _map(plan, move)


def column(plan: Any, i: int) -> Any:
    """Column i of every [B or 1, T, ...] tensor of ``plan``."""
    return _map(plan, lambda v, static, flat: v if static else v[:, i])


def pick(plan: Any, index: Tensor, batch: int) -> Any:
    """Rows ``index`` of a plan with per-sample rows (shared [1, ...] rows stay shared)."""

    def rows(v: Tensor, static: bool, flat: bool) -> Tensor:
        return v if static or (v.shape[0] == 1 and batch > 1) else v.index_select(0, index.to(v.device))

    return _map(plan, rows)


@dataclass(frozen=True, eq=False)
class Row:
    """Transition i: its grid points t_i (``at``) and t_{i+1} (``next``), the solver's coefficients and order."""

    at: Points
    next: Points
    coef: Any
    order: int


@dataclass(frozen=True, eq=False)
class Plan:
    """A sampler's plan: the grid points, the solver family's coefficients (None on a one-point grid) and the
    order of each transition. Memoised (a plan never changes): its ``on`` copies per (device, dtype, state rank)
    and its columns, so a step's row costs a dictionary look-up."""

    grid: Points
    coef: Any
    orders: tuple[int, ...]
    told: Tensor | None = None  # a step-scaled run's grid as given (``grid`` holds its state times)
    cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def on(self, x: Tensor) -> Plan:
        return self._memo((x.device, x.dtype, x.ndim), lambda: Plan(on(self.grid, x), on(self.coef, x), self.orders))

    def pick(self, index: Tensor, batch: int) -> Plan:
        """Rows ``index`` of a per-sample plan (a shared one is returned as it is)."""
        if batch > 1 and self.grid.t.shape[0] == 1:
            return self
        return Plan(pick(self.grid, index, batch), pick(self.coef, index, batch), self.orders)

    def at(self, j: int) -> Points:
        """Grid point j."""
        return self._memo(("at", j), lambda: column(self.grid, j))

    def row(self, i: int) -> Row:
        """Transition i."""
        return self._memo(("row", i), lambda: Row(self.at(i), self.at(i + 1), column(self.coef, i), self.orders[i]))


@dataclass
class State:
    """Per-sample sampler state; every tensor has the batch as its leading dimension (or 1 = shared)."""

    x: Tensor
    x0: Tensor | None  # denoised estimate at (x, t_i) when already computed (UniPC, guidance)
    hist: tuple[Tensor, ...]  # solver features at earlier grid points, newest first
    extra: tuple[Tensor, ...]  # solver-specific carried tensors (momentum)
    mask: Tensor | None
    keep: Tensor  # the input x_T: padded entries are returned as they came in
    cond: dict[str, Tensor]
    plan: Plan  # in the state's device and dtype
    # finiteness record: per model call (step, [B] row sums of its output), reduced once after the loop
    nan_step: tuple[tuple[int, Tensor], ...]

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def times(self) -> Tensor:
        """The grid times [B or 1, n] in the state's dtype."""
        t = self.plan.grid.t
        return t.reshape(t.shape[0], -1)


class Move(NamedTuple):
    """What a step returns: the next state (before projection), its history, carried tensors and, where the
    step computed it, the denoised estimate there."""

    x: Tensor
    hist: tuple[Tensor, ...] = ()
    extra: tuple[Tensor, ...] = ()
    x0: Tensor | None = None


class Model(Protocol):
    """The denoiser as a step sees it. ``affine``: plain R^d, no mask, no thresholding, so a step may combine
    the raw output with fused coefficients."""

    affine: bool

    def output(self, x: Tensor, at: Points) -> Tensor:
        """The raw model output at (x, at.t)."""

    def denoise(self, x: Tensor, at: Points, carried: bool = False) -> Tensor:
        """x0 at (x, at.t); ``carried``: the next state keeps it (its call belongs to the next grid point)."""

    def point(self, x: Tensor) -> Tensor:
        """An intermediate state made ready for a model call (projected, padding kept)."""


Step = Callable[[Row, State, Model, Callable[[], Tensor]], Move]


@runtime_checkable
class StepSampler(Protocol):
    """A sampler driven step by step (``molgen.diffusion.Sampler``, ``discrete.DiscreteSampler``)."""

    n_steps: int

    def init(self, x_T: Tensor, mask: Tensor | None = None, cond: Any = None) -> Any:
        """The state at the first grid point."""

    def estimate(self, state: Any, i: int) -> tuple[Any, Tensor]:
        """(state, denoised estimate at grid point i); the state caches it for ``step``."""

    def step(self, state: Any, i: int, generator: torch.Generator | None = None) -> Any:
        """The state at grid point i + 1."""

    def select(self, state: Any, index: Tensor) -> Any:
        """Particles ``index`` (resampling, replication)."""

    def finish(self, state: Any) -> Tensor:
        """The sample: the denoised estimate at the last grid point."""


def denoised(row: Row, state: State, model: Model) -> Tensor:
    """x0 at the state: the cached estimate (a previous step's or guidance's), else one model call."""
    return state.x0 if state.x0 is not None else model.denoise(state.x, row.at)


def eps(at: Points, x: Tensor, d: Tensor) -> Tensor:
    """eps = (x - alpha D) / sigma."""
    return torch.addcmul(x / at.sigma, d, -at.alpha / at.sigma)
