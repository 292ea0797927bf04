"""Few-step students against their teacher: EDM metrics at the same model calls, each model with its own sampler.

    python benchmarks/students.py --student runs/molecules/student/ema.pt --json OUT.json --png OUT.png \
        [--teacher data/molecules/qm9_egnn.pt] [--calls 4 5 8 10 20 50] [--n 1000]

Both models sample with ``sample_molecules``' defaults (DPM-Solver++(2M) on the logSNR grid from 4 A, AF3's step
scale below 3 A), ``--n`` molecules per row with the same seed (the same atom counts and noise for both). Rows
carry binomial standard errors; the PNG plots molecule stability and validity against calls.
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

METRICS = ("atom_stability", "mol_stability", "validity", "uniqueness", "novelty")


def row(label: str, model: Any, config: dict[str, Any], calls: int, n: int, seed: int, ref: Any) -> dict[str, Any]:
    """EDM metrics of ``n`` molecules of ``model`` at ``calls`` calls."""
    start = time.perf_counter()
    mols = sample_molecules(model, config, n, steps=calls, seed=seed)
    seconds = time.perf_counter() - start
    metrics = evaluate(((m.symbols, m.positions) for m in mols), reference_smiles=ref).as_dict()
    se = {k: math.sqrt(metrics[k] * (1 - metrics[k]) / n) for k in ("mol_stability", "validity")}
    out = {"model": label, "calls": calls, "n": n,
           **{k: metrics[k] for k in METRICS}, "stderr": se, "seconds": round(seconds, 1)}
    print(f"{label:>8s} {calls:3d} calls: atom {100 * out['atom_stability']:.1f} % "
          f"mol {100 * out['mol_stability']:.1f} % valid {100 * out['validity']:.1f} % ({seconds:.0f} s)", flush=True)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("mol_stability", "validity")):
        for label in ("teacher", "student"):
            pts = sorted((r["calls"], r[metric], r["stderr"][metric]) for r in rows if r["model"] == label)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=label,
                        capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("model calls")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="a distilled checkpoint (molgen.molecules.distill)")
    p.add_argument("--teacher", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--calls", type=int, nargs="+", default=[4, 5, 8, 10, 20, 50])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = read_card(args.student)
    source = card["provenance"].get("distilled_from")
    if source is None:
        raise SystemExit(f"{args.student} is not a distilled student (its card names no distilled_from)")
    ref_name, ref = reference_smiles("auto")
    models = {"teacher": load_model(args.teacher), "student": load_model(args.student)}
    rows = [row(label, *models[label], k, args.n, args.seed, ref) for k in args.calls for label in models]
    result = {"student": args.student, "student_step": card["provenance"].get("global_step"),
              "student_train_wall_s": card["provenance"].get("train_wall_s"), "teacher": args.teacher,
              "distilled_from": source, "n": args.n, "seed": args.seed, "novelty_reference": ref_name,
              "hardware": hardware(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.png:
        plot(rows, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
