"""Ship a run's EMA weights as the default checkpoint, with measured EDM metrics on its card.

    python -m molgen.molecules.export --run-dir runs/molecules/qm9_egnn_x0 --out data/molecules/qm9_egnn.pt \
        --n 1000 --steps 10 20

Reads ``RUN_DIR/ema.pt`` (written at every training checkpoint; training may go on meanwhile), samples ``--n``
molecules per step count with ``--solver``, evaluates them exactly as EDM and writes weights + card.
``--source CKPT`` measures an existing checkpoint instead (metrics are added to its card).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from molgen.checkpoints import hardware, load_checkpoint, save_checkpoint
from molgen.molecules.metrics import evaluate
from molgen.molecules.reference import reference_smiles
from molgen.molecules.sampling import DEFAULT_CHECKPOINT, load_model, sample_molecules, sampler_settings


def measure(path: Path, n: int, steps: list[int], solver: str, seed: int) -> dict[str, dict]:
    """EDM metrics of ``n`` samples per step count (novelty against the QM9 train SMILES when shipped)."""
    model, config = load_model(path)
    ref_name, ref = reference_smiles("auto")
    out = {}
    for k in steps:
        start = time.perf_counter()
        mols = sample_molecules(model, config, n, solver=solver, steps=k, seed=seed)
        seconds = time.perf_counter() - start
        metrics = evaluate(((m.symbols, m.positions) for m in mols), reference_smiles=ref).as_dict()
        out[f"{solver}_{k}_steps"] = {
            **metrics,
            "sampler": {"grid": "logsnr", **sampler_settings(solver)},
            "novelty_reference": ref_name,
            "sampling_seconds": round(seconds, 1),
            "seed": seed,
            "hardware": hardware(),
        }
        print(f"{solver} {k} steps: {metrics}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src_group = p.add_mutually_exclusive_group(required=True)
    src_group.add_argument("--run-dir", help="a training run: its EMA weights RUN_DIR/ema.pt are exported")
    src_group.add_argument("--source", help="a molgen checkpoint (.pt with .json card) to measure and re-export")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="*", default=[10])
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default=None, help="free text for the card (hardware sharing, run status)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = Path(args.source) if args.source else Path(args.run_dir) / "ema.pt"
    state, card = load_checkpoint(src)  # read once: training may overwrite ema.pt meanwhile
    with tempfile.TemporaryDirectory() as folder:
        frozen = save_checkpoint(Path(folder) / "ema.pt", state, card["config"], provenance=card["provenance"])
        metrics = measure(frozen, args.n, args.steps, args.solver, args.seed) if args.n > 0 else {}
    provenance = {**card["provenance"], "metrics": {**card["provenance"].get("metrics", {}), **metrics}}
    provenance.setdefault("exported_from", str(src))
    provenance["exported_at_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    if args.note:
        provenance["note"] = args.note
    save_checkpoint(args.out, state, card["config"], provenance=provenance)
    print(f"wrote {args.out} (step {provenance.get('global_step')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
