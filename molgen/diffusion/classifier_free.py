"""Classifier-free guidance (Ho & Salimans 2022) for x0-predicting models trained with condition dropout.

    x0_w = x0(x_t, t | null) + w (x0(x_t, t | c) - x0(x_t, t | null))

``w = 1`` is the conditional model alone (one call per step); ``w > 1`` sharpens the condition at two calls
per step. The null condition is the call without the conditioning keywords ``keys``, which the model reads
as "not given".
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ClassifierFree(nn.Module):
    """Wrap ``model(x_t, t, **kw) -> x0``: guidance weight ``scale`` on the keywords ``keys``."""

    def __init__(self, model: nn.Module, scale: float, keys: Sequence[str]) -> None:
        super().__init__()
        self.model, self.scale, self.keys = model, float(scale), tuple(keys)
        self.prediction = getattr(model, "prediction", "x0")
        self.self_conditioning = getattr(model, "self_conditioning", False)  # both calls read the same estimate
        if self.prediction != "x0":
            raise ValueError(f"classifier-free guidance here mixes x0 predictions, got a {self.prediction!r} model")

    def forward(self, x_t: Tensor, t: Tensor, **kw: Tensor) -> Tensor:
        cond = self.model(x_t, t, **kw)
        if self.scale == 1.0:
            return cond
        uncond = self.model(x_t, t, **{k: v for k, v in kw.items() if k not in self.keys})
        return uncond + self.scale * (cond - uncond)
