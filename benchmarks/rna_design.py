"""RNA design to held-out target structures: molgen's methods against ViennaRNA's ``RNA.inverse_fold`` at an
equal wall-clock budget per target, one core each.

Targets (never trained on, see ``molgen.sequences.design_training``):

* ``dev``: held-out natural structures of 20-128 nt (ArchiveII's tRNA, 5S and SRP families and bpRNA's
  held-out split), half of them <= 60 nt;
* ``long``: 150-200 nt: the held-out natural ones (SRP RNA) and synthetic targets (the MFE structures of
  random sequences laid on random nested structures, drawn with a seed apart from training's).

Methods: ``uncond_svdd`` (the unconditional RNA model with SVDD over plain tokens, as ``molgen guide rna
--reward rna_target:...`` runs it), ``cond_sample`` (the structure-conditioned model alone, pair-aware),
``cond_refine`` (the default of ``molgen design rna``), ``cond_svdd``, ``cond_fk`` and ``inverse_fold``
(random starts, restarted until solved or out of time). Each row: solve rate (with its standard error), median
best base-pair distance, target probability and ensemble defect of each target's best design, median seconds
and model calls, and the targets proved undesignable (a short helix, an isolated pair among them, that no
sequence holds in its MFE structure: ``molgen.sequences.structure.helix_proofs``) with the solve rate over the
rest.
Diversity: ``--diversity`` targets of <= 60 nt designed four times each; mean pairwise Hamming fraction of the
solved designs.

    python benchmarks/rna_design.py --json OUT.json --png OUT.png       # the full run (about 30 min on 2 cores)
    python benchmarks/rna_design.py --dev 10 --long 2 --seconds 2 --json OUT.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = {
    "uncond_svdd": {"method": "svdd", "model": "rna", "pair_aware": False},
    "cond_sample": {"method": "sample", "model": "rna_design"},
    "cond_refine": {"method": "refine", "model": "rna_design"},
    "cond_svdd": {"method": "svdd", "model": "rna_design"},
    "cond_fk": {"method": "fk", "model": "rna_design"},
    "inverse_fold": {"method": "inverse_fold", "model": None},
}
BANDS = {"20-60": (20, 60), "61-128": (61, 128), "150-200": (150, 200)}
_MODELS: dict[str, Any] = {}


def targets(dev: int, long: int, seed: int) -> list[tuple[str, str]]:
    """(name, structure): ``dev`` held-out natural targets of 20-128 nt (half <= 60 nt), ``long`` of 150-200 nt."""
    from molgen.sequences.design_training import heldout_targets
    from molgen.sequences.structure import fold, random_structure, seeded_sequence

    short = heldout_targets(None, dev // 2, (20, 60), seed)
    mid = heldout_targets(None, dev - len(short), (61, 128), seed)
    natural_long = heldout_targets(None, long // 2, (150, 200), seed)
    rng = random.Random(10_000 + seed)
    synthetic = []
    while len(natural_long) + len(synthetic) < long:
        length = rng.randint(150, 200)
        structure = fold(seeded_sequence(random_structure(length, rng), rng))[0]
        if structure.count("(") >= 10:
            synthetic.append((f"synthetic_{len(synthetic)}", structure))
    return short + mid + natural_long + synthetic


def _model(name: str) -> Any:
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained

    if name not in _MODELS:
        _MODELS[name] = load_pretrained(default_checkpoint(name))
    return _MODELS[name]


def run_one(job: tuple[str, str, str, float, int, int]) -> dict[str, Any]:
    """One (target, method) design run in this worker process (one torch thread)."""
    from molgen.errors import InputError
    from molgen.sequences.design import Budget, Target, design_rna

    torch.set_num_threads(1)
    name, structure, method, seconds, n, seed = job
    spec = METHODS[method]
    model = _model(spec["model"]) if spec["model"] else None
    try:
        res = design_rna(Target(name, structure), n, Budget(seconds=seconds), spec["method"], model, seed,
                         pair_aware=spec.get("pair_aware", True))
    except InputError as err:
        return {"name": name, "length": len(structure), "method": method, "error": str(err)}
    s = res.summary()
    best = res.designs[0]
    return {"name": name, "length": len(structure), "method": method, "solved": s["solved"],
            "n_solved": s["n_solved"], "bp_distance": best.bp_distance,
            "target_probability": best.target_probability, "ensemble_defect": best.ensemble_defect,
            "seconds": s["seconds"], "model_calls": s["model_calls"], "folding_calls": s["folding_calls"],
            "undesignable": bool(s["undesignable_helices"]),
            "sequences": [d.sequence for d in res.designs if d.bp_distance == 0]}


def band_of(length: int) -> str:
    return next(b for b, (lo, hi) in BANDS.items() if lo <= length <= hi)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for band in BANDS:
        for method in METHODS:
            rs = [r for r in runs if r["method"] == method and band_of(r["length"]) == band]
            done = [r for r in rs if "error" not in r]
            if not rs:
                continue
            row: dict[str, Any] = {"band": band, "method": method, "targets": len(rs), "refused": len(rs) - len(done)}
            if done:
                p = sum(r["solved"] for r in done) / len(rs)
                undesignable = sum(r["undesignable"] for r in done)
                row.update({
                    "solve_rate": p,
                    "solve_rate_se": math.sqrt(p * (1 - p) / len(rs)),
                    "undesignable": undesignable,
                    "solve_rate_designable": sum(r["solved"] for r in done) / max(len(rs) - undesignable, 1),
                    "median_bp_distance": statistics.median(r["bp_distance"] for r in done),
                    "median_target_probability": statistics.median(r["target_probability"] for r in done),
                    "median_ensemble_defect": statistics.median(r["ensemble_defect"] for r in done),
                    "median_seconds": statistics.median(r["seconds"] for r in done),
                    "median_model_calls": statistics.median(r["model_calls"] for r in done),
                })
            rows.append(row)
    return rows


def diversity(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from molgen.sequences.design import diversity as hamming

    rows = []
    for method in METHODS:
        values = [hamming(r["sequences"]) for r in runs if r["method"] == method and "error" not in r]
        values = [v for v in values if v is not None]
        if values:
            rows.append({"method": method, "targets": len(values), "mean_pairwise_hamming": statistics.mean(values)})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Solve rate (+- 1 SE) per length band, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    bands = [b for b in BANDS if any(r["band"] == b for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        got = {r["band"]: r for r in rows if r["method"] == method and "solve_rate" in r}
        xs = [i + k * width for i, b in enumerate(bands) if b in got]
        ax.bar(xs, [got[b]["solve_rate"] for b in bands if b in got], width,
               yerr=[got[b]["solve_rate_se"] for b in bands if b in got], capsize=2, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bands))], [f"{b} nt" for b in bands])
    ax.set_ylabel("targets solved")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dev", type=int, default=100, help="held-out targets of 20-128 nt")
    p.add_argument("--long", type=int, default=12, help="targets of 150-200 nt")
    p.add_argument("--seconds", type=float, default=5.0, help="wall-clock budget per target and method (20-128 nt)")
    p.add_argument("--long-seconds", type=float, default=15.0, help="budget per target of 150-200 nt")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--diversity", type=int, default=12, help="targets <= 60 nt designed 4 times for diversity")
    p.add_argument("--workers", type=int, default=2, help="processes, one core each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    p.add_argument("--png", default=None, help="bar chart of the solve rates (needs matplotlib: the bench extra)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    chosen = targets(args.dev, args.long, args.seed)
    jobs = [(name, s, m, args.long_seconds if len(s) >= 150 else args.seconds, 1, args.seed)
            for name, s in chosen for m in methods]
    short = [(name, s) for name, s in chosen if len(s) <= 60][: args.diversity]
    div_jobs = [(name, s, m, args.seconds, 4, args.seed) for name, s in short for m in methods
                if m in ("cond_refine", "inverse_fold")]
    start = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(run_one, jobs))
        div_runs = list(pool.map(run_one, div_jobs))
    out = {"rows": summarise(runs), "diversity": diversity(div_runs),
           "settings": {**vars(args), "targets": len(chosen)},
           "runs": [{k: v for k, v in r.items() if k != "sequences"} for r in runs],
           "wall_s": round(time.time() - start, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.png:
        plot(out["rows"], Path(args.png))
    for row in out["rows"]:
        print(json.dumps(row))
    for row in out["diversity"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
