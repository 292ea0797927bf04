"""Protein backbones: CA traces from the equivariant denoiser of ``molgen.structure`` (N, C, O rebuilt).

Presets: ``default`` is UniPC with AF3's step scale, 10 calls on the few-step Karras grid (rho -4, last call at
0.1 A, warm start at 5 A; ``molgen.structure.sampling.FEW_STEPS``); ``af3`` is AlphaFold 3's 200-step sampler
on EDM's grid (``MANY_STEPS``); ``guided`` is the DDPM ancestral sampler, 20 steps on EDM's grid, whose
transitions guidance steers. Naturalness of a design: its fraction of CA-CA distances within 3.80 +- 0.10 A;
rewards read the CA coordinates [B, N, 3].
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molgen.modalities.base import Design, Modality, Preset

_FEW = {"grid": "karras", "rho": -4.0, "sigma_last": 0.1, "warm_start": True}
_MANY = {"grid": "karras", "rho": 7.0, "sigma_last": 0.02, "warm_start": False}


def sampler_keywords(preset: Preset) -> dict[str, Any]:
    """A preset's options as ``structure.sampling`` keywords: ``grid``, ``step_scale``, ``solver_options`` and
    the ``GridSettings`` of rho, sigma_last and warm_start."""
    from molgen.structure.sampling import GridSettings

    opts = dict(preset.options)
    settings = GridSettings(**{k: opts.pop(k) for k in ("rho", "sigma_last", "warm_start") if k in opts})
    return {"grid": opts.pop("grid", "karras"), "settings": settings, **opts}


class Backbones(Modality):
    name = "backbones"
    extension = "pdb"
    payload = None
    naturalness_label = "CA-CA valid fraction"
    cli_module = "molgen.structure.cli"
    default_length = 64
    presets = {
        "default": Preset("default", "unipc", 10, _FEW),
        "af3": Preset("af3", "af3", 200, _MANY),
        "guided": Preset("guided", "ddpm_ancestral", 20, _MANY),
    }

    def default_checkpoint(self) -> Path:
        from molgen.structure.sampling import DEFAULT_CHECKPOINT

        return DEFAULT_CHECKPOINT

    def load(self, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
        from molgen.structure.sampling import load_model

        return load_model(checkpoint or self.default_checkpoint()).to(device)

    def sample(self, model: Any, n: int, *, preset: Preset, seed: int, length: int | None = None,
               device: str | torch.device = "cpu") -> list[Any]:
        from molgen.structure.io import backbone_from_ca
        from molgen.structure.sampling import sample_ca

        ca = sample_ca(model, n, length or 100, preset.solver, preset.steps, seed=seed, **sampler_keywords(preset))
        return [backbone_from_ca(c.cpu().numpy()) for c in ca]

    def write(self, samples: Sequence[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
        from molgen.structure.io import write_backbone
        from molgen.structure.metrics import backbone_metrics

        path.mkdir(parents=True, exist_ok=True)
        rows = []
        for bb, i in zip(samples, ids):
            bb.name = i
            write_backbone(bb, path / f"{i}.pdb")
            rows.append(backbone_metrics(bb))
        return rows

    def problem(self, *, preset: Preset, checkpoint: str | Path | None = None, length: int | None = None,
                condition: str | None = None, chunk: int = 16) -> Any:
        from molgen.guidance.tasks import Draw, Problem, result_names, snapshot
        from molgen.guidance.value import PointValueNet, gaussian_noise
        from molgen.structure.io import backbone_from_ca, write_backbone
        from molgen.structure.metrics import ca_ca_stats, clash_fraction
        from molgen.structure.sampling import check_length, initial_noise, load_model, make_sampler

        length = length or self.default_length
        path = Path(checkpoint) if checkpoint else self.default_checkpoint()
        with snapshot(path, self.name) as (copy, digest):
            model = load_model(copy)
        check_length(model, length)
        kw = sampler_keywords(preset)
        sampler = make_sampler(model, preset.solver, preset.steps, length, kw.pop("grid"), **kw)

        def draw(outputs: int, per: int, g: torch.Generator) -> list[Any]:
            x_T = initial_noise(model, outputs * per, length, g)
            return [Draw(x) for x in x_T.split(chunk * per)]

        def natural(res: Any) -> dict[str, float]:
            cas = [ca.double().numpy() for ca in res.samples]
            stats = [ca_ca_stats(ca)[0] for ca in cas]
            d = torch.cdist(res.samples.double(), res.samples.double())  # distance-matrix diversity (invariant)
            n = len(cas)
            diff = ((d[:, None] - d[None]) ** 2).mean((-1, -2)).sqrt()
            return {"ca_ca_valid": float(np.mean(stats)),
                    "clash_rate": float(np.mean([clash_fraction(c) for c in cas])),
                    "diversity": float(diff.sum() / max(n * (n - 1), 1))}

        def write(path_out: str | Path, res: Any, names: Sequence[str] | None = None) -> None:
            out = Path(path_out)
            out.mkdir(parents=True, exist_ok=True)
            for name, ca in zip(result_names(res, names), res.samples):
                write_backbone(backbone_from_ca(ca.double().numpy(), name=name), out / f"{name}.pdb")

        settings = {**preset.as_dict(), "length": length}
        return Problem(
            self.name, sampler, path, draw, lambda x0: x0.detach(), natural, write,
            value_net=lambda: PointValueNet(0, model.schedule, sigma_data=model.cfg.sigma_data, r_max=3.0),
            noise=gaussian_noise(model.schedule, sampler.space), clean=lambda res: (res.samples, None),
            sha256=digest, settings=settings,
        )

    def designs(self, problem: Any, result: Any) -> list[Design]:
        from molgen.structure.io import backbone_from_ca, write_backbone
        from molgen.structure.metrics import ca_ca_stats

        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, ca in enumerate(result.samples.double().cpu().numpy()):
                path = write_backbone(backbone_from_ca(ca, name=f"design{i}"), Path(tmp) / f"{i}.pdb")
                out.append(Design(structure=path.read_text(), naturalness=ca_ca_stats(ca)[0]))
        return out

    def encode(self, problem: Any, designs: Sequence[Design]) -> tuple[Tensor, None]:
        return self.reward_inputs(designs).float(), None

    def reward_inputs(self, designs: Sequence[Design]) -> Tensor:
        cas = [ca_from_pdb(d.structure or "") for d in designs]
        if len({len(c) for c in cas}) != 1:
            raise ValueError("backbone designs of one campaign must share one length")
        return torch.as_tensor(np.stack(cas), dtype=torch.float64)

    def picture(self, design: Design) -> str:
        """The CA trace (principal-axes projection) and its contact map, as inline SVG."""
        from molgen.campaign import svg

        ca = ca_from_pdb(design.structure or "")
        return svg.ca_trace(ca) + svg.contact_map(ca) if len(ca) > 2 else "<p>no coordinates</p>"

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        from molgen.campaign.selection import tm_distances

        return tm_distances([ca_from_pdb(d.structure or "") for d in designs])


def ca_from_pdb(text: str) -> np.ndarray:
    """CA coordinates [L, 3] from PDB text (ATOM records named CA, in file order)."""
    rows = [(float(line[30:38]), float(line[38:46]), float(line[46:54])) for line in text.splitlines()
            if line.startswith("ATOM") and line[12:16].strip() == "CA"]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def preset_settings(preset: Preset) -> dict[str, Any]:
    """The grid settings a preset resolves to, as recorded in ``sampling.json``."""
    return asdict(sampler_keywords(preset)["settings"])
