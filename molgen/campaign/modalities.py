"""What a campaign needs from each modality: generate a round (guided, optionally refining parents), the
reward inputs, a per-design naturalness (higher = closer to the training data) and a distance for diversity.

Generation is the ``guidance`` package's: ``guidance.tasks.get_problem`` (the modality's sampler, prior draw and
decoder) and ``guidance.tasks.guide`` (unguided, best-of-N, FK steering, SVDD, DPS). Refinement (SDEdit) runs the
same ``guide`` on a problem whose sampler starts at time t and whose prior draw is the selected designs noised to
t: masked diffusion masks each token independently with probability 1 - alpha(t) (an exact draw of
q(x_t | x_0)); continuous diffusion draws x_t = alpha(t) x_0 + sigma(t) eps (zero centre of mass).

Naturalness: rna/dna -(model NELBO in bits per nucleotide, 8 stratified times), molecules the EDM atom
stability of the molecule, backbones the fraction of CA-CA distances within 3.80 +- 0.10 Angstrom.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molgen.campaign.config import CampaignConfig
from molgen.campaign.selection import hamming, tanimoto_distances, tm_distances

NATURALNESS_LABEL = {
    "rna": "-NELBO (bits/nt)",
    "dna": "-NELBO (bits/nt)",
    "molecules": "atom stability",
    "backbones": "CA-CA valid fraction",
}
DEFAULT_LENGTH = {"backbones": 64}
METHOD_NAMES = {"none": "unguided"}  # campaign name -> guidance.tasks name (the others are the same)


@dataclass
class Design:
    """One generated design; ``structure`` is a MOL block (molecules) or PDB text (backbones)."""

    sequence: str | None = None
    smiles: str | None = None
    structure: str | None = None
    parent: str | None = None
    origin: str = "sample"
    naturalness: float = math.nan


@dataclass
class RoundOutput:
    designs: list[Design]
    model_calls: int


def checkpoint_path(cfg: CampaignConfig) -> Path:
    """The checkpoint file the campaign's model comes from (the shipped default when none is given)."""
    from molgen.guidance.tasks import default_checkpoint

    return Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(cfg.modality)


class Modality:
    """A ``guidance.tasks.Problem`` plus the conversions between its states and stored designs."""

    def __init__(self, cfg: CampaignConfig) -> None:
        from molgen.guidance.tasks import DEFAULT_STEPS, get_problem

        self.cfg = cfg
        self.problem = get_problem(cfg.modality, steps=cfg.sampler.steps or DEFAULT_STEPS[cfg.modality],
                                   checkpoint=cfg.checkpoint, length=cfg.length or DEFAULT_LENGTH.get(cfg.modality),
                                   solver=cfg.sampler.solver)

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, n: int, seed: int, reward: Any, parents: Sequence[tuple[str, Design]]) -> RoundOutput:
        """``n`` designs: ``refine.fraction`` of them (when there are parents) refine the parents in turn."""
        parents = [p for p in parents if self.refinable(p[1])]
        n_refine = round(self.cfg.refine.fraction * n) if parents else 0
        designs: list[Design] = []
        calls = 0
        if n - n_refine:
            res = self._guide(self.problem, reward, n - n_refine, seed)
            designs += self.designs(res)
            calls += res.model_calls
        if n_refine:
            picked = [parents[i % len(parents)] for i in range(n_refine)]
            res = self._guide(self.refine_problem([d for _, d in picked]), reward, n_refine, seed + 1)
            for d, (pid, _) in zip(self.designs(res), picked):
                designs.append(dataclasses.replace(d, parent=pid, origin="refine"))
            calls += res.model_calls
        return RoundOutput(designs, calls)

    def _guide(self, problem: Any, reward: Any, n: int, seed: int) -> Any:
        from molgen.guidance.tasks import guide

        g = self.cfg.guidance
        return guide(problem, METHOD_NAMES.get(g.method, g.method), reward, n, candidates=g.candidates,
                     particles=g.particles, alpha=g.alpha, lam=g.lam, potential=g.potential, dps_scale=g.scale,
                     seed=seed)

    def refine_problem(self, parents: Sequence[Design]) -> Any:
        """The problem whose sampler starts at t = refine.t and whose prior is the parents noised to t."""
        from molgen.guidance.tasks import Draw

        t = self.cfg.refine.t
        x0, mask = self.encode(parents)

        def draw(outputs: int, per: int, g: torch.Generator) -> list[Draw]:
            if outputs != len(parents):
                raise ValueError(f"refinement draw: {outputs} outputs for {len(parents)} parents")
            x_t = self.noise_to(x0, mask, t, g).repeat_interleave(per, 0)
            m = None if mask is None else mask.repeat_interleave(per, 0)
            return [Draw(x_t, m, None if m is None else {"mask": m})]

        return dataclasses.replace(self.problem, sampler=self.partial_sampler(t), draw=draw)

    # ------------------------------------------------------------------------------------------ per modality
    def refinable(self, design: Design) -> bool:
        raise NotImplementedError

    def designs(self, res: Any) -> list[Design]:
        raise NotImplementedError

    def encode(self, designs: Sequence[Design]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def noise_to(self, x0: Tensor, mask: Tensor | None, t: float, g: torch.Generator) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps in the sampler's space (continuous modalities)."""
        smp = self.problem.sampler
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = float(smp.schedule.alpha(tt)), float(smp.schedule.sigma(tt))
        x_t = a * x0 + s * smp.space.noise_like(x0, mask, g)
        return smp.space.project(x_t, mask)

    def partial_sampler(self, t: float) -> Any:
        """The continuous sampler on a grid from t down, with ceil(steps * t) + 1 points (at least 2); when t
        lies below the sampler's last time (few-step grids stop early), the grid runs down to the schedule's end.
        It starts from the given noisy states, so without the sampler's warm start (which carries pure noise)."""
        smp = self.problem.sampler
        options = {**(smp.grid_options or {}), "t_max": float(t)}
        if options.get("t_min", smp.schedule.t_min) >= t:
            options["t_min"] = smp.schedule.t_min
        return dataclasses.replace(smp, steps=max(2, math.ceil(smp.steps * t) + 1), nfe=None, grid_options=options,
                                   warm_start=None)

    def reward_inputs(self, designs: Sequence[Design]) -> Any:
        raise NotImplementedError

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ sequences
class Sequences(Modality):
    """RNA / DNA from the masked-diffusion model."""

    def __init__(self, cfg: CampaignConfig) -> None:
        from molgen.sequences.alphabets import get_alphabet

        super().__init__(cfg)
        self.alphabet = get_alphabet(cfg.modality)

    def refinable(self, design: Design) -> bool:
        return bool(design.sequence)

    def designs(self, res: Any) -> list[Design]:
        out = [Design(sequence=s) for s in self.problem.decode(res.samples)]
        x0, _ = self.encode(out)
        smp = self.problem.sampler
        nelbo = smp.process.nelbo(smp.model, x0, n_t=8, generator=torch.Generator().manual_seed(0))
        bits = nelbo / (smp.process.is_data(x0).sum(-1).clamp_min(1) * math.log(2))
        for d, b in zip(out, bits.tolist()):
            d.naturalness = -float(b)
        return out

    def encode(self, designs: Sequence[Design]) -> tuple[Tensor, None]:
        seqs = [d.sequence or "" for d in designs]
        x = torch.full((len(seqs), max(len(s) for s in seqs)), self.alphabet.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = self.alphabet.encode(s, record=f"design {i}")
        return x, None

    def noise_to(self, x0: Tensor, mask: Tensor | None, t: float, g: torch.Generator) -> Tensor:
        return renoise(self.problem.sampler.process, x0, t, g)

    def partial_sampler(self, t: float) -> Any:
        from molgen.diffusion.discrete import DiscreteSampler

        smp = self.problem.sampler
        return partial_discrete(DiscreteSampler(smp.model, smp.process, smp.solver, smp.steps, options=smp.options), t)

    def reward_inputs(self, designs: Sequence[Design]) -> list[str]:
        return [d.sequence or "" for d in designs]

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        seqs = [d.sequence or "" for d in designs]
        return lambda i, j: hamming(seqs[i], seqs[j])


def renoise(process: Any, x0: Tensor, t: float, generator: torch.Generator) -> Tensor:
    """x_t ~ q(x_t | x_0): each letter masked independently with probability 1 - alpha(t); padding kept."""
    return process.corrupt(x0, torch.full((len(x0),), float(t), dtype=torch.float64), generator)


def partial_discrete(smp: Any, t: float) -> Any:
    """A masked-diffusion sampler on the time grid t = t_0 > ... > 0 with ceil(steps * t) transitions."""
    k = max(1, math.ceil(smp.steps * t))
    smp.grid = torch.linspace(float(t), 0.0, k + 1, dtype=torch.float64)
    return smp


# ------------------------------------------------------------------------------------------------ molecules
class Molecules(Modality):
    """3D molecules; a design keeps its SMILES (the whole sanitised structure, '.' between fragments; '' if
    invalid) and MOL block."""

    def refinable(self, design: Design) -> bool:
        return bool(design.structure)

    def designs(self, res: Any) -> list[Design]:
        from rdkit import Chem

        from molgen.molecules.io import Molecule, to_rdkit
        from molgen.molecules.metrics import atom_stability

        model = self.problem.sampler.model
        smiles = self.problem.decode(res.samples, res.mask)
        types = model.decode_types(res.samples)
        out = []
        for i, (m, smi) in enumerate(zip(res.mask, smiles)):
            k = int(m.sum())
            symbols = tuple(model.atom_types[j] for j in types[i, :k].tolist())
            pos = res.samples[i, :k, :3].double().cpu().numpy()
            try:
                block = Chem.MolToMolBlock(to_rdkit(Molecule(symbols, pos, f"design {i}")))
            except Exception:  # noqa: BLE001 - a molecule RDKit cannot write keeps no MOL block
                block = None
            out.append(Design(smiles=smi, structure=block, naturalness=float(atom_stability(symbols, pos).mean())))
        return out

    def encode(self, designs: Sequence[Design]) -> tuple[Tensor, Tensor]:
        from rdkit import Chem

        model = self.problem.sampler.model
        atoms = []
        for d in designs:
            mol = Chem.MolFromMolBlock(d.structure or "", sanitize=False, removeHs=False)
            if mol is None:
                raise ValueError(f"cannot read the MOL block of a design to refine (SMILES {d.smiles!r})")
            atoms.append(([a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions()))
        width = max(len(s) for s, _ in atoms)
        pos = torch.zeros(len(atoms), width, 3)
        types = torch.zeros(len(atoms), width, dtype=torch.long)
        mask = torch.zeros(len(atoms), width, dtype=torch.bool)
        for i, (symbols, p) in enumerate(atoms):
            pos[i, : len(symbols)] = torch.as_tensor(p, dtype=torch.float32)
            types[i, : len(symbols)] = torch.tensor([model.atom_types.index(s) for s in symbols])
            mask[i, : len(symbols)] = True
        return model.encode(pos, types, mask), mask

    def reward_inputs(self, designs: Sequence[Design]) -> list[str]:
        return [d.smiles or "" for d in designs]

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        return tanimoto_distances([d.smiles or "" for d in designs])


# ------------------------------------------------------------------------------------------------ backbones
class Backbones(Modality):
    """CA-trace backbones (N, C, O rebuilt) stored as PDB text; rewards see CA tensors [B, N, 3]."""

    def refinable(self, design: Design) -> bool:
        return bool(design.structure)

    def designs(self, res: Any) -> list[Design]:
        from molgen.structure.io import backbone_from_ca, write_backbone
        from molgen.structure.metrics import ca_ca_stats

        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, ca in enumerate(res.samples.double().cpu().numpy()):
                path = write_backbone(backbone_from_ca(ca, name=f"design{i}"), Path(tmp) / f"{i}.pdb")
                out.append(Design(structure=path.read_text(), naturalness=ca_ca_stats(ca)[0]))
        return out

    def encode(self, designs: Sequence[Design]) -> tuple[Tensor, None]:
        return self.reward_inputs(designs).float(), None

    def reward_inputs(self, designs: Sequence[Design]) -> Tensor:
        cas = [ca_from_pdb(d.structure or "") for d in designs]
        if len({len(c) for c in cas}) != 1:
            raise ValueError("backbone designs of one campaign must share one length")
        return torch.as_tensor(np.stack(cas), dtype=torch.float64)

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        return tm_distances([ca_from_pdb(d.structure or "") for d in designs])


def ca_from_pdb(text: str) -> np.ndarray:
    """CA coordinates [L, 3] from PDB text (ATOM records named CA, in file order)."""
    rows = [(float(line[30:38]), float(line[38:46]), float(line[46:54])) for line in text.splitlines()
            if line.startswith("ATOM") and line[12:16].strip() == "CA"]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


MODALITY_CLASSES = {"rna": Sequences, "dna": Sequences, "molecules": Molecules, "backbones": Backbones}


def load_modality(cfg: CampaignConfig) -> Modality:
    return MODALITY_CLASSES[cfg.modality](cfg)
