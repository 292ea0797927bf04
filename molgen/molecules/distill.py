"""Few-step students by rectified diffusion (Wang et al. 2024, "Rectified Diffusion") with a hand-over: the
model is fine-tuned on its own deterministic sampler's noise-sample pairs where its few-step solve goes wrong
(high noise), and keeps its own denoiser where it is already precise (low noise).

The teacher's ODE sampler maps the state z at its first call (time t_a, sigma/alpha = ``first_noise``) to a
molecule f(z). On the line through both,

    x_t = alpha_t f(z) + sigma_t e,   e = (z - alpha_a f(z)) / sigma_a,   t in [t_min, t_a],

the x0 a DDIM step needs is f(z) at every t, and a DDIM step from x_t to x_s with the estimate f(z) stays on the
line (x_s = alpha_s f(z) + sigma_s (x_t - alpha_t f(z)) / sigma_t): a student that has learned f(z) on the lines
is integrated exactly in any number of calls. Learning f(z) to the picometres that EDM's stability needs is far
beyond a few CPU-hours, so below sigma/alpha = ``handover`` the student is instead trained towards the teacher's
own estimate at the same x_t: it keeps the teacher's precise last steps, and the straight lines serve the first
calls, where a few-step solve of the teacher's curved ODE lands on blurred structures. The student then samples
with the teacher's sampler (``sample_molecules``' defaults). Rotations of a pair are pairs (the teacher is
equivariant), so every batch is rotated at random. Pairs come from ``sample_states`` with the teacher's default
ODE settings and are written in shards, so a killed job keeps what it made.

    python -m molgen.molecules.distill pairs --run-dir runs/molecules/student --n 16384 --steps 50
    python -m molgen.molecules.distill train --run-dir runs/molecules/student --max-minutes 120
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from molgen.batching import ResumableLoader, SizeBucketBatches
from molgen.checkpoints import read_init, sha256_file
from molgen.diffusion.schedules import Schedule
from molgen.geometry import centre
from molgen.molecules.model import MoleculeDenoiser
from molgen.molecules.sampling import DEFAULT_CHECKPOINT, FIRST_NOISE, load_model, sample_states
from molgen.molecules.train import DEFAULTS as TRAIN_DEFAULTS
from molgen.molecules.train import MODEL_KEYS, MoleculeDiffusion, fit, warm_start
from molgen.progress import progress

MANIFEST = "pairs.json"
PAIR_KEYS = ("z", "x0", "types", "mask")


def random_rotations(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` uniform random rotations [n, 3, 3]: Q of a Gaussian matrix's QR with the signs of R's diagonal
    moved into Q (Haar on O(3)), then a column flipped where det = -1."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q[..., 2] *= torch.det(q).sign().unsqueeze(-1)
    return q.to(dtype)


def harden(model: MoleculeDenoiser, x0: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A sampled state as training data: (state with one-hot types re-encoded, type indices)."""
    types = model.decode_types(x0)
    return model.encode(x0[..., :3], types, mask), types


def line_noise(schedule: Schedule, z: Tensor, x0: Tensor, t_a: Tensor) -> Tensor:
    """e = (z - alpha_a x0) / sigma_a: the noise that puts z on the line x_t = alpha_t x0 + sigma_t e at t_a
    ([B]; z, x0 [B, ...])."""
    t64 = t_a.to(torch.float64)
    shape = (-1,) + (1,) * (z.ndim - 1)
    a, s = (v.to(z.dtype).view(shape) for v in (schedule.alpha(t64), schedule.sigma(t64)))
    return (z - a * x0) / s


def line_times(u: Tensor, schedule: Schedule, first_noise: float) -> Tensor:
    """Training times from uniforms u, uniform in log(sigma/alpha) between the schedule's end and
    ``first_noise`` (where the logSNR grid puts a sampler's calls)."""
    lo = math.log(float(schedule.rho(torch.tensor(schedule.t_min, dtype=torch.float64))))
    hi = math.log(first_noise)
    return schedule.t_of_rho(torch.exp(lo + (hi - lo) * u.double())).to(u.dtype)


def check_variance_preserving(model: MoleculeDenoiser) -> None:
    """The pairs' first state is the sampler's noise only where the prior needs no carrying (VP schedules)."""
    t = torch.linspace(model.schedule.t_min, model.schedule.t_max, 5, dtype=torch.float64)
    if not torch.allclose(model.schedule.alpha(t) ** 2 + model.schedule.sigma(t) ** 2, torch.ones_like(t)):
        raise ValueError("distillation needs a variance-preserving teacher (its noise is the state at the first "
                         "call); this model's schedule is not")


@torch.no_grad()
def make_pairs(run_dir: Path, teacher: Path, n: int, *, shard: int = 1024, steps: int = 50, seed: int = 0,
               batch_size: int = 256, part: tuple[int, int] = (0, 1)) -> list[Path]:
    """Teacher pairs in ``run_dir/pairs/shard_K.pt`` ({"z", "x0", "types", "mask"}, padded to the model's
    maximum atoms), shard K from seed ``seed + K``; existing shards are kept, so a rerun continues, and
    ``part=(i, w)`` makes only the shards K = i mod w (w processes share the work). The manifest ``pairs.json``
    records the teacher (path, sha256) and its sampler; a rerun with other settings is refused."""
    folder = run_dir / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"teacher": str(teacher), "teacher_sha256": sha256_file(teacher), "steps": steps, "seed": seed,
                "shard": shard, "first_noise": FIRST_NOISE, "solver": "dpmpp_2m"}
    path = run_dir / MANIFEST
    if path.exists():
        stored = json.loads(path.read_text())
        stored_keys = {k: stored.get(k) for k in manifest}
        if stored_keys != manifest:
            raise ValueError(f"{path} was made with {stored_keys}, not {manifest}: use another --run-dir")
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    model, config = load_model(teacher)
    check_variance_preserving(model)
    width = int(config.get("max_atoms", 29))
    mine = [k for k in range(math.ceil(n / shard)) if k % part[1] == part[0]]
    for k in progress(mine, desc="teacher pairs (shards)"):
        out = folder / f"shard_{k}.pt"
        if out.exists():
            continue
        z = torch.zeros(shard, width, model.n_features)
        x0 = torch.zeros_like(z)
        types = torch.zeros(shard, width, dtype=torch.long)
        mask = torch.zeros(shard, width, dtype=torch.bool)
        for chunk in sample_states(model, config, shard, solver=manifest["solver"], steps=steps, seed=seed + k,
                                   batch_size=batch_size):
            w = chunk.mask.shape[1]
            hard, kinds = harden(model, chunk.x0, chunk.mask)
            z[chunk.index, :w], x0[chunk.index, :w] = chunk.x_T, hard
            types[chunk.index, :w], mask[chunk.index, :w] = kinds, chunk.mask
        tmp = out.with_suffix(".tmp")
        torch.save(dict(zip(PAIR_KEYS, (z, x0, types, mask))), tmp)
        tmp.replace(out)
    return [folder / f"shard_{k}.pt" for k in mine]


def load_pairs(run_dir: Path) -> dict[str, Tensor]:
    """Every finished shard of ``run_dir/pairs`` concatenated; a shard that cannot be read is named on stderr and
    left out (delete it and rerun ``distill pairs`` to make it again)."""
    shards = sorted((run_dir / "pairs").glob("shard_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    parts = []
    for path in shards:
        try:
            part = torch.load(path, weights_only=True)
            if not isinstance(part, dict) or set(part) != set(PAIR_KEYS):
                raise ValueError(f"holds {sorted(part) if isinstance(part, dict) else type(part).__name__}, "
                                 f"not {list(PAIR_KEYS)}")
        except Exception as err:  # noqa: BLE001 - any unreadable shard is skipped, by name
            print(f"skipped teacher pairs {path}: {err}", file=sys.stderr)
            continue
        parts.append(part)
    if not parts:
        raise FileNotFoundError(f"no readable teacher pairs in {run_dir / 'pairs'}: run `distill pairs` first")
    return {k: torch.cat([p[k] for p in parts]) for k in PAIR_KEYS}


class PairSet(torch.utils.data.Dataset):
    """Index -> one pair, trimmed to its atoms."""

    def __init__(self, pairs: Mapping[str, Tensor]) -> None:
        self.pairs = pairs
        self.sizes = pairs["mask"].sum(1)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = int(self.sizes[i])
        return {k: v[i, :n] for k, v in self.pairs.items()}


def collate_pairs(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack pairs of one size bucket (equal atom counts)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class StudentDiffusion(MoleculeDiffusion):
    """``MoleculeDiffusion`` on teacher pairs, each pair randomly rotated, at t = ``line_times`` on the lines
    x_t = alpha_t f(z) + sigma_t e (``line_noise``): above sigma/alpha = ``handover`` the output is trained towards
    f(z), below it towards the frozen ``teacher``'s own estimate at x_t, so that the student keeps the teacher's
    low-noise denoiser (its precise last steps) and learns the lines only where the teacher's few-step solve goes
    wrong. Unconditional (the pairs were sampled without properties)."""

    def __init__(self, config: dict[str, Any], teacher: MoleculeDenoiser) -> None:
        super().__init__(config)
        self.teacher = teacher.requires_grad_(False).eval()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x0, types, mask, eps, t = on_lines(batch, self.net.schedule, self.config["first_noise"])
        target, types = handover_targets(self.teacher, x0, types, mask, eps, t, self.config["handover"])
        out = self.net.loss(x0, types, mask, t, eps, None, None, self.config["type_weight"], target=target)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=False, batch_size=len(t))
        if self.global_step % self.config["print_every"] == 0:
            print(f"step {self.global_step} loss {out['loss'].item():.4f} pos {out['pos'].item():.4f} "
                  f"ce {out['type_ce'].item():.4f}", flush=True)
        return out["loss"]


def on_lines(batch: Mapping[str, Tensor], schedule: Schedule, first_noise: float,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A batch of pairs, randomly rotated, as (x0, types, mask, line noise e, times t ~ ``line_times``)."""
    z, x0, types, mask = batch["z"], batch["x0"], batch["types"], batch["mask"]
    b = z.shape[0]
    rot = random_rotations(b, generator, dtype=z.dtype).to(z.device)
    z = torch.cat([z[..., :3] @ rot, z[..., 3:]], -1)
    x0 = torch.cat([centre(x0[..., :3] @ rot, mask), x0[..., 3:]], -1)
    t_a = schedule.t_of_rho(torch.full((b,), first_noise, dtype=torch.float64)).to(z.dtype)
    eps = line_noise(schedule, z, x0, t_a) * mask.unsqueeze(-1)
    t = line_times(torch.rand(b, generator=generator).to(z.device), schedule, first_noise)
    return x0, types, mask, eps, t


@torch.no_grad()
def handover_targets(teacher: MoleculeDenoiser, x0: Tensor, types: Tensor, mask: Tensor, eps: Tensor, t: Tensor,
                     handover: float) -> tuple[Tensor, Tensor]:
    """The student's (x0 target, type targets) at x_t = alpha_t x0 + sigma_t eps: the pair's own above
    sigma/alpha = ``handover``, the teacher's estimate at x_t (and its argmax types) below; the teacher runs on
    the rows below only."""
    low = teacher.schedule.rho(t.to(torch.float64)) < handover
    target, kinds = x0.clone(), types.clone()
    if low.any():
        c = teacher.coefficients(t[low])
        own = teacher(c["alpha"] * x0[low] + c["sigma"] * eps[low], t[low], mask=mask[low])
        target[low], kinds[low] = own, teacher.decode_types(own)
    return target, kinds


STUDENT_DEFAULTS: dict[str, Any] = {"lr": 2e-4, "warmup_steps": 100, "batch_size": 64, "ema_decay": 0.999,
                                     "handover": 0.5}


def student_config(run_dir: Path, teacher_config: Mapping[str, Any], args: argparse.Namespace,
                   n_pairs: int) -> dict[str, Any]:
    """The run's config: the teacher's model and sampling statistics, the training defaults with the student's
    overrides, the pairs' first noise level and their source (on the card's provenance)."""
    manifest = json.loads((run_dir / MANIFEST).read_text())
    config = {**TRAIN_DEFAULTS, **{k: teacher_config[k] for k in MODEL_KEYS if k in teacher_config}}
    config.update({k: getattr(args, k) for k in STUDENT_DEFAULTS})
    config.update({
        "run_dir": str(run_dir),
        "keep_exports": args.keep_exports,
        "command": " ".join(["python -m molgen.molecules.distill", *sys.argv[1:]]),
        "data_desc": f"{n_pairs} teacher pairs ({manifest['steps']}-call {manifest['solver']} from "
                     f"sigma/alpha {manifest['first_noise']} A) of {manifest['teacher']} "
                     f"(sha256 {manifest['teacher_sha256'][:12]})",
        "atom_hist": teacher_config["atom_hist"],
        "prop_mean": teacher_config.get("prop_mean", []),
        "prop_std": teacher_config.get("prop_std", []),
        "first_noise": manifest["first_noise"],
        "distilled_from": {"path": manifest["teacher"], "sha256": manifest["teacher_sha256"],
                           "steps": manifest["steps"]},
    })
    return config


def train_student(args: argparse.Namespace) -> Path:
    """Fine-tune (or resume) the student on the run's pairs; returns the run directory."""
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    manifest = json.loads((run_dir / MANIFEST).read_text())
    state, teacher_config, summary = read_init(manifest["teacher"])
    pairs = PairSet(load_pairs(run_dir))
    config = student_config(run_dir, teacher_config, args, len(pairs))
    config["init"] = summary
    start = state
    if args.init:  # an earlier student's weights (the teacher stays the pairs' one)
        start, _, config["init"] = read_init(args.init)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    loader = ResumableLoader(pairs, batch_sampler=SizeBucketBatches(pairs.sizes, config["batch_size"], config["seed"]),
                             collate_fn=collate_pairs, num_workers=0)
    module = StudentDiffusion(config, load_model(manifest["teacher"])[0])
    if not (run_dir / "last.ckpt").exists():
        warm_start(module, start, teacher_config)
    fit(module, loader, run_dir, args)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m molgen.molecules.distill", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pairs = sub.add_parser("pairs", help="teacher (noise, molecule) pairs, in resumable shards")
    pairs.add_argument("--run-dir", required=True)
    pairs.add_argument("--teacher", default=str(DEFAULT_CHECKPOINT))
    pairs.add_argument("--n", type=int, default=16384)
    pairs.add_argument("--shard", type=int, default=1024)
    pairs.add_argument("--steps", type=int, default=50, help="the teacher's model calls per molecule")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--part", default="0/1", help="I/W: make only the shards K = I mod W (W processes share)")
    pairs.add_argument("--threads", type=int, default=1)
    train = sub.add_parser("train", help="fine-tune the student on the pairs (resumes from RUN_DIR/last.ckpt)")
    train.add_argument("--run-dir", required=True)
    train.add_argument("--max-steps", type=int, default=-1)
    train.add_argument("--max-minutes", type=float, default=None)
    train.add_argument("--ckpt-minutes", type=float, default=5.0)
    train.add_argument("--threads", type=int, default=1)
    train.add_argument("--accelerator", default="auto")
    train.add_argument("--precision", default="32-true")
    train.add_argument("--keep-exports", action="store_true")
    train.add_argument("--init", default=None, help="start from this checkpoint instead of the teacher")
    for key, value in STUDENT_DEFAULTS.items():
        train.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    if args.command == "pairs":
        torch.set_num_threads(args.threads)
        make_pairs(Path(args.run_dir), Path(args.teacher), args.n, shard=args.shard, steps=args.steps,
                   seed=args.seed, part=tuple(int(v) for v in args.part.split("/")))
    else:
        train_student(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
