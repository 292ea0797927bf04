"""One campaign round's designs: guided generation (``molgen.guidance.tasks.guide``) on the campaign's
modality, optionally refining the previous selection.

Refinement (SDEdit) runs the same ``guide`` on a problem whose sampler starts at time t and whose prior draw
is the selected designs noised to t (``Modality.noise_to``: masked diffusion masks each token independently
with probability 1 - alpha(t), an exact draw of q(x_t | x_0); continuous diffusion draws
x_t = alpha(t) x_0 + sigma(t) eps in the zero-CoM space).

With ``refine.recombine`` a share of the refinements are the parents rearranged instead (``Modality.recombine``:
a segment of another selected design written over the parent, or a stretch of it shifted by one place), used
as they are; those designs have origin ``recombine``.

``use_model`` swaps the sampler's denoiser (a fine-tuned copy, ``molgen.finetune``) for the following rounds;
guidance runs on top of it, and naturalness is always measured under the campaign's own model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from molgen.campaign.config import CampaignConfig
from molgen.modalities import Design, Modality, get_modality
from molgen.seeds import derived_seed


@dataclass
class RoundOutput:
    """A round's designs, the model calls they cost and the guided reward of each (as the guidance run scored
    them)."""

    designs: list[Design]
    model_calls: int
    rewards: torch.Tensor


def checkpoint_path(cfg: CampaignConfig) -> Path:
    """The checkpoint file the campaign's model comes from (the shipped default when none is given)."""
    return Path(cfg.checkpoint) if cfg.checkpoint else get_modality(cfg.modality).default_checkpoint()


class RoundGenerator:
    """The campaign's modality and its guidance problem, built once per campaign."""

    def __init__(self, cfg: CampaignConfig) -> None:
        from molgen.guidance.tasks import get_problem

        self.cfg = cfg
        self.modality: Modality = get_modality(cfg.modality)
        self.problem = get_problem(cfg.modality, steps=cfg.sampler.steps, solver=cfg.sampler.solver,
                                   checkpoint=cfg.checkpoint,
                                   length=cfg.sample_length() or self.modality.default_length)
        self.sampling = self.problem  # the problem designs are drawn from (its model fine-tuned or not)

    def use_model(self, model: Any | None) -> None:
        """Draw the following rounds with ``model`` in place of the campaign's model (None: the campaign's)."""
        base = self.problem.sampler
        self.sampling = self.problem if model is None else dataclasses.replace(
            self.problem, sampler=dataclasses.replace(base, model=model))

    def generate(self, n: int, seed: int, reward: Any, parents: Sequence[tuple[str, Design]],
                 value: Any = None) -> RoundOutput:
        """``n`` designs: ``refine.fraction`` of them (when there are parents) refine the parents in turn, the
        i-th at the ladder's level i mod (number of levels), and ``refine.recombine`` of those are the parents
        rearranged instead (scored here, no model call); ``value``: SVDD-MC's value hook (``svdd_mc``
        without one draws unguided)."""
        parents = [p for p in parents if self.modality.refinable(p[1])]
        n_refine = round(self.cfg.refine.fraction * n) if parents else 0
        n_recombine = round(self.cfg.refine.recombine * n_refine)
        designs: list[Design] = []
        rewards: list[torch.Tensor] = []
        calls = 0
        if n - n_refine:
            res = self._guide(self.sampling, reward, n - n_refine, seed, value)
            designs += self.modality.designs(self.problem, res)
            rewards.append(res.rewards.double().cpu())
            calls += res.model_calls
        levels = self.cfg.refine.levels
        for k, t in enumerate(levels):
            picked = [parents[i % len(parents)] for i in range(k, n_refine - n_recombine, len(levels))]
            if not picked:
                continue
            res = self._guide(self.refine_problem([d for _, d in picked], t), reward, len(picked), seed + 1 + k, value)
            for d, (pid, _) in zip(self.modality.designs(self.problem, res), picked):
                designs.append(dataclasses.replace(d, parent=pid, origin="refine"))
            rewards.append(res.rewards.double().cpu())
            calls += res.model_calls
        if n_recombine:
            g = torch.Generator().manual_seed(derived_seed("molgen-recombine", seed, 0))
            moved = self.recombined(parents, n_recombine, g)
            designs += moved
            rewards.append(reward(self.modality.reward_inputs(moved)).double().cpu())
        return RoundOutput(designs, calls, torch.cat(rewards))

    def recombined(self, parents: Sequence[tuple[str, Design]], n: int, g: torch.Generator) -> list[Design]:
        """``n`` rearrangements (``Modality.recombine``) of the parents in turn, each with a donor drawn from all
        of them (itself included), as they are: a move that re-noised them would mostly break what it moved."""
        out = []
        for i in range(n):
            pid, design = parents[i % len(parents)]
            donor = parents[int(torch.randint(len(parents), (), generator=g))][1]
            out.append(dataclasses.replace(self.modality.recombine(design, donor, g), parent=pid, origin="recombine"))
        return self.modality.with_naturalness(self.problem, out)

    def _guide(self, problem: Any, reward: Any, n: int, seed: int, value: Any = None) -> Any:
        from molgen.guidance.tasks import guide

        g = self.cfg.guidance
        method = "unguided" if g.method == "svdd_mc" and value is None else g.method
        return guide(problem, method, reward, n, candidates=g.candidates, particles=g.particles, alpha=g.alpha,
                     lam=g.lam, potential=g.potential, dps_scale=g.scale, value=value, seed=seed)

    def refine_problem(self, parents: Sequence[Design], t: float) -> Any:
        """The problem whose sampler starts at time ``t`` and whose prior is the parents noised to t."""
        from molgen.guidance.tasks import Draw

        x0, mask = self.modality.encode(self.problem, parents)

        def draw(outputs: int, per: int, g: torch.Generator) -> list[Draw]:
            if outputs != len(parents):
                raise ValueError(f"refinement draw: {outputs} outputs for {len(parents)} parents")
            x_t = self.modality.noise_to(self.problem, x0, mask, t, g).repeat_interleave(per, 0)
            m = None if mask is None else mask.repeat_interleave(per, 0)
            return [Draw(x_t, m, None if m is None else {"mask": m})]

        return dataclasses.replace(self.sampling, sampler=self.modality.partial_sampler(self.sampling, t), draw=draw)
