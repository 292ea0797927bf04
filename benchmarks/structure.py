"""Backbone benchmark: natural chains' metrics as the reference row, then the shipped model at 2, 5, 10 and 50
ODE steps (Euler = Protenix-Mini's gamma_0 = 0 sampler, and DPM-Solver++(2M)) and 200 AF3 steps: CA-CA
validity, clashes, Rg ratio, DSSP fractions, TM diversity, novelty, ProteinMPNN NLL, seconds per backbone.

    python benchmarks/structure.py --json results/structure.json [--n 8] [--length 80] [--solvers euler dpmpp_2m]

Natural reference: TS50 (committed) and Pfam40 (read from the data path, default ../shared/data); novelty is
the highest TM-score of a sample to any training chain (TS50 + Pfam40 + PoseBusters monomers). The goal
check compares each solver's 5-step CA-CA validity and clash rate with AF3's 200-step figures (within 5 %,
with an absolute floor of 0.005).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from structure.cli import DEFAULT_CHECKPOINT  # noqa: E402
from structure.data import TS50_DIR, default_data_path, default_sources, load_chains  # noqa: E402
from structure.io import backbone_from_ca, list_structure_files, read_backbone  # noqa: E402
from structure.metrics import evaluate  # noqa: E402
from structure.sampling import AF3_DEFAULTS, load_model, sample_ca  # noqa: E402


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
    name: str,
    solver: str,
    steps: int,
    n: int,
    length: int,
    seed: int,
    reference: list,
    options: dict | None = None,
) -> dict:
    t0 = time.time()
    ca = sample_ca(model, n, length, solver, steps, seed=seed, solver_options=options)
    wall = time.time() - t0
    bbs = [backbone_from_ca(c.numpy(), name=f"s{k}") for k, c in enumerate(ca)]
    return {
        "name": name,
        "solver": solver,
        "steps": steps,
        "solver_options": options,
        "length": length,
        **evaluate(bbs, reference),
        "s_per_backbone": wall / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--data-path", type=Path, default=None)
    ap.add_argument("--n", type=int, default=8, help="backbones per row")
    ap.add_argument("--length", type=int, default=80)
    ap.add_argument("--solvers", nargs="+", default=["euler", "dpmpp_2m"], help="ODE solvers for the step rows")
    ap.add_argument("--steps", type=int, nargs="*", default=[2, 5, 10, 50])
    ap.add_argument("--af3-steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_path = args.data_path or default_data_path()
    reference = load_chains(default_sources(data_path))
    model = load_model(args.checkpoint)
    rows = [natural_row(data_path, 90)]
    print(json.dumps(rows[-1]), flush=True)
    for solver in args.solvers:
        for steps in args.steps:
            name = f"{solver} {steps} steps"
            rows.append(model_row(model, name, solver, steps, args.n, args.length, args.seed, reference))
            print(json.dumps(rows[-1]), flush=True)
    name = f"af3 {args.af3_steps} steps"
    af3 = model_row(model, name, "af3", args.af3_steps, args.n, args.length, args.seed, reference, dict(AF3_DEFAULTS))
    rows.append(af3)
    print(json.dumps(af3), flush=True)
    goal = {}
    for row in rows[1:-1]:
        if row["steps"] == 5:
            goal[row["solver"]] = {
                k: {
                    "5_steps": row[k],
                    "af3": af3[k],
                    "within_5pct": abs(row[k] - af3[k]) <= 0.05 * max(abs(af3[k]), 0.1),
                }
                for k in ("ca_ca_valid", "clash_rate")
            }
    card = json.loads(Path(args.checkpoint).with_suffix(".json").read_text())
    out = {
        "rows": rows,
        "goal_5_steps_vs_af3": goal,
        "checkpoint": str(args.checkpoint),
        "checkpoint_steps": card["provenance"].get("steps"),
        "n": args.n,
        "length": args.length,
        "seed": args.seed,
        "hardware": f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
