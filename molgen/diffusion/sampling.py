"""The sampling loop: a ``Sampler`` (plan + step-level interface) and ``sample`` (the one-call form).

A sampler evaluates the model at ``n_steps`` grid times t_0 > ... > t_{n-1} and returns the denoised estimate
at the last one, so the step into sigma = 0 is always first order. Everything the loop needs per sample
(state, multistep history, mask, conditioning, coefficient tables) lives in a ``State`` with a leading batch
dimension: guidance can resample or replicate particles with ``select(state, index)`` between steps.
All coefficients are precomputed in float64 before the loop; the loop itself never synchronises with the host
(non-finite model outputs are recorded per sample and reported once, after the loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from molgen.diffusion.grids import get_grid
from molgen.diffusion.parameterization import check_prediction, x0_coefficients
from molgen.diffusion.schedules import Schedule, get_schedule
from molgen.diffusion.spaces import Euclidean, expand_mask


class Denoiser(Protocol):
    prediction: str

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor: ...


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
    tab: dict[str, Tensor]  # coefficient tables [B or 1, ...], float64
    nan_step: Tensor  # [B] long: first step whose model output was not finite, -1 if none

    @property
    def batch(self) -> int:
        return self.x.shape[0]


def select(state: State, index: Tensor) -> State:
    """Particles ``index`` of ``state`` (resampling, replication); shared tables stay shared."""
    batch = state.batch

    def pick(t: Any) -> Any:
        if not isinstance(t, Tensor) or (t.shape[0] == 1 and batch > 1):
            return t
        return t.index_select(0, index.to(t.device))

    fields = {f: tree_map(pick, getattr(state, f)) for f in State.__dataclass_fields__}
    return State(**fields)


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """[B] or [1] coefficient -> broadcastable against x, in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def plan_orders(kind: str, order: int, steps: int | None, nfe: int | None) -> tuple[int, list[int]]:
    """Number of grid points and the order of each of the ``n - 1`` transitions.

    Multistep solvers spend one model call per grid point. A singlestep transition of order k spends k calls
    (one at its start, k - 1 inside); with an ``nfe`` budget the calls are spread over as few transitions of
    order <= k as the budget allows, higher orders first (the last call is always the final denoising)."""
    if (steps is None) == (nfe is None):
        raise ValueError("give exactly one of steps= and nfe=")
    budget = steps if steps is not None else nfe
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{'steps' if steps is not None else 'nfe'} must be an integer >= 1, got {budget!r}")
    if kind == "multistep" or steps is not None:
        return budget, [order] * (budget - 1)
    transitions = math.ceil((budget - 1) / order)
    extra = budget - 1 - transitions
    base, rem = divmod(extra, transitions) if transitions else (0, 0)
    return transitions + 1, [base + 2] * rem + [base + 1] * (transitions - rem)


def model_calls(kind: str, orders: list[int]) -> int:
    """Model evaluations of a plan: one per grid point, plus the inner ones of singlestep transitions."""
    return len(orders) + 1 + (sum(o - 1 for o in orders) if kind == "singlestep" else 0)


@dataclass
class Sampler:
    """A planned sampler: model, schedule, solver and time grid, with a step-level interface.

    ``init(x_T)`` -> state at t_0; ``step(state, i)`` moves from t_i to t_{i+1} (i < n_steps - 1);
    ``finish(state)`` returns the denoised estimate at t_{n-1}. ``sample`` runs all three.
    """

    model: Callable[..., Tensor]
    schedule: Schedule | str
    solver: str
    steps: int | None = None
    nfe: int | None = None
    grid: str | Tensor = "logsnr"
    space: Any = None
    prediction: str | None = None
    solver_options: Mapping[str, Any] | None = None
    grid_options: Mapping[str, Any] | None = None
    clip_x0: float | None = None
    dynamic_threshold: float | None = None
    autocast: torch.dtype | None = None  # e.g. torch.bfloat16: the model runs under autocast, the state does not
    compile: bool | str = False  # torch.compile the model (True: inductor, or a backend name); the loop stays eager
    n_steps: int = field(init=False)
    orders: list[int] = field(init=False)

    def __post_init__(self) -> None:
        from molgen.diffusion.solvers import get_solver

        self.schedule = get_schedule(self.schedule)
        self.spec = get_solver(self.solver)
        self.options = self.spec.check_options(self.solver_options or {})
        self.space = self.space if self.space is not None else Euclidean()
        pred = self.prediction or getattr(self.model, "prediction", None)
        if pred is None:
            raise ValueError("the model declares no prediction (x0, eps, v, velocity): pass prediction=")
        self.prediction = check_prediction(pred)
        if self.compile:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            self.model = torch.compile(self.model, backend=backend)
        if isinstance(self.grid, Tensor):
            grid = self.grid.to(torch.float64)
            self.t_grid = grid.reshape(grid.shape[0], -1).T.contiguous()  # [n] or [n, B] -> [1 or B, n]
            n = self.t_grid.shape[1]
            if (self.steps is None and self.nfe is None) or self.steps == n:
                self.steps, self.nfe = n, None
            self.n_steps, self.orders = plan_orders(self.spec.kind, self.options["order"], self.steps, self.nfe)
            if self.n_steps != n:
                raise ValueError(f"the explicit time grid has {n} points but the plan needs {self.n_steps}")
            if not bool((self.t_grid[:, 1:] < self.t_grid[:, :-1]).all()):
                raise ValueError("an explicit time grid must be strictly decreasing (noise first)")
        else:
            self.n_steps, self.orders = plan_orders(self.spec.kind, self.options["order"], self.steps, self.nfe)
            self.t_grid = get_grid(self.grid, self.schedule, self.n_steps, **(self.grid_options or {}))[None]
        if self.clip_x0 is not None and self.dynamic_threshold is not None:
            raise ValueError("choose one of clip_x0 and dynamic_threshold")
        self.tables = _tables(self.spec.name, self.schedule, self.t_grid, tuple(self.orders), self.options)
        for prefix in {k[: -len("d_alpha")] for k in self.tables if k.endswith("d_alpha")}:
            p = {n: self.tables[prefix + n] for n in ("alpha", "sigma", "d_alpha", "d_sigma")}
            c_x, c_out = x0_coefficients(self.prediction, **p)
            self.tables.update({prefix + "c_x": c_x, prefix + "c_out": c_out})

    @property
    def model_calls(self) -> int:
        return model_calls(self.spec.kind, self.orders)

    # ---- the step-level interface -------------------------------------------------------------------------
    def init(self, x_T: Tensor, mask: Tensor | None = None, cond: Mapping[str, Tensor] | None = None) -> State:
        if not torch.is_floating_point(x_T):
            raise ValueError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
        expand_mask(mask, x_T)  # validates the shape
        batch = x_T.shape[0]
        if self.t_grid.shape[0] not in (1, batch):
            raise ValueError(f"per-sample time grid has {self.t_grid.shape[0]} rows for a batch of {batch}")
        # tables in the state's dtype, shaped [B or 1, T, (K,) 1, ...] to broadcast against x without copies
        trailing = [1] * (x_T.ndim - 1)
        tab = {k: v.to(x_T.device, x_T.dtype).reshape(*v.shape, *trailing) for k, v in self.tables.items()}
        x = self.space.project(x_T, mask)
        return State(
            x=self._keep(x, mask, x_T), x0=None, hist=(), extra=(), mask=mask, keep=x_T,
            cond=dict(cond or {}), tab=tab,
            nan_step=torch.full((batch,), -1, dtype=torch.long, device=x_T.device),
        )

    def step(self, state: State, i: int, generator: torch.Generator | None = None) -> State:
        if not 0 <= i < self.n_steps - 1:
            raise IndexError(f"step {i} outside 0..{self.n_steps - 2}")
        return self.spec.step(self, state, i, generator)

    def finish(self, state: State) -> Tensor:
        x0 = state.x0 if state.x0 is not None else self.denoise_at(state, state.x, "", self.n_steps - 1)[0]
        x0 = self._keep(x0, state.mask, state.keep)
        bad = state.nan_step >= 0
        if bool(bad.any()):  # the one host synchronisation, after the loop
            first = int(state.nan_step[bad].min())
            raise FloatingPointError(
                f"the model returned NaN/inf for {int(bad.sum())} of {state.batch} samples "
                f"(first at step {first} of {self.n_steps}, t={float(self.t_grid[0, first]):.4g})"
            )
        return x0

    def run(
        self, state: State, generator: torch.Generator | None = None, callback: Callable | None = None
    ) -> State:
        """All transitions; ``callback(i, state)`` after each."""
        for i in range(self.n_steps - 1):
            state = self.step(state, i, generator)
            if callback is not None:
                callback(i, state)
        return state

    # ---- helpers used by the solver steps -----------------------------------------------------------------
    def denoise_at(
        self, state: State, x: Tensor, prefix: str, j: int, step: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """x0 estimate at table point ``prefix + name`` column j (grid point when prefix == "").

        Returns (x0, nan_step) with non-finite outputs recorded against ``step`` (default j)."""
        tab = state.tab
        t = tab[prefix + "t"][:, j].reshape(-1).expand(x.shape[0])
        if self.autocast is None:
            out = self.model(x, t, **state.cond)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast):
                out = self.model(x, t, **state.cond)
        out = out.to(x.dtype)
        c_out = tab[prefix + "c_out"][:, j]
        x0 = out * c_out if self.prediction == "x0" else torch.addcmul(tab[prefix + "c_x"][:, j] * x, c_out, out)
        x0 = self._threshold(x0)
        m = expand_mask(state.mask, x0)
        if m is not None:
            x0 = torch.where(m, x0, torch.zeros_like(x0))
        x0 = self.space.project(x0, state.mask)
        bad = ~torch.isfinite(x0.flatten(1).sum(1))  # one pass; NaN and inf propagate through the sum
        nan_step = torch.where(bad & (state.nan_step < 0), step if step is not None else j, state.nan_step)
        return x0, nan_step

    def advance(self, state: State, x_next: Tensor, **changes: Any) -> State:
        """New state at the next grid point: projected, padding kept, cached x0 dropped unless given."""
        x_next = self._keep(self.space.project(x_next, state.mask), state.mask, state.keep)
        changes.setdefault("x0", None)
        return replace(state, x=x_next, **changes)

    def noise(self, state: State, generator: torch.Generator | None) -> Tensor:
        return self.space.noise_like(state.x, state.mask, generator)

    @staticmethod
    def _keep(x: Tensor, mask: Tensor | None, keep: Tensor) -> Tensor:
        m = expand_mask(mask, x)
        return x if m is None else torch.where(m, x, keep)

    def _threshold(self, x0: Tensor) -> Tensor:
        if self.clip_x0 is not None:
            return x0.clamp(-self.clip_x0, self.clip_x0)
        if self.dynamic_threshold is not None:  # Imagen: s = max(1, quantile_p |x0|), x0 <- clip(x0, s) / s
            s = torch.quantile(x0.flatten(1).abs().float(), self.dynamic_threshold, dim=1).clamp_min(1.0)
            s = bcast(s, x0)
            return torch.maximum(torch.minimum(x0, s), -s) / s
        return x0


_PLANS: dict[tuple, dict[str, Tensor]] = {}


def _tables(solver: str, schedule: Schedule, t_grid: Tensor, orders: tuple[int, ...], options: Mapping) -> dict:
    """Coefficient tables of a plan, memoised for shared grids (plans are pure functions of their inputs)."""
    from molgen.diffusion.solvers import get_solver, points

    key = (solver, schedule, tuple(t_grid.flatten().tolist()), orders, tuple(sorted(options.items())))
    if t_grid.shape[0] > 1 or t_grid.numel() > 2048:
        key = None
    if key is not None and key in _PLANS:
        return dict(_PLANS[key])
    tables = get_solver(solver).tables(schedule, t_grid, list(orders), options) if orders else points(schedule, t_grid)
    if key is not None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = tables
    return dict(tables)


def sample(
    model: Callable[..., Tensor],
    schedule: Schedule | str,
    x_T: Tensor,
    *,
    solver: str,
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | Tensor = "logsnr",
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    space: Any = None,
    prediction: str | None = None,
    callback: Callable[[int, State], None] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    grid_options: Mapping[str, Any] | None = None,
    clip_x0: float | None = None,
    dynamic_threshold: float | None = None,
    autocast: torch.dtype | None = None,
    compile: bool | str = False,
) -> Tensor:
    """Denoise ``x_T`` (drawn at the schedule's ``t_max``) with ``solver`` on a time ``grid``.

    ``steps`` is the number of grid points (= model calls for multistep solvers); ``nfe`` instead gives a model
    call budget that singlestep solvers spread over mixed orders. ``grid`` is a name or an explicit
    decreasing tensor of times, [n] or [n, B] for per-sample times. Returns the x0 estimate at the last point.
    """
    sampler = Sampler(
        model, schedule, solver, steps=steps, nfe=nfe, grid=grid, space=space, prediction=prediction,
        solver_options=solver_options, grid_options=grid_options, clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold, autocast=autocast, compile=compile,
    )
    state = sampler.run(sampler.init(x_T, mask=mask, cond=cond), generator, callback)
    return sampler.finish(state)
