"""Exponential moving average of a model's weights, with the warm-up every molgen training uses."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """ema <- d ema + (1 - d) model with d = min(decay, (1 + step) / (10 + step)).

    The warm-up averages over a short window early on, so the EMA forgets its initialisation: the weight left on
    it after n steps is prod_k (1 + k) / (10 + k), about 9! / n^9, instead of decay^n (a plain 0.999 EMA still
    holds 17 % of the random initial weights after 1,800 steps).
    """
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - d)
