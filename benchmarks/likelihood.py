"""Probability-flow bits per dimension of molecules and backbones under the shipped models (``naturalness``).

    nice -n 10 python benchmarks/likelihood.py                 # 24 rk4 steps, 1 Hutchinson probe per stage
    nice -n 10 python benchmarks/likelihood.py --steps 48 --probes 2

Scores 16 random molecules of the shipped QM9 subset and 16 sampled by the model (dpmpp_2m, 20 steps), 4 TS50
crops of 60 residues, 4 sampled 60-residue backbones (dpmpp_2m, 10 steps, default settings) and the same with
N(0, 0.5^2) Angstrom noise. Each set is scored with two probe seeds: the spread is the per-sample standard deviation
of Hutchinson's estimate. Bits per dimension are in the models' units (Angstrom; the molecules' type channels are
near point masses, whose density grows as t_min falls, so molecule figures are negative and only comparable at one
t_min).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from molgen.diffusion import naturalness
from molgen.geometry import centre


def measure(label: str, model, x0: Tensor, mask: Tensor | None, steps: int, probes: int) -> dict:
    runs, seconds = [], 0.0
    for seed in (0, 1):
        start = time.perf_counter()
        runs.append(naturalness(model, x0, mask, steps=steps, hutchinson_samples=probes,
                                generator=torch.Generator().manual_seed(seed)))
        seconds = time.perf_counter() - start
    bpd, spread = runs[0], float((runs[0] - runs[1]).abs().mean()) / 2**0.5
    print(f"{label}: {bpd.mean():.3f} bits/dim (sd over states {bpd.std():.3f}, probe sd per state {spread:.3f}); "
          f"{len(x0)} states in {seconds:.1f} s", flush=True)
    return {"states": label, "n": len(x0), "bits_per_dim": float(bpd.mean()), "sd_states": float(bpd.std()),
            "sd_probe": spread, "seconds": seconds}


def molecules(steps: int, probes: int) -> list[dict]:
    from molgen.molecules.data import load_subset
    from molgen.molecules.sampling import load_model, sample_molecules

    model, config = load_model()
    data = load_subset()
    idx = torch.randperm(len(data["n_atoms"]), generator=torch.Generator().manual_seed(0))[:16]
    counts = data["n_atoms"][idx]
    mask = torch.arange(int(counts.max())) < counts[:, None]
    with torch.no_grad():
        x0 = model.encode(data["positions"][idx, : mask.shape[1]], data["types"][idx, : mask.shape[1]], mask)
    rows = [measure(f"QM9 subset, 16 molecules ({counts.float().mean():.1f} atoms)", model, x0, mask, steps, probes)]
    mols = sample_molecules(model, config, 16, solver="dpmpp_2m", steps=20, seed=0)
    counts = torch.tensor([len(m.symbols) for m in mols])
    mask = torch.arange(int(counts.max())) < counts[:, None]
    pos = torch.zeros(*mask.shape, 3)
    types = torch.zeros(mask.shape, dtype=torch.long)
    for i, m in enumerate(mols):
        pos[i, : len(m.symbols)] = torch.as_tensor(m.positions, dtype=torch.float32)
        types[i, : len(m.symbols)] = torch.tensor([model.atom_types.index(s) for s in m.symbols])
    with torch.no_grad():
        x0 = model.encode(pos, types, mask)
    rows.append(measure(f"16 sampled molecules ({counts.float().mean():.1f} atoms)", model, x0, mask, steps, probes))
    return rows


def backbones(steps: int, probes: int) -> list[dict]:
    from molgen.structure.data import TS50_DIR, load_segments
    from molgen.structure.sampling import DEFAULT_CHECKPOINT, load_model, sample_ca

    model = load_model(DEFAULT_CHECKPOINT)
    segments = load_segments([TS50_DIR], min_length=60)[:4]
    ca = centre(torch.stack([torch.from_numpy(s.ca[:60]) for s in segments]))
    names = ", ".join(s.name for s in segments)
    rows = [measure(f"TS50 crops ({names}, first 60)", model, ca, None, steps, probes)]
    x = centre(sample_ca(model, 4, 60, "dpmpp_2m", 10, seed=0))
    rows.append(measure("4 sampled backbones of 60", model, x, None, steps, probes))
    noisy = centre(x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    rows.append(measure("the same + 0.5 A noise", model, noisy, None, steps, probes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="rk4 steps of the probability-flow ODE")
    parser.add_argument("--probes", type=int, default=1, help="Hutchinson probes per stage")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = molecules(args.steps, args.probes) + backbones(args.steps, args.probes)
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "probes": args.probes, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
