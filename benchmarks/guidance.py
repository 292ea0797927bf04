"""Guidance at equal model calls: unguided, best-of-N, DPS (differentiable rewards), FK steering, SVDD-PM.

    nice -n 10 python benchmarks/guidance.py --json results/guidance.json [--tasks gmm,rna_mfe,rna_target]

SVDD-MC (gmm only) uses a value network fitted on 2000 unguided samples (a one-off cost, reported).
Budget per output: SVDD with M candidates and n grid points costs 1 + M (n - 1) model evaluations; best-of-N
and FK get N = K = floor(budget / n) full trajectories (never more calls than SVDD). Tasks:

* ``gmm``: 2-D mixture of 8 Gaussians on a circle (exact denoiser), reward -|x - c|^2 / 2 with c off the
  modes; naturalness = mean log-density under the mixture.
* ``rna_mfe`` / ``rna_target``: the shipped RNA masked-diffusion model (data/sequences/rna_default.pt),
  rewards -MFE and -(bp distance to a target structure) / length; naturalness = NELBO in bits per token under
  the model; diversity = mean pairwise Hamming distance per position.

Each figure is the median (and top-10 % mean) of the final reward over the outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guidance.baselines import best_of_n, dps_sample  # noqa: E402
from guidance.core import prior  # noqa: E402
from guidance.fk import Tilt, fk_sample  # noqa: E402
from guidance.rewards import parse_reward, quadratic  # noqa: E402
from guidance.smc import ResamplePolicy  # noqa: E402
from guidance.svdd import svdd_calls, svdd_sample  # noqa: E402
from guidance.value import VectorValueNet, as_value, fit_value, gaussian_noise  # noqa: E402
from molgen.diffusion import Sampler, get_schedule  # noqa: E402
from molgen.diffusion.analytic import GaussianMixtureDenoiser  # noqa: E402

RNA_TARGET = "." * 8 + "(" * 10 + "." * 6 + ")" * 10 + "." * 8 + "(" * 12 + "...." + ")" * 12 + "." * 30


def pairwise_hamming(tokens: torch.Tensor) -> float:
    n = tokens.shape[0]
    diff = (tokens[:, None] != tokens[None]).double().mean(-1)
    return float(diff.sum() / (n * (n - 1)))


def gmm_task(args: argparse.Namespace) -> dict:
    sched = get_schedule("vp_cosine")
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 3.0 * torch.stack([angles.cos(), angles.sin()], -1)
    model = GaussianMixtureDenoiser(means, 0.3, None, sched)
    reward = quadratic(c=torch.tensor([4.5, 1.5], dtype=torch.float64), tau=1.0)
    smp = Sampler(model, sched, "ddpm_ancestral", steps=args.steps)
    n, m, steps = args.n, args.candidates, smp.n_steps
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
    net = VectorValueNet(2, hidden=64)
    fit_value(net, train.samples, train.rewards, gaussian_noise(sched), steps=1500, batch=256, generator=g)
    res = svdd_sample(smp, prior(smp, n, (2,), g, torch.float64), reward, candidates=m, alpha=0.0,
                      value=as_value(net), generator=g)
    res.info["value_training_model_calls"] = train.model_calls
    runs[f"svdd_mc_{m}"] = res
    return {name: {**res.summary(), **natural(res.samples)} for name, res in runs.items()}


def rna_task(args: argparse.Namespace, spec: str, lam: float) -> dict:
    from molgen.diffusion.discrete import DiscreteSampler
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained

    path = default_checkpoint("rna")
    if not path.exists():
        return {"skipped": f"no checkpoint at {path}"}
    pre = load_pretrained(path)
    reward = parse_reward(spec)
    length = len(RNA_TARGET)
    smp = DiscreteSampler(pre.model, pre.process, "ancestral", steps=args.steps)
    n, m, steps = args.n, args.candidates, smp.n_steps
    per = max(1, svdd_calls(steps, m) // (steps - 1))  # a discrete trajectory costs n_steps - 1 calls
    g = torch.Generator().manual_seed(args.seed)

    def prior_tokens(rows: int) -> torch.Tensor:
        return torch.full((rows, length), pre.process.mask_id, dtype=torch.long)

    def decode(tokens: torch.Tensor) -> list[str]:
        return [pre.alphabet.decode(row) for row in tokens]

    def natural(tokens: torch.Tensor) -> dict:
        with torch.no_grad():
            nelbo = pre.process.nelbo(pre.model, tokens, n_t=4, generator=torch.Generator().manual_seed(0))
        return {"nelbo_bits_per_token": float(nelbo.mean() / (length * math.log(2))),
                "diversity": pairwise_hamming(tokens)}

    with torch.no_grad():
        runs = {
            "unguided": best_of_n(smp, prior_tokens(n), reward, candidates=1, decode=decode, generator=g),
            f"best_of_{per}": best_of_n(smp, prior_tokens(n * per), reward, candidates=per, decode=decode,
                                        generator=g),
            f"fk_{per}": fk_sample(smp, prior_tokens(n * per), particles=per, generator=g, final="best",
                                   tilt=Tilt(reward, lam=lam, decode=decode),
                                   policy=ResamplePolicy("systematic", 1, 0.5)),
            f"svdd_pm_{m}": svdd_sample(smp, prior_tokens(n), reward, candidates=m, alpha=0.0, decode=decode,
                                        generator=g),
        }
    return {name: {**res.summary(), **natural(res.samples)} for name, res in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="gmm,rna_mfe,rna_target")
    p.add_argument("--n", type=int, default=32, help="outputs per method")
    p.add_argument("--candidates", type=int, default=4, help="SVDD's M")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--lam", type=float, default=10.0, help="FK tilt strength for rna_mfe (reward in kcal/mol)")
    p.add_argument("--lam-target", dest="lam_target", type=float, default=100.0,
                   help="FK tilt strength for rna_target (reward in [-1, 0])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out: dict = {"config": vars(args) | {"json": str(args.json)}}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        if task == "gmm":
            out[task] = gmm_task(args)
        elif task == "rna_mfe":
            out[task] = rna_task(args, "rna_mfe", args.lam)
        elif task == "rna_target":
            out[task] = rna_task(args, f"rna_target:{RNA_TARGET}", args.lam_target)
        else:
            raise SystemExit(f"unknown task {task!r}; choose from gmm, rna_mfe, rna_target")
        print(f"== {task} ({time.perf_counter() - t0:.1f} s)")
        for name, row in out[task].items():
            if isinstance(row, dict):
                cols = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                print(f"  {name:14s} {cols}")
            else:
                print(f"  {name}: {row}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
