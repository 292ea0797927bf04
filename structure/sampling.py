"""Backbone generation with the engine's solvers, and motif scaffolding by replacement.

The CA state lives in ZeroCoM(3) on the engine's ``edm`` schedule (alpha = 1, sigma in Angstrom) on a Karras
grid placed by ``GridSettings`` (``FEW_STEPS`` by default, ``MANY_STEPS`` for AF3's protocol); the denoiser
predicts x0. ``af3`` is the AlphaFold 3 sampler (200 steps, gamma_0 0.8); with ``gamma_0 = 0, step_scale = 1``
it is the Protenix-Mini few-step ODE form.

Motif scaffolding: after every solver step the motif's CA atoms are replaced by the reference motif, rigidly
superimposed (Kabsch) on the current motif estimate and noised to the next grid level,
x_motif <- R m + c + sigma_{i+1} z; the final motif is superimposed the same way and set exactly, and the
whole backbone is moved into the input file's frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from molgen.diffusion.classifier_free import ClassifierFree
from molgen.geometry import centre, rmsd_superposed, superpose
from molgen.structure.geometry import project_ca_bonds
from molgen.structure.io import Backbone, backbone_from_ca, read_backbone
from molgen.structure.model import BackboneDenoiser, ModelConfig
from molgen.structure.ss_prior import SSRequest

if TYPE_CHECKING:
    from molgen.diffusion.tune import TunedPlan

SIGMA_MIN, SIGMA_MAX = 0.02, 80.0
WARM_START_SIGMA = 5.0  # first model call (A) of a warm-started run
STEP_SCALE = 1.5  # AF3's step scale eta, used by every ODE solver too (molgen.diffusion.step_scale)
AF3_DEFAULTS = {"gamma_0": 0.8, "gamma_min": 1.0, "noise_scale": 1.003, "step_scale": STEP_SCALE}
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "data" / "structure" / "backbone_egnn.pt"
SS_CHECKPOINT = DEFAULT_CHECKPOINT.with_name("backbone_ss.pt")  # secondary-structure conditioned (``--ss``)


@dataclass(frozen=True)
class GridSettings:
    """Where a run's grid lies: the Karras exponent ``rho``, the noise level (A) of the last model call
    ``sigma_last`` (its denoised estimate is the output), and whether it starts warm at ``WARM_START_SIGMA``.

    The defaults are the few-step settings: rho = -4 puts more of 5-10 calls at low noise than a geometric grid
    (80, 4.3, 0.80, 0.25, 0.1 A for 5 calls), where the CA-CA geometry is set; a grid ending at the schedule's
    0.02 A spends a few-step solver's last call where it can no longer move the chain; the warm start carries x_T
    along the exact flow of the chain-shaped prior (``structure.prior``) to 5 A. ``MANY_STEPS`` is EDM's grid
    (rho = 7 to 0.02 A from the schedule's start), AF3's protocol."""

    rho: float = -4.0
    sigma_last: float = 0.1
    warm_start: bool = True


FEW_STEPS = GridSettings()
MANY_STEPS = GridSettings(rho=7.0, sigma_last=SIGMA_MIN, warm_start=False)


def load_model(path: str | Path, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> BackboneDenoiser:
    """The shipped (or any exported) denoiser with the engine's ``edm`` schedule attached, in eval mode."""
    from molgen.checkpoints import card_config, load_checkpoint, load_weights
    from molgen.diffusion import get_schedule

    state, card = load_checkpoint(path)
    fields = set(ModelConfig.__dataclass_fields__)
    cfg = ModelConfig(**{k: v for k, v in card_config(card, path, ()).items() if k in fields})
    model = BackboneDenoiser(cfg, get_schedule("edm", sigma_min=sigma_min, sigma_max=sigma_max))
    return load_weights(model, state, path).eval().requires_grad_(False)


def check_length(model: BackboneDenoiser, length: int) -> None:
    lo, hi = model.cfg.min_length, model.cfg.max_length
    if not lo <= length <= hi:
        raise ValueError(f"backbone length {length} is outside the model's range {lo}-{hi}")


def default_step_scale(solver: str) -> float:
    """``STEP_SCALE`` for af3 and the engine's ODE solvers, 1 for the other stochastic ones.

    eta = 1.5 integrates dy/drho = 1.5 (y - D) / rho, AF3's step-scaled ODE, to the solver's order: the chain
    keeps less noise than the denoiser is told, which tightens the CA-CA bonds (docs/backbones.md)."""
    from molgen.diffusion.step_scale import applies

    return STEP_SCALE if solver == "af3" or applies(solver) else 1.0


def make_sampler(
    model: BackboneDenoiser,
    solver: str,
    steps: int,
    length: int | None = None,
    grid: str = "karras",
    solver_options: dict | None = None,
    settings: GridSettings = FEW_STEPS,
    step_scale: float | None = None,
    net: torch.nn.Module | None = None,
):
    """Engine sampler on the model's schedule in ZeroCoM(3), its grid placed by ``settings`` (a Karras grid
    takes its rho); ``step_scale`` (default ``default_step_scale``) is AF3's eta: af3's option, and for ODE
    solvers the step-scaled ODE of the engine (its grid is the noise levels the denoiser is told). A warm start
    needs the chain ``length``. ``net`` is what the solver calls (default the model; a guidance wrapper)."""
    from molgen.diffusion import Sampler, ZeroCoM
    from molgen.structure.prior import chain_prior

    step_scale = default_step_scale(solver) if step_scale is None else step_scale
    if solver == "af3":  # its own Euler step takes the scale
        solver_options, step_scale = {"step_scale": step_scale, **(solver_options or {})}, 1.0
    sched, warm = model.schedule, settings.warm_start
    lo, hi = float(sched.rho(torch.tensor(sched.t_min))), float(sched.rho(torch.tensor(sched.t_max)))
    hi = WARM_START_SIGMA if warm else hi
    if not lo <= settings.sigma_last < hi:
        raise ValueError(f"sigma_last {settings.sigma_last} A is outside the "
                         f"{'warm-started run' if warm else 'schedule'}'s noise range [{lo:.3g}, {hi:.3g}) A")
    if warm and length is None:
        raise ValueError("a warm-started sampler needs the chain length")
    grid_options = {"t_min": max(float(sched.t_of_rho(settings.sigma_last)), sched.t_min)}
    if grid == "karras":
        grid_options["rho"] = settings.rho
    grid_options["t_max"] = float(sched.t_of_rho(WARM_START_SIGMA)) if warm else sched.t_max
    return Sampler(
        model if net is None else net,
        sched,
        solver,
        steps=steps,
        grid=grid,
        space=ZeroCoM(3),
        solver_options=solver_options,
        grid_options=grid_options,
        warm_start=chain_prior(length) if warm else None,
        step_scale=step_scale,
    )


def tune_plan(model: BackboneDenoiser, length: int, nfe: int, *, batch: int = 32, budget_s: float = 120.0,
              seed: int = 0, progress: Any = None) -> TunedPlan:
    """A sampling plan of ``nfe`` calls for chains of ``length`` residues fitted to ``model``
    (``molgen.diffusion.tune``, warm-started from the chain-shaped prior as the default few-step runs are) on
    ``batch`` noise draws, against the many-step solution of the step-scaled ODE the preset samples."""
    from molgen.diffusion import ZeroCoM
    from molgen.diffusion.tune import tune
    from molgen.structure.prior import chain_prior

    check_length(model, length)
    x_T = initial_noise(model, batch, length, torch.Generator().manual_seed(seed))
    return tune(model, model.schedule, x_T, nfe=nfe, budget_s=budget_s, space=ZeroCoM(3),
                warm_start=chain_prior(length), step_scale=STEP_SCALE, progress=progress)


def initial_noise(model: BackboneDenoiser, n: int, length: int, generator: torch.Generator) -> Tensor:
    """x_T = prior_std * z, z ~ N(0, I) projected to zero centre of mass; [n, length, 3]."""
    return model.schedule.prior_std * centre(torch.randn(n, length, 3, generator=generator))


@torch.no_grad()
def sample_ca(
    model: BackboneDenoiser,
    n: int,
    length: int,
    solver: str,
    steps: int,
    seed: int = 0,
    grid: str = "karras",
    solver_options: dict | None = None,
    x_T: Tensor | None = None,
    settings: GridSettings = FEW_STEPS,
    ideal_bonds: bool = False,
    step_scale: float | None = None,
    generator: torch.Generator | None = None,
    plan: TunedPlan | None = None,
    ss: SSRequest | None = None,
    ss_guidance: float = 1.0,
) -> Tensor:
    """``n`` CA traces [n, length, 3] (Angstrom) on the model's device, every draw from one CPU generator
    (``generator``, else one seeded with ``seed``; a run in batches passes one generator to all of them);
    ``ideal_bonds`` projects each trace onto CA-CA = 3.80 A (``structure.geometry.project_ca_bonds``);
    ``settings`` and ``step_scale`` as in ``make_sampler``. A ``plan`` (``tune_plan``, fitted on this model and
    length) replaces solver, grid and step scale. ``ss`` asks a model with ``ss_condition`` for a secondary
    structure (its per-chain strings drawn from ``generator`` too), with classifier-free guidance weight
    ``ss_guidance`` (1: the conditional model alone; above 1, two calls per step)."""
    check_length(model, length)
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    net, cond = model, {}
    if ss is not None:
        if not model.cfg.ss_condition:
            raise ValueError("this backbone model has no secondary-structure conditioning; train one with "
                             "`molgen train backbones --ss-condition`")
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
        net, cond = ClassifierFree(model, ss_guidance, keys=("ss", "composition")), ss.tensors(n, length, rng)
    device = next(model.parameters()).device
    x_T = (initial_noise(model, n, length, g) if x_T is None else x_T).to(device)
    if device.type != "cpu":  # the solver's own noise is drawn on the device, seeded from the CPU stream
        g = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
    if plan is None:
        sampler = make_sampler(model, solver, steps, length, grid, solver_options, settings, step_scale, net)
    else:
        from molgen.diffusion import Sampler, ZeroCoM
        from molgen.structure.prior import chain_prior

        warm = chain_prior(length) if plan.fitted_on.get("warm_start") else None
        plan.check(model, model.schedule, x_T, warm_start=warm)
        sampler = Sampler(net, model.schedule, space=ZeroCoM(3), warm_start=warm, **plan.kwargs)
    cond = {k: v.to(device) for k, v in cond.items()}
    x0 = sampler.finish(sampler.run(sampler.init(x_T, cond=cond), g)).cpu()
    return project_ca_bonds(x0) if ideal_bonds else x0


# ---------------------------------------------------------------------------------------------- motifs
@dataclass(frozen=True)
class Segment:
    """A contig part: a motif (chain, first, last residue number) or a free stretch of min..max residues."""

    chain: str | None
    start: int
    end: int

    @property
    def is_motif(self) -> bool:
        return self.chain is not None

    def __str__(self) -> str:
        span = str(self.start) if self.start == self.end else f"{self.start}-{self.end}"
        return f"{self.chain or ''}{span}"


_MOTIF = re.compile(r"^([A-Za-z])(-?\d+)-(-?\d+)$|^([A-Za-z])(-?\d+)$")
_FREE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_contig(spec: str) -> list[Segment]:
    """Parse ``A10-25,40-60,A40-52``: chain-prefixed ranges are motif residues (inclusive) from the input
    structure, bare numbers or ranges are generated stretches whose length is drawn from the range."""
    if not spec or not spec.strip():
        raise ValueError("empty contig spec")
    parts = [p.strip() for p in spec.split(",")]
    out = []
    for k, part in enumerate(parts):
        if m := _MOTIF.match(part):
            chain = m.group(1) or m.group(4)
            a = int(m.group(2) if m.group(1) else m.group(5))
            b = int(m.group(3)) if m.group(1) else a
            if b < a:
                raise ValueError(f"contig part {k + 1} {part!r}: motif range end {b} is before its start {a}")
            out.append(Segment(chain, a, b))
        elif m := _FREE.match(part):
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) else a
            if b < a:
                raise ValueError(f"contig part {k + 1} {part!r}: length range {a}-{b} is decreasing")
            out.append(Segment(None, a, b))
        else:
            raise ValueError(f"contig part {k + 1} {part!r} is neither a motif like 'A10-25' nor a length like '40-60'")
    if not any(s.is_motif for s in out):
        raise ValueError(f"contig {spec!r} names no motif residues (e.g. 'A10-25')")
    return out


def motif_residues(segments: list[Segment], bb_by_chain: dict[str, Backbone]) -> list[list[int]]:
    """Per motif segment, the indices of its residues in the input chain (clear error for any it lacks)."""
    out = []
    for seg in segments:
        if not seg.is_motif:
            continue
        if seg.chain not in bb_by_chain:
            raise ValueError(f"motif {seg}: the input has no chain {seg.chain}")
        bb = bb_by_chain[seg.chain]
        idx = []
        for num in range(seg.start, seg.end + 1):
            try:
                idx.append(bb.index_of(num))
            except ValueError:
                where = f"motif {seg}: chain {seg.chain} of {bb.name}"
                raise ValueError(f"{where} has no residue {num}") from None
        out.append(idx)
    return out


def layout(segments: list[Segment], rng: np.random.Generator) -> tuple[list[int], int]:
    """Draw each free stretch's length; returns (positions of the motif residues in the new chain, length)."""
    pos, cursor = [], 0
    for seg in segments:
        n = seg.end - seg.start + 1 if seg.is_motif else int(rng.integers(seg.start, seg.end + 1))
        if seg.is_motif:
            pos.extend(range(cursor, cursor + n))
        cursor += n
    return pos, cursor


@dataclass
class ScaffoldResult:
    ca: Tensor  # [B, L, 3] in the input file's frame
    motif_positions: list[int]
    motif_rmsd: Tensor  # [B] CA RMSD of the generated motif (before it is set exactly) to the input motif


@torch.no_grad()
def scaffold_ca(
    model: BackboneDenoiser,
    motif: Tensor,
    positions: list[int],
    length: int,
    n: int,
    solver: str,
    steps: int,
    seed: int = 0,
    grid: str = "karras",
    solver_options: dict | None = None,
    settings: GridSettings = FEW_STEPS,
    step_scale: float | None = None,
) -> ScaffoldResult:
    """``n`` backbones of ``length`` residues whose CA at ``positions`` reproduce ``motif`` [M, 3]."""
    check_length(model, length)
    g = torch.Generator().manual_seed(seed)
    sampler = make_sampler(model, solver, steps, length, grid, solver_options, settings, step_scale)
    sched, space = model.schedule, sampler.space
    ref = motif.to(torch.float32)[None].expand(n, -1, -1)
    state = sampler.init(initial_noise(model, n, length, g))
    t = sampler.t_grid[0]
    for i in range(sampler.n_steps - 1):
        state = sampler.step(state, i, g)
        alpha, sigma = float(sched.alpha(t[i + 1])), float(sched.sigma(t[i + 1]))
        x = state.x.clone()
        r, c = superpose(ref, x[:, positions] / alpha)
        z = torch.randn(n, len(positions), 3, generator=g)
        x[:, positions] = alpha * (ref @ r + c) + sigma * z
        state = replace(state, x=space.project(x, None), x0=None)
    x0 = sampler.finish(state)
    rmsd = rmsd_superposed(ref, x0[:, positions])
    r_back, c_back = superpose(x0[:, positions], ref)  # generated motif -> input frame
    out = x0 @ r_back + c_back
    out[:, positions] = ref
    return ScaffoldResult(out, positions, rmsd)


def scaffold_from_file(
    model: BackboneDenoiser, path: str | Path, contig: str, n: int, seed: int = 0, **kwargs
) -> tuple[list[Backbone], ScaffoldResult]:
    """Motif scaffolding from a contig spec against the chains of ``path``; returns backbones + raw result."""
    segments = parse_contig(contig)
    chains = {s.chain for s in segments if s.is_motif}
    bbs = {c: read_backbone(path, c) for c in chains}
    idx = motif_residues(segments, bbs)
    motif_segs = [s for s in segments if s.is_motif]
    motif = np.concatenate([bbs[s.chain].ca[i] for s, i in zip(motif_segs, idx)])
    seq_motif = "".join(bbs[s.chain].sequence[j] for s, i in zip(motif_segs, idx) for j in i)
    positions, length = layout(segments, np.random.default_rng(seed))
    try:
        check_length(model, length)
    except ValueError as err:
        raise ValueError(f"contig {contig!r} (seed {seed}) lays out {length} residues: {err}") from None
    res = scaffold_ca(model, torch.from_numpy(motif), positions, length, n, seed=seed, **kwargs)
    seq = ["G"] * length
    for p, aa in zip(positions, seq_motif):
        seq[p] = aa
    return [backbone_from_ca(ca.numpy(), "".join(seq), name=f"scaffold_{k:04d}") for k, ca in enumerate(res.ca)], res
