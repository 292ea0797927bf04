"""Batch sequence generation from a shipped model with any registered discrete sampler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from molgen.batching import largest_batch
from molgen.diffusion.discrete import ClassifierFreeGuidance, DiscreteSampler
from molgen.sequences.io import Record
from molgen.sequences.pretrained import Pretrained


def generate(
    pre: Pretrained,
    n: int,
    solver: str = "cached_ancestral",
    steps: int = 32,
    seed: int = 0,
    length: int | None = None,
    condition: str | None = None,
    guidance_scale: float = 0.0,
    options: Mapping[str, Any] | None = None,
    batch_size: int | str = 256,
    device: str | torch.device = "cpu",
    grid: str | torch.Tensor = "time_uniform",
) -> list[Record]:
    """Sample ``n`` sequences; lengths are ``length`` or drawn from the model's data length distribution.
    ``batch_size="auto"``: the largest batch of the longest sequences that fits the device (``molgen.batching``);
    ``grid``: a named time grid or explicit times from 1 to 0 (a tuned plan's, ``molgen.diffusion.tune``)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    max_len = pre.model.config.max_length
    if length is not None and not 1 <= length <= max_len:
        raise ValueError(f"--length {length} is outside [1, {max_len}] for this model")
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = (
        torch.full((n,), length, dtype=torch.long)
        if length is not None
        else pre.lengths.sample(n, torch.Generator().manual_seed(seed))
    )
    cond: dict[str, torch.Tensor] = {}
    model = pre.model
    if condition is not None:
        cond = {"labels": torch.full((n,), pre.label_id(condition), dtype=torch.long, device=device)}
        if guidance_scale:
            model = ClassifierFreeGuidance(pre.model, guidance_scale, len(pre.label_names))
    elif guidance_scale:
        raise ValueError("--guidance-scale needs --condition")
    records = []
    with torch.no_grad():
        if batch_size == "auto":
            batch_size = largest_batch(lambda b: one_call(model, pre, b, int(lengths.max()), cond, device), device)
        for i in range(0, n, batch_size):
            lb = lengths[i : i + batch_size].to(device)
            x_T = pre.process.prior(lb, int(lb.max()))
            cb = {k: v[i : i + batch_size] for k, v in cond.items()}
            st = DiscreteSampler(model, pre.process, solver, steps, grid, options).run(x_T, cb, gen)
            for j, row in enumerate(st.x.cpu()):
                tag = f" condition={condition}" if condition else ""
                records.append(
                    Record(
                        f"sample_{i + j} solver={solver} steps={steps} seed={seed}{tag}",
                        pre.alphabet.decode(row),
                    )
                )
    return records


def one_call(model: torch.nn.Module, pre: Pretrained, batch: int, length: int, cond: Mapping[str, torch.Tensor],
             device: str | torch.device) -> torch.Tensor:
    """One model call on ``batch`` fully masked sequences of ``length`` (the probe of ``batch_size="auto"``)."""
    x_T = pre.process.prior(torch.full((batch,), length, device=device), length)
    t = torch.ones(batch, device=device)
    return model(x_T, t, **{k: v[:1].expand(batch) for k, v in cond.items()})
