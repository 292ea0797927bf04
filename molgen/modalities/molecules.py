"""3D small molecules (QM9): the E(3)-equivariant denoiser of ``molgen.molecules`` on zero-CoM noise.

Presets: ``default`` is DPM-Solver++(2M) on the logSNR grid, 10 model calls, with the ODE settings of
``molgen.molecules.sampling.sampler_settings`` (step scale 1.5 below sigma/alpha 3 A, first call at 4 A);
``guided`` is its SDE form from 4 A, the stochastic transition SVDD and FK steer. Naturalness of a design: the
EDM atom stability of the molecule; rewards read its SMILES (the whole sanitised structure, '.' between
fragments, '' if invalid).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molgen.modalities.base import Design, Modality, Preset


class Molecules(Modality):
    name = "molecules"
    extension = "sdf"
    payload = "smiles"
    naturalness_label = "atom stability"
    cli_module = "molgen.molecules.cli"
    presets = {
        "default": Preset("default", "dpmpp_2m", 10, {"grid": "logsnr"}),
        "guided": Preset("guided", "dpmpp_2m_sde", 10, {"grid": "logsnr", "first_noise": 4.0}),
    }

    def default_checkpoint(self) -> Path:
        from molgen.molecules.sampling import DEFAULT_CHECKPOINT

        return DEFAULT_CHECKPOINT

    def load(self, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
        from molgen.molecules.sampling import load_model

        model, config = load_model(checkpoint or self.default_checkpoint())
        return model.to(device), config

    def sample(self, model: Any, n: int, *, preset: Preset, seed: int, length: int | None = None,
               device: str | torch.device = "cpu") -> list[Any]:
        from molgen.molecules.sampling import sample_molecules

        net, config = model
        return sample_molecules(net, config, n, solver=preset.solver, steps=preset.steps, seed=seed, device=device,
                                **preset.options)

    def write(self, samples: Sequence[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
        import dataclasses

        from molgen.molecules.io import write_sdf
        from molgen.molecules.metrics import atom_stability, valid_smiles

        named = [dataclasses.replace(m, name=i) for m, i in zip(samples, ids)]
        write_sdf(path, named)
        rows = []
        for m in named:
            stable = atom_stability(m.symbols, m.positions)
            smiles = valid_smiles(m.symbols, m.positions)
            rows.append({"atoms": len(m.symbols), "atom_stability": float(stable.mean()),
                         "stable": bool(stable.all()), "valid": smiles is not None, "smiles": smiles or ""})
        return rows

    def problem(self, *, preset: Preset, checkpoint: str | Path | None = None, length: int | None = None,
                condition: str | None = None, chunk: int = 16) -> Any:
        from molgen.diffusion import Sampler, ZeroCoM
        from molgen.guidance.tasks import Draw, Problem, result_names, snapshot, tanimoto_diversity
        from molgen.guidance.value import PointValueNet, gaussian_noise
        from molgen.molecules.io import write_molecules
        from molgen.molecules.metrics import evaluate, structure_smiles, valid_smiles
        from molgen.molecules.sampling import decode_molecules, grid_ends, load_model, sample_atom_counts

        path = Path(checkpoint) if checkpoint else self.default_checkpoint()
        with snapshot(path, self.name) as (copy, digest):
            model, config = load_model(copy)
        model.requires_grad_(False)
        space = ZeroCoM(3)
        options = dict(preset.options)
        first, last = options.pop("first_noise", float("inf")), options.pop("last_noise", None)
        grid_options = grid_ends(model.schedule, first, last)
        sampler = Sampler(model, model.schedule, preset.solver, steps=preset.steps, grid=options.pop("grid"),
                          space=space, grid_options=grid_options, **options)
        max_atoms = int(config.get("max_atoms", 29))

        def draw(outputs: int, per: int, g: torch.Generator) -> list[Any]:
            counts = sample_atom_counts(config["atom_hist"], outputs, g).clamp(1, max_atoms)
            order = torch.argsort(counts, stable=True)  # similar sizes share a chunk: little padding
            chunks = []
            for idx in order.split(chunk):
                c = counts[idx].repeat_interleave(per)
                mask = torch.arange(int(c.max())) < c[:, None]
                x_T = space.noise_like(torch.zeros(len(c), mask.shape[1], model.n_features), mask, g)
                chunks.append(Draw(x_T * model.schedule.prior_std, mask, {"mask": mask}))
            return chunks

        def atoms(x0: Tensor, mask: Tensor) -> list[tuple[tuple[str, ...], np.ndarray]]:
            return [(m.symbols, m.positions) for m in decode_molecules(model, x0, mask)]

        def decode(x0: Tensor, mask: Tensor) -> list[str]:
            """SMILES of the whole EDM-inferred structure, fragments included (the molecule rewards discount
            them); '' when it does not sanitise."""
            return [structure_smiles(s, p) or "" for s, p in atoms(x0, mask)]

        def natural(res: Any) -> dict[str, float]:
            mols = atoms(res.samples, res.mask)
            metrics = evaluate(mols).as_dict()
            smiles = [s for s in (valid_smiles(sy, p) for sy, p in mols) if s]
            return {"validity": metrics["validity"], "atom_stability": metrics["atom_stability"],
                    "mol_stability": metrics["mol_stability"], "uniqueness": metrics["uniqueness"],
                    "diversity": tanimoto_diversity(smiles)}

        def write(path_out: str | Path, res: Any, names: Sequence[str] | None = None) -> None:
            mols = decode_molecules(model, res.samples, res.mask, result_names(res, names))
            for m, r in zip(mols, res.rewards.tolist()):
                m.name = f"{m.name} reward={float(r):.4g}"
            write_molecules(path_out, mols)

        def clean(res: Any) -> tuple[Tensor, Tensor]:
            """Sampled x0 re-encoded as data (one-hot types, zero-CoM positions)."""
            x0 = res.samples.float()
            return model.encode(x0[..., :3], model.decode_types(x0), res.mask), res.mask

        return Problem(
            self.name, sampler, path, draw, decode, natural, write,
            value_net=lambda: PointValueNet(model.n_features - 3, model.schedule, sigma_data=model.sigma_data),
            noise=gaussian_noise(model.schedule, space), clean=clean, sha256=digest, settings=preset.as_dict(),
        )

    def designs(self, problem: Any, result: Any) -> list[Design]:
        from rdkit import Chem

        from molgen.molecules.io import to_rdkit
        from molgen.molecules.metrics import atom_stability
        from molgen.molecules.sampling import decode_molecules

        smiles = problem.decode(result.samples, result.mask)
        out = []
        for i, (mol, smi) in enumerate(zip(decode_molecules(problem.sampler.model, result.samples, result.mask),
                                           smiles)):
            mol.name = f"design {i}"
            try:
                block = Chem.MolToMolBlock(to_rdkit(mol))
            except Exception:  # noqa: BLE001 - a molecule RDKit cannot write keeps no MOL block
                block = None
            out.append(Design(smiles=smi, structure=block,
                              naturalness=float(atom_stability(mol.symbols, mol.positions).mean())))
        return out

    def encode(self, problem: Any, designs: Sequence[Design]) -> tuple[Tensor, Tensor]:
        from rdkit import Chem

        model = problem.sampler.model
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

    def picture(self, design: Design, size: int = 240) -> str:
        """RDKit 2D depiction of the design's SMILES as inline SVG (XML prologue removed), and the SMILES."""
        import re
        from html import escape

        from rdkit import Chem
        from rdkit.Chem.Draw import rdMolDraw2D

        caption = f"<br>{escape(design.smiles or 'invalid')}"
        mol = Chem.MolFromSmiles(design.smiles) if design.smiles else None
        if mol is None:
            return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}"><rect width="{size}" '
                    f'height="{size}" fill="#fff"/><text x="{size / 2}" y="{size / 2}" text-anchor="middle">'
                    f"invalid molecule</text></svg>{caption}")
        drawer = rdMolDraw2D.MolDraw2DSVG(size, size)
        rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
        drawer.FinishDrawing()
        return re.sub(r"<\?xml[^>]*\?>\s*", "", drawer.GetDrawingText()) + caption

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        from molgen.campaign.selection import tanimoto_distances

        return tanimoto_distances([d.smiles or "" for d in designs])
