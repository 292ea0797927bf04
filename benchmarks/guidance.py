"""Guidance at equal model calls: unguided, best-of-N, DPS (differentiable rewards), FK steering, SVDD-PM, SVDD-MC.

    nice -n 10 python benchmarks/guidance.py --json results/guidance.json            # every task
    nice -n 10 python benchmarks/guidance.py --json results/guidance.json --tasks molecules_qed,dna_jaspar

Budget per output: SVDD with M candidates costs 1 + M (n - 1) model evaluations on a grid of n points (a masked
discrete sampler's last point needs none); best-of-N and FK get N = K = round(SVDD's calls / one trajectory's
calls) full trajectories (measured, reported per row as ``model_calls``). Tasks (each reads its model
checkpoint when it starts, so a snapshot exported while others run is used and its SHA-256 recorded):

* ``gmm``: 2-D mixture of 8 Gaussians on a circle (exact denoiser), reward -|x - c|^2 / 2 with c off the
  modes; naturalness = mean log-density under the mixture.
* ``rna_mfe`` / ``rna_target``: the shipped RNA masked-diffusion model, 100 nt, rewards -MFE and -(bp distance
  to a target structure) / length.
* ``dna_jaspar``: the shipped DNA model conditioned on ``enhancer``, 200 bp, reward = best window of the AP-1
  (FOS::JUN) JASPAR matrix MA0099.3 on either strand, scaled to [0, 1].
* ``molecules_qed``: the shipped QM9 model (data/molecules/qm9_egnn.pt), 20 steps of dpmpp_2m_sde on the logSNR
  grid from sigma/alpha = 4 A (``molgen.molecules.sampling.FIRST_NOISE``; from the schedule's start, 6 of the 20
  calls fell above 8 A, where a molecule is pure noise), reward QED of the largest fragment of the EDM-inferred
  structure times that fragment's share of the atoms (0 when it does not sanitise).
* ``backbones_helix`` / ``backbones_rg``: the shipped CA backbone model, 64 residues, 10 steps of
  ddpm_ancestral, rewards DSSP helix fraction and -|Rg / (3.3 N^0.31) - 1| (differentiable: DPS applies).

SVDD-MC uses a value net trained by ``python -m molgen.guidance.train_value`` (the command is in each net's card,
under ``--value-dir``; a net trained on another model snapshot is retrained). Naturalness: sequences NLL
(bits per token under the model) and 3-mer Pearson r against natural held-out sequences; molecules EDM validity
and atom stability; backbones CA-CA validity. Diversity: sequences mean pairwise Hamming distance, molecules
mean pairwise Tanimoto distance (Morgan r = 2) of the valid ones, backbones mean pairwise RMS difference of
distance matrices (Angstrom). Each reward figure is the median (and top-10 % mean) over the outputs.
Dev seed 1 was used to choose lambda, the ESS threshold, the molecule step count and the DPS scale of
backbones_rg (100: scale 1 left the reward unchanged, 1000 broke the chains); the reported figures use seed 0.
Molecules (snapshot e75511d8): FK lambda 30 (10 / 30 / 100 gave medians 0.455 / 0.463 / 0.463 on seed 1, 30 the
higher atom stability) and SVDD's selection temperature alpha = 0.01 (0 / 0.01 / 0.02 / 0.05: 0.428 / 0.463 /
0.461 / 0.437; argmax over near-tied children of an under-trained model is a poor choice).

``svdd_late_M`` (molecules): SVDD with M children only at times t <= branch_below (one child above it), at most
SVDD-PM's budget: on molecules neither the denoised estimate nor 2-step completions carry any information about
the final QED while t > 0.5 (every value is 0 on 64 unguided seed-1 trajectories); the Spearman correlation of
the denoised estimate's QED with the trajectory's final QED is <= 0.28 above t = 0.03, that of a 4-copy 2-step
completion value 0.38 / 0.55 at t = 0.08 / 0.05. So the calls go where the values rank children: M = 8 at the
last 8 of the 20 grid points (t <= 0.04 on the grid from 4 A; t <= 0.15 on the grid from the schedule's start,
chosen there on seed 1 over t* = 0.15 / 0.25 / 0.4 and argmax vs alpha = 0.01): 76 calls per output against
best-of-4's 80.

Completion values (``svdd_c_M`` / ``fk_c_K`` rows, a task's ``completions`` spec or ``--completions
TASK=completions:K:STEPS``): each child / particle is valued by K sampled completions (``guidance.completions``)
instead of its denoised estimate; every completion call is counted, and each such row is paired with
``best_of_N`` at its own measured budget (N = round(calls / one trajectory's calls)).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molgen.diffusion import Sampler, get_schedule  # noqa: E402
from molgen.diffusion.analytic import GaussianMixtureDenoiser  # noqa: E402
from molgen.guidance.baselines import best_of_n, dps_sample  # noqa: E402
from molgen.guidance.completions import parse_value  # noqa: E402
from molgen.guidance.core import prior  # noqa: E402
from molgen.guidance.fk import Tilt, fk_sample  # noqa: E402
from molgen.guidance.rewards import Reward, parse_reward, quadratic  # noqa: E402
from molgen.guidance.svdd import svdd_calls, svdd_sample  # noqa: E402
from molgen.guidance.tasks import Problem, get_problem, guide  # noqa: E402
from molgen.guidance.train_value import load_value, save_value, train_value  # noqa: E402
from molgen.guidance.value import VectorValueNet, as_value, fit_value, gaussian_noise  # noqa: E402

RNA_TARGET = "." * 8 + "(" * 10 + "." * 6 + ")" * 10 + "." * 8 + "(" * 12 + "...." + ")" * 12 + "." * 30

# task -> problem, reward, defaults (n outputs, steps, FK lambda, value-net training samples)
TASKS = {
    "rna_mfe": {"modality": "rna", "reward": "rna_mfe", "length": len(RNA_TARGET), "n": 32, "steps": 16,
                "lam": 10.0, "value_samples": 256},
    "rna_target": {"modality": "rna", "reward": f"rna_target:{RNA_TARGET}", "length": len(RNA_TARGET), "n": 32,
                   "steps": 16, "lam": 100.0, "value_samples": 256},
    "dna_jaspar": {"modality": "dna", "reward": "jaspar:MA0099.3", "length": 200, "condition": "enhancer",
                   "n": 32, "steps": 16, "lam": 30.0, "value_samples": 256},
    "molecules_qed": {"modality": "molecules", "reward": "qed", "solver": "dpmpp_2m_sde", "n": 64, "steps": 20,
                      "lam": 30.0, "alpha": 0.01, "value_samples": 256, "completions": "completions:1:2",
                      "late": {"candidates": 8, "branch_below": 0.04}},
    "backbones_helix": {"modality": "backbones", "reward": "helix", "length": 64, "n": 16, "steps": 10,
                        "lam": 30.0, "value_samples": 64},
    "backbones_rg": {"modality": "backbones", "reward": "rg", "length": 64, "n": 16, "steps": 10, "lam": 30.0,
                     "value_samples": 64, "dps_scale": 100.0},
}


def gmm_task(args: argparse.Namespace) -> dict:
    sched = get_schedule("vp_cosine")
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 3.0 * torch.stack([angles.cos(), angles.sin()], -1)
    model = GaussianMixtureDenoiser(means, 0.3, None, sched)
    reward = quadratic(c=torch.tensor([4.5, 1.5], dtype=torch.float64), tau=1.0)
    steps = args.steps or 16
    smp = Sampler(model, sched, "ddpm_ancestral", steps=steps)
    n, m, steps = args.n or 32, args.candidates, smp.n_steps
    per = svdd_calls(steps, m) // steps
    g = torch.Generator().manual_seed(args.seed)

    def natural(x: torch.Tensor) -> dict:
        d2 = ((x[:, None] - means[None]) ** 2).sum(-1)
        logp = torch.logsumexp(-d2 / (2 * 0.09) - math.log(8), -1) - math.log(2 * math.pi * 0.09)
        dist = torch.cdist(x, x)
        return {"log_density": float(logp.mean()), "diversity": float(dist.sum() / (n * (n - 1)))}

    runs = {
        "unguided": best_of_n(smp, prior(smp, n, (2,), g, torch.float64), reward, candidates=1, generator=g),
        f"best_of_{per}": best_of_n(smp, prior(smp, n * per, (2,), g, torch.float64), reward, candidates=per,
                                    generator=g),
        "dps": dps_sample(Sampler(model, sched, "ddpm_ancestral", steps=steps), prior(smp, n, (2,), g,
                          torch.float64), reward, scale=1.0, generator=g),
        f"fk_{per}": fk_sample(smp, prior(smp, n * per, (2,), g, torch.float64), particles=per,
                               tilt=Tilt(reward, lam=1.0), generator=g, final="best"),
        f"svdd_pm_{m}": svdd_sample(smp, prior(smp, n, (2,), g, torch.float64), reward, candidates=m, alpha=0.0,
                                    generator=g),
    }
    # SVDD-MC: a value net fitted on 2000 unguided samples (their cost is a one-off, reported separately)
    train = best_of_n(smp, prior(smp, 2000, (2,), g, torch.float64), reward, candidates=1, generator=g)
    torch.manual_seed(args.seed)  # the net's initial weights
    net = VectorValueNet(2, hidden=64)
    fit_value(net, train.samples, train.rewards, gaussian_noise(sched), steps=1500, batch=256, generator=g)
    res = svdd_sample(smp, prior(smp, n, (2,), g, torch.float64), reward, candidates=m, alpha=0.0,
                      value=as_value(net), generator=g)
    res.info["value_training_model_calls"] = train.model_calls
    runs[f"svdd_mc_{m}"] = res
    # SVDD valued by sampled completions (after SVDD-MC: the earlier rows keep their random stream)
    value = parse_value(args.completions.get("gmm", "completions:1:2"))
    runs[f"svdd_c_{m}"] = svdd_sample(smp, prior(smp, n, (2,), g, torch.float64), reward, candidates=m, alpha=0.0,
                                      value=value, generator=g)
    per_c = max(1, round(runs[f"svdd_c_{m}"].model_calls / (n * steps)))
    runs[f"best_of_{per_c}"] = best_of_n(smp, prior(smp, n * per_c, (2,), g, torch.float64), reward,
                                         candidates=per_c, generator=g)
    out: dict = {"config": {"n": n, "steps": steps, "candidates": m, "seed": args.seed}}
    return out | {name: {**res.summary(), **natural(res.samples)} for name, res in runs.items()}


def value_hook(args: argparse.Namespace, task: str, spec: dict, problem) -> tuple[object, dict]:
    """The task's value net: loaded from --value-dir when it matches the model snapshot, else trained now with
    the recorded command's recipe and saved there."""
    path = args.value_dir / f"{task}.pt"
    if path.exists():
        try:
            value, card = load_value(path, problem, spec["reward"])
            return value, {**card["provenance"], "loaded": str(path)}
        except ValueError as err:
            print(f"  retraining the value net: {err}")
    samples = spec["value_samples"]
    cmd = [problem.modality, "--reward", spec["reward"], "--steps", str(spec["steps"]), "--samples", str(samples),
           "--fit-steps", str(args.fit_steps), "--seed", str(args.seed + 1000), "--out", str(path)]
    for key in ("length", "condition", "solver"):
        if key in spec:
            cmd += [f"--{key}", str(spec[key])]
    net, prov = train_value(problem, spec["reward"], samples=samples, fit_steps=args.fit_steps, seed=args.seed + 1000)
    save_value(path, net, problem, prov, "python -m molgen.guidance.train_value " + shlex.join(cmd))
    value, card = load_value(path, problem, spec["reward"])
    return value, {**card["provenance"], "trained": str(path)}


def add_matched_best_of_n(runs: dict, name: str, problem: Problem, reward: Reward, n: int, common: dict) -> None:
    """Add best-of-N at run ``name``'s measured budget, N = round(its calls / one unguided trajectory's), unless
    that row is already there."""
    matched = max(1, round(runs[name].model_calls / runs["unguided"].model_calls))
    if f"best_of_{matched}" not in runs:
        runs[f"best_of_{matched}"] = guide(problem, "bon", reward, n, candidates=matched, **common)


def model_task(args: argparse.Namespace, task: str) -> dict:
    spec = dict(TASKS[task])
    spec["n"] = args.n or spec["n"]
    spec["steps"] = args.steps or spec["steps"]
    if task in args.lam:
        spec["lam"] = args.lam[task]
    problem = get_problem(spec["modality"], steps=spec["steps"], length=spec.get("length"),
                          condition=spec.get("condition"), solver=spec.get("solver"))
    reward = parse_reward(spec["reward"])
    n, m = spec["n"], args.candidates
    common = {"seed": args.seed}
    out: dict = {"config": {**spec, "candidates": m, "seed": args.seed, "model_checkpoint": str(problem.checkpoint),
                            "model_sha256": problem.sha256, **problem.settings}}
    runs = {"unguided": guide(problem, "unguided", reward, n, **common),
            f"svdd_pm_{m}": guide(problem, "svdd", reward, n, candidates=m, alpha=spec.get("alpha", 0.0), **common)}
    per = max(1, round(runs[f"svdd_pm_{m}"].model_calls / runs["unguided"].model_calls))
    runs[f"best_of_{per}"] = guide(problem, "bon", reward, n, candidates=per, **common)
    if reward.differentiable:
        runs["dps"] = guide(problem, "dps", reward, n, dps_scale=spec.get("dps_scale", 1.0), **common)
    else:
        out["dps"] = "n/a (reward not differentiable)"
    runs[f"fk_{per}"] = guide(problem, "fk", reward, n, particles=per, lam=spec["lam"],
                              ess_threshold=args.ess_threshold, **common)
    if spec.get("late"):  # SVDD that branches only at t <= branch_below, where the values say something
        late = spec["late"]
        name = f"svdd_late_{late['candidates']}"
        runs[name] = guide(problem, "svdd", reward, n, candidates=late["candidates"], alpha=spec.get("alpha", 0.0),
                           branch_below=late["branch_below"], **common)
        add_matched_best_of_n(runs, name, problem, reward, n, common)
    completions = args.completions.get(task, spec.get("completions"))
    if completions:  # SVDD and FK valued by sampled completions, each against best-of-N at its own budget
        value = parse_value(completions)
        mc, kc = spec.get("completion_candidates", m), spec.get("completion_particles", per)
        runs[f"svdd_c_{mc}"] = guide(problem, "svdd", reward, n, candidates=mc, value=value,
                                     alpha=spec.get("alpha", 0.0), **common)
        runs[f"fk_c_{kc}"] = guide(problem, "fk", reward, n, particles=kc, lam=spec["lam"], value=value,
                                   ess_threshold=args.ess_threshold, **common)
        out["completions"] = completions
        for name in (f"svdd_c_{mc}", f"fk_c_{kc}"):
            add_matched_best_of_n(runs, name, problem, reward, n, common)
    value, card = value_hook(args, task, spec, problem)
    runs[f"svdd_mc_{m}"] = guide(problem, "svdd_mc", reward, n, candidates=m, value=value, **common)
    runs[f"svdd_mc_{m}"].info.update({"value_training_model_calls": card["model_calls"],
                                      "value_training_s": card["wall_s"]})
    out["value_net"] = {k: card.get(k) for k in ("command", "loaded", "trained", "samples", "fit_steps",
                                                 "loss_first", "loss_last_10pct", "wall_s", "model_calls")}
    with torch.no_grad():
        for name, res in runs.items():
            out[name] = {**res.summary(), **problem.natural(res)}
    out["reward_stats"] = reward.stats.as_dict()
    return out


def margin_task(args: argparse.Namespace, task: str) -> dict:
    """``--margin``: is FK's lead over best-of-N real? Unguided, best-of-K and FK with K = 4 particles (equal
    model calls) at ``--n`` outputs, with the bootstrap standard error of the medians' difference."""
    spec = {**TASKS[task], "n": args.n or TASKS[task]["n"], **({"lam": args.lam[task]} if task in args.lam else {})}
    problem = get_problem(spec["modality"], steps=args.steps or spec["steps"], length=spec.get("length"),
                          condition=spec.get("condition"), solver=spec.get("solver"))
    reward, n, k = parse_reward(spec["reward"]), spec["n"], args.candidates
    runs = {"unguided": guide(problem, "unguided", reward, n, seed=args.seed),
            f"best_of_{k}": guide(problem, "bon", reward, n, candidates=k, seed=args.seed),
            f"fk_{k}": guide(problem, "fk", reward, n, particles=k, lam=spec["lam"], ess_threshold=args.ess_threshold,
                             seed=args.seed)}
    out: dict = {"config": {**spec, "margin": True, "seed": args.seed, "model_sha256": problem.sha256}}
    with torch.no_grad():
        for name, res in runs.items():
            out[name] = {**res.summary(), **problem.natural(res)}
    fk, bon = (runs[name].rewards.double() for name in (f"fk_{k}", f"best_of_{k}"))
    gen = torch.Generator().manual_seed(0)
    boot = torch.stack([fk[torch.randint(0, n, (n,), generator=gen)].median()
                        - bon[torch.randint(0, n, (n,), generator=gen)].median() for _ in range(2000)])
    out["fk_minus_best_of_n_median"] = {"value": float(fk.median() - bon.median()), "se": float(boot.std())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="gmm,rna_mfe,rna_target,dna_jaspar,molecules_qed,backbones_helix,backbones_rg")
    p.add_argument("--n", type=int, default=None, help="outputs per method (default: per task)")
    p.add_argument("--candidates", type=int, default=4, help="SVDD's M")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: per task)")
    p.add_argument("--lam", default="", help="FK tilt strengths per task, e.g. molecules_qed=30,dna_jaspar=20")
    p.add_argument("--ess-threshold", dest="ess_threshold", type=float, default=0.5)
    p.add_argument("--completions", default="",
                   help="completion values per task, e.g. molecules_qed=completions:1:2 (default: the task's own)")
    p.add_argument("--fit-steps", dest="fit_steps", type=int, default=400, help="value-net training steps")
    p.add_argument("--value-dir", dest="value_dir", type=Path, default=ROOT / "runs" / "guidance" / "values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="results file (tasks are merged into an existing one)")
    p.add_argument("--margin", action="store_true",
                   help="only unguided, best-of-M and FK-M with a bootstrap SE of FK's median lead (use a larger --n)")
    args = p.parse_args(argv)
    args.lam = {k: float(v) for k, v in (item.split("=") for item in args.lam.split(",") if item)}
    args.completions = dict(item.split("=", 1) for item in args.completions.split(",") if item)
    torch.set_num_threads(1)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t != "gmm" and t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from gmm, {', '.join(TASKS)}")
    if args.margin and "gmm" in tasks:
        raise SystemExit("--margin compares FK and best-of-N on the model tasks, not on gmm")
    out: dict = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    out.pop("config", None)  # each task carries its own
    for task in tasks:
        t0 = time.perf_counter()
        key = f"{task}_margin" if args.margin else task
        if args.margin:
            out[key] = margin_task(args, task)
        elif task == "gmm":
            out[key] = gmm_task(args)
        else:
            out[key] = model_task(args, task)
        out[key]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"== {key} ({out[key]['wall_s']} s)", flush=True)
        for name, row in out[key].items():
            if isinstance(row, dict) and "reward_median" in row:
                cols = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                print(f"  {name:14s} {cols}", flush=True)
        if args.json:  # after every task: a long run keeps what it finished
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
