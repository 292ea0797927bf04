"""Batches: ``--batch-size auto`` for sampling, and size-bucketed, resumable batches for training.

``--batch-size auto``: the largest batch whose model call fits the device's memory.

On CUDA, one probe at a small batch measures the peak memory per row; activations grow linearly with the batch,
so b = headroom * free / per_row predicts the largest batch, which is then tried and halved until it runs. On a
CPU, memory is not the limit (throughput stops growing long before it is), so ``auto`` means ``CPU_BATCH``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

CPU_BATCH = 256


def batch_size_arg(text: str) -> int | str:
    """argparse type for ``--batch-size``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return value


def halve_until_fits(fits: Callable[[int], bool], guess: int) -> int:
    """The first of guess, guess // 2, ... for which ``fits`` holds (1 at the least: fits(1) is not asked)."""
    b = max(1, guess)
    while b > 1 and not fits(b):
        b //= 2
    return b


def largest_batch(
    run: Callable[[int], object], device: str | torch.device, *, probe: int = 16, limit: int = 1 << 16,
    headroom: float = 0.8,
) -> int:
    """The largest batch b <= ``limit`` for which ``run(b)`` (one model call at the widest shape) fits in
    ``headroom`` of the free memory of ``device`` (CUDA), else ``min(CPU_BATCH, limit)``."""
    device = torch.device(device)
    if device.type != "cuda":
        return min(CPU_BATCH, limit)

    def fits(b: int) -> bool:
        try:
            run(b)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if not fits(probe):
        return halve_until_fits(fits, probe // 2)
    per_row = max(1, torch.cuda.max_memory_allocated(device) - base) / probe
    free, _ = torch.cuda.mem_get_info(device)
    guess = min(limit, int(headroom * free / per_row))
    return halve_until_fits(fits, guess) if guess > probe else probe


class SizeBucketBatches(torch.utils.data.Sampler):
    """Batches of items with the same size key (a molecule's atom count: no padding; a sequence's length
    bucket), shuffled per epoch with a seeded generator: epoch e uses seed ``seed + e``. Resumable:
    ``state_dict`` records the epoch and how many of its batches were handed out, and after ``load_state_dict``
    that epoch continues where it stopped instead of replaying its first batches."""

    def __init__(self, sizes: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.sizes, self.batch_size, self.seed, self.epoch = sizes, batch_size, seed, 0
        self.served = 0  # batches of the current epoch handed out so far
        self._resume: int | None = None

    def _batches(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        out: list[torch.Tensor] = []
        for n in torch.unique(self.sizes).tolist():
            idx = torch.nonzero(self.sizes == n).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            out.extend(idx.split(self.batch_size))
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[i] for i in order]

    @property
    def sampler(self) -> SizeBucketBatches:
        """Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` (not on the batch sampler itself) at each
        epoch start: that is this object."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start (also after resuming)."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next epoch iterated starts at batch ``served`` (Lightning's view of which epoch that is can
        differ from the saved ``epoch`` after a checkpoint written when ``max_steps`` stopped the run; its batch
        count inside the epoch continues from ``served`` either way)."""
        self._resume = int(state["served"])

    def __iter__(self):
        batches = self._batches()
        start = min(self._resume or 0, len(batches))
        self._resume = None
        for k in range(start, len(batches)):
            self.served = k + 1
            yield batches[k].tolist()

    def __len__(self) -> int:
        counts = torch.bincount(self.sizes)
        return int(sum(math.ceil(c / self.batch_size) for c in counts.tolist() if c))


class ResumableLoader(torch.utils.data.DataLoader):
    """DataLoader whose position inside an epoch is saved in Lightning checkpoints (via its batch sampler)."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)
