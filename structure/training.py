"""Lightning training of the backbone denoiser with EDM's loss, an EMA copy, resumable checkpoints.

Loss (Karras et al. 2022): ln sigma ~ N(ln s_d + p_mean, p_std^2), x = x0 + sigma eps (eps zero-centred),
L = lambda(sigma) |D(x; sigma) - x0|^2 / (3 n) with lambda = (sigma^2 + s_d^2) / (sigma s_d)^2, plus, at
sigma < s_d / 2, the squared error of the predicted CA-CA distances for sequence neighbours |i - j| <= 4
weighted by max(lambda(sigma), 1 A^-2). With weight 1 (``local_weight="flat"``, the first shipped runs) the
distance term vanishes next to the coordinate term as sigma -> 0 (its errors scale as sigma^2 while lambda
scales as 1 / sigma^2), exactly where the final bond lengths are set; max(lambda, 1) gives it the coordinate
term's weighting below sigma ~ 1 A and keeps weight 1 between 1 A and s_d / 2.

Contact loss (``contact_weight`` > 0; FrameFlow's auxiliary pair-distance loss, for CA): the same low-noise gating
and weight as the local term, on the predicted distances of pairs |i - j| > 4 that lie within ``CONTACT_CUTOFF``
in the data (strand partners at 4.4-5.5 A, packed helices at 8-10 A): the long-range distances that make a
sheet, which the coordinate error averages away among the many distant pairs.

Chains whose coordinates are rounded to 0.1 A (the CA-only SCOPe set) carry no loss at sigma below
``data.ROUNDED_SIGMA``: there the rounding error would be a sizeable part of the target.

Secondary-structure conditioning (a model with ``ss_condition``) is trained classifier-free: each chain is
given nothing (probability ``SS_DROP[0]``), its P-SEA composition (``SS_DROP[1]``), or its composition and
per-residue labels (the rest).

Self-conditioning (a model with ``self_condition``): half the batches (``SELF_COND_RATE``) first denoise
without gradients and give that estimate to the trained call as ``self_cond`` (Chen et al. 2022).

Warm start (``init``): a new run can start from exported weights whose config lacks the zero-initialised
extensions of ``structure.model`` (``fine_rbf``, ``local_coord``, ``bond_feature``, ``ss_condition``); the
extended model computes the same function at step 0.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from molgen.ema import ema_update
from molgen.geometry import centre
from molgen.optim import lr_factor
from molgen.progress import bars_enabled
from molgen.structure.data import (
    ROUNDED_SIGMA,
    CropBatch,
    Segment,
    crop_batch,
    held_out_split,
    load_backbones,
    segments_of,
)
from molgen.structure.model import BackboneDenoiser, ModelConfig, safe_norm
from molgen.structure.sse import UNKNOWN_SS, composition_of

LOCAL_OFFSETS = (1, 2, 3, 4)
CONTACT_CUTOFF = 8.0  # Angstrom: non-local CA pairs within this distance in the data carry the contact loss
ZERO_INIT = ("fine", "coord_local", "bond", "ss_residue", "ss_chain",  # extensions a warm start may lack
             "sc_message", "sc_node", "sc_pair")
# (and the whole pair track, ``pair.*``, whose projections into the messages start at zero)
SELF_COND_RATE = 0.5  # share of batches trained with a self-conditioning estimate
SS_DROP = (0.25, 0.4)  # P(no conditioning), P(composition only); the rest also get per-residue labels


def ss_dropout(batch: CropBatch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Classifier-free conditioning of a crop batch (``SS_DROP``): ``ss`` [B, N] and ``composition`` [B, 3]."""
    u = torch.rand(batch.x.shape[0], generator=generator).to(batch.ss.device)
    composition = composition_of(batch.ss, batch.mask)
    composition[u < SS_DROP[0]] = math.nan
    per_residue = (u >= sum(SS_DROP))[:, None] & batch.mask
    return {"ss": torch.where(per_residue, batch.ss, UNKNOWN_SS), "composition": composition}


def contact_error(pred: Tensor, x0: Tensor, mask: Tensor) -> Tensor:
    """[B] mean squared error (A^2) of the predicted distances of the pairs |i - j| > 4 closer than
    ``CONTACT_CUTOFF`` in ``x0`` (0 for a chain without such pairs); rigid motions of ``pred`` leave it unchanged."""
    d_true, d_pred = safe_norm(x0[:, :, None] - x0[:, None]), safe_norm(pred[:, :, None] - pred[:, None])
    offset = torch.arange(x0.shape[1], device=x0.device)
    far = (offset[:, None] - offset[None]).abs() > max(LOCAL_OFFSETS)
    m = mask.to(x0.dtype)
    contacts = (far & (d_true < CONTACT_CUTOFF)).to(x0.dtype) * m[:, :, None] * m[:, None]
    return ((d_pred - d_true) ** 2 * contacts).sum((1, 2)) / contacts.sum((1, 2)).clamp_min(1)


def edm_loss(
    model: BackboneDenoiser,
    batch: CropBatch,
    p_mean: float = -1.2,
    p_std: float = 1.5,
    generator: torch.Generator | None = None,
    local_weight: str = "edm",
    contact_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """EDM denoising loss plus local-distance and contact losses (see module docstring); returns (loss, parts)."""
    x0, mask = batch.x, batch.mask
    b = x0.shape[0]
    sd = model.cfg.sigma_data
    ln_sigma = math.log(sd) + p_mean + p_std * torch.randn(b, generator=generator).to(x0.device)
    sigma = ln_sigma.exp()
    eps = centre(torch.randn(x0.shape, generator=generator).to(x0.device), mask)  # drawn on the CPU (seeded)
    cond = ss_dropout(batch, generator) if model.cfg.ss_condition else {}
    x = x0 + sigma[:, None, None] * eps
    if model.cfg.self_condition and float(torch.rand((), generator=generator)) < SELF_COND_RATE:
        with torch.no_grad():
            cond["self_cond"] = model.denoise(x, sigma, mask, **cond)
    pred = model.denoise(x, sigma, mask, **cond)
    m = mask.to(x0.dtype)
    n = m.sum(1)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    target = (~(batch.rounded & (sigma < ROUNDED_SIGMA))).to(x0.dtype)  # see ROUNDED_SIGMA
    denoise = (target * weight * ((pred - x0) ** 2).sum(-1).mul(m).sum(1) / (3 * n)).mean()
    if local_weight not in ("edm", "flat"):
        raise ValueError(f"local_weight must be 'edm' or 'flat', got {local_weight!r}")
    low = target * (sigma < sd / 2).to(x0.dtype) * (weight.clamp_min(1.0) if local_weight == "edm" else 1.0)
    local = x0.new_zeros(())
    for k in LOCAL_OFFSETS:
        pair = m[:, k:] * m[:, :-k]
        d_pred = safe_norm(pred[:, k:] - pred[:, :-k])
        d_true = safe_norm(x0[:, k:] - x0[:, :-k])
        local = local + (low * ((d_pred - d_true) ** 2 * pair).sum(1) / pair.sum(1).clamp_min(1)).mean()
    local = local / len(LOCAL_OFFSETS)
    parts = {"denoise": float(denoise.detach()), "local": float(local.detach())}
    if not contact_weight:
        return denoise + local, parts
    contact = (low * contact_error(pred, x0, mask)).mean()
    return denoise + local + contact_weight * contact, {**parts, "contact": float(contact.detach())}


def warm_start(module: BackboneDiffusion, path: Path) -> None:
    """Load exported weights into the model and its EMA copy; only zero-initialised extension weights
    (``ZERO_INIT``) may be absent from the file, and the file may hold nothing the model lacks."""
    from molgen.checkpoints import load_checkpoint

    state, _ = load_checkpoint(path)
    for net in (module.model, module.ema):
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ValueError(f"{path}: weights do not fit the model config ({str(err).splitlines()[-1]})") from err
        bad = [k for k in missing if k.split(".")[-2] not in ZERO_INIT and not k.startswith("pair.")]
        bad += list(unexpected)
        if bad:
            raise ValueError(f"{path}: weights do not fit the model config (mismatched keys {bad[:4]})")


class CropStream(torch.utils.data.IterableDataset):
    """Endless stream of padded crop batches; seeded by (seed, start step) so resumed runs draw new crops."""

    def __init__(self, segments: list[Segment], seed: int, start: int, max_length: int, edge_budget: int):
        self.segments, self.seed, self.start = segments, seed, start
        self.max_length, self.edge_budget = max_length, edge_budget

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.start])
        while True:
            yield crop_batch(self.segments, rng, max_length=self.max_length, edge_budget=self.edge_budget)


class BackboneDiffusion(L.LightningModule):
    """Lightning module: the denoiser, its EMA copy (the shipped weights) and AdamW with warm-up and an optional
    cosine cool-down (``decay`` = (first step, steps), see ``molgen.optim.lr_factor``)."""

    def __init__(
        self,
        config: dict,
        lr: float = 5e-4,
        ema_decay: float = 0.999,
        warmup: int = 200,
        decay: tuple[int, int] = (0, 0),
        p_mean: float = -1.2,
        p_std: float = 1.5,
        local_weight: str = "edm",
        contact_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = BackboneDenoiser(ModelConfig(**config))
        self.ema = copy.deepcopy(self.model).requires_grad_(False)

    def training_step(self, batch: CropBatch, batch_idx: int) -> Tensor:
        hp = self.hparams
        loss, parts = edm_loss(self.model, batch, hp.p_mean, hp.p_std, local_weight=hp.local_weight,
                               contact_weight=hp.contact_weight)
        self.log_dict({"loss": loss.detach(), **parts, "length": float(batch.x.shape[1])}, prog_bar=True,
                      batch_size=batch.x.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.ema, self.model, self.global_step, self.hparams.ema_decay)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        hp = self.hparams
        start, steps = hp.decay
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, hp.warmup, steps, decay_start=start))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportEMA(L.Callback):
    """Every ``every`` steps and at the end, save the EMA weights with ``molgen.checkpoints.save_checkpoint``;
    stop after ``max_seconds`` of this invocation (Lightning's own max_time would count resumed runs too)."""

    def __init__(self, path: Path, every: int, provenance: dict, max_seconds: float) -> None:
        self.path, self.every, self.provenance, self.max_seconds = path, every, provenance, max_seconds
        self.t0 = time.time()

    def _export(self, trainer: L.Trainer, module: BackboneDiffusion) -> None:
        from molgen.checkpoints import save_checkpoint

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        prov = {
            **self.provenance,
            "steps": trainer.global_step,
            "run_wall_s": round(time.time() - self.t0),
            "last_metrics": metrics,
        }
        config = {
            **module.model.cfg.to_dict(),
            "prediction": "x0",
            "state": "CA [B, N, 3] Angstrom, zero CoM",
        }
        save_checkpoint(self.path, module.ema.state_dict(), config, provenance=prov)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._export(trainer, module)
        if time.time() - self.t0 > self.max_seconds:
            trainer.should_stop = True

    def on_train_end(self, trainer, module) -> None:
        self._export(trainer, module)


def init_record(path: Path) -> dict:
    """What a warm start came from: path, SHA-256 and the provenance on its card (so the chain of training
    commands survives the file being replaced, e.g. a shipped checkpoint re-exported from the new run)."""
    from molgen.checkpoints import read_card, sha256_file

    return {"path": str(path), "sha256": sha256_file(path), "provenance": read_card(path).get("provenance", {})}


def latest_checkpoint(out: Path) -> tuple[Path, dict] | None:
    """The ``last*.ckpt`` in ``out`` with the highest step, with its contents (runs written before
    ``enable_version_counter=False`` left ``last-v1.ckpt`` beside an older ``last.ckpt``), or None."""
    found = [(p, torch.load(p, weights_only=True, map_location="cpu")) for p in sorted(out.glob("last*.ckpt"))]
    return max(found, key=lambda f: int(f[1]["global_step"])) if found else None


def train(
    out: Path,
    export: Path,
    sources: list[Path],
    max_steps: int,
    max_minutes: float,
    seed: int = 0,
    config: dict | None = None,
    lr: float = 5e-4,
    decay: tuple[int, int] = (0, 0),
    max_length: int = 128,
    edge_budget: int = 40_000,
    every: int = 100,
    init: Path | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.5,
    held_out: float = 0.05,
    accelerator: str = "cpu",
    precision: str = "32-true",
    contact_weight: float = 0.0,
) -> Path:
    """Train (or resume from the newest ``out/last*.ckpt``, keeping that run's model config) and export EMA
    weights to ``export``; returns ``export``. A new run may start from exported weights (``init``).
    Whole sequence clusters holding ``held_out`` of the chains are left out (``out/held_out.txt``).
    ``accelerator`` and ``precision`` are Lightning's (e.g. ``"gpu"``, ``"bf16-mixed"``); checkpoints move
    between machines either way."""
    out.mkdir(parents=True, exist_ok=True)
    chains, held = held_out_split(load_backbones(sources), held_out)
    segments = segments_of(chains)
    last, saved = latest_checkpoint(out) or (None, None)
    start = int(saved["global_step"]) if saved else 0
    provenance = {
        "command": " ".join(["molgen", *sys.argv[1:]]) if sys.argv else "",
        "data": [str(f) for f in sources],
        "n_segments": len(segments),
        "n_residues": int(sum(len(s.ca) for s in segments)),
        "held_out_chains": len(held),
        "hardware": f"{accelerator}, {precision}, torch threads {torch.get_num_threads()}",
        "resumed_from_step": start,
    }
    (out / "train_segments.txt").write_text("".join(f"{s.name}\n" for s in segments))
    (out / "held_out.txt").write_text("".join(f"{bb.name}\n" for bb in held))
    if saved is not None:  # a resumed run keeps the model config it was started with
        config = saved["hyper_parameters"]["config"]
    L.seed_everything(seed + start, workers=True)
    module = BackboneDiffusion(config or ModelConfig().to_dict(), lr=lr, decay=decay, p_mean=p_mean, p_std=p_std,
                               contact_weight=contact_weight)
    if init is not None and last is None:
        warm_start(module, init)
        provenance["init"] = init_record(init)
    stream = CropStream(segments, seed, start, max_length, edge_budget)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out, save_last=True, every_n_train_steps=every, save_top_k=0, enable_version_counter=False
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        callbacks=[ckpt, ExportEMA(export, every, provenance, 60 * max_minutes)],
        default_root_dir=out,
        log_every_n_steps=10,
        enable_progress_bar=bars_enabled(),
        gradient_clip_val=1.0,
        logger=L.pytorch.loggers.CSVLogger(out, name="logs"),
    )
    trainer.fit(module, loader, ckpt_path=str(last) if last else None, weights_only=True)
    return export
