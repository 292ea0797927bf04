"""Molecule quality per training CPU-hour: EDM metrics of exported checkpoints at few model calls.

    nice -n 5 python benchmarks/molecule_training.py data/molecules/qm9_egnn.pt runs/molecules/qm9_flow_ot \
        --n 200 --steps 10 20

Each source is a molgen checkpoint or a run folder: its ``exports/step_N.pt`` (written with the trainer's
``--keep-exports``) and its latest ``ema.pt``, read once (training may rewrite it). A checkpoint is sampled
``--n`` molecules per step count with ``sample_molecules`` (seed ``--seed``, ``--solver``) and scored with
``evaluate``. Training cost = card ``train_wall_s`` plus that of the checkpoint it was warm-started from
(card ``init``), times the threads on its ``hardware`` line, in CPU-hours. Every model is measured with the
default sampler (which starts at sigma/alpha = 4 A, its noise carried along the flow, with the step scale 1.5
chosen for the VP model); linear-flow models also with the ``--flow-samplers`` named in ``FLOW_SAMPLERS``: from
the pure-noise end on a grid equally spaced in sqrt(t), at step scales 1-1.3. Standard errors:
sqrt(p (1 - p) / n) for molecule stability and validity; for atom stability, whose atoms share molecules, the
ratio estimator's sqrt(sum_i (s_i - p n_i)^2) / sum_i n_i (s_i stable atoms of molecule i, n_i its atoms).
Writes a results table (``benchmarks/results_table.py`` format: title, command, commit, date, hardware, columns,
rows; rewritten after every measurement) and, when matplotlib is installed, a PNG of molecule and atom stability
and validity against CPU-hours next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molgen.checkpoints import hardware, read_card
from molgen.molecules.metrics import atom_stability, evaluate
from molgen.molecules.model import MoleculeDenoiser
from molgen.molecules.sampling import load_model, sample_molecules

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = [
    ["source", "checkpoint", ""],
    ["global_step", "step", ""],
    ["cpu_hours", "training CPU-h", ".2f"],
    ["sampler", "sampler", ""],
    ["steps", "NFE", ""],
    ["n", "n", ""],
    ["atom_stability", "atom stability", ".1%"],
    ["atom_stability_se", "SE", ".1%"],
    ["mol_stability", "molecule stability", ".1%"],
    ["mol_stability_se", "SE", ".1%"],
    ["validity", "validity", ".1%"],
    ["validity_se", "SE", ".1%"],
]
FLOW_SAMPLERS: dict[str, dict[str, Any]] = {
    f"noise_quadratic_eta{eta}": {"first_noise": math.inf, "grid": "time_quadratic", "step_scale": eta}
    for eta in (1.0, 1.1, 1.2, 1.3)
}


def step_of(path: Path) -> int:
    """The optimiser step on a checkpoint's card."""
    return int(read_card(path)["provenance"].get("global_step") or 0)


def checkpoints(source: str) -> list[tuple[str, Path]]:
    """(series name, checkpoint) pairs: a run folder gives its ``exports/step_N.pt`` and its latest ``ema.pt`` (when
    newer) under the folder's name; a checkpoint file gives itself, under its run's name when it is one of the
    run's exports, else under its file name."""
    path = Path(source)
    if not path.is_dir():
        return [(path.parent.parent.name if path.parent.name == "exports" else path.stem, path)]
    found = sorted(path.glob("exports/step_*.pt"), key=step_of)
    latest = path / "ema.pt"
    if latest.exists() and (not found or step_of(latest) > step_of(found[-1])):
        found.append(latest)
    return [(path.name, p) for p in found]


def frozen_model(path: Path, tries: int = 3) -> tuple[MoleculeDenoiser, dict[str, Any], dict[str, Any]]:
    """(model, config, provenance) from weights and a card of the same export (re-read while a training run
    rewrites them between the two reads)."""
    for _ in range(tries):
        card = read_card(path)
        model, config = load_model(path)
        if read_card(path)["provenance"].get("global_step") == card["provenance"].get("global_step"):
            break
        time.sleep(2.0)
    return model, config, card["provenance"]


def cpu_hours(provenance: dict[str, Any]) -> float:
    """(train_wall_s + init train_wall_s) x threads / 3600, threads from ``hardware`` ('... x1 threads')."""
    found = re.search(r"x(\d+) threads", str(provenance.get("hardware", "")))
    seconds = float(provenance.get("train_wall_s", 0.0)) + float(provenance.get("init", {}).get("train_wall_s", 0.0))
    return seconds * (int(found.group(1)) if found else 1) / 3600.0


def binomial_se(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n)


def atom_stability_se(stable: np.ndarray, atoms: np.ndarray) -> float:
    """Standard error of p = sum s_i / sum n_i over molecules: sqrt(sum (s_i - p n_i)^2) / sum n_i."""
    p = stable.sum() / atoms.sum()
    return float(np.sqrt(((stable - p * atoms) ** 2).sum()) / atoms.sum())


def score(molecules: list) -> dict[str, float]:
    """EDM metrics with standard errors of (symbols, positions) pairs."""
    m = evaluate(molecules).as_dict()
    stable = np.array([atom_stability(s, x).sum() for s, x in molecules], dtype=np.float64)
    atoms = np.array([len(s) for s, _ in molecules], dtype=np.float64)
    n = int(m["n"])
    return {
        **m,
        "mol_stability_se": binomial_se(m["mol_stability"], n),
        "validity_se": binomial_se(m["validity"], n),
        "atom_stability_se": atom_stability_se(stable, atoms),
    }


def samplers(config: dict[str, Any], flow_samplers: list[str]) -> dict[str, dict[str, Any]]:
    """Sampler settings to measure: the defaults, and for linear-flow models the named ``FLOW_SAMPLERS``."""
    out: dict[str, dict[str, Any]] = {"default": {}}
    if config.get("schedule") == "linear_flow":
        out.update({name: FLOW_SAMPLERS[name] for name in flow_samplers})
    return out


def measure(series: str, path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per sampler and step count of one checkpoint."""
    model, config, prov = frozen_model(path)
    rows = []
    for name, options in samplers(config, args.flow_samplers).items():
        for steps in args.steps:
            start = time.perf_counter()
            mols = sample_molecules(model, config, args.n, solver=args.solver, steps=steps, seed=args.seed, **options)
            seconds = time.perf_counter() - start
            row = {
                "series": series,
                "source": str(path),
                "schedule": config.get("schedule"),
                "global_step": prov.get("global_step"),
                "cpu_hours": round(cpu_hours(prov), 3),
                "training_command": prov.get("training_command"),
                "sampler": name,
                "sampler_options": {k: str(v) if v == math.inf else v for k, v in options.items()},
                "solver": args.solver,
                "steps": steps,
                "seed": args.seed,
                "sampling_seconds": round(seconds, 1),
                **score([(m.symbols, m.positions) for m in mols]),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Molecule and atom stability and validity (+- 1 SE) against CPU-hours, one line per (series, sampler, steps);
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("mol_stability", "atom_stability", "validity")):
        series: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            series.setdefault(f"{r['series']} {r['sampler']} {r['steps']} NFE", []).append(r)
        for label, group in sorted(series.items()):
            group.sort(key=lambda r: r["cpu_hours"])
            ax.errorbar([r["cpu_hours"] for r in group], [100 * r[metric] for r in group],
                        yerr=[100 * r[f"{metric}_se"] for r in group], marker="o", capsize=3, label=label)
        ax.set_xlabel("training CPU-hours")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def commit() -> str:
    """Short HEAD commit, flagged when the working tree has uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, check=False).returncode != 0
    return f"{head.strip() or 'unknown'}{' (with uncommitted changes)' if dirty else ''}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The rows as a ``benchmarks/results_table.py`` table with its provenance."""
    return {
        "title": "3D molecules: EDM metrics against training CPU-hours",
        "description": (f"{args.n} molecules per row, seed {args.seed}, {args.solver}. Sampler default: "
                        "molgen.molecules.sampling's defaults (logsnr grid from sigma/alpha 4 A, step scale 1.5 "
                        "below 3 A); noise_quadratic_etaE: from pure noise on the time_quadratic grid, step scale E "
                        "below 3 A. CPU-hours include the checkpoint a run was warm-started from; SE = one "
                        "standard error."),
        "command": " ".join(["python benchmarks/molecule_training.py", *argv]),
        "commit": commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(),
        "columns": COLUMNS,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", nargs="+", help="molgen checkpoints (.pt with card) or run folders (their ema.pt)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flow-samplers", nargs="*", default=[], choices=sorted(FLOW_SAMPLERS),
                   help="extra samplers for linear-flow models")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "molecule_training.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for series, path in (pair for source in args.sources for pair in checkpoints(source)):
        rows.extend(measure(series, path, args))
        out.write_text(json.dumps(table(rows, args, argv), indent=2) + "\n")
    if plot(rows, out.with_suffix(".png")):
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
