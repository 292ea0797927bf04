"""Train SVDD-MC's value network for one modality, reward and pretrained model; record the recipe.

    nice -n 10 python -m molgen.guidance.train_value dna --reward jaspar:MA0099.3 --condition enhancer --steps 16 \\
        --samples 256 --fit-steps 400 --out runs/guidance/values/dna_jaspar.pt

Recipe (Li et al. 2024, SVDD-MC): draw ``--samples`` unguided samples of the model with the sampler used for
guidance, score them once, and regress the reward on noisy states x_t ~ q(x_t | x_0) at uniform t
(``guidance.value.fit_value``). The checkpoint card records the command, the model checkpoint (path and
SHA-256, so that a value net of an older snapshot is refused), the model and reward calls spent, the loss and
the wall time. ``load_value`` gives the SVDD ``value`` hook back.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from molgen.checkpoints import hardware, load_checkpoint, save_checkpoint
from molgen.guidance.rewards import parse_reward
from molgen.guidance.tasks import Problem, get_problem, guide
from molgen.guidance.value import as_value, fit_value
from molgen.modalities import names


def train_value(problem: Problem, reward_spec: str, *, samples: int = 256, fit_steps: int = 400, batch: int = 64,
                lr: float = 2e-3, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Fit ``problem.value_net()`` on ``samples`` unguided samples; returns the net and its provenance."""
    reward = parse_reward(reward_spec)
    start = time.perf_counter()
    res = guide(problem, "unguided", reward, samples, seed=seed)
    x0, mask = problem.clean(res)
    net = problem.value_net()
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    losses = fit_value(net, x0, res.rewards, problem.noise, mask=mask, steps=fit_steps, batch=batch, lr=lr,
                       generator=g)
    tail = losses[-max(1, fit_steps // 10):]
    provenance = {
        "model_checkpoint": str(problem.checkpoint), "model_sha256": problem.sha256,
        "reward": reward_spec, "samples": samples, "sampler": problem.settings, "fit_steps": fit_steps,
        "batch": batch, "lr": lr, "seed": seed, "model_calls": res.model_calls, "reward_calls": res.reward_calls,
        "reward_mean": float(res.rewards.mean()), "loss_first": losses[0], "loss_last_10pct": sum(tail) / len(tail),
        "wall_s": round(time.perf_counter() - start, 1), "hardware": hardware(),
    }
    net.eval()
    return net, provenance


def save_value(path: str | Path, net: torch.nn.Module, problem: Problem, provenance: dict, command: str) -> Path:
    config = {"modality": problem.modality, "net": type(net).__name__, "value_shift": net.value_shift,
              "value_scale": net.value_scale}
    return save_checkpoint(path, net.state_dict(), config, provenance={"command": command, **provenance})


def load_value(path: str | Path, problem: Problem, reward_spec: str) -> tuple[Callable[..., Tensor], dict]:
    """The SVDD ``value`` hook of a saved value net (and its card); refuses a net trained for another modality,
    reward or model checkpoint."""
    state, card = load_checkpoint(path)
    cfg, prov = card["config"], card["provenance"]
    if cfg.get("modality") != problem.modality or prov.get("reward") != reward_spec:
        raise ValueError(f"value net {path} was trained for {cfg.get('modality')} / {prov.get('reward')!r}, "
                         f"not {problem.modality} / {reward_spec!r}")
    if prov.get("model_sha256") != problem.sha256:
        raise ValueError(f"value net {path} was trained on another version of {problem.checkpoint}; retrain it")
    net = problem.value_net()
    net.load_state_dict(state)
    net.value_shift, net.value_scale = cfg["value_shift"], cfg["value_scale"]
    return as_value(net.eval()), card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modality", choices=names())
    p.add_argument("--reward", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=16, help="sampler steps (use the guidance run's)")
    p.add_argument("--samples", type=int, default=256, help="unguided samples to regress on")
    p.add_argument("--fit-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped one)")
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--condition", default=None, help="sequence label (e.g. enhancer)")
    p.add_argument("--solver", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = get_problem(args.modality, steps=args.steps, checkpoint=args.checkpoint, length=args.length,
                          condition=args.condition, solver=args.solver)
    net, prov = train_value(problem, args.reward, samples=args.samples, fit_steps=args.fit_steps,
                            batch=args.batch, lr=args.lr, seed=args.seed)
    command = "python -m molgen.guidance.train_value " + shlex.join(sys.argv[1:] if argv is None else argv)
    save_value(args.out, net, problem, prov, command)
    print(f"value net -> {args.out}: loss {prov['loss_first']:.3f} -> {prov['loss_last_10pct']:.3f}, "
          f"{prov['model_calls']} model calls, {prov['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
