"""Training: Lightning module with EMA, size-bucketed batches, resumable checkpoints.

Run (resumes from ``RUN_DIR/last.ckpt`` when it exists, so re-running the same command continues):

    nice -n 10 python -m molgen.molecules.train --data qm9 --run-dir runs/molecules/qm9_x0 --threads 1

Every ``--ckpt-minutes`` it writes ``last.ckpt`` (full state) and ``ema.pt`` + ``ema.json`` (EMA weights as a
molgen checkpoint with its card; load with ``molgen.molecules.sampling.load_model``); with ``--keep-exports`` also
``exports/step_N.pt`` + ``.json`` (every export, for ``benchmarks/molecule_training.py``).

Flow-matching recipe (all off by default): ``--schedule linear_flow`` (x_t = (1 - t) x0 + t eps, still an x0
model), ``--coupling ot`` (equivariant OT coupling of each molecule's noise, ``molgen.molecules.coupling``),
``--time-beta 2`` (t ~ Beta(1, 2): density 2 (1 - t), falling from the data end to zero at pure noise) and
``--init CKPT`` (start a new run from a molgen checkpoint's weights, e.g. the shipped model):

    nice -n 5 python -m molgen.molecules.train --data qm9 --run-dir runs/molecules/qm9_flow_ot --threads 1 \
        --schedule linear_flow --coupling ot --time-beta 2 --init data/molecules/qm9_egnn.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from molgen.batching import ResumableLoader, SizeBucketBatches
from molgen.checkpoints import hardware, read_init, save_checkpoint
from molgen.ema import ema_update
from molgen.geometry import centre
from molgen.molecules.coupling import ot_couple
from molgen.molecules.data import (
    MAX_ATOMS,
    PROPERTY_NAMES,
    atom_count_histogram,
    load_dataset,
    property_stats,
)
from molgen.molecules.model import MoleculeDenoiser
from molgen.optim import lr_factor

MODEL_KEYS = (
    "hidden",
    "edge_hidden",
    "layers",
    "n_rbf",
    "rbf_max",
    "schedule",
    "sigma_data",
    "type_scale",
    "charge_scale",
    "feature_var",
    "properties",
    "self_condition",
)
ZERO_INIT = ("sc_node", "sc_edge")  # the zero-initialised self-conditioning weights a warm start may lack


class MoleculeSet(torch.utils.data.Dataset):
    """Index -> (positions [n,3], types [n], normalised props [P]) for a processed data set."""

    def __init__(self, data: dict, prop_idx: list[int], prop_mean: Tensor, prop_std: Tensor) -> None:
        self.data, self.prop_idx = data, prop_idx
        self.prop_mean, self.prop_std = prop_mean, prop_std

    def __len__(self) -> int:
        return len(self.data["n_atoms"])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        n = int(self.data["n_atoms"][i])
        props = (self.data["props"][i, self.prop_idx] - self.prop_mean) / self.prop_std
        return self.data["positions"][i, :n], self.data["types"][i, :n], props


def collate(items: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
    """Pad to the largest molecule in the batch; mask marks real atoms."""
    n = max(len(p) for p, _, _ in items)
    b = len(items)
    pos = torch.zeros(b, n, 3)
    types = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, (p, t, _) in enumerate(items):
        pos[i, : len(p)], types[i, : len(t)], mask[i, : len(p)] = p, t, True
    return {"positions": pos, "types": types, "mask": mask, "props": torch.stack([c for _, _, c in items])}


def sample_times(u: Tensor, t_min: float, t_max: float, beta: float = 1.0) -> Tensor:
    """Training times from uniforms u: t = t_min + (t_max - t_min) s with s ~ Beta(1, beta), i.e.
    s = 1 - (1 - u)^(1 / beta) (density beta (1 - s)^(beta - 1); beta = 1: uniform, beta > 1: near the data)."""
    s = u if beta == 1.0 else 1.0 - (1.0 - u).pow(1.0 / beta)
    return t_min + (t_max - t_min) * s


class MoleculeDiffusion(L.LightningModule):
    """Denoiser + EMA copy; loss from ``MoleculeDenoiser.loss`` at t ~ t_min + (t_max - t_min) Beta(1, time_beta)
    of the schedule, with independent or OT-coupled noise (``coupling``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        self.net = MoleculeDenoiser(**{k: config[k] for k in MODEL_KEYS})
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self._t0 = time.time()
        self._step0 = 0
        self.seconds_before = 0.0  # training wall time of earlier processes (restored from the checkpoint)

    def on_train_start(self) -> None:
        self._t0, self._step0 = time.time(), self.global_step

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        pos, types, mask = batch["positions"], batch["types"], batch["mask"]
        b = pos.shape[0]
        x0 = self.net.encode(pos, types, mask)
        sched = self.net.schedule
        t = sample_times(torch.rand(b, device=pos.device), sched.t_min, sched.t_max, self.config["time_beta"])
        eps = torch.randn_like(x0) * mask.unsqueeze(-1)
        eps = torch.cat([centre(eps[..., :3], mask), eps[..., 3:]], -1)
        if self.config["coupling"] == "ot":
            eps = ot_couple(x0, eps, mask, self.config["ot_rounds"])
        props = batch["props"] if self.net.properties else None
        drop = torch.rand(b, device=pos.device) < self.config["cond_drop"] if props is not None else None
        self_cond = self.net.self_conditioning and float(torch.rand(())) < self.config["self_cond_rate"]
        out = self.net.loss(x0, types, mask, t, eps, props, drop, self.config["type_weight"], self_cond)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=False, batch_size=b)
        step = self.global_step
        if step % self.config["print_every"] == 0:
            rate = (step - self._step0 + 1) / max(time.time() - self._t0, 1e-9)
            print(
                f"step {step} epoch {self.current_epoch} loss {out['loss'].item():.4f} "
                f"pos {out['pos'].item():.4f} "
                f"ce {out['type_ce'].item():.4f} lr {self.optimizers().param_groups[0]['lr']:.2e} "
                f"({rate:.2f} steps/s this process)",
                flush=True,
            )
        if not torch.isfinite(out["loss"]):
            print(f"step {step}: non-finite loss, batch skipped", flush=True)
            return None
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        ema_update(self.ema, self.net, self.global_step, self.config["ema_decay"])

    def configure_optimizers(self):
        cfg = self.config
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, cfg["warmup_steps"], cfg["decay_steps"], decay_start=cfg["decay_start"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_seconds(self) -> float:
        """Total training wall time over all processes of this run."""
        return self.seconds_before + time.time() - self._t0

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.seconds_before = float(checkpoint.get("train_seconds", 0.0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["train_seconds"] = self.train_seconds()
        run_dir = Path(self.config["run_dir"])
        export_ema(self, run_dir / "ema.pt")
        if self.config.get("keep_exports"):
            export_ema(self, run_dir / "exports" / f"step_{self.global_step}.pt")


def model_config(module: MoleculeDiffusion) -> dict[str, Any]:
    """Everything needed to rebuild the denoiser and sample from it (atom-count histogram, property stats)."""
    cfg = module.config
    return {
        **{k: cfg[k] for k in MODEL_KEYS},
        "properties": list(cfg["properties"]),
        "atom_hist": cfg["atom_hist"],
        "prop_mean": cfg["prop_mean"],
        "prop_std": cfg["prop_std"],
        "max_atoms": MAX_ATOMS,
    }


def export_ema(module: MoleculeDiffusion, path: Path, metrics: dict | None = None) -> Path:
    """Write the EMA weights with a card (training command, data, steps, wall time, hardware)."""
    cfg = module.config
    provenance = {
        "training_command": cfg["command"],
        "data": cfg["data_desc"],
        "global_step": int(module.global_step),
        "epoch": int(module.current_epoch),
        "train_wall_s": round(module.train_seconds(), 1),
        "hardware": f"{hardware()}, {module.trainer.precision}",
        "metrics": metrics or {},
    }
    for key in ("init", "distilled_from"):  # a warm start's checkpoint, a distilled student's teacher and pairs
        if cfg.get(key):
            provenance[key] = cfg[key]
    return save_checkpoint(path, module.ema.state_dict(), model_config(module), provenance=provenance)


DEFAULTS: dict[str, Any] = {
    "hidden": 128,
    "edge_hidden": 64,
    "layers": 6,
    "n_rbf": 24,
    "rbf_max": 4.0,
    "schedule": "vp_cosine",
    "sigma_data": 1.4,
    "type_scale": 0.25,
    "charge_scale": 0.1,
    "feature_var": 0.05,
    "properties": ["gap"],
    "cond_drop": 0.1,
    "type_weight": 1.0,
    "lr": 1e-3,
    "weight_decay": 1e-12,
    "warmup_steps": 500,
    "decay_start": 0,
    "decay_steps": 0,
    "ema_decay": 0.999,
    "batch_size": 64,
    "grad_clip": 1.0,
    "seed": 0,
    "print_every": 50,
    "coupling": "independent",
    "ot_rounds": 2,
    "time_beta": 1.0,
    "self_condition": False,
    "self_cond_rate": 0.5,
}
CHOICES: dict[str, tuple[str, ...]] = {"coupling": ("independent", "ot")}


COOL_DOWN_KEYS = ("decay_start", "decay_steps")  # may be set when resuming: branch a cool-down off any checkpoint


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m molgen.molecules.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="subset", choices=["qm9", "subset"], help="qm9 needs molgen[qm9]")
    p.add_argument("--run-dir", default="runs/molecules/default", help="checkpoints and logs (resumes from here)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimiser steps (-1: never)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time")
    p.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint interval")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="32-true",
                   help="Lightning precision: 32-true, or bf16-mixed for a GPU window (checkpoints stay float32)")
    p.add_argument("--init", default=None, help="start a new run from this molgen checkpoint's weights")
    p.add_argument("--keep-exports", action="store_true", help="also keep every EMA export as exports/step_N.pt")
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            p.add_argument(flag, nargs="*", default=value, choices=list(PROPERTY_NAMES))
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif key in COOL_DOWN_KEYS:  # None: keep the run's stored value (or the default)
            p.add_argument(flag, type=int, default=None, help=f"given again on resume, overrides (default {value})")
        else:
            p.add_argument(flag, type=type(value), default=value, choices=CHOICES.get(key))
    return p


def legacy_batches_done(ckpt_path: Path) -> int | None:
    """Batches of the interrupted epoch done by a Lightning checkpoint written before the loader was resumable
    (it has no loader state); None when it has one (Lightning restores that)."""
    fit = torch.load(ckpt_path, map_location="cpu", weights_only=True)["loops"]["fit_loop"]
    if fit["state_dict"].get("combined_loader"):
        return None
    return int(fit["epoch_loop.batch_progress"]["current"]["ready"])


def warm_start(module: MoleculeDiffusion, state: dict[str, Tensor], init_config: dict[str, Any]) -> None:
    """Load weights into the network and its EMA; the architecture and feature scales must match (the schedule
    may differ: the denoiser sees lambda and scale-free inputs, so an x0 model keeps its predictions)."""
    keys = [k for k in MODEL_KEYS if k not in ("schedule", "self_condition")]
    diff = {k: (init_config.get(k), module.config[k]) for k in keys if init_config.get(k) != module.config[k]}
    if diff:
        raise ValueError(f"--init checkpoint differs from this run in {diff} (checkpoint, run)")
    for net in (module.net, module.ema):
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if k.split(".")[0] not in ZERO_INIT] + list(unexpected)
        if bad:
            raise ValueError(f"--init checkpoint's weights do not fit this run (mismatched keys {bad[:4]})")


def train(args: argparse.Namespace) -> Path:
    """Train (or resume) and return the run directory."""
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in DEFAULTS}
    config_path = run_dir / "config.json"
    if config_path.exists():  # resuming: the stored config wins, except a cool-down given on this command line
        stored = json.loads(config_path.read_text())
        keep = [k for k in DEFAULTS if k in stored and (k not in COOL_DOWN_KEYS or config[k] is None)]
        config.update({k: stored[k] for k in keep})
    config.update({k: DEFAULTS[k] for k in COOL_DOWN_KEYS if config[k] is None})
    L.seed_everything(config["seed"], workers=True)
    data = load_dataset(args.data, "train")
    prop_idx = [PROPERTY_NAMES.index(p) for p in config["properties"]]
    mean, std = property_stats(data["props"][:, prop_idx]) if prop_idx else (torch.zeros(0), torch.ones(0))
    config.update(
        {
            "run_dir": str(run_dir),
            "keep_exports": args.keep_exports,
            "command": " ".join([getattr(args, "prog", "python -m molgen.molecules.train"), *sys.argv[1:]]),
            "data_desc": f"{args.data} train split ({len(data['n_atoms'])} molecules, "
            f"{len(data.get('skipped', []))} skipped with unrepresentable atoms)",
            "atom_hist": atom_count_histogram(data["n_atoms"]).tolist(),
            "prop_mean": mean.tolist(),
            "prop_std": std.tolist(),
        }
    )
    init = read_init(args.init) if args.init else None
    if init:
        config["init"] = init[2]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    dataset = MoleculeSet(data, prop_idx, mean, std)
    loader = ResumableLoader(
        dataset,
        batch_sampler=SizeBucketBatches(data["n_atoms"], config["batch_size"], config["seed"]),
        collate_fn=collate,
        num_workers=0,
    )
    module = MoleculeDiffusion(config)
    if init and not (run_dir / "last.ckpt").exists():
        warm_start(module, init[0], init[1])
    fit(module, loader, run_dir, args)
    return run_dir


def fit(module: L.LightningModule, loader: ResumableLoader, run_dir: Path, args: argparse.Namespace) -> None:
    """Fit ``module`` on ``loader``, resuming from ``run_dir/last.ckpt`` and writing it every ``args.ckpt_minutes``
    (and at the end); ``args`` also gives max_steps, max_minutes, accelerator and precision."""
    last = run_dir / "last.ckpt"
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir,
        save_last=True,
        save_top_k=0,
        train_time_interval=timedelta(minutes=args.ckpt_minutes),
        enable_version_counter=False,  # always last.ckpt, also in a copied (branched) run directory
    )
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_steps=args.max_steps,
        max_epochs=-1,
        max_time=timedelta(minutes=args.max_minutes) if args.max_minutes else None,
        accelerator=args.accelerator,
        precision=args.precision,
        devices=1,
        gradient_clip_val=module.config["grad_clip"],
        callbacks=[ckpt],
        logger=L.pytorch.loggers.CSVLogger(run_dir, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
    )
    if last.exists() and (done := legacy_batches_done(last)) and done < len(loader.batch_sampler):
        loader.batch_sampler.load_state_dict({"served": done})
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    trainer.save_checkpoint(last, weights_only=False)  # the full state: a rerun resumes it


def main(argv: list[str] | None = None) -> int:
    train(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
