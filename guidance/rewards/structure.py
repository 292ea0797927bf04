"""Backbone rewards on CA traces (a tensor [B, N, 3] in Angstrom, or a sequence of [N, 3] arrays).

* ``helix`` / ``strand``: DSSP 3-state fraction (pydssp) of the backbone rebuilt from the CA trace, in [0, 1].
* ``rg`` / ``rg:target=1.0``: -|Rg / (3.3 N^0.31) - target|, the radius of gyration against the natural-domain
  law; differentiable (a ``TensorReward``), so DPS applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from molgen.geometry import centre
from molgen.guidance.rewards import Reward, TensorReward, register
from molgen.structure.geometry import natural_rg


@dataclass
class SecondaryStructure(Reward):
    state: str = "H"
    penalty: float = 0.0

    def score_one(self, sample: object) -> float:
        from molgen.structure.io import backbone_from_ca
        from molgen.structure.metrics import complete_coords, dssp

        ca = np.asarray(sample.detach().cpu() if isinstance(sample, Tensor) else sample, dtype=np.float64)
        if ca.ndim != 2 or ca.shape[1] != 3 or len(ca) < 4 or not np.isfinite(ca).all():
            raise ValueError(f"expected a finite CA trace [N >= 4, 3], got shape {ca.shape}")
        ss = dssp(complete_coords(backbone_from_ca(ca)))
        return ss.count(self.state) / len(ss)


def rg_ratio(x: Tensor) -> Tensor:
    """Rg / (3.3 N^0.31) per CA trace of x [B, N, 3] (differentiable)."""
    rg = centre(x).pow(2).sum(-1).mean(-1).clamp_min(1e-12).sqrt()
    return rg / natural_rg(x.shape[1])


def rg(target: float = 1.0) -> TensorReward:
    def fn(x: Tensor) -> Tensor:
        x = torch.as_tensor(x) if not isinstance(x, Tensor) else x
        return -(rg_ratio(x) - target).abs()

    return TensorReward(name=f"rg(target={target})", fn=fn, differentiable=True, penalty=-10.0)


register("helix", "backbones", "DSSP helix fraction of the rebuilt backbone")(
    lambda: SecondaryStructure(name="helix", state="H")
)
register("strand", "backbones", "DSSP strand fraction of the rebuilt backbone")(
    lambda: SecondaryStructure(name="strand", state="E")
)
register("rg", "backbones", "-|Rg / (3.3 N^0.31) - target| (arg target, default 1)")(rg)
