"""Sampling molecules with the engine: atom counts from the training histogram (or given), zero-CoM noise,
any engine solver, optional property conditioning with classifier-free guidance.

    from molgen.molecules.sampling import load_model, sample_rdkit
    model, config = load_model()            # the shipped default checkpoint
    mols = sample_rdkit(model, config, n=8, solver="dpmpp_2m", steps=10, seed=0)   # RDKit Mols, 3D
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rdkit import Chem
from torch import Tensor, nn

from molgen.batching import largest_batch
from molgen.checkpoints import card_config, load_checkpoint, load_weights
from molgen.diffusion import ZeroCoM, sample
from molgen.diffusion.classifier_free import ClassifierFree
from molgen.diffusion.schedules import Schedule
from molgen.diffusion.step_scale import applies
from molgen.diffusion.tune import TunedPlan, tune
from molgen.molecules.io import Molecule, to_rdkit
from molgen.molecules.model import MoleculeDenoiser
from molgen.molecules.train import MODEL_KEYS

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "data" / "molecules" / "qm9_egnn.pt"
# AF3's step scale for the ODE solvers, below sigma/alpha = 3 A (about 2 sigma_data; above it the plain ODE).
# Chosen on development seed 1 (300 molecules, step-25,598 model, dpmpp_2m, logSNR grid), atom stability at
# 10 / 20 NFE: plain ODE 0.34 / 0.57; eta 1.5 below 1 / 3 / 10 A 0.32 / 0.40 / 0.37 and 0.77 / 0.79 / 0.67;
# eta 2 below 3 A 0.27 / 0.81; over the whole grid (from sigma/alpha ~ 10^2) the state's noise falls far below
# the level the denoiser is told and every molecule breaks.
STEP_SCALE, STEP_SCALE_BELOW = 1.5, 3.0
# Where an ODE solver's grid starts: sigma/alpha = 4 A (about 3 sigma_data) instead of the schedule's 119 A. On the
# full logSNR grid 3 of 10 calls fall above 10 A, where a molecule is pure noise; starting at 4 A moves them to
# where bonds form. Chosen on development seed 1 (300 molecules, step-35,231 model, dpmpp_2m, eta 1.5 below 3 A),
# 10 NFE atom / molecule stability / validity: start 119 A 40 / 0 / 86 %, 12 A 69 / 1 / 79 %, 8 A 73 / 3 / 73 %,
# 6 A 73 / 4 / 74 %, 4 A 76 / 5.3 / 73 %; at 50 NFE the start changes nothing (119 / 8 / 4 A: atom 84.6 / 84.7 /
# 84.5 %, molecule 18.7 / 20.3 / 18.3 %): the start only re-spends the calls. The prior N(0, 1) is close to x's
# law there (variance 1 + alpha^2 (sigma_data^2 - 1) = 1.06 at 4 A). Stochastic solvers keep the whole schedule,
# EDM's protocol: 1000 ancestral steps from 4 A gave molecule stability 1.3 % against 4.3 % (300 molecules, seeds
# 0 and 1, atom stability 71 % both), a gap of 2.2 standard errors that a default should not risk.
FIRST_NOISE = 4.0


def load_model(path: str | Path | None = None) -> tuple[MoleculeDenoiser, dict[str, Any]]:
    """Denoiser (eval mode) and its config (atom-count histogram, property statistics) from a checkpoint."""
    path = path or DEFAULT_CHECKPOINT
    state, card = load_checkpoint(path)
    config = card_config(card, path, ("atom_hist",))
    model = MoleculeDenoiser(**{k: config[k] for k in MODEL_KEYS if k in config})
    return load_weights(model, state, path).eval(), config


def sample_atom_counts(hist: Sequence[float], n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` atom counts drawn from a histogram (index = number of atoms)."""
    probs = torch.as_tensor(hist, dtype=torch.float64)
    if probs.sum() <= 0:
        raise ValueError("atom-count histogram is empty")
    return torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)


def size_chunks(counts: Tensor, batch_size: int, slack: float = 1.25) -> list[Tensor]:
    """Split molecule indices into batches of similar size, so padding wastes little of the dense
    O(N^2) edge work: indices sorted by atom count, and a batch is closed when it holds ``batch_size``
    molecules or when padding to the new molecule's width would cost more than ``slack`` times the
    batch's own work (len * n_max^2 > slack * sum n^2). ``slack=1`` gives exact-size batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.argsort(counts, stable=True).tolist()
    sizes = counts.tolist()
    chunks: list[list[int]] = []
    work = 0
    for i in order:
        n2 = sizes[i] ** 2
        if chunks and len(chunks[-1]) < batch_size and (len(chunks[-1]) + 1) * n2 <= slack * (work + n2):
            chunks[-1].append(i)
            work += n2
        else:
            chunks.append([i])
            work = n2
    return [torch.tensor(c, dtype=torch.long) for c in chunks]


def normalise_condition(condition: Mapping[str, float], config: Mapping[str, Any]) -> Tensor:
    """{"gap": 0.25} -> normalised property vector [P] in the model's property order."""
    names = list(config.get("properties", []))
    unknown = sorted(set(condition) - set(names))
    if unknown:
        raise ValueError(f"the model is not conditioned on {unknown}; it knows {names or 'no properties'}")
    missing = sorted(set(names) - set(condition))
    if missing:
        raise ValueError(f"condition needs a value for every model property; missing {missing}")
    mean, std = torch.tensor(config["prop_mean"]), torch.tensor(config["prop_std"])
    raw = torch.tensor([float(condition[k]) for k in names])
    return (raw - mean) / std


def sampler_settings(solver: str, step_scale: float | None = None, step_scale_below: float | None = None,
                     first_noise: float | None = None) -> dict[str, float]:
    """The step scale and grid start ``sample_molecules`` uses with ``solver``: the given values, else for ODE
    solvers ``STEP_SCALE`` below ``STEP_SCALE_BELOW`` from ``FIRST_NOISE``, for stochastic ones no scale (1) from
    the schedule's start (inf)."""
    ode = applies(solver)
    return {
        "step_scale": (STEP_SCALE if ode else 1.0) if step_scale is None else step_scale,
        "step_scale_below": STEP_SCALE_BELOW if step_scale_below is None else step_scale_below,
        "first_noise": (FIRST_NOISE if ode else math.inf) if first_noise is None else first_noise,
    }


def grid_ends(schedule: Schedule, first_noise: float, last_noise: float | None) -> dict[str, float]:
    """Grid options t_max / t_min for sigma/alpha ``first_noise`` at the first model call (clipped to the
    schedule's start) and ``last_noise`` at the last (None: the schedule's end), both in Angstrom."""
    for name, value in (("first_noise", first_noise), ("last_noise", last_noise)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 (sigma/alpha in Angstrom), got {value}")
    if last_noise is not None and not first_noise > last_noise:
        raise ValueError(f"first_noise ({first_noise}) must be above last_noise ({last_noise})")
    return {"t_max": min(float(schedule.t_of_rho(first_noise)), schedule.t_max),
            "t_min": schedule.t_min if last_noise is None else float(schedule.t_of_rho(last_noise))}


def tune_plan(model: MoleculeDenoiser, config: Mapping[str, Any], nfe: int, *, batch: int = 128,
              budget_s: float = 120.0, seed: int = 0, progress: Any = None) -> TunedPlan:
    """A sampling plan of ``nfe`` calls fitted to ``model`` (``molgen.diffusion.tune``) on ``batch`` noise draws
    with atom counts from the training histogram, against the many-step solution of the ODE the preset samples
    (AF3's step scale ``STEP_SCALE`` below ``STEP_SCALE_BELOW``)."""
    g = torch.Generator().manual_seed(seed)
    counts = sample_atom_counts(config["atom_hist"], batch, g).clamp(1, int(config.get("max_atoms", 29)))
    mask = torch.arange(int(counts.max())) < counts[:, None]
    space = ZeroCoM(3)
    x_T = space.noise_like(torch.zeros(batch, mask.shape[1], model.n_features), mask, g) * model.schedule.prior_std
    return tune(model, model.schedule, x_T, nfe=nfe, budget_s=budget_s, mask=mask, cond={"mask": mask},
                space=space, step_scale=STEP_SCALE, step_scale_below=STEP_SCALE_BELOW, progress=progress)


@torch.no_grad()
def sample_molecules(model: MoleculeDenoiser, config: Mapping[str, Any], n: int, **settings: Any) -> list[Molecule]:
    """Generate ``n`` molecules with the sampling ``settings`` of ``sample_states`` (solver, steps, seed, atom
    counts, condition, grid, step scale, plan, ...), decoded in the order they were asked for."""
    out: list[Molecule | None] = [None] * n
    seed = settings.get("seed", 0)
    for chunk in sample_states(model, config, n, **settings):
        names = [f"molgen_{seed}_{idx}" for idx in chunk.index.tolist()]
        for idx, mol in zip(chunk.index.tolist(), decode_molecules(model, chunk.x0, chunk.mask, names)):
            out[idx] = mol
    return [m for m in out if m is not None]


@dataclass(frozen=True)
class StateChunk:
    """One batch of a sampling run: which molecules (``index`` into the run), their noise ``x_T`` at the first
    grid point, denoised states ``x0`` [B, N, F] and atom ``mask`` [B, N]."""

    index: Tensor
    x_T: Tensor
    x0: Tensor
    mask: Tensor


@torch.no_grad()
def sample_states(
    model: MoleculeDenoiser,
    config: Mapping[str, Any],
    n: int,
    *,
    solver: str = "dpmpp_2m",
    steps: int = 10,
    seed: int = 0,
    atoms: int | Sequence[int] | None = None,
    condition: Mapping[str, float] | None = None,
    guidance: float = 1.0,
    batch_size: int | str = 256,
    grid: str = "logsnr",
    grid_options: Mapping[str, Any] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    step_scale: float | None = None,
    step_scale_below: float | None = None,
    first_noise: float | None = None,
    last_noise: float | None = None,
    device: str | torch.device = "cpu",
    plan: TunedPlan | None = None,
) -> Iterator[StateChunk]:
    """A sampling run of ``n`` molecules as states, one size-sorted batch at a time, before decoding (each noise
    with its denoised state; ``sample_molecules`` decodes them, ``molgen.molecules.distill`` keeps the pairs).

    Atom counts: ``atoms`` (one int for all, or one per molecule) or drawn from the training histogram. Same seed
    -> same molecules (on the same device and batch size). ``batch_size="auto"``: the largest batch of the widest
    molecules that fits the device (``molgen.batching``). ODE solvers integrate AF3's step-scaled ODE below
    sigma/alpha = ``step_scale_below`` (``molgen.diffusion.step_scale``). The grid runs from sigma/alpha =
    ``first_noise`` (Angstrom; inf: the schedule's start) to ``last_noise`` (default: the schedule's end), with
    the schedule's prior N(0, prior_std^2) at its start, carried to the first call along the flow of
    unit-variance Gaussian data (the identity on VP schedules); t_max / t_min in ``grid_options`` take
    precedence. Defaults: ``sampler_settings``. A ``plan`` (``tune_plan``, fitted on this model) replaces the
    solver, grid and step scale."""
    device = torch.device(device)
    model = model.to(device)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    max_atoms = int(config.get("max_atoms", 29))
    if atoms is None:
        counts = sample_atom_counts(config["atom_hist"], n, g)
    else:
        counts = torch.as_tensor([atoms] * n if isinstance(atoms, int) else list(atoms), dtype=torch.long)
        if len(counts) != n:
            raise ValueError(f"got {len(counts)} atom counts for {n} molecules")
    if int(counts.min()) < 1 or int(counts.max()) > max_atoms:
        raise ValueError(f"atom counts must be in 1..{max_atoms} (the model's maximum), got {counts.tolist()[:5]}...")
    if device.type != "cpu":  # diffusion noise is drawn on the model's device
        g = torch.Generator(device=device).manual_seed(seed)
    denoiser: nn.Module = model
    props = None
    if condition:
        props = normalise_condition(condition, config)
        denoiser = ClassifierFree(model, guidance, keys=("props",))
    if batch_size == "auto":
        batch_size = largest_batch(lambda b: one_call(denoiser, model, b, int(counts.max()), props, device), device)
    space = ZeroCoM(3)
    scale = sampler_settings(solver, step_scale, step_scale_below, first_noise)
    grid_options = {**grid_ends(model.schedule, scale.pop("first_noise"), last_noise), **(grid_options or {})}
    if plan is not None:  # one check for every chunk: padded states are described by their feature width
        plan.check(model, model.schedule, torch.zeros(1, 1, model.n_features), mask=torch.ones(1, 1, dtype=torch.bool))
    run = plan.kwargs if plan is not None else {"solver": solver, "steps": steps, "grid": grid, "noise_at_t_max": True,
                                                "solver_options": solver_options, "grid_options": grid_options, **scale}
    for chunk in size_chunks(counts, batch_size):
        c = counts[chunk]
        width = int(c.max())
        mask = (torch.arange(width) < c.unsqueeze(1)).to(device)
        shape = torch.zeros(len(chunk), width, model.n_features, device=device)
        x_T = space.noise_like(shape, mask, g) * model.schedule.prior_std
        cond: dict[str, Tensor] = {"mask": mask}
        if props is not None:
            cond["props"] = props.expand(len(chunk), -1).contiguous().to(device)
        x0 = sample(denoiser, model.schedule, x_T, generator=g, mask=mask, cond=cond, space=space, **run)
        yield StateChunk(chunk, x_T, x0, mask)


def decode_molecules(model: MoleculeDenoiser, x0: Tensor, mask: Tensor,
                     names: Sequence[str] | None = None) -> list[Molecule]:
    """Denoised states [B, N, F] with atom mask [B, N] as molecules: element of each real atom by the model's
    type decoder, positions the first three features (Angstrom, float64)."""
    x0, mask = x0.cpu(), mask.cpu()
    types = model.decode_types(x0)
    out = []
    for row, m in enumerate(mask):
        k = int(m.sum())
        symbols = tuple(model.atom_types[j] for j in types[row, :k].tolist())
        out.append(Molecule(symbols, x0[row, :k, :3].double().numpy(), names[row] if names else ""))
    return out


def one_call(denoiser: nn.Module, model: MoleculeDenoiser, batch: int, width: int, props: Tensor | None,
             device: torch.device) -> Tensor:
    """One denoiser call on ``batch`` molecules of ``width`` atoms (the memory probe of ``batch_size="auto"``)."""
    x = torch.zeros(batch, width, model.n_features, device=device)
    mask = torch.ones(batch, width, dtype=torch.bool, device=device)
    t = torch.full((batch,), 0.5, device=device)
    extra = {} if props is None else {"props": props.expand(batch, -1).to(device)}
    return denoiser(x, t, mask=mask, **extra)


def sample_rdkit(model: MoleculeDenoiser, config: Mapping[str, Any], n: int, **kwargs: Any) -> list[Chem.Mol]:
    """``sample_molecules`` as RDKit molecules (3D conformer, EDM-inferred bonds, sanitised when possible)."""
    return [to_rdkit(m) for m in sample_molecules(model, config, n, **kwargs)]
