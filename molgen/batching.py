"""``--batch-size auto``: the largest batch whose model call fits the device's memory.

On CUDA, one probe at a small batch measures the peak memory per row; activations grow linearly with the batch,
so b = headroom * free / per_row predicts the largest batch, which is then tried and halved until it runs. On a
CPU, memory is not the limit (throughput stops growing long before it is), so ``auto`` means ``CPU_BATCH``.
"""

from __future__ import annotations

import argparse
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
