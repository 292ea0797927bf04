"""Lightning training of the masked-diffusion sequence denoiser (resumable, time-budgeted) and export."""

from __future__ import annotations

import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from molgen.diffusion.discrete import MaskedDiffusion, MaskingSchedule
from molgen.ema import ema_update
from molgen.optim import lr_factor
from molgen.progress import bars_enabled
from molgen.sequences.model import UNSPECIFIED, DenoiserConfig, SequenceDenoiser

NELBO_TIMES = 4  # stratified times of every NELBO molgen reports (cards, evaluation, naturalness)


def train_command(modality: str) -> str:
    """The command line of this training run as a user types it (``molgen train MODALITY ...``), for its card."""
    argv = sys.argv
    return ("molgen train " + " ".join(shlex.quote(a) for a in argv[argv.index(modality):])
            if modality in argv else " ".join(argv))


def build_process(
    alphabet_size: int, pad_id: int, mask_id: int, schedule: str = "loglinear"
) -> MaskedDiffusion:
    return MaskedDiffusion(alphabet_size, mask_id, pad_id, MaskingSchedule(schedule))


class MaskedDiffusionModule(L.LightningModule):
    """Trains ``SequenceDenoiser`` on the MDLM NELBO (per data token); keeps an EMA copy for evaluation.

    Classifier-free dropout: with probability ``p_uncond`` a label is replaced by the null label, or (a
    pair-conditioned denoiser, batches ``(x0, partners)``) a row's structure by ``UNSPECIFIED``.
    Learning rate: linear warm-up, then constant, or (``decay_steps`` > 0) cosine decay to lr / 10 at
    ``decay_steps``, constant after.
    """

    def __init__(
        self,
        denoiser: dict[str, Any],
        mask_id: int,
        schedule: str = "loglinear",
        lr: float = 1e-3,
        warmup: int = 200,
        p_uncond: float = 0.1,
        ema_decay: float = 0.999,
        decay_steps: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        cfg = DenoiserConfig(**denoiser)
        self.net = SequenceDenoiser(cfg)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.process = build_process(cfg.n_tokens, cfg.pad_id, mask_id, schedule)

    def _cond(self, extra: torch.Tensor | None, drop: bool, width: int) -> dict:
        """The denoiser's conditioning from a batch's second tensor (labels, or partners cropped to width)."""
        if extra is not None and self.net.config.pair_conditioning:
            partners = extra[:, :width]
            if drop and self.hparams.p_uncond > 0:
                null = torch.rand(len(partners), device=partners.device) < self.hparams.p_uncond
                partners = torch.where(null[:, None], torch.full_like(partners, UNSPECIFIED), partners)
            return {"partners": partners}
        labels = extra
        if labels is None or self.net.config.n_classes == 0:
            return {}
        if drop and self.hparams.p_uncond > 0:
            null = torch.rand(labels.shape, device=labels.device) < self.hparams.p_uncond
            labels = torch.where(null, torch.full_like(labels, self.net.config.n_classes), labels)
        return {"labels": labels}

    @staticmethod
    def _crop(x0: torch.Tensor, pad_id: int) -> torch.Tensor:
        """Drop trailing all-padding columns (outputs at real positions do not depend on them)."""
        width = int((x0 != pad_id).sum(-1).max())
        return x0[:, :width]

    def training_step(self, batch, batch_idx):
        x0, extra = batch if len(batch) == 2 else (batch[0], None)
        x0 = self._crop(x0, self.net.config.pad_id)
        loss = self.process.loss(self.net, x0, cond=self._cond(extra, True, x0.shape[1]))
        per_token = loss.sum() / self.process.is_data(x0).sum()
        self.log("train_nats_per_token", per_token, prog_bar=True)
        return per_token

    def on_train_batch_end(self, outputs, batch, batch_idx):
        ema_update(self.ema, self.net, self.global_step, self.hparams.ema_decay)

    def validation_step(self, batch, batch_idx):
        x0, extra = batch if len(batch) == 2 else (batch[0], None)
        x0 = self._crop(x0, self.net.config.pad_id)
        gen = torch.Generator(device=x0.device).manual_seed(1000 + batch_idx)
        cond = self._cond(extra, False, x0.shape[1])
        nelbo = self.process.nelbo(self.ema, x0, n_t=NELBO_TIMES, generator=gen, cond=cond)
        n_tok = self.process.is_data(x0).sum()
        self.log(
            "val_bits_per_token",
            nelbo.sum() / n_tok / torch.log(torch.tensor(2.0)),
            prog_bar=True,
            reduce_fx="mean",
            batch_size=len(x0),
        )

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, self.hparams.warmup, self.hparams.decay_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loaders(train_x, train_y, val_x, val_y, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    def ds(x, y):
        return TensorDataset(x, y) if y is not None else TensorDataset(x)

    gen = torch.Generator().manual_seed(seed)
    return (
        DataLoader(ds(train_x, train_y), batch_size=batch_size, shuffle=True, generator=gen, drop_last=True),
        DataLoader(ds(val_x, val_y), batch_size=256, shuffle=False),
    )


def fit(
    module: MaskedDiffusionModule,
    train: DataLoader,
    val: DataLoader,
    out_dir: Path,
    max_minutes: float,
    max_steps: int,
    val_every: int,
) -> dict[str, Any]:
    """Train for ``max_minutes`` (total over resumes) or ``max_steps``; resumes from ``out_dir/last.ckpt``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out_dir, save_last=True, every_n_train_steps=100, save_top_k=0, enable_version_counter=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_time={"minutes": max_minutes},
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        callbacks=[ckpt],
        default_root_dir=out_dir,
        logger=L.pytorch.loggers.CSVLogger(out_dir, name="logs"),
        enable_progress_bar=bars_enabled(),
        num_sanity_val_steps=0,
        log_every_n_steps=25,
    )
    last = out_dir / "last.ckpt"
    start = time.time()
    trainer.fit(module, train, val, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    trainer.save_checkpoint(last, weights_only=False)  # the full state: a rerun resumes it
    timer = next(c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer))
    stats = {
        "global_step": int(trainer.global_step),
        "run_wall_s": round(time.time() - start, 1),
        "train_wall_s_total": round(float(timer.time_elapsed("train")), 1),
    }
    (out_dir / "progress.json").write_text(json.dumps(stats) + "\n")
    return stats


@torch.no_grad()
def sequence_bits(model, process, tokens: torch.Tensor, n_t: int = NELBO_TIMES, seed: int = 0) -> torch.Tensor:
    """NELBO of each row of ``tokens`` [B, L] in bits per data token, [B] (stratified times, seeded)."""
    nelbo = process.nelbo(model, tokens, n_t=n_t, generator=torch.Generator().manual_seed(seed))
    return nelbo / (process.is_data(tokens).sum(-1).clamp_min(1) * math.log(2))


@torch.no_grad()
def heldout_bits_per_token(
    model, process, x0: torch.Tensor, cond: dict, n_t: int = NELBO_TIMES, batch: int = 256
) -> float:
    """NELBO in bits per data token over ``x0`` (stratified times, fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    total, n_tok = 0.0, 0
    for i in range(0, len(x0), batch):
        xb = x0[i : i + batch]
        xb = xb[:, : int(process.is_data(xb).sum(-1).max())]
        cb = {k: v[i : i + batch, : xb.shape[1]] if v.dim() == 2 else v[i : i + batch] for k, v in cond.items()}
        total += float(process.nelbo(model, xb, n_t=n_t, generator=gen, cond=cb).sum())
        n_tok += int(process.is_data(xb).sum())
    return total / n_tok / float(torch.log(torch.tensor(2.0)))
