"""Guided runs over the registered modalities, shared by ``molgen guide``, batch generation, campaigns
and ``benchmarks/guidance.py``.

A ``Problem`` (built by the modality, ``molgen.modalities``) bundles what a guided run needs from a pretrained
model: a stochastic step-level sampler, the prior draw for G outputs with R rows each (``draw``: chunks of outputs,
similar sizes together), the decoder from states to reward inputs, naturalness and diversity of the outputs, a
writer, and SVDD-MC's value network and noising process. ``guide(problem, method, reward, n, ...)`` runs one
method chunk by chunk and merges.

    problem = get_problem("molecules")          # the guided preset; reads the checkpoint now, not at import
    res = guide(problem, "svdd", parse_reward("qed"), 64, candidates=4, seed=0)
    res.summary() | problem.natural(res)

Model checkpoints are read when the problem is built (``checkpoint=None``: the shipped default), from a copy
taken at that moment (a training run may replace the file at any time); ``problem.sha256`` identifies the
weights used, so a newer snapshot exported meanwhile is picked up by the next run and recorded.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from molgen.checkpoints import sha256_file
from molgen.guidance.baselines import best_of_n, dps_sample
from molgen.guidance.completions import Completions
from molgen.guidance.core import GuidanceResult, check_count, merge
from molgen.guidance.fk import Tilt, fk_sample
from molgen.guidance.rewards import Reward, TensorReward, check_failures
from molgen.guidance.smc import ResamplePolicy
from molgen.guidance.svdd import svdd_sample
from molgen.guidance.value import Noise

METHODS = ("unguided", "bon", "dps", "fk", "svdd", "svdd_mc")


@dataclass
class Draw:
    """Prior states of one chunk: rows ``g * per .. g * per + per - 1`` belong to output g."""

    x_T: Tensor
    mask: Tensor | None = None
    cond: dict[str, Tensor] | None = None


@dataclass
class Problem:
    modality: str
    sampler: Any
    checkpoint: Path
    draw: Callable[[int, int, torch.Generator], list[Draw]]
    decode: Callable[..., Any]
    natural: Callable[[GuidanceResult], dict[str, float]]
    write: Callable[..., None]  # write(path, result, names=None): SDF / FASTA / folder of PDB files
    value_net: Callable[[], nn.Module]
    noise: Noise
    clean: Callable[[GuidanceResult], tuple[Tensor, Tensor | None]]  # value-training targets (x0, mask)
    sha256: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


def get_problem(modality: str, *, steps: int | None = None, checkpoint: str | Path | None = None,
                length: int | None = None, condition: str | None = None, solver: str | None = None,
                preset: str = "guided", chunk: int = 16) -> Problem:
    """The guidance problem of a registered modality's shipped (or given) checkpoint, sampled with its
    ``preset`` (``guided`` by default), the caller's solver and step count where given."""
    from molgen.modalities import get_modality

    if steps is not None:
        check_count("steps", steps)
    check_count("chunk", chunk)
    mod = get_modality(modality)
    return mod.problem(preset=mod.preset(preset, solver, steps), checkpoint=checkpoint, length=length,
                       condition=condition, chunk=chunk)


def rows_per_output(method: str, candidates: int, particles: int) -> int:
    return {"bon": candidates, "fk": particles}.get(method, 1)


def guide(problem: Problem, method: str, reward: Reward, n: int, *, candidates: int = 4, particles: int = 4,
          alpha: float = 0.0, lam: float = 10.0, potential: str = "difference", ess_threshold: float = 0.5,
          dps_scale: float = 1.0, value: Callable[..., Tensor] | Completions | None = None,
          branch_below: float | None = None, seed: int = 0, max_failed: float = 0.5) -> GuidanceResult:
    """``n`` outputs of ``method``: unguided, bon (best of ``candidates``), dps, fk (``particles`` per output,
    tilt exp(lam r), the best final particle), svdd (M = ``candidates``, alpha) or svdd_mc (with ``value``).
    ``value=Completions(K, steps, alpha)`` makes svdd and fk score noisy states by K sampled completions
    instead of the denoised estimate (``guidance.completions``; their model calls are counted).
    ``branch_below``: svdd branches only into children at times t <= branch_below (``svdd.branch_schedule``).
    The prior draw depends on ``seed`` only, so methods see the same sizes / lengths per output.
    A run stops with ``RewardFailures`` once more than ``max_failed`` of its reward's samples failed to score
    (declared invalid samples, such as unparseable molecules, do not count)."""
    if method not in METHODS:
        raise ValueError(f"unknown guidance method {method!r}; choose one of {METHODS}")
    check_count("n", n)
    check_count("candidates", candidates)
    check_count("particles", particles)
    if method == "dps" and not (isinstance(reward, TensorReward) and reward.differentiable):
        raise ValueError(f"dps needs a differentiable reward on the {problem.modality} state; "
                         f"{reward.name!r} is not (use svdd, fk or bon)")
    if method == "svdd_mc" and (value is None or isinstance(value, Completions)):
        raise ValueError("svdd_mc needs a value network (train one with python -m molgen.guidance.train_value)")
    if isinstance(value, Completions) and method not in ("svdd", "fk"):
        raise ValueError(f"completion values steer svdd and fk, not {method!r}")
    per = rows_per_output(method, candidates, particles)
    g = torch.Generator().manual_seed(seed)
    chunks = problem.draw(n, per, g)
    smp, dec = problem.sampler, problem.decode
    out = []
    with torch.no_grad():
        for d in chunks:
            kw = {"generator": g, "mask": d.mask, "cond": d.cond}
            if method in ("unguided", "bon"):
                res = best_of_n(smp, d.x_T, reward, candidates=per, decode=dec, **kw)
            elif method == "dps":
                res = dps_sample(smp, d.x_T, reward, scale=dps_scale, **kw)
            elif method == "fk":
                tilt = Tilt(reward, lam=lam, potential=potential, decode=dec,
                            value=value if isinstance(value, Completions) else None)
                res = fk_sample(smp, d.x_T, particles=per, tilt=tilt,
                                policy=ResamplePolicy("systematic", 1, ess_threshold), final="best", **kw)
            else:
                res = svdd_sample(smp, d.x_T, reward, candidates=candidates, alpha=alpha, decode=dec,
                                  value=value if method == "svdd_mc" or isinstance(value, Completions) else None,
                                  branch_below=branch_below, **kw)
            out.append(res)
            check_failures(reward, max_failed)
    return merge(out)


def tanimoto_diversity(smiles: list[str]) -> float:
    """Mean pairwise 1 - Tanimoto similarity of Morgan fingerprints (radius 2, 2048 bits); NaN below 2."""
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(m) for m in (Chem.MolFromSmiles(s) for s in smiles) if m is not None]
    if len(fps) < 2:
        return float("nan")
    sims = [s for i, fp in enumerate(fps[:-1]) for s in DataStructs.BulkTanimotoSimilarity(fp, fps[i + 1:])]
    return float(1.0 - np.mean(sims))


def pairwise_hamming(tokens: Tensor) -> float:
    """Mean pairwise fraction of differing positions (equal-length rows)."""
    n = tokens.shape[0]
    if n < 2:
        return float("nan")
    diff = (tokens[:, None] != tokens[None]).double().mean(-1)
    return float(diff.sum() / (n * (n - 1)))


def result_names(res: GuidanceResult, names: Sequence[str] | None) -> Sequence[str]:
    """Record names of a result's outputs: the given ones, or guided_0, guided_1, ..."""
    if names is None:
        return [f"guided_{i}" for i in range(len(res.rewards))]
    if len(names) != len(res.rewards):
        raise ValueError(f"{len(names)} names for {len(res.rewards)} outputs")
    return names


@contextmanager
def snapshot(path: Path, modality: str) -> Iterator[tuple[Path, str]]:
    """A private copy of a checkpoint and its card (and the weights' SHA-256), removed afterwards."""
    if not path.exists():
        raise ValueError(f"no {modality} checkpoint at {path}; train one with `molgen train {modality}` or pass "
                         "--checkpoint")
    with tempfile.TemporaryDirectory(prefix="molgen_guide_") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        card = path.with_suffix(".json")
        if card.exists():
            shutil.copyfile(card, copy.with_suffix(".json"))
        yield copy, sha256_file(copy)
