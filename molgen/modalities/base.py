"""The one protocol every modality satisfies, read by the CLI, batch generation, guidance, campaigns, the
report and the benchmarks.

A modality knows its shipped checkpoint and how to load it, its named sampler presets (``default`` for plain
sampling, ``guided`` for the stochastic sampler guidance steers), how to draw and write plain samples (batch
generation), how to build a guidance ``Problem`` (prior draw, decoder, naturalness, writer), and how to turn a
guidance result into stored campaign ``Design`` rows and back. Adding a modality is one module in this
package plus ``register(MyModality())``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def choose(kind: str, name: str, choices: Iterable[str]) -> str:
    """``name`` when it is one of ``choices``, else the one error every entry point gives for a bad name."""
    options = list(choices)
    if name not in options:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(options)}")
    return name


@dataclass(frozen=True)
class Preset:
    """Named sampler settings: a solver, its number of steps and the modality's sampler keywords (grid, step
    scale, grid ends, ...). Every output records the preset it was drawn with (``as_dict``)."""

    name: str
    solver: str
    steps: int
    options: Mapping[str, Any] = field(default_factory=dict)

    def override(self, solver: str | None = None, steps: int | None = None) -> Preset:
        """This preset with the caller's solver and step count where given (the options are kept)."""
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return dataclasses.replace(self, solver=solver or self.solver, steps=steps or self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.name, "solver": self.solver, "steps": self.steps, **dict(self.options)}


@dataclass
class Design:
    """One stored design of a campaign; ``structure`` is a MOL block (molecules) or PDB text (backbones)."""

    sequence: str | None = None
    smiles: str | None = None
    structure: str | None = None
    parent: str | None = None
    origin: str = "sample"
    naturalness: float = math.nan


def write_sampling_record(out: str | Path, preset: Preset, **facts: Any) -> Path:
    """``OUT.json`` beside a sample file: the preset it was drawn with (after the caller's overrides) and the
    run's facts (seed, n, checkpoint, ...), so every output says how it was made."""
    import json

    path = Path(f"{out}.json")
    path.write_text(json.dumps({**preset.as_dict(), **facts}, indent=2, default=str) + "\n")
    return path


class Modality:
    """What molgen needs from one kind of design. Subclasses set the class attributes and implement the
    methods; the continuous modalities share the re-noising of designs for refinement defined here."""

    name: str
    extension: str  # written samples: "sdf", "fasta", "pdb" (a folder of files)
    payload: str | None  # the stored design column rewards read ("smiles", "sequence"); None: the structure
    naturalness_label: str  # what ``Design.naturalness`` measures (higher = closer to the training data)
    cli_module: str  # module with the add_/run_ hooks of ``molgen sample|evaluate|train``
    presets: Mapping[str, Preset]
    default_length: int | None = None  # guided runs and campaigns when no length is given (None: drawn)

    def preset(self, name: str = "default", solver: str | None = None, steps: int | None = None) -> Preset:
        """The named preset, with the caller's solver and step count where given (an unknown name of either
        fails here, before anything is loaded or written)."""
        preset = self.presets[choose(f"{self.name} preset", name, self.presets)].override(solver, steps)
        choose(f"{self.name} solver", preset.solver, self.solvers())
        return preset

    def solvers(self) -> list[str]:
        """The solver names this modality's sampler takes: the engine's continuous solvers."""
        from molgen.diffusion import SOLVERS

        return sorted(SOLVERS)

    # ------------------------------------------------------------------------------------------ models
    def default_checkpoint(self) -> Path:
        raise NotImplementedError

    def load(self, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
        """The model bundle ``sample`` takes (the shipped checkpoint when none is given)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ plain samples
    def sample(self, model: Any, n: int, *, preset: Preset, seed: int, length: int | None = None,
               device: str | torch.device = "cpu") -> list[Any]:
        """``n`` unguided samples (molecules, sequence records, backbones) drawn with ``preset``."""
        raise NotImplementedError

    def write(self, samples: Sequence[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
        """Write ``samples`` named ``ids`` to ``path`` (a file, or a folder for backbones); per-sample rows."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ guidance
    def problem(self, *, preset: Preset, checkpoint: str | Path | None = None, length: int | None = None,
                condition: str | None = None, chunk: int = 16) -> Any:
        """The ``molgen.guidance.tasks.Problem`` of this modality's model, sampled with ``preset``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ campaigns
    def designs(self, problem: Any, result: Any) -> list[Design]:
        """A guidance result as stored designs, with their naturalness."""
        raise NotImplementedError

    def encode(self, problem: Any, designs: Sequence[Design]) -> tuple[Tensor, Tensor | None]:
        """Stored designs as clean model states x0 (and their mask)."""
        raise NotImplementedError

    def refinable(self, design: Design) -> bool:
        """Whether ``encode`` can read the design back (a structure is stored)."""
        return bool(design.structure)

    def recombine(self, design: Design, donor: Design, g: torch.Generator) -> Design:
        """``design`` rearranged, with material from ``donor`` (campaign refinement's ``recombine``)."""
        raise NotImplementedError(f"{self.name} designs cannot be recombined (refine.recombine: sequences only)")

    def with_naturalness(self, problem: Any, designs: Sequence[Design]) -> list[Design]:
        """``designs`` with their naturalness under the problem's model."""
        raise NotImplementedError

    def reward_inputs(self, designs: Sequence[Design]) -> Any:
        """What the rewards score: the payload column, or the structures."""
        return [getattr(d, self.payload) or "" for d in designs]

    def distance(self, designs: Sequence[Design]) -> Callable[[int, int], float]:
        """Distance in [0, 1] between designs i and j, for the campaign's diversity filter."""
        raise NotImplementedError

    def report_columns(self, sequences: Sequence[str]) -> dict[str, list[Any]]:
        """Columns of the report's table of best designs for sequence modalities (empty: designs are drawn)."""
        return {}

    def picture(self, design: Design) -> str:
        """An inline SVG (and caption) of a design for the report's cards."""
        raise NotImplementedError

    def noise_to(self, problem: Any, x0: Tensor, mask: Tensor | None, t: float, g: torch.Generator) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps in the sampler's space."""
        smp = problem.sampler
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = float(smp.schedule.alpha(tt)), float(smp.schedule.sigma(tt))
        return smp.space.project(a * x0 + s * smp.space.noise_like(x0, mask, g), mask)

    def partial_sampler(self, problem: Any, t: float) -> Any:
        """The sampler on a grid from t down, with ceil(steps * t) + 1 points (at least 2); when t lies below the
        sampler's last time (few-step grids stop early), the grid runs down to the schedule's end. It starts from
        the given noisy states, so without the sampler's warm start (which carries pure noise)."""
        smp = problem.sampler
        options = {"t_min": smp.schedule.t_min, **(smp.grid_options or {}), "t_max": float(t)}
        if options.get("t_min", smp.schedule.t_min) >= t:
            options["t_min"] = smp.schedule.t_min
        return dataclasses.replace(smp, steps=max(2, math.ceil(smp.steps * t) + 1), nfe=None, grid_options=options,
                                   warm_start=None)
