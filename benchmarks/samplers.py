"""Few-step sampler accuracy and overhead: molgen's solvers against diffusers' schedulers, side by side.

Every sampler is driven by the same exact denoiser (molgen.diffusion.analytic) on the same schedule (DDPM's
linear VP, given to diffusers as ``trained_betas`` so that its discrete table is the same schedule) from the
same initial noise. Error = RMS over samples of the distance to the exact probability-flow ODE solution (an
independent adaptive DOP853 solve); sliced_w = sliced 2-Wasserstein distance to exact samples of the target;
overhead_s_per_step = the sampler's own CPU time per model call with a free model (measured interleaved with
diffusers' in one process, median of repeats). Writes JSON rows
    {"target", "impl", "solver", "grid", "nfe", "error", "sliced_w", "overhead_s_per_step"}
plus a summary (best per target and NFE, ratios) that the README table is made from.

Configurations, fixed in advance and the same for every target. diffusers: each scheduler with each of its
spacing options (linspace, trailing, karras, exponential and beta sigmas, lu_lambdas, where it has them).
molgen: each solver on five grids x five last-evaluation levels rho_min, each started cold at t_max and
warm-started (``warm_start=GaussianMoments``: x_T carried in closed form along the flow of the data's Gaussian
approximation to rho = 5 n / 4 sigma_data for n calls, ``defaults.warm_start_ends``, a rule fitted on other
problems), and, for the solvers that have the form, warm-started with the Gaussian flow also integrated exactly at
every step ("+lin": ``linear_part=GaussianMoments`` too, the solver's polynomial acts on the residual D - D_G only).
Both use the data's mean and covariance (the mixture's, the 742 molecules'), which diffusers' schedulers cannot
take; the summary also gives molgen's best without them ("cold") and with the warm start only ("warm").

Defaults and tuned plans ("defaults" in the summary): the plain ``sample(model, schedule, x_T, steps=n)`` (no
solver, no grid options: ``molgen.diffusion.defaults``, a rule frozen before this benchmark), the default solver
on each named grid with its default ends, and a plan ``molgen.diffusion.tune`` fitted in ``--tune-seconds`` on
512 other noise draws (seed + 100), measured on the benchmark's noise. Targets: the three above and a 16-D
mixture of 6 narrow, unequal components.

    python benchmarks/samplers.py --json results/samplers.json [--quick] [--targets mixture_64d,...]
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from molgen.diffusion import SOLVERS, get_schedule, sample
from molgen.diffusion.analytic import EmpiricalDenoiser, GaussianMixtureDenoiser, exact_ode_solution
from molgen.diffusion.defaults import default_solver
from molgen.diffusion.tune import tune

ROOT = Path(__file__).resolve().parent.parent
QM9_SUBSET = ROOT / "data" / "molecules" / "qm9_subset_5000.csv.gz"
NFES = (3, 5, 8, 10, 20)
GRIDS = ("logsnr", "time_uniform", "time_quadratic", "karras", "sigmoid")
# last-evaluation noise levels (as sigma / alpha) tried for every molgen grid
RHO_MIN = (0.01, 0.03, 0.1, 0.3, 1.0)
PAIRS = {  # molgen solver -> (diffusers scheduler class name, its constructor arguments)
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "deis": ("DEISMultistepScheduler", {"solver_order": 3}),
}
# name -> constructor arguments; each scheduler gets those it accepts. diffusers' "leading" spacing is left out:
# it starts below the noise end (t = 0.9 for 10 steps), so it solves a different, shorter problem.
DIFFUSERS_GRIDS = {
    "linspace": {"timestep_spacing": "linspace"},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "lu_lambdas": {"use_lu_lambdas": True},
}


# ------------------------------------------------------------------------------------------------- targets
def mixture_2d() -> GaussianMixtureDenoiser:
    """8 equal components on a circle of radius 2, std 0.2."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixtureDenoiser(means, 0.2, None, SCHEDULE)


def mixture_64d(seed: int = 0) -> GaussianMixtureDenoiser:
    """16 components in 64-D, means N(0, 1), stds U(0.2, 0.6), unequal (Dirichlet(1)) weights."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(16, 64, generator=g, dtype=torch.float64)
    stds = 0.2 + 0.4 * torch.rand(16, generator=g, dtype=torch.float64)
    weights = -torch.log(torch.rand(16, generator=g, dtype=torch.float64))  # Exp(1), normalised: Dirichlet(1)
    return GaussianMixtureDenoiser(means, stds, weights / weights.sum(), SCHEDULE)


def mixture_16d(seed: int = 0) -> GaussianMixtureDenoiser:
    """6 narrow components in 16-D, means N(0, 1), stds U(0.05, 0.15), unequal (Dirichlet(1)) weights."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(6, 16, generator=g, dtype=torch.float64)
    stds = 0.05 + 0.1 * torch.rand(6, generator=g, dtype=torch.float64)
    weights = -torch.log(torch.rand(6, generator=g, dtype=torch.float64))
    return GaussianMixtureDenoiser(means, stds, weights / weights.sum(), SCHEDULE)


def qm9_points(path: Path = QM9_SUBSET) -> torch.Tensor:
    """Centred, flattened coordinates (Angstrom) of the QM9-subset molecules with the most common atom count."""
    with gzip.open(path, "rt") as fh:
        rows = list(csv.DictReader(fh))
    counts = Counter(int(r["N_atoms"]) for r in rows)
    n_atoms = counts.most_common(1)[0][0]
    coords = [
        np.array(ast.literal_eval(r["XYZ_Ang"].replace("*^", "e")), dtype=np.float64)
        for r in rows
        if int(r["N_atoms"]) == n_atoms
    ]
    x = torch.tensor(np.stack(coords))
    return (x - x.mean(1, keepdim=True)).flatten(1)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    proj /= proj.norm(dim=0, keepdim=True)
    pa = (a.to(torch.float64) @ proj).sort(0).values
    pb = (b.to(torch.float64) @ proj).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def t_of_rho(rho: float) -> float:
    """Schedule time where sigma / alpha = rho."""
    return float(SCHEDULE.t_of_rho(rho))


def rms_distance(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x - ref) ** 2).sum(1).mean().sqrt())


# ------------------------------------------------------------------------------------------------- diffusers
def diffusers_betas(n_train: int = 1000) -> np.ndarray:
    """Betas whose cumulative product is molgen's vp_linear at t = (i + 1) / n_train."""
    t = torch.arange(1, n_train + 1, dtype=torch.float64) / n_train
    alpha_bar = SCHEDULE.alpha(t) ** 2
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return (1.0 - alpha_bar / prev).numpy()


def make_scheduler(name: str, kwargs: dict, grid: str):
    import inspect

    import diffusers

    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    extra = DIFFUSERS_GRIDS[grid]
    if any(k not in accepted for k in extra):
        return None
    return cls(num_train_timesteps=1000, trained_betas=diffusers_betas(), prediction_type="epsilon", **kwargs, **extra)


def diffusers_sample(scheduler, denoiser, x_T: torch.Tensor, steps: int) -> tuple[torch.Tensor, int, float]:
    """Run a diffusers scheduler with the exact denoiser (as eps prediction); returns (x0, model calls, start t)."""
    scheduler.set_timesteps(steps)
    log_sigmas = np.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).numpy() ** 0.5)
    calls = 0

    def eps_model(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        sigma_ve = float(np.exp(np.interp(float(timestep), np.arange(len(log_sigmas)), log_sigmas)))
        alpha = 1.0 / math.sqrt(1.0 + sigma_ve**2)
        a = torch.full((x.shape[0],), alpha, dtype=torch.float64)
        x0 = denoiser.x0_given(x, a, a * sigma_ve)
        return (x - alpha * x0) / (alpha * sigma_ve)

    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    start_t = (float(scheduler.timesteps[0]) + 1.0) / 1000.0
    return x, calls, start_t


def diffusers_runner(name: str, kwargs: dict, x: torch.Tensor, steps: int):
    """One diffusers run with a free model (it returns a fixed zero tensor); returns its model calls."""
    scheduler = make_scheduler(name, kwargs, "linspace")
    zeros = torch.zeros_like(x)

    def run() -> int:
        scheduler.set_timesteps(steps)
        y, calls = x.clone(), 0
        for t in scheduler.timesteps:
            scheduler.scale_model_input(y, t)  # part of the scheduler's work; the free model ignores it
            y = scheduler.step(zeros, t, y).prev_sample
            calls += 1
        return calls

    return run


def molgen_runner(solver: str, x: torch.Tensor, calls: int):
    """One molgen run with the same free model (eps prediction); returns its model calls."""
    zeros = torch.zeros_like(x)

    class Free:
        prediction = "eps"

        def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return zeros

    free = Free()
    budget = {"nfe": calls} if SOLVERS[solver].kind == "singlestep" else {"steps": calls}

    def run() -> int:
        sample(free, SCHEDULE, x, solver=solver, **budget)
        return calls

    return run


def overhead_pair(runs: tuple, repeats: int) -> list[float]:
    """Median CPU time per model call of each run, measured interleaved (A B A B ...) in one process, so that
    both see the same machine load; thread CPU time is insensitive to time spent descheduled."""
    for run in runs:
        run()  # warm-up
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, acc in zip(runs, times):
            start = time.thread_time()
            calls = run()
            acc.append((time.thread_time() - start) / calls)
    return [float(np.median(t)) for t in times]


# ------------------------------------------------------------------------------------------------- main
SCHEDULE = get_schedule("vp_linear")
TARGETS = {"mixture_2d": mixture_2d, "mixture_16d": mixture_16d, "mixture_64d": mixture_64d,
           "qm9_empirical": None}  # qm9: from --qm9
TUNE_NOISE = 512  # draws tune() fits on (a seed the measured noise does not use)


def ode_references(denoiser, x_T: torch.Tensor):
    """reference(t_start): the exact ODE solution from x_T taken at t_start, solved once per start."""
    refs: dict[float, torch.Tensor] = {}

    def reference(t_start: float) -> torch.Tensor:
        key = round(t_start, 6)
        if key not in refs:
            refs[key] = exact_ode_solution(denoiser, x_T, SCHEDULE, t_start=t_start)
        return refs[key]

    return reference


def diffusers_runs(denoiser, x_T: torch.Tensor, nfe: int, reference):
    """Every diffusers scheduler x spacing at ``nfe`` calls: (solver, spacing, x0, calls, error to reference)."""
    for solver, (cls_name, kwargs) in PAIRS.items():
        steps = (nfe + 1) // 2 if solver == "heun" else nfe
        for grid in DIFFUSERS_GRIDS:
            scheduler = make_scheduler(cls_name, kwargs, grid)
            if scheduler is not None:
                x, calls, t_start = diffusers_sample(scheduler, denoiser, x_T, steps)
                yield solver, grid, x, calls, rms_distance(x, reference(t_start))


def run_target(name: str, denoiser, n: int, nfes, quick: bool, seed: int = 0, tune_s: float = 0.0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, denoiser.dim, generator=g, dtype=torch.float64) * SCHEDULE.prior_std
    exact = denoiser.sample_data(n, torch.Generator().manual_seed(seed + 1))
    reference = ode_references(denoiser, x_T)

    rows = []
    grids = ("logsnr", "time_uniform", "karras") if quick else GRIDS
    moments = denoiser.moments()  # the data's mean and covariance (the training set's, for the empirical one)
    for solver, spec in SOLVERS.items():
        if solver == "af3":
            continue
        for nfe in nfes:
            for grid in grids:
                # the same configurations for every target: each last-evaluation level, from t_max (cold) and
                # warm-started at the first point of defaults.warm_start_ends (a rule fitted on other problems)
                # and, where the solver has the form, with the Gaussian part exact at every step ("+lin")
                modes = [("", {}), ("+warm", {"warm_start": moments})]
                modes += [("+lin", {"warm_start": moments, "linear_part": moments})] if spec.linear_part else []
                configs = [  # cold runs start at t_max; warm ones at the warm-start rule's first point
                    (f"{grid}@{r:g}{suffix}", {"t_min": t_of_rho(r), **({} if extra else {"t_max": SCHEDULE.t_max})},
                     extra)
                    for r in (RHO_MIN[1:] if quick else RHO_MIN) for suffix, extra in modes
                ]
                for label, grid_options, extra in configs:
                    x = sample(denoiser, SCHEDULE, x_T, solver=solver, nfe=nfe, grid=grid, grid_options=grid_options,
                               generator=torch.Generator().manual_seed(seed + 2), **extra)
                    rows.append({
                        "target": name, "impl": "molgen", "solver": solver, "grid": label, "nfe": nfe,
                        "warm_start": bool(extra), "linear_part": "linear_part" in extra,
                        "error": None if spec.stochastic else rms_distance(x, reference(SCHEDULE.t_max)),
                        "sliced_w": sliced_w2(x, exact),
                    })
    for nfe in nfes:  # the defaults: no solver, no grid options (molgen.diffusion.defaults), then each named grid
        for grid in (None, *GRIDS):
            x = sample(denoiser, SCHEDULE, x_T, steps=nfe, **({"grid": grid} if grid else {}))
            rows.append({"target": name, "impl": "molgen_default", "solver": default_solver(nfe),
                         "grid": grid or "default", "nfe": nfe, "error": rms_distance(x, reference(SCHEDULE.t_max)),
                         "sliced_w": sliced_w2(x, exact)})
    for nfe in nfes if tune_s > 0 else ():
        fit_noise = torch.randn(TUNE_NOISE, denoiser.dim, generator=torch.Generator().manual_seed(seed + 100),
                                dtype=torch.float64) * SCHEDULE.prior_std
        plan = tune(denoiser, SCHEDULE, fit_noise, nfe=nfe, budget_s=tune_s)
        x = sample(denoiser, SCHEDULE, x_T, **plan.kwargs)
        rows.append({"target": name, "impl": "molgen_tuned", "solver": plan.solver, "grid": "tuned", "nfe": nfe,
                     "error": rms_distance(x, reference(SCHEDULE.t_max)), "sliced_w": sliced_w2(x, exact),
                     "tune_seconds": plan.fit["seconds"], "tune_model_calls": plan.fit["model_calls"],
                     "tune_batch": plan.fit["batch"], "compensation": plan.compensation})
    for nfe in nfes:
        for solver, grid, x, calls, error in diffusers_runs(denoiser, x_T, nfe, reference):
            rows.append({"target": name, "impl": "diffusers", "solver": solver, "grid": grid, "nfe": nfe,
                         "calls": calls, "error": error, "sliced_w": sliced_w2(x, exact)})
    print(f"{name}: {len(rows)} rows", file=sys.stderr)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Best error per (target, NFE) of each side; molgen's best over all its configurations, over those
    without the data's moments ("cold", the same information diffusers gets) and over those with at most the
    warm start ("warm", no ``linear_part``)."""
    best: dict = {}
    for r in rows:
        if r["error"] is None or r["impl"] in ("molgen_default", "molgen_tuned"):
            continue
        keys = [(r["target"], r["nfe"], r["impl"])]
        if r["impl"] == "molgen" and not r.get("warm_start"):
            keys.append((r["target"], r["nfe"], "molgen_cold"))
        if r["impl"] == "molgen" and not r.get("linear_part"):
            keys.append((r["target"], r["nfe"], "molgen_warm"))
        for key in keys:
            if key not in best or r["error"] < best[key]["error"]:
                best[key] = r
    table = []
    for (target, nfe, impl), r in sorted(best.items()):
        if impl != "molgen":
            continue
        d, c = best.get((target, nfe, "diffusers")), best[(target, nfe, "molgen_cold")]
        w = best[(target, nfe, "molgen_warm")]
        table.append({
            "target": target, "nfe": nfe,
            "molgen_best": f"{r['solver']}/{r['grid']}", "molgen_error": r["error"],
            "molgen_warm_best": f"{w['solver']}/{w['grid']}", "molgen_warm_error": w["error"],
            "molgen_cold_best": f"{c['solver']}/{c['grid']}", "molgen_cold_error": c["error"],
            "diffusers_best": f"{d['solver']}/{d['grid']}" if d else None,
            "diffusers_error": d["error"] if d else None,
            "ratio": r["error"] / d["error"] if d else None,
            "warm_ratio": w["error"] / d["error"] if d else None,
            "cold_ratio": c["error"] / d["error"] if d else None,
        })
    return {"best": table, "defaults": defaults_and_tuned(rows, best)}


def defaults_and_tuned(rows: list[dict], best: dict) -> list[dict]:
    """Per (target, NFE): the default run (no solver or grid options), the best named grid on its default ends,
    the tuned plan (fitted on other noise), each against diffusers' best."""
    out = []
    for (target, nfe, impl), d in sorted(best.items()):
        if impl != "diffusers":
            continue
        mine = [r for r in rows if r["target"] == target and r["nfe"] == nfe]
        default = next(r for r in mine if r["impl"] == "molgen_default" and r["grid"] == "default")
        named = min((r for r in mine if r["impl"] == "molgen_default" and r["grid"] != "default"),
                    key=lambda r: r["error"])
        tuned = next((r for r in mine if r["impl"] == "molgen_tuned"), None)
        out.append({
            "target": target, "nfe": nfe, "diffusers_best": f"{d['solver']}/{d['grid']}", "diffusers_error": d["error"],
            "default": f"{default['solver']}/logsnr", "default_error": default["error"],
            "default_ratio": default["error"] / d["error"],
            "best_named_grid": f"{named['solver']}/{named['grid']}",
            "best_named_grid_ratio": named["error"] / d["error"],
            "tuned": tuned and f"{tuned['solver']}{'+comp' if tuned['compensation'] else ''}",
            "tuned_error": tuned and tuned["error"], "tuned_ratio": tuned and tuned["error"] / d["error"],
            "tune_seconds": tuned and tuned["tune_seconds"], "tune_model_calls": tuned and tuned["tune_model_calls"],
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer samples and grids (the README's main job)")
    parser.add_argument("--qm9", type=Path, default=QM9_SUBSET)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated model-call budgets")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    parser.add_argument("--tune-seconds", type=float, default=30.0,
                        help="tune() budget per target and NFE for the tuned section (0: skip it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    try:
        nfes = tuple(int(v) for v in args.nfe.split(","))
    except ValueError:
        raise SystemExit(f"--nfe must be comma-separated integers, got {args.nfe!r}") from None
    n = 200 if args.quick else 1000
    rows = []
    for name in names:
        if name == "qm9_empirical" and not args.qm9.exists():
            print(f"qm9_empirical skipped: {args.qm9} not found", file=sys.stderr)
            continue
        denoiser = EmpiricalDenoiser(qm9_points(args.qm9), SCHEDULE) if name == "qm9_empirical" else TARGETS[name]()
        rows += run_target(name, denoiser, n, nfes, args.quick, tune_s=args.tune_seconds)
    x = torch.randn(1024, 64, dtype=torch.float64)
    for solver, (cls_name, kwargs) in PAIRS.items() if not args.no_overhead else ():
        runs = (molgen_runner(solver, x, 9), diffusers_runner(cls_name, kwargs, x, 5 if solver == "heun" else 9))
        ours, theirs = overhead_pair(runs, 10 if args.quick else 60)
        rows.append({"target": "overhead", "impl": "molgen", "solver": solver, "grid": "logsnr", "nfe": 9,
                     "error": None, "sliced_w": None, "overhead_s_per_step": ours})
        rows.append({"target": "overhead", "impl": "diffusers", "solver": solver, "grid": "linspace", "nfe": 9,
                     "error": None, "sliced_w": None, "overhead_s_per_step": theirs, "ratio": ours / theirs})
    summary = summarise(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    for r in summary["best"]:
        print(f"{r['target']:>14} nfe {r['nfe']:>2}: molgen {r['molgen_error']:.4f} ({r['molgen_best']})  "
              f"warm {r['molgen_warm_error']:.4f} ({r['molgen_warm_best']})  "
              f"cold {r['molgen_cold_error']:.4f} ({r['molgen_cold_best']})  "
              f"diffusers {r['diffusers_error']:.4f} ({r['diffusers_best']})  "
              f"ratio {r['ratio']:.2f} (cold {r['cold_ratio']:.2f})")
    for r in summary["defaults"]:
        tuned = f"tuned {r['tuned_ratio']:.2f} ({r['tuned']}, {r['tune_seconds']:.0f} s)" if r["tuned"] else ""
        print(f"{r['target']:>14} nfe {r['nfe']:>2}: default {r['default_ratio']:.2f}  best named grid "
              f"{r['best_named_grid_ratio']:.2f} ({r['best_named_grid']})  {tuned}")
    for r in rows:
        if r["target"] == "overhead" and r["impl"] == "diffusers":
            print(f"overhead {r['solver']:>9}: molgen/diffusers per step = {r['ratio']:.2f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
