"""Reward fine-tuning of a continuous model at equal reward calls: MixGRPO (a policy gradient on stochastic
steps inside a window that slides over the grid, deterministic steps elsewhere) against reward-weighted
denoising fine-tuning on as many scored samples from the shipped model, and the shipped model itself.

Per method: the reward of fresh samples from the resulting model on the ``--preset`` sampler (campaigns' guided
one by default; mean and top-10 % mean over ``--n``), their naturalness (the modality's metrics), the reward
calls, the model calls and the seconds the fine-tuning took. Each fine-tuning sees ``--iterations x --groups x
--group-size`` scored samples; MixGRPO's rollouts use the same grid.

    python benchmarks/mixgrpo.py --modality molecules --reward qed --json OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def unguided(problem: Any, model: torch.nn.Module, reward: Any, n: int, seed: int) -> Any:
    """``n`` samples of ``model`` on the problem's sampler, scored (``molgen.guidance.tasks.guide``, unguided)."""
    from molgen.guidance.tasks import guide

    sampler = dataclasses.replace(problem.sampler, model=model)
    return guide(dataclasses.replace(problem, sampler=sampler), "unguided", reward, n, seed=seed)


def fresh(problem: Any, model: torch.nn.Module, reward: Any, n: int, seed: int) -> dict[str, Any]:
    """Reward (mean, top-10 % mean) and naturalness of ``n`` fresh samples of ``model``."""
    res = unguided(problem, model, reward, n, seed)
    r = np.sort(res.rewards.double().numpy())
    return {"reward_mean": float(r.mean()), "reward_top10_mean": float(r[-max(1, len(r) // 10):].mean()),
            **problem.natural(res)}


def main(argv: list[str] | None = None) -> int:
    from molgen.finetune import FinetuneSettings, GRPOSettings, finetune_continuous, mixgrpo
    from molgen.guidance.rewards import parse_reward
    from molgen.guidance.tasks import get_problem

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modality", default="molecules", choices=["molecules", "backbones"])
    p.add_argument("--reward", default="qed")
    p.add_argument("--preset", default="guided", help="the modality's sampler preset (its grid; fresh samples)")
    p.add_argument("--steps", type=int, default=10, help="grid points of the sampler (model calls per sample)")
    p.add_argument("--iterations", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--window", type=int, default=GRPOSettings.window)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's rate (0.003: the best of 0.001-0.01 here)")
    p.add_argument("--kl-weight", type=float, default=GRPOSettings.kl_weight)
    p.add_argument("--n", type=int, default=256, help="fresh samples per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = get_problem(args.modality, steps=args.steps, preset=args.preset)
    reward = parse_reward(args.reward)
    budget = args.iterations * args.groups * args.group_size
    base = problem.sampler.model
    rows = [{"method": "shipped", "reward_calls": 0, "model_calls": 0, "seconds": 0.0,
             **fresh(problem, base, reward, args.n, args.seed + 1)}]

    t0 = time.perf_counter()
    settings = GRPOSettings(iterations=args.iterations, groups=args.groups, group_size=args.group_size,
                            window=args.window, lr=args.lr, kl_weight=args.kl_weight, seed=args.seed)
    tuned, report = mixgrpo(problem.sampler, problem.draw, reward, problem.decode, settings, penalty=reward.penalty)
    rows.append({"method": "mixgrpo", "reward_calls": report.data_size, "model_calls": report.model_calls,
                 "seconds": round(time.perf_counter() - t0, 1), "kl": report.kl, "rolled_back": len(report.rolled_back),
                 "reward_per_iteration": report.reward_means, **fresh(problem, tuned, reward, args.n, args.seed + 1)})

    t0 = time.perf_counter()
    shipped = unguided(problem, base, reward, budget, args.seed)
    x0, mask = problem.clean(shipped)
    scores = shipped.rewards.double()
    weighted, wreport = finetune_continuous(base, problem.sampler, x0, mask, scores,
                                            FinetuneSettings(seed=args.seed), penalty=reward.penalty)
    rows.append({"method": "reward_weighted", "reward_calls": budget, "seconds": round(time.perf_counter() - t0, 1),
                 "model_calls": wreport.model_calls + budget * args.steps,
                 "kl": wreport.kl, "rolled_back": len(wreport.rolled_back),
                 **fresh(problem, weighted, reward, args.n, args.seed + 1)})
    out = {"rows": rows, "settings": vars(args)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "reward_per_iteration"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
