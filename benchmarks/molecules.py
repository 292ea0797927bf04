"""Molecules benchmark: EDM metrics and throughput of few-step solvers against 1000-step ancestral sampling
on the same model, in bounded time on one CPU core.

    python benchmarks/molecules.py --json results/molecules.json [--checkpoint PATH] [--n 1000] [--n-reference 100]

* Quality: EDM metrics (atom/molecule stability, validity, uniqueness, novelty against the QM9 train SMILES)
  of ``--n`` samples per few-step budget (``--nfe``, default 10 20 50; ``--solver`` on the logSNR grid with
  ``sample_molecules``' defaults: step scale and grid start; and again as the textbook run, the plain ODE over the
  schedule's whole noise range, ``few_step_plain_ode``) and of
  ``--n-reference`` samples of the ``--reference-steps``-step ancestral sampler (DDPM, uniform time grid over
  the whole schedule, EDM's protocol).
* Retention: each few-step metric over the reference figure (targets for molecule stability: >= 0.9 at 10
  NFE, >= 0.97 at 20). A ratio over a reference of 0 is undefined and is written as ``null`` with a reason.
* Throughput: the first few-step budget re-run on the reference run's ``--n-reference`` molecules (same seed,
  so the same atom counts and batches) against the reference run's time, wall and process CPU seconds; and
  EDM's paper figure, 0.76 s per molecule at 1000 steps on an RTX 3090.

Cost on one core is about (n * sum(nfe) + n_reference * (reference_steps + nfe[0])) model calls per
molecule at roughly 3-5 ms each (QM9 sizes, this model): the defaults take about 15 CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from molgen.checkpoints import hardware, read_card
from molgen.molecules.metrics import evaluate
from molgen.molecules.reference import reference_smiles
from molgen.molecules.sampling import DEFAULT_CHECKPOINT, load_model, sample_molecules

EDM_SECONDS_PER_MOLECULE = 0.76  # EDM paper, 1000 steps, RTX 3090
RATIO_METRICS = ("mol_stability", "atom_stability", "validity")
RETENTION_TARGETS = {"10": 0.9, "20": 0.97}  # molecule stability kept against 1000 steps


def timed_sample(model, config, n: int, sampler: dict[str, Any], seed: int, batch: int, device: str) -> tuple:
    """(molecules, wall seconds, process CPU seconds) of one sampling run."""
    wall, cpu = time.perf_counter(), time.process_time()
    mols = sample_molecules(model, config, n, seed=seed, batch_size=batch, device=device, **sampler)
    return mols, time.perf_counter() - wall, time.process_time() - cpu


def quality(model, config, ref, n: int, sampler: dict[str, Any], seed: int, batch: int, device: str) -> dict:
    """EDM metrics of ``n`` samples, with binomial standard errors for the per-molecule rates."""
    mols, wall, cpu = timed_sample(model, config, n, sampler, seed, batch, device)
    metrics = evaluate(((m.symbols, m.positions) for m in mols), reference_smiles=ref).as_dict()
    se = {k: math.sqrt(metrics[k] * (1 - metrics[k]) / n) for k in ("mol_stability", "validity")}
    return {**sampler, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), **metrics, "stderr": se}


def ratio(value: float, reference: float, metric: str) -> dict[str, Any]:
    """value / reference, or null with the reason when the reference is 0."""
    if reference == 0:
        return {"ratio": None, "undefined": f"reference {metric} is 0 (ratio undefined)"}
    return {"ratio": value / reference}


def retention(rows: list[dict], reference: dict) -> dict[str, dict]:
    """metric -> NFE -> ratio to the reference sampler's figure."""
    return {m: {str(r["steps"]): ratio(r[m], reference[m], m) for r in rows} for m in RATIO_METRICS}


def throughput(model, config, few: dict, ref_row: dict, seed: int, batch: int, device: str) -> dict:
    """The few-step sampler on the reference run's molecules (same n and seed: same atom counts and batches)
    against the reference run's time: molecules/s, speed-up, and EDM's paper figure."""
    n = ref_row["n"]
    _, wall, cpu = timed_sample(model, config, n, few, seed, batch, device)
    out: dict[str, Any] = {"n": n, "batch": batch}
    for key, sampler, w, c in (
        ("few_step", few, wall, cpu),
        ("reference", {k: ref_row[k] for k in ("solver", "steps", "grid", "first_noise")}, ref_row["seconds"],
         ref_row["cpu_seconds"]),
    ):
        out[key] = {
            **sampler,
            "seconds": round(w, 2),
            "cpu_seconds": round(c, 2),
            "molecules_per_s": n / w,
            "seconds_per_molecule": w / n,
        }
    out["speedup_wall"] = out["reference"]["seconds"] / out["few_step"]["seconds"]
    out["speedup_cpu"] = out["reference"]["cpu_seconds"] / max(out["few_step"]["cpu_seconds"], 1e-9)
    out["edm_paper_seconds_per_molecule"] = EDM_SECONDS_PER_MOLECULE
    out["few_step_speedup_vs_edm_paper"] = EDM_SECONDS_PER_MOLECULE / out["few_step"]["seconds_per_molecule"]
    out["reference_speedup_vs_edm_paper"] = EDM_SECONDS_PER_MOLECULE / out["reference"]["seconds_per_molecule"]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--n", type=int, default=1000, help="molecules per few-step budget")
    p.add_argument("--n-reference", type=int, default=100, help="molecules for the reference (1000-step) sampler")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--grid", default="logsnr")
    p.add_argument("--reference-solver", default="ddpm_ancestral")
    p.add_argument("--reference-steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100, help="largest batch, the same for every sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n", "n_reference", "batch", "reference_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, config = load_model(args.checkpoint)
    ref_name, ref = reference_smiles("auto")
    common = {"seed": args.seed, "batch": args.batch, "device": args.device}
    few = [{"solver": args.solver, "steps": k, "grid": args.grid} for k in args.nfe]
    whole = float(model.schedule.rho(torch.tensor(model.schedule.t_max, dtype=torch.float64)))  # first_noise
    reference = {"solver": args.reference_solver, "steps": args.reference_steps, "grid": "time_uniform",
                 "first_noise": whole}  # EDM's protocol: the whole schedule
    rows = [quality(model, config, ref, args.n, s, **common) for s in few]
    plain = [quality(model, config, ref, args.n, {**s, "step_scale": 1.0, "first_noise": whole}, **common)
             for s in few]
    ref_row = quality(model, config, ref, args.n_reference, reference, **common)
    speed = throughput(model, config, few[0], ref_row, **common)
    for r in [*rows, *plain, ref_row]:
        print(
            f"{r['solver']:>15s} {r['steps']:5d} steps{' (plain ODE, whole schedule)' if 'step_scale' in r else ''}: "
            f"atom {100 * r['atom_stability']:.1f} % "
            f"mol {100 * r['mol_stability']:.1f} % valid {100 * r['validity']:.1f} % "
            f"unique {100 * r['uniqueness']:.1f} % (n={r['n']}, {r['seconds']:.0f} s)"
        )
    print(
        f"throughput on {args.n_reference} molecules, batch <= {args.batch}: "
        f"{speed['few_step']['molecules_per_s']:.2f} "
        f"vs {speed['reference']['molecules_per_s']:.3f} molecules/s ({speed['speedup_wall']:.0f}x); EDM paper "
        f"{EDM_SECONDS_PER_MOLECULE} s/molecule, ours {speed['few_step']['seconds_per_molecule']:.3f} at "
        f"{args.nfe[0]} NFE"
    )
    result: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "checkpoint_step": load_checkpoint_step(args.checkpoint),
        "hardware": hardware(),
        "n": args.n,
        "n_reference": args.n_reference,
        "batch": args.batch,
        "seed": args.seed,
        "novelty_reference": ref_name,
        "few_step": rows,
        "few_step_plain_ode": plain,
        "reference": ref_row,
        "retention": retention(rows, ref_row),
        "retention_targets_mol_stability": RETENTION_TARGETS,
        "throughput": speed,
        "total_seconds": round(time.perf_counter() - start, 1),
        "note": "wall seconds on a shared machine depend on its load; cpu_seconds are this process's CPU time",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def load_checkpoint_step(path: str) -> int | None:
    """Optimiser step recorded on the checkpoint's card, if any."""
    return read_card(path)["provenance"].get("global_step") if Path(path).with_suffix(".json").exists() else None


if __name__ == "__main__":
    sys.exit(main())
