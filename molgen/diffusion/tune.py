"""Sampling plans fitted to a model: ``plan = tune(model, schedule, x_T, nfe=5)``, then
``sample(model, schedule, x_T, **plan.kwargs)``.

No data are needed: the target is the model's own probability-flow ODE, solved with many steps
(``reference_steps`` of DPM-Solver++(3M) over the schedule's whole range) from a batch of the user's noise. On half
of that batch ``tune`` fits, within ``budget_s`` seconds,

1. the solver (every ODE solver that runs in ``nfe`` calls on the default grid, then the best three on every
   named grid with its default ends),
2. the time grid: free points, log rho = log(sigma / alpha) of the first and last call and the interior spacing,
   by Nelder-Mead on log RMS distance to the reference, from the best named grid,
3. for dpmpp_2m / dpmpp_3m / deis, DC-Solver-style compensation ratios r_i on each transition's higher-order
   correction (``solvers.compensate``: r = 1 is the solver, r = 0 its first-order step), jointly with the grid,

then keeps, of each solver's fit and the default sampler, the one with the lowest error on the other half of
the batch and reports both errors there (that half only chooses among four candidates; nothing is fitted on it).
A plan records what it was fitted on (schedule, prediction, state shape, a fingerprint of the weights, a warm
start) and ``check`` refuses it for anything else; it saves to and loads from a small JSON file.

Masked (discrete) samplers: ``tune_masked(model, process, x_T, nfe=n)`` fits the unmasking schedule, the times
1 = t_0 > ... > t_n = 0 of an n-call grid, as the increments of alpha(t) (the expected share of letters
unmasked by each call). There is no deterministic path to compare with, so the target is the model's own
judgement: the mean NELBO (bits per letter, ``MaskedDiffusion.nelbo``) of the plan's samples, with common random
numbers across candidate grids. A few-step sampler that draws many letters at once from one conditional
produces combinations the model finds unlikely; the many-step sampler's figure is the floor, reported beside.
The fit uses one batch of draws and is scored on another (other letters, other random numbers).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molgen.diffusion.grids import GRIDS
from molgen.diffusion.sampling import Sampler
from molgen.diffusion.schedules import Schedule, get_schedule
from molgen.diffusion.solvers import SOLVERS
from molgen.errors import InputError

PLAN_FORMAT = "molgen-sampling-plan/1"
REFERENCE_SOLVER = "dpmpp_3m"
TOP_SOLVERS = 3  # solvers whose grid is fitted (the best on their default grids)
MAX_RATIO = 2.0  # compensation ratios stay in [0, 2]: between the first-order step and twice the correction


def fingerprint(model: Any) -> str:
    """SHA-256 (16 hex digits) of a module's weights by name, or the class name of any other callable."""
    if not isinstance(model, torch.nn.Module):
        return f"{type(model).__module__}.{type(model).__qualname__}"
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TunedPlan:
    """A solver, its grid times (descending, float64) and compensation ratios for ``nfe`` model calls, with what
    it was fitted on (``fitted_on``) and how it scored (``fit``)."""

    solver: str
    nfe: int
    times: tuple[float, ...]
    compensation: tuple[float, ...] | None
    fitted_on: dict[str, Any]
    fit: dict[str, Any]
    step_scale: float = 1.0  # AF3's step-scaled ODE the plan was fitted on (molgen.diffusion.step_scale)
    step_scale_below: float | None = None
    source: str = field(default="sampling plan", compare=False, repr=False)  # the file it was read from
    family = "continuous"  # the samplers it is for (``fitted_on["family"]`` in the file; absent: continuous)

    @staticmethod
    def solvers() -> Mapping[str, Any]:
        return SOLVERS

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sample`` / ``Sampler``: solver, the explicit grid, the call budget, ratios."""
        kw: dict[str, Any] = {"solver": self.solver, "grid": torch.tensor(self.times, dtype=torch.float64),
                              "nfe": self.nfe, "noise_at_t_max": True}
        if self.compensation is not None:
            kw["compensation"] = self.compensation
        if self.step_scale != 1.0:
            kw.update(step_scale=self.step_scale, step_scale_below=self.step_scale_below)
        return kw

    def summary(self) -> str:
        """One line on the plan and its fit, for the command line."""
        f = self.fit
        return (f"{self.solver}, {self.nfe} calls; RMS distance to the model's {f['reference_steps']}-step ODE "
                f"solution on held-out noise {f['heldout_error']:.4g} (engine default "
                f"{f['heldout_default_error']:.4g}); {f['seconds']:.0f} s, {f['model_calls']} batched model calls")

    def record(self) -> dict[str, Any]:
        """What an output's sampling record says about the plan it was drawn with."""
        return {"file": self.source, "solver": self.solver, "nfe": self.nfe, "times": list(self.times),
                "compensation": self.compensation}

    def check(self, model: Any, schedule: Schedule | str, x_T: Tensor, prediction: str | None = None,
              mask: Tensor | None = None, warm_start: Any = None) -> None:
        """Refuse the plan (``InputError`` naming what differs and the plan's file) for another model, schedule,
        prediction, state shape or start (warm or not) than it was fitted on."""
        now = describe(model, get_schedule(schedule), x_T, prediction, mask, warm_start)
        diff = {k: (self.fitted_on.get(k), v) for k, v in now.items() if self.fitted_on.get(k) != v}
        if diff:
            said = "; ".join(f"{k}: fitted on {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise InputError(f"the sampling plan was fitted on something else ({said})", self.source)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields_ = {k: v for k, v in asdict(self).items() if k != "source"}
        path.write_text(json.dumps({"format": PLAN_FORMAT, **fields_}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedPlan:
        """Read a plan file; anything but a well-formed plan is an ``InputError`` naming the file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError("no such sampling plan file", str(path)) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"not a sampling plan (not JSON: {err})", str(path)) from None
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise InputError(f"not a sampling plan (no format {PLAN_FORMAT!r})", str(path))
        fitted_on = raw.get("fitted_on")
        family = fitted_on.get("family", "continuous") if isinstance(fitted_on, dict) else cls.family
        if family != cls.family:
            raise InputError(f"a plan for {family} models, not for this {cls.family} one", str(path))
        try:
            plan = cls(str(raw["solver"]), int(raw["nfe"]), tuple(float(t) for t in raw["times"]),
                       None if raw["compensation"] is None else tuple(float(r) for r in raw["compensation"]),
                       dict(raw["fitted_on"]), dict(raw["fit"]), float(raw.get("step_scale", 1.0)),
                       None if raw.get("step_scale_below") is None else float(raw["step_scale_below"]), str(path))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"malformed sampling plan ({type(err).__name__}: {err})", str(path)) from None
        if plan.solver not in cls.solvers() or len(plan.times) < 1 or any(
                not a > b for a, b in zip(plan.times, plan.times[1:])):
            raise InputError("malformed sampling plan (unknown solver or times not strictly decreasing)", str(path))
        return plan


def describe(model: Any, schedule: Schedule, x_T: Tensor, prediction: str | None, mask: Tensor | None = None,
             warm_start: Any = None) -> dict[str, Any]:
    """What a plan is fitted on: the schedule, the prediction, one state's shape (with a padding mask, the size
    axis 1 as null: padded states come in every size), the model's fingerprint and whether runs start warm
    (``Sampler(warm_start=...)``: the caller passes the same moments again)."""
    state: list[int | None] = list(x_T.shape[1:])
    if mask is not None:
        state[0] = None
    return {"schedule": schedule.name, "prediction": prediction or getattr(model, "prediction", None),
            "state": state, "model": fingerprint(model), "warm_start": warm_start is not None}


class _Counted:
    """The model with a count of its (batched) calls."""

    def __init__(self, model: Callable[..., Tensor]) -> None:
        self.model, self.calls = model, 0
        self.prediction = getattr(model, "prediction", None)
        self.self_conditioning = getattr(model, "self_conditioning", False)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x, t, **cond)


def meets(solver: str, nfe: int) -> bool:
    """Whether ``solver`` makes at least one step of its own order in ``nfe`` calls (a singlestep solver of
    order k needs k + 1: one step and the final denoising)."""
    spec = SOLVERS[solver]
    return spec.kind == "multistep" or nfe >= spec.calls_per_step + 1


def _rho_grid(schedule: Schedule, theta: np.ndarray, n: int, bounds: tuple[float, float]) -> Tensor:
    """Times of an n-point grid from theta = (log rho_first, log(log rho_first - log rho_last), z_1..z_{n-2}):
    interior points at cumulative softmax([0, z]) fractions of the way in log rho; ends clipped to ``bounds``."""
    lo, hi = bounds
    first = min(max(theta[0], lo + 1e-3), hi)
    last = max(first - math.exp(min(theta[1], 5.0)), lo)
    if n == 1:
        return schedule.t_of_rho(torch.tensor([math.exp(first)], dtype=torch.float64))
    w = np.exp(np.concatenate([[0.0], theta[2:]]) - max(0.0, float(np.max(theta[2:], initial=0.0))))
    frac = np.concatenate([[0.0], np.cumsum(w) / w.sum()])
    log_rho = torch.tensor(first + frac * (last - first), dtype=torch.float64)
    t = schedule.t_of_rho(log_rho.exp())
    for j in range(1, n):  # keep strictly decreasing despite clipping and round-off
        t[j] = torch.minimum(t[j], t[j - 1] * (1 - 1e-9))
    return t


def _theta_of(schedule: Schedule, times: Tensor) -> np.ndarray:
    """The parameters reproducing grid ``times`` [n]."""
    log_rho = schedule.rho(times.to(torch.float64)).log().numpy()
    theta = [log_rho[0], math.log(max(log_rho[0] - log_rho[-1], 1e-6))]
    steps = np.maximum(log_rho[:-1] - log_rho[1:], 1e-9)
    return np.array(theta + list(np.log(steps[1:] / steps[0])))


def tune(
    model: Callable[..., Tensor],
    schedule: Schedule | str,
    x_T: Tensor,
    *,
    nfe: int,
    budget_s: float = 60.0,
    solvers: tuple[str, ...] | None = None,
    mask: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    space: Any = None,
    prediction: str | None = None,
    warm_start: Any = None,
    step_scale: float = 1.0,
    step_scale_below: float | None = None,
    reference_steps: int = 64,
    compensation: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TunedPlan:
    """Fit a sampling plan of at most ``nfe`` model calls to ``model`` on the noise ``x_T`` (a batch of at least 4,
    split in halves: fitted on the first, scored on the second); ``solvers`` restricts the search. With
    ``warm_start`` (``GaussianMoments``) every fitted run starts warm from them, the reference still cold; with
    ``step_scale`` the target and every run are AF3's step-scaled ODE (as a modality's preset samples it)."""
    schedule = get_schedule(schedule)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if x_T.shape[0] < 4:
        raise ValueError(f"tune needs a batch of at least 4 noise draws (half to fit, half to score), "
                         f"got {x_T.shape[0]}")
    names = [s for s in SOLVERS if not SOLVERS[s].stochastic] if solvers is None else list(solvers)
    for s in names:
        if s not in SOLVERS or SOLVERS[s].stochastic:
            ode = sorted(n for n, v in SOLVERS.items() if not v.stochastic)
            raise ValueError(f"tune fits ODE solvers; {s!r} is not one ({ode})")
    counted = _Counted(model)
    start = time.monotonic()
    common = {"space": space, "prediction": prediction, "step_scale": step_scale, "step_scale_below": step_scale_below}
    half = x_T.shape[0] // 2
    parts = [_part(x_T, mask, cond, slice(0, half)), _part(x_T, mask, cond, slice(half, None))]
    full = {"t_max": schedule.t_max, "t_min": schedule.t_min}
    refs = [_run(Sampler(counted, schedule, REFERENCE_SOLVER, steps=reference_steps, grid_options=full, **common), p)
            for p in parts]

    def sampler(solver: str | None, **kw: Any) -> Sampler:
        return Sampler(counted, schedule, solver, nfe=nfe, **common, warm_start=warm_start, noise_at_t_max=True, **kw)

    def error(smp: Sampler, part: int = 0) -> float:
        return _rms(_run(smp, parts[part]), refs[part], parts[part][1])

    meetable = [s for s in names if meets(s, nfe)]
    if solvers is not None and len(meetable) < len(names):
        cannot = [f"{s} (needs {SOLVERS[s].calls_per_step + 1})" for s in names if s not in meetable]
        raise ValueError(f"solver(s) {', '.join(cannot)} cannot make a step of their order in {nfe} model calls")
    default = sampler(None)
    on_logsnr = sorted((error(sampler(s)), s) for s in meetable)[:TOP_SOLVERS]
    chosen = [(s, min((error(sampler(s, grid=g)), g) for g in GRIDS)) for _, s in on_logsnr]
    chosen.sort(key=lambda kv: kv[1][0])
    say = progress or (lambda _: None)
    say(f"tune: {len(meetable)} solvers on the default grid, {TOP_SOLVERS} on every named grid; best start "
        f"{chosen[0][0]}/{chosen[0][1][1]} ({chosen[0][1][0]:.4g})")
    bounds = tuple(float(schedule.rho(torch.tensor(t, dtype=torch.float64)).log()) for t in (schedule.t_min,
                                                                                         schedule.t_max))
    results = []
    for k, (solver, (err0, grid)) in enumerate(chosen):
        deadline = start + budget_s * (k + 1) / len(chosen)
        results.append(_fit(sampler, error, schedule, solver, sampler(solver, grid=grid), err0, bounds,
                            compensation and SOLVERS[solver].compensable, deadline))
        say(f"tune: {solver} fitted to {results[-1][0]:.4g} (from {err0:.4g})")
    default_errors = (error(default), error(default, 1))
    candidates = [(default_errors[1], default_errors[0], default.solver, default, None)]
    for err, solver, times, ratios in results:  # each solver's fit, against the default itself
        smp = sampler(solver, grid=times, **({"compensation": ratios} if ratios is not None else {}))
        candidates.append((error(smp, 1), err, solver, smp, ratios))
    heldout, err, solver, tuned, ratios = min(candidates, key=lambda c: c[0])
    fit = {
        "fit_error": err, "fit_default_error": default_errors[0],
        "heldout_error": heldout, "heldout_default_error": default_errors[1],
        "default_solver": default.solver, "batch": x_T.shape[0], "reference_steps": reference_steps,
        "seconds": round(time.monotonic() - start, 2), "model_calls": counted.calls,
    }
    return TunedPlan(solver, nfe, tuple(float(t) for t in tuned.grid_times[0]),
                     None if ratios is None else tuple(float(r) for r in ratios),
                     describe(model, schedule, x_T, prediction, mask, warm_start), fit, step_scale, step_scale_below)


def _fit(sampler: Callable[..., Sampler], error: Callable[[Sampler], float], schedule: Schedule, solver: str,
         start: Sampler, start_error: float, bounds: tuple[float, float], compensable: bool, deadline: float
         ) -> tuple[float, str, Tensor, tuple[float, ...] | None]:
    """Nelder-Mead on (grid parameters, compensation ratios) until ``deadline``; the best point seen."""
    from scipy.optimize import minimize

    times0 = start.grid_times[0].clone()
    n = times0.numel()
    theta0 = _theta_of(schedule, times0)
    n_ratios = len(start.orders) if compensable else 0
    x0 = np.concatenate([theta0, np.ones(n_ratios)])
    best = [start_error, times0, None]

    class Done(Exception):
        pass

    def objective(v: np.ndarray) -> float:
        if time.monotonic() > deadline:
            raise Done
        times = _rho_grid(schedule, v[: len(theta0)], n, bounds)
        ratios = tuple(min(max(float(r), 0.0), MAX_RATIO) for r in v[len(theta0):]) if n_ratios else None
        try:
            err = error(sampler(solver, grid=times, **({"compensation": ratios} if ratios else {})))
        except (ValueError, FloatingPointError):
            return 1e9
        if not math.isfinite(err):
            return 1e9
        if err < best[0]:
            best[:] = [err, times, ratios]
        return math.log(err + 1e-300)

    steps = np.concatenate([np.full(len(theta0), 0.25), np.full(n_ratios, 0.2)])
    simplex = np.vstack([x0] + [x0 + np.eye(len(x0))[i] * steps[i] for i in range(len(x0))])
    try:
        while time.monotonic() < deadline:  # restart from the best point while time is left
            res = minimize(objective, simplex[0], method="Nelder-Mead",
                           options={"initial_simplex": simplex, "adaptive": True, "xatol": 1e-4, "fatol": 1e-6,
                                    "maxfev": 4000})
            v = res.x
            simplex = np.vstack([v] + [v + np.eye(len(v))[i] * steps[i] * 0.5 for i in range(len(v))])
    except Done:
        pass
    return best[0], solver, best[1], best[2]


def _part(x_T: Tensor, mask: Tensor | None, cond: Mapping[str, Tensor] | None, rows: slice) -> tuple:
    """Rows ``rows`` of the noise, its mask and the per-sample conditioning tensors."""
    per_sample = {k: v[rows] if isinstance(v, Tensor) and v.shape[:1] == x_T.shape[:1] else v
                  for k, v in (cond or {}).items()}
    return x_T[rows], None if mask is None else mask[rows], per_sample


@torch.no_grad()
def _run(smp: Sampler, part: tuple) -> Tensor:
    x_T, mask, cond = part
    return smp.finish(smp.run(smp.init(x_T, mask=mask, cond=cond)))


def _rms(x: Tensor, ref: Tensor, mask: Tensor | None) -> float:
    """RMS over samples of the distance to the reference (over the real entries of padded states)."""
    d = (x - ref).to(torch.float64) ** 2
    if mask is not None:
        d = d * mask.reshape(*mask.shape, *([1] * (d.ndim - mask.ndim))).to(d.dtype)
    return float(d.flatten(1).sum(1).mean().sqrt())


# --------------------------------------------------------------------------------------------- masked samplers
@dataclass(frozen=True)
class MaskedPlan(TunedPlan):
    """A masked-diffusion sampler's grid for ``nfe`` calls (``tune_masked``); ``DiscreteSampler(model, process,
    **plan.kwargs)``."""

    family = "masked"

    @staticmethod
    def solvers() -> Mapping[str, Any]:
        from molgen.diffusion.discrete import DISCRETE_SAMPLERS

        return DISCRETE_SAMPLERS

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"solver": self.solver, "steps": self.nfe, "grid": torch.tensor(self.times, dtype=torch.float64)}

    def summary(self) -> str:
        f = self.fit
        return (f"{self.solver}, {self.nfe} calls; NELBO of its samples on held-out draws {f['heldout_bits']:.4g} "
                f"bits/letter (default grid {f['heldout_default_bits']:.4g}, {f['reference_steps']}-step sampler "
                f"{f['reference_bits']:.4g}); {f['seconds']:.0f} s, {f['model_calls']} batched model calls")

    def check(self, model: Any, process: Any) -> None:  # type: ignore[override]
        """Refuse the plan (``InputError``) for another model or masking process than it was fitted on."""
        now = describe_masked(model, process)
        diff = {k: (self.fitted_on.get(k), v) for k, v in now.items() if self.fitted_on.get(k) != v}
        if diff:
            said = "; ".join(f"{k}: fitted on {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise InputError(f"the sampling plan was fitted on something else ({said})", self.source)


def describe_masked(model: Any, process: Any) -> dict[str, Any]:
    """What a masked plan is fitted on: the family, the masking schedule, the letters and the model's weights."""
    return {"family": "masked", "schedule": process.schedule.kind, "letters": process.n_tokens,
            "model": fingerprint(model)}


def alpha_grid(process: Any, z: np.ndarray) -> Tensor:
    """Times 1 = t_0 > ... > t_n = 0 whose alpha(t_k) are the cumulative shares softmax([0, z]) (n = len(z) + 1)."""
    w = np.exp(np.concatenate([[0.0], z]) - max(0.0, float(np.max(z, initial=0.0))))
    alpha = torch.tensor(np.concatenate([[0.0], np.cumsum(w) / w.sum()]), dtype=torch.float64)
    t = process.schedule.t_of_alpha(alpha.clamp(0.0, 1.0))
    t[0], t[-1] = 1.0, 0.0
    for j in range(1, len(t)):  # strictly decreasing despite round-off
        t[j] = torch.minimum(t[j], t[j - 1] * (1 - 1e-9))
    t[-1] = 0.0
    return t


def _z_of(process: Any, times: Tensor) -> np.ndarray:
    """The parameters of ``alpha_grid`` reproducing ``times``."""
    a = process.schedule.alpha(times.to(torch.float64)).numpy()
    steps = np.maximum(np.diff(a), 1e-9)
    return np.log(steps[1:] / steps[0])


def tune_masked(
    model: Callable[..., Tensor],
    process: Any,
    x_T: Tensor,
    *,
    nfe: int,
    solver: str = "cached_ancestral",
    cond: Mapping[str, Tensor] | None = None,
    budget_s: float = 60.0,
    seed: int = 0,
    nelbo_times: int = 8,
    reference_steps: int = 128,
    progress: Callable[[str], None] | None = None,
) -> MaskedPlan:
    """Fit the ``nfe``-call grid of the masked sampler ``solver`` to ``model`` (see the module docstring) on the
    prior draws ``x_T`` (all-mask rows, at least 4: half fitted on, half scoring); ``cond``: per-row conditioning."""
    from scipy.optimize import minimize

    from molgen.diffusion.discrete import DiscreteSampler, time_grid

    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if x_T.shape[0] < 4:
        raise ValueError(f"tune_masked needs at least 4 prior draws (half to fit, half to score), got {x_T.shape[0]}")
    counted = _Counted(model)
    start = time.monotonic()
    half = x_T.shape[0] // 2
    parts = [_part(x_T, None, cond, slice(0, half)), _part(x_T, None, cond, slice(half, None))]
    letters = [int(process.is_data(p[0]).sum()) for p in parts]

    @torch.no_grad()
    def bits(grid: Tensor, part: int, steps: int = nfe) -> float:
        x, _, c = parts[part]
        g = torch.Generator().manual_seed(seed + 2 * part)
        out = DiscreteSampler(counted, process, solver, steps, grid).run(x, c, g).x
        nats = process.nelbo(counted, out, nelbo_times, torch.Generator().manual_seed(seed + 2 * part + 1), c)
        return float(nats.sum()) / (math.log(2.0) * letters[part])

    starts = sorted((bits(time_grid(nfe, process.schedule, g), 0), g) for g in ("time_uniform", "alpha_uniform"))
    default = time_grid(nfe, process.schedule)
    best = [starts[0][0], time_grid(nfe, process.schedule, starts[0][1])]
    say = progress or (lambda _: None)
    say(f"tune_masked: {nfe} calls, best named grid {starts[0][1]} ({starts[0][0]:.4g} bits/letter)")

    class Done(Exception):
        pass

    def objective(z: np.ndarray) -> float:
        if time.monotonic() > start + budget_s:
            raise Done
        grid = alpha_grid(process, z)
        value = bits(grid, 0)
        if value < best[0]:
            best[:] = [value, grid]
        return value

    if nfe > 1:
        z0 = _z_of(process, best[1])
        simplex = np.vstack([z0] + [z0 + np.eye(len(z0))[i] for i in range(len(z0))])
        try:
            while time.monotonic() < start + budget_s:  # restart from the best point while time is left
                res = minimize(objective, simplex[0], method="Nelder-Mead",
                               options={"initial_simplex": simplex, "adaptive": True, "xatol": 1e-3, "maxfev": 2000})
                simplex = np.vstack([res.x] + [res.x + np.eye(len(res.x))[i] * 0.5 for i in range(len(res.x))])
        except Done:
            pass
    fitted, heldout_default = bits(best[1], 1), bits(default, 1)
    grid, heldout = (best[1], fitted) if fitted < heldout_default else (default, heldout_default)
    fit = {"fit_bits": best[0], "heldout_bits": heldout, "heldout_default_bits": heldout_default,
           "reference_bits": bits(time_grid(reference_steps, process.schedule), 1, reference_steps),
           "reference_steps": reference_steps, "batch": x_T.shape[0], "nelbo_times": nelbo_times,
           "seconds": round(time.monotonic() - start, 2), "model_calls": counted.calls}
    return MaskedPlan(solver, nfe, tuple(float(t) for t in grid), None, describe_masked(model, process), fit)
