"""Modalities as guidance problems, shared by ``molgen guide`` and ``benchmarks/guidance.py``.

A ``Problem`` bundles what a guided run needs from a pretrained model: a stochastic step-level sampler, the
prior draw for G outputs with R rows each (``draw``: chunks of outputs, similar sizes together), the decoder from
states to reward inputs, naturalness and diversity of the outputs, a writer, and SVDD-MC's value network and
noising process. ``guide(problem, method, reward, n, ...)`` runs one method chunk by chunk and merges.

    problem = get_problem("molecules", steps=10)                  # reads the checkpoint now, not at import
    res = guide(problem, "svdd", parse_reward("qed"), 64, candidates=4, seed=0)
    res.summary() | problem.natural(res)

Model checkpoints are read when the problem is built (``checkpoint=None``: the shipped default), from a copy
taken at that moment (a training run may replace the file at any time); ``problem.sha256`` identifies the
weights used, so a newer snapshot exported during a session is picked up by the next run and recorded.
"""

from __future__ import annotations

import math
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

from molgen.guidance.baselines import best_of_n, dps_sample
from molgen.guidance.completions import Completions
from molgen.guidance.core import GuidanceResult, check_count, merge
from molgen.guidance.fk import Tilt, fk_sample
from molgen.guidance.rewards import Reward, TensorReward
from molgen.guidance.smc import ResamplePolicy
from molgen.guidance.svdd import svdd_sample
from molgen.guidance.value import Noise, PointValueNet, TokenValueNet, gaussian_noise, masking_noise
from molgen.checkpoints import sha256_file

MODALITIES = ("molecules", "rna", "dna", "backbones")
DEFAULT_STEPS = {"rna": 16, "dna": 16, "molecules": 10, "backbones": 20}  # guided runs when steps are not given
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


def default_checkpoint(modality: str) -> Path:
    """The shipped checkpoint of a modality."""
    if modality in ("rna", "dna"):
        from molgen.sequences.pretrained import default_checkpoint as sequences_checkpoint

        return sequences_checkpoint(modality)
    if modality == "molecules":
        from molgen.molecules.sampling import DEFAULT_CHECKPOINT

        return DEFAULT_CHECKPOINT
    from molgen.structure.cli import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT


def get_problem(modality: str, *, steps: int, checkpoint: str | Path | None = None, length: int | None = None,
                condition: str | None = None, solver: str | None = None, chunk: int = 16) -> Problem:
    """The guidance problem of a modality's shipped (or given) checkpoint."""
    check_count("steps", steps)
    check_count("chunk", chunk)
    if modality == "molecules":
        return _molecules(steps, checkpoint, solver or "dpmpp_2m_sde", chunk)
    if modality in ("rna", "dna"):
        return _sequences(modality, steps, checkpoint, length, condition, solver or "ancestral")
    if modality == "backbones":
        return _backbones(steps, checkpoint, length or 64, solver or "ddpm_ancestral", chunk)
    raise ValueError(f"unknown modality {modality!r}; choose one of {MODALITIES}")


def rows_per_output(method: str, candidates: int, particles: int) -> int:
    return {"bon": candidates, "fk": particles}.get(method, 1)


def guide(problem: Problem, method: str, reward: Reward, n: int, *, candidates: int = 4, particles: int = 4,
          alpha: float = 0.0, lam: float = 10.0, potential: str = "difference", ess_threshold: float = 0.5,
          dps_scale: float = 1.0, value: Callable[..., Tensor] | Completions | None = None,
          branch_below: float | None = None, seed: int = 0) -> GuidanceResult:
    """``n`` outputs of ``method``: unguided, bon (best of ``candidates``), dps, fk (``particles`` per output,
    tilt exp(lam r), the best final particle), svdd (M = ``candidates``, alpha) or svdd_mc (with ``value``).
    ``value=Completions(K, steps, alpha)`` makes svdd and fk score noisy states by K sampled completions
    instead of the denoised estimate (``guidance.completions``; their model calls are counted).
    ``branch_below``: svdd branches only into children at times t <= branch_below (``svdd.branch_schedule``).
    The prior draw depends on ``seed`` only, so methods see the same sizes / lengths per output."""
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
    return merge(out)


# ---------------------------------------------------------------------------------------------- molecules
def _molecules(steps: int, checkpoint: str | Path | None, solver: str, chunk: int) -> Problem:
    from molgen.diffusion import Sampler, ZeroCoM
    from molgen.molecules.io import Molecule, write_molecules
    from molgen.molecules.metrics import evaluate, structure_smiles, valid_smiles
    from molgen.molecules.sampling import FIRST_NOISE, grid_ends, load_model, sample_atom_counts

    path = Path(checkpoint) if checkpoint else default_checkpoint("molecules")
    with snapshot(path, "molecules") as (copy, digest):
        model, config = load_model(copy)
    model.requires_grad_(False)
    space = ZeroCoM(3)
    # few guided steps start where a molecule forms, as the ODE default does (README "Guidance": FK's lead needs it)
    sampler = Sampler(model, model.schedule, solver, steps=steps, grid="logsnr", space=space,
                      grid_options=grid_ends(model.schedule, FIRST_NOISE, None))
    max_atoms = int(config.get("max_atoms", 29))

    def draw(outputs: int, per: int, g: torch.Generator) -> list[Draw]:
        counts = sample_atom_counts(config["atom_hist"], outputs, g).clamp(1, max_atoms)
        order = torch.argsort(counts, stable=True)  # similar sizes share a chunk: little padding
        chunks = []
        for idx in order.split(chunk):
            c = counts[idx].repeat_interleave(per)
            mask = torch.arange(int(c.max())) < c[:, None]
            x_T = space.noise_like(torch.zeros(len(c), mask.shape[1], model.n_features), mask, g)
            chunks.append(Draw(x_T * model.schedule.prior_std, mask, {"mask": mask}))
        return chunks

    def molecules(x0: Tensor, mask: Tensor) -> list[tuple[tuple[str, ...], np.ndarray]]:
        types = model.decode_types(x0)
        out = []
        for row, m in enumerate(mask):
            k = int(m.sum())
            out.append((tuple(model.atom_types[j] for j in types[row, :k].tolist()),
                        x0[row, :k, :3].double().cpu().numpy()))
        return out

    def decode(x0: Tensor, mask: Tensor) -> list[str]:
        """SMILES of the whole EDM-inferred structure, fragments included (the molecule rewards discount them);
        '' when it does not sanitise."""
        return [structure_smiles(s, p) or "" for s, p in molecules(x0, mask)]

    def natural(res: GuidanceResult) -> dict[str, float]:
        mols = molecules(res.samples, res.mask)
        metrics = evaluate(mols).as_dict()
        smiles = [s for s in (valid_smiles(sy, p) for sy, p in mols) if s]
        return {"validity": metrics["validity"], "atom_stability": metrics["atom_stability"],
                "mol_stability": metrics["mol_stability"], "uniqueness": metrics["uniqueness"],
                "diversity": tanimoto_diversity(smiles)}

    def write(path_out: str | Path, res: GuidanceResult, names: Sequence[str] | None = None) -> None:
        mols = [Molecule(s, p, f"{name} reward={float(r):.4g}")
                for name, (s, p), r in zip(_names(res, names), molecules(res.samples, res.mask), res.rewards)]
        write_molecules(path_out, mols)

    def clean(res: GuidanceResult) -> tuple[Tensor, Tensor]:
        """Sampled x0 re-encoded as data (one-hot types, zero-CoM positions)."""
        x0 = res.samples.float()
        return model.encode(x0[..., :3], model.decode_types(x0), res.mask), res.mask

    return Problem(
        "molecules", sampler, path, draw, decode, natural, write,
        value_net=lambda: PointValueNet(model.n_features - 3, model.schedule, sigma_data=model.sigma_data),
        noise=gaussian_noise(model.schedule, space), clean=clean, sha256=digest,
        settings={"solver": solver, "steps": steps, "grid": "logsnr"},
    )


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


# ---------------------------------------------------------------------------------------------- sequences
def _sequences(modality: str, steps: int, checkpoint: str | Path | None, length: int | None,
               condition: str | None, solver: str) -> Problem:
    from molgen.diffusion.discrete import DiscreteSampler
    from molgen.sequences.evaluate import load_reference
    from molgen.sequences.io import Record, write_fasta
    from molgen.sequences.metrics import kmer_frequencies, pearson
    from molgen.sequences.pretrained import load_pretrained

    path = Path(checkpoint) if checkpoint else default_checkpoint(modality)
    with snapshot(path, modality) as (copy, digest):
        pre = load_pretrained(copy)
    label = pre.label_id(condition) if condition is not None else None
    max_len = pre.model.config.max_length
    if length is not None and not 1 <= length <= max_len:
        raise ValueError(f"--length must lie in 1..{max_len} for this {modality} model, got {length}")
    sampler = DiscreteSampler(pre.model, pre.process, solver, steps=steps)
    ref = load_reference(modality)

    def draw(outputs: int, per: int, g: torch.Generator) -> list[Draw]:
        lengths = (torch.full((outputs,), length, dtype=torch.long) if length is not None
                   else pre.lengths.sample(outputs, g))
        x_T = pre.process.prior(lengths.repeat_interleave(per), int(lengths.max()))
        cond = None if label is None else {"labels": torch.full((len(x_T),), label, dtype=torch.long)}
        return [Draw(x_T, None, cond)]

    def decode(tokens: Tensor) -> list[str]:
        return [pre.alphabet.decode(row) for row in tokens]

    def natural(res: GuidanceResult) -> dict[str, float]:
        tokens = res.samples
        seqs = decode(tokens)
        nelbo = pre.process.nelbo(pre.model, tokens, n_t=4, generator=torch.Generator().manual_seed(0))
        n_tok = pre.process.is_data(tokens).sum(-1).clamp_min(1)
        return {"nll_bits_per_token": float((nelbo / (n_tok * math.log(2))).mean()),
                "kmer3_r": pearson(kmer_frequencies(seqs, pre.alphabet, 3), np.asarray(ref["kmer3"])),
                "diversity": pairwise_hamming(tokens)}

    def write(path_out: str | Path, res: GuidanceResult, names: Sequence[str] | None = None) -> None:
        write_fasta(path_out, [Record(f"{name} reward={float(r):.4g}", s)
                               for name, s, r in zip(_names(res, names), decode(res.samples), res.rewards.tolist())])

    return Problem(
        modality, sampler, path, draw, decode, natural, write,
        value_net=lambda: TokenValueNet(pre.model.config.vocab_size, pad_id=pre.alphabet.pad_id),
        noise=masking_noise(pre.process), clean=lambda res: (res.samples, None), sha256=digest,
        settings={"solver": solver, "steps": steps, "length": length, "condition": condition},
    )


def pairwise_hamming(tokens: Tensor) -> float:
    """Mean pairwise fraction of differing positions (equal-length rows)."""
    n = tokens.shape[0]
    if n < 2:
        return float("nan")
    diff = (tokens[:, None] != tokens[None]).double().mean(-1)
    return float(diff.sum() / (n * (n - 1)))


# ---------------------------------------------------------------------------------------------- backbones
def _backbones(steps: int, checkpoint: str | Path | None, length: int, solver: str, chunk: int) -> Problem:
    from molgen.structure.io import backbone_from_ca, write_backbone
    from molgen.structure.metrics import ca_ca_stats, clash_fraction
    from molgen.structure.sampling import check_length, initial_noise, load_model, make_sampler

    path = Path(checkpoint) if checkpoint else default_checkpoint("backbones")
    with snapshot(path, "backbones") as (copy, digest):
        model = load_model(copy)
    check_length(model, length)
    sampler = make_sampler(model, solver, steps, length)

    def draw(outputs: int, per: int, g: torch.Generator) -> list[Draw]:
        x_T = initial_noise(model, outputs * per, length, g)
        return [Draw(x) for x in x_T.split(chunk * per)]

    def natural(res: GuidanceResult) -> dict[str, float]:
        cas = [ca.double().numpy() for ca in res.samples]
        stats = [ca_ca_stats(ca)[0] for ca in cas]
        d = torch.cdist(res.samples.double(), res.samples.double())  # distance-matrix diversity (invariant)
        n = len(cas)
        diff = ((d[:, None] - d[None]) ** 2).mean((-1, -2)).sqrt()
        return {"ca_ca_valid": float(np.mean(stats)), "clash_rate": float(np.mean([clash_fraction(c) for c in cas])),
                "diversity": float(diff.sum() / max(n * (n - 1), 1))}

    def write(path_out: str | Path, res: GuidanceResult, names: Sequence[str] | None = None) -> None:
        out = Path(path_out)
        out.mkdir(parents=True, exist_ok=True)
        for name, ca in zip(_names(res, names), res.samples):
            write_backbone(backbone_from_ca(ca.double().numpy(), name=name), out / f"{name}.pdb")

    return Problem(
        "backbones", sampler, path, draw, lambda x0: x0.detach(), natural, write,
        value_net=lambda: PointValueNet(0, model.schedule, sigma_data=model.cfg.sigma_data, r_max=3.0),
        noise=gaussian_noise(model.schedule, sampler.space), clean=lambda res: (res.samples, None), sha256=digest,
        settings={"solver": solver, "steps": steps, "length": length, "grid": "karras"},
    )


def _names(res: GuidanceResult, names: Sequence[str] | None) -> Sequence[str]:
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
