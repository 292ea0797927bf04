"""The sampling loop: a ``Sampler`` (plan + step-level interface) and ``sample`` (the one-call form).

A sampler evaluates the model at ``n_steps`` grid times t_0 > ... > t_{n-1} and returns the denoised estimate
at the last one, so the step into sigma = 0 is always first order. Everything the loop needs per sample
(state, multistep history, mask, conditioning, coefficient tables) lives in a ``State`` with a leading batch
dimension: guidance can resample or replicate particles with ``select(state, index)`` between steps.
All coefficients are precomputed in float64 before the loop; the loop itself never synchronises with the host
(non-finite model outputs are recorded per sample and reported once, after the loop). Plans (grid, tables,
parameterisation and fused step coefficients) are memoised, and so are their copies in a state's device, dtype
and rank. On plain R^d without a mask the steps take an affine fast path: each transition is a few fused
multiply-adds of the state, the raw model output and the history, with no projection or masking work.
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
from molgen.diffusion.step_scale import StepScaled, anchor, scaled_times


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
    # finiteness record: per model call (step, [B] row sums of its output), reduced once after the loop
    # (``first_nan_step``); NaN and inf propagate through a sum, so one reduction per call is the whole check
    nan_step: tuple[tuple[int, Tensor], ...]

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


def first_nan_step(state: State) -> Tensor:
    """[B] long: the first step whose model output was not finite, per sample, -1 if none."""
    if not state.nan_step:
        return torch.full((state.batch,), -1, dtype=torch.long, device=state.x.device)
    steps = torch.tensor([s for s, _ in state.nan_step], dtype=torch.long, device=state.x.device)
    bad = ~torch.isfinite(torch.stack([v for _, v in state.nan_step]))  # [calls, B]
    first = torch.where(bad, steps[:, None], torch.iinfo(torch.long).max).amin(0)
    return torch.where(bad.any(0), first, -1)


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
    warm_start: Any = None  # GaussianMoments of the data: x_T is carried to the first grid point in closed form
    linear_part: Any = None  # GaussianMoments: every step integrates their flow exactly, extrapolates the residual
    step_scale: float = 1.0  # AF3's eta for any solver: dy/drho = eta (y - D) / rho (molgen.diffusion.step_scale)
    step_scale_below: float | None = None  # rho = sigma / alpha below which it applies (None: the whole grid)
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
        if self.step_scale != 1.0:
            if not self.step_scale > 0:
                raise ValueError(f"step_scale must be > 0, got {self.step_scale}")
            if self.step_scale_below is not None and not self.step_scale_below > 0:
                raise ValueError(f"step_scale_below must be > 0, got {self.step_scale_below}")
            if self.spec.stochastic or self.linear_part is not None:
                raise ValueError("step_scale applies to the ODE solvers, without linear_part (af3 takes its own: "
                                 "solver_options={'step_scale': ...})")
        if self.compile:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            self.model = torch.compile(self.model, backend=backend)
        if self.clip_x0 is not None and self.dynamic_threshold is not None:
            raise ValueError("choose one of clip_x0 and dynamic_threshold")
        if self.linear_part is not None:
            if self.spec.linear_part is None:
                from molgen.diffusion.solvers import SOLVERS

                raise ValueError(
                    f"solver {self.spec.name!r} has no exact-linear-part form; linear_part works with "
                    f"{sorted(n for n, s in SOLVERS.items() if s.linear_part)}"
                )
        grid_options = dict(self.grid_options or {})
        if isinstance(self.grid, Tensor):
            grid = self.grid.to(torch.float64)
            t_grid = grid.reshape(grid.shape[0], -1).T.contiguous()  # [n] or [n, B] -> [1 or B, n]
            n = t_grid.shape[1]
            if (self.steps is None and self.nfe is None) or self.steps == n:
                self.steps, self.nfe = n, None
            self.n_steps, self.orders = plan_orders(self.spec.kind, self.options["order"], self.steps, self.nfe)
            if self.n_steps != n:
                raise ValueError(f"the explicit time grid has {n} points but the plan needs {self.n_steps}")
            if not bool((t_grid[:, 1:] < t_grid[:, :-1]).all()):
                raise ValueError("an explicit time grid must be strictly decreasing (noise first)")
            grid_key = tuple(t_grid.flatten().tolist()) if t_grid.numel() <= 2048 else None
            grid_key = None if grid_key is None else (t_grid.shape, grid_key)
        else:
            self.n_steps, self.orders = plan_orders(self.spec.kind, self.options["order"], self.steps, self.nfe)
            if self.warm_start is not None and not {"t_max", "t_min"} <= grid_options.keys():
                grid_options = {**self.warm_start.grid_ends(self.schedule, self.model_calls), **grid_options}
            t_grid, grid_key = None, (self.grid, tuple(sorted(grid_options.items())))
        key = None if grid_key is None else (
            self.spec.name, self.schedule, grid_key, tuple(self.orders), tuple(sorted(self.options.items())),
            self.prediction, self.linear_part, self.step_scale, self.step_scale_below,
        )
        try:
            hash(key)
        except TypeError:  # unhashable grid options: plan without memoising
            key = None
        self._plan = _plan(key, self, t_grid, grid_options)
        self.t_grid, self.tables = self._plan.t_grid, dict(self._plan.tables)
        self._net = self.model if self.step_scale == 1.0 else StepScaled(
            self.model, self.schedule, self.step_scale, anchor(self.schedule, self.t_grid, self.step_scale_below),
            self.prediction)
        self._step = self.spec.step if self.linear_part is None else self.spec.linear_step
        # plain R^d, no thresholding: steps may take the affine fast path (states without a mask)
        self._affine = type(self.space) is Euclidean and self.clip_x0 is None and self.dynamic_threshold is None

    @property
    def net_prediction(self) -> str:
        """What the solver steps receive: the model's prediction, or x0 from a step-scaled model."""
        return self.prediction if self.step_scale == 1.0 else "x0"

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
        tab = self._plan.tables_for(x_T)
        if self.linear_part is not None:
            if mask is not None:
                raise ValueError("linear_part needs fixed-size states (no padding mask)")
            if x_T.shape[1:] != self.linear_part.mean.shape:
                raise ValueError(f"linear_part moments are for states of shape {tuple(self.linear_part.mean.shape)}, "
                                 f"got {tuple(x_T.shape[1:])}")
        x = self.space.project(x_T, mask)
        if self.warm_start is not None:
            if mask is not None:
                raise ValueError("warm_start needs fixed-size states (no padding mask)")
            x = self.space.project(self.warm_start.flow(x, self.schedule, self.schedule.t_max, self.t_grid[:, 0]), mask)
        return State(
            x=self._keep(x, mask, x_T), x0=None, hist=(), extra=(), mask=mask, keep=x_T,
            cond=dict(cond or {}), tab=tab,
            nan_step=(),
        )

    def step(self, state: State, i: int, generator: torch.Generator | None = None) -> State:
        if not 0 <= i < self.n_steps - 1:
            raise IndexError(f"step {i} outside 0..{self.n_steps - 2}")
        return self._step(self, state, i, generator)

    def final(self, state: State) -> State:
        """``state`` with ``x0`` = the denoised estimate at t_{n-1}, padded entries as they came in. No host
        synchronisation: a CUDA graph can hold ``init``, ``run`` and ``final`` (``molgen.diffusion.cuda_graph``)."""
        if state.x0 is None:
            x0, record = self.denoise_at(state, state.x, "", self.n_steps - 1)
            state = replace(state, x0=x0, nan_step=record)
        return replace(state, x0=self._keep(state.x0, state.mask, state.keep))

    def check_finite(self, state: State) -> None:
        """Raise if any model call returned NaN/inf: the one host synchronisation, after the loop."""
        sums = torch.cat([v for _, v in state.nan_step]) if state.nan_step else state.x.new_zeros(1)
        if not bool(torch.isfinite(sums).all()):
            nan_step = first_nan_step(state)
            bad = nan_step >= 0
            first = int(nan_step[bad].min())
            raise FloatingPointError(
                f"the model returned NaN/inf for {int(bad.sum())} of {state.batch} samples "
                f"(first at step {first} of {self.n_steps}, t={float(self.t_grid[0, first]):.4g})"
            )

    def finish(self, state: State) -> Tensor:
        state = self.final(state)
        self.check_finite(state)
        return state.x0

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
    def basis(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean [d], eigenvectors [d, E]) of ``linear_part`` in x's device and dtype."""
        return self._plan.basis_for(x)

    def affine(self, state: State) -> bool:
        """Whether ``state`` may take the affine fast path (plain R^d, no mask, no thresholding)."""
        return self._affine and state.mask is None

    def _call(self, state: State, x: Tensor, prefix: str, j: int) -> Tensor:
        t = state.tab[prefix + "t"][:, j].reshape(-1).expand(x.shape[0])
        if self.autocast is None:
            out = self._net(x, t, **state.cond)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast):
                out = self._net(x, t, **state.cond)
        return out.to(x.dtype)

    @staticmethod
    def _record(state: State, values: Tensor, step: int) -> tuple[tuple[int, Tensor], ...]:
        """The finiteness record with this call's row sums appended (one reduction, no host synchronisation)."""
        return (*state.nan_step, (step, values.flatten(1).sum(1)))

    def model_out(
        self, state: State, x: Tensor, prefix: str, j: int, step: int | None = None
    ) -> tuple[Tensor, tuple]:
        """The raw model output at table point ``prefix`` column j, in x's dtype, and the updated record.
        For the affine fast path: x0 = c_x x + c_out out and eps = e_x x + e_out out are read from the tables."""
        out = self._call(state, x, prefix, j)
        return out, self._record(state, out, j if step is None else step)

    def denoise_at(
        self, state: State, x: Tensor, prefix: str, j: int, step: int | None = None
    ) -> tuple[Tensor, tuple]:
        """x0 estimate at table point ``prefix + name`` column j (grid point when prefix == "").

        Returns (x0, nan_step) with non-finite outputs recorded against ``step`` (default j)."""
        tab = state.tab
        out = self._call(state, x, prefix, j)
        c_out = tab[prefix + "c_out"][:, j]
        if self.net_prediction == "x0":
            x0 = out * c_out
        else:
            x0 = torch.mul(x, tab[prefix + "c_x"][:, j])
            x0.addcmul_(c_out, out)
        if not self.affine(state):
            x0 = self._threshold(x0)
            m = expand_mask(state.mask, x0)
            if m is not None:
                x0 = torch.where(m, x0, torch.zeros_like(x0))
            x0 = self.space.project(x0, state.mask)
        return x0, self._record(state, x0, j if step is None else step)

    def advance(self, state: State, x_next: Tensor, **changes: Any) -> State:
        """New state at the next grid point: projected, padding kept, cached x0 dropped unless given."""
        if not self.affine(state):
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


@dataclass
class Plan:
    """A sampler's precomputed part: time grid [B or 1, n] and float64 tables, plus the tables' copies per
    (device, dtype, state rank), shaped [B or 1, T, (K,) 1, ...] to broadcast against the state."""

    t_grid: Tensor
    tables: dict[str, Tensor]
    basis: tuple[Tensor, Tensor] | None = None  # linear part: (mean [d], eigenvectors [d, E]), float64
    copies: dict[tuple, dict[str, Tensor]] = field(default_factory=dict)

    def tables_for(self, x: Tensor) -> dict[str, Tensor]:
        """Tables in x's device and dtype; ``lin_*`` tables act on flattened [B, d] states and keep their shape."""
        key = (x.device, x.dtype, x.ndim)
        if key not in self.copies:
            trailing = [1] * (x.ndim - 1)
            self.copies[key] = {
                k: v.to(x.device, x.dtype).reshape(*v.shape, *([] if k.startswith("lin_") else trailing))
                for k, v in self.tables.items()
            }
        return dict(self.copies[key])

    def basis_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        key = ("basis", x.device, x.dtype)
        if key not in self.copies:
            mean, vecs = (v.to(x.device, x.dtype) for v in self.basis)
            self.copies[key] = {"mean": mean, "vecs": vecs}
        return self.copies[key]["mean"], self.copies[key]["vecs"]


_PLANS: dict[tuple, Plan] = {}


def _plan(key: tuple | None, sampler: Sampler, t_grid: Tensor | None, grid_options: Mapping[str, Any]) -> Plan:
    """The plan of ``sampler`` (memoised under ``key``; plans are pure functions of their inputs):
    grid, solver tables, the linear parameterisation per table point (x0 = c_x x + c_out out and
    eps = e_x x + e_out out) and the solver's fused step coefficients."""
    from molgen.diffusion.solvers import gaussian_tables, points

    if key is not None and key in _PLANS:
        return _PLANS[key]
    if t_grid is None:
        t_grid = get_grid(sampler.grid, sampler.schedule, sampler.n_steps, **grid_options)[None]
    if sampler.step_scale != 1.0:
        t_grid = scaled_times(sampler.schedule, t_grid, sampler.step_scale, sampler.step_scale_below)
    spec, orders = sampler.spec, sampler.orders
    tables = spec.tables(sampler.schedule, t_grid, list(orders), sampler.options) if orders else points(
        sampler.schedule, t_grid
    )
    for prefix in {k[: -len("d_alpha")] for k in tables if k.endswith("d_alpha")}:
        p = {n: tables[prefix + n] for n in ("alpha", "sigma", "d_alpha", "d_sigma")}
        c_x, c_out = x0_coefficients(sampler.net_prediction, **p)
        tables.update({
            prefix + "c_x": c_x, prefix + "c_out": c_out,
            prefix + "e_x": (1.0 - p["alpha"] * c_x) / p["sigma"], prefix + "e_out": -p["alpha"] * c_out / p["sigma"],
        })
    if orders and spec.fuse is not None:
        tables.update(spec.fuse(tables))
    basis, lin = None, sampler.linear_part
    if lin is not None:
        tables.update(gaussian_tables(sampler.schedule, t_grid, list(orders), sampler.options, lin, spec.linear_part))
        basis = (lin.mean.to(torch.float64).flatten(), lin.eigvecs.to(torch.float64))
    plan = Plan(t_grid, tables, basis)
    if key is not None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


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
    warm_start: Any = None,
    linear_part: Any = None,
    step_scale: float = 1.0,
    step_scale_below: float | None = None,
) -> Tensor:
    """Denoise ``x_T`` (drawn at the schedule's ``t_max``) with ``solver`` on a time ``grid``.

    ``steps`` is the number of grid points (= model calls for multistep solvers); ``nfe`` instead gives a model
    call budget that singlestep solvers spread over mixed orders. ``grid`` is a name or an explicit
    decreasing tensor of times, [n] or [n, B] for per-sample times. ``warm_start`` (``GaussianMoments`` of the
    data) carries x_T from ``t_max`` to the first grid point along the exact flow of the data's Gaussian
    approximation, with no model call; named grids then default to the ends of ``GaussianMoments.grid_ends``.
    ``linear_part`` (the same kind of moments, for ddim, dpmpp_2m/3m, unipc, euler, deis) changes the steps:
    each integrates the flow of N(m, C) exactly and extrapolates only the residual D - D_G. The two are
    independent; with both (the same moments) the whole run, start included, follows the Gaussian flow exactly
    where the model adds nothing. ``step_scale`` eta != 1 integrates AF3's step-scaled ODE
    dy/drho = eta (y - D) / rho with any ODE solver (``molgen.diffusion.step_scale``), below
    ``step_scale_below`` when given: the grid gives the noise levels the denoiser is told. Returns the x0
    estimate at the last point.
    """
    sampler = Sampler(
        model, schedule, solver, steps=steps, nfe=nfe, grid=grid, space=space, prediction=prediction,
        solver_options=solver_options, grid_options=grid_options, clip_x0=clip_x0,
        dynamic_threshold=dynamic_threshold, autocast=autocast, compile=compile, warm_start=warm_start,
        linear_part=linear_part, step_scale=step_scale, step_scale_below=step_scale_below,
    )
    state = sampler.run(sampler.init(x_T, mask=mask, cond=cond), generator, callback)
    return sampler.finish(state)
