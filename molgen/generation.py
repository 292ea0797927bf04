"""Batch generation: shards over Lightning's predict loop, written atomically, resumable.

Work is cut into shards by (seed, shard index): shard k holds samples [k * S, min((k + 1) * S, N)), drawn with
a generator seeded from (seed, k) alone, so a shard regenerates identically on the same device type whatever
the number of processes, and sample IDs ``{seed}-{shard:05d}-{i:05d}`` never depend on a rank. A shard is
written as ``shard-KKKKK.<ext>`` plus ``shard-KKKKK.parquet`` (per-sample metrics and provenance), each through
a temporary file and an atomic rename, and only then marked done in ``done/shard-KKKKK.json``. Re-running the
same command skips done shards and redoes partial ones; a folder written by another configuration is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from molgen import __version__


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that decides the samples (and so the folder's identity), plus where they go."""

    modality: str
    n: int
    shard_size: int = 256
    seed: int = 0
    solver: str | None = None
    steps: int | None = None
    length: int | None = None
    checkpoint: str | None = None
    out: str = "generated"

    def __post_init__(self) -> None:
        if self.modality not in ADAPTERS:
            raise ValueError(f"unknown modality {self.modality!r}; choose one of {sorted(ADAPTERS)}")
        for name in ("n", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "config") -> GenerationConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the samples (not where they are written)."""
        d = dataclasses.asdict(self)
        d.pop("out")
        return d

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n))


def shard_seed(seed: int, shard: int) -> int:
    """A 63-bit seed from (seed, shard) alone."""
    digest = hashlib.sha256(f"molgen-shard:{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_id(seed: int, shard: int, index: int) -> str:
    return f"{seed}-{shard:05d}-{index:05d}"


# ------------------------------------------------------------------------------------------------ modalities
class Adapter(Protocol):
    """How one modality loads its model, generates a shard and writes it."""

    extension: str

    def load(self, config: GenerationConfig, device: torch.device) -> Any: ...

    def generate(self, model: Any, config: GenerationConfig, n: int, seed: int, device: torch.device) -> list[Any]: ...

    def write(self, samples: list[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
        """Write the samples to ``path`` (a file, or a folder for backbones); return per-sample metric rows."""
        ...


class MoleculeAdapter:
    extension = "sdf"

    def load(self, config: GenerationConfig, device: torch.device) -> Any:
        from molgen.molecules.sampling import load_model

        return load_model(config.checkpoint)

    def generate(self, model: Any, config: GenerationConfig, n: int, seed: int, device: torch.device) -> list[Any]:
        from molgen.molecules.sampling import sample_molecules

        net, card = model
        return sample_molecules(net, card, n, solver=config.solver or "dpmpp_2m", steps=config.steps or 10,
                                seed=seed, device=device)

    def write(self, samples: list[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
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


class SequenceAdapter:
    extension = "fasta"

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def load(self, config: GenerationConfig, device: torch.device) -> Any:
        from molgen.sequences.pretrained import default_checkpoint, load_pretrained

        return load_pretrained(config.checkpoint or default_checkpoint(self.kind), device)

    def generate(self, model: Any, config: GenerationConfig, n: int, seed: int, device: torch.device) -> list[Any]:
        from molgen.sequences.sampling import generate

        return generate(model, n, solver=config.solver or "cached_ancestral", steps=config.steps or 32, seed=seed,
                        length=config.length, device=device)

    def write(self, samples: list[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
        from molgen.sequences.io import Record, write_fasta

        records = [Record(i, r.seq) for r, i in zip(samples, ids)]
        write_fasta(path, records)
        return [{"length": len(r.seq), "gc": _gc(r.seq), "sequence": r.seq} for r in records]


def _gc(seq: str) -> float:
    return sum(c in "GC" for c in seq) / max(len(seq), 1)


class BackboneAdapter:
    extension = "pdb"

    def load(self, config: GenerationConfig, device: torch.device) -> Any:
        from structure.cli import DEFAULT_CHECKPOINT
        from structure.sampling import load_model

        return load_model(config.checkpoint or DEFAULT_CHECKPOINT).to(device)

    def generate(self, model: Any, config: GenerationConfig, n: int, seed: int, device: torch.device) -> list[Any]:
        from structure.io import backbone_from_ca
        from structure.sampling import sample_ca

        ca = sample_ca(model, n, config.length or 100, solver=config.solver or "dpmpp_2m", steps=config.steps or 10,
                       seed=seed)
        return [backbone_from_ca(c.cpu().numpy()) for c in ca]

    def write(self, samples: list[Any], ids: Sequence[str], path: Path) -> list[dict[str, Any]]:
        from structure.io import write_backbone
        from structure.metrics import backbone_metrics

        path.mkdir(parents=True, exist_ok=True)
        rows = []
        for bb, i in zip(samples, ids):
            bb.name = i
            write_backbone(bb, path / f"{i}.pdb")
            rows.append(backbone_metrics(bb))
        return rows


ADAPTERS: dict[str, Adapter] = {
    "molecules": MoleculeAdapter(),
    "rna": SequenceAdapter("rna"),
    "dna": SequenceAdapter("dna"),
    "backbones": BackboneAdapter(),
}


# ------------------------------------------------------------------------------------------------ the folder
class ShardStore:
    """The output folder: config, shard files, done markers."""

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.root = Path(config.out)
        self.adapter = ADAPTERS[config.modality]

    def prepare(self, overwrite: bool = False) -> None:
        """Create the folder, or check that it was written by the same configuration."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "done").mkdir(exist_ok=True)
        card = self.root / "config.json"
        identity = self.config.identity()
        if card.exists():
            existing = json.loads(card.read_text())["config"]
            if existing != identity and not overwrite:
                diff = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
                raise ValueError(
                    f"{self.root} was written by a different configuration (differs in {diff}); "
                    "use another --out or pass --overwrite"
                )
            if existing != identity:
                for f in self.root.glob("done/*.json"):
                    f.unlink()
        _atomic_text(card, json.dumps({"config": identity, "molgen": __version__}, indent=2, sort_keys=True))

    def shard_path(self, k: int) -> Path:
        return self.root / f"shard-{k:05d}.{self.adapter.extension}"

    def done_path(self, k: int) -> Path:
        return self.root / "done" / f"shard-{k:05d}.json"

    def pending(self) -> list[int]:
        return [k for k in range(self.config.n_shards) if not self.done_path(k).exists()]

    def write_shard(self, k: int, samples: list[Any], seconds: float, device: str) -> None:
        cfg = self.config
        indices = cfg.shard_range(k)
        ids = [sample_id(cfg.seed, k, i) for i in indices]
        target = self.shard_path(k)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        rows = self.adapter.write(samples, ids, tmp)
        os.replace(tmp, target) if tmp.is_file() else _replace_dir(tmp, target)
        table = pd.DataFrame(rows)
        table.insert(0, "id", ids)
        table["shard"], table["seed"], table["modality"] = k, cfg.seed, cfg.modality
        table["solver"], table["steps"], table["molgen"] = cfg.solver or "default", cfg.steps or -1, __version__
        parquet = self.root / f"shard-{k:05d}.parquet"
        table.to_parquet(parquet.with_name(parquet.name + ".tmp"), index=False)
        os.replace(parquet.with_name(parquet.name + ".tmp"), parquet)
        marker = {"shard": k, "n": len(ids), "seconds": seconds, "device": device, "first_id": ids[0]}
        _atomic_text(self.done_path(k), json.dumps(marker))

    def table(self) -> pd.DataFrame:
        """All finished samples' rows, in ID order."""
        files = sorted(self.root.glob("shard-*.parquet"))
        done = {f"shard-{k:05d}" for k in range(self.config.n_shards) if self.done_path(k).exists()}
        frames = [pd.read_parquet(f) for f in files if f.stem in done]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------------------ Lightning
class ShardGenerator(L.LightningModule):
    """Predict loop over shard indices; each rank takes the pending shards k with k % world == rank."""

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__()
        self.config = config
        self.store = ShardStore(config)
        self.model: Any = None

    def on_predict_start(self) -> None:
        self.model = self.store.adapter.load(self.config, self.device)

    def predict_step(self, batch: list[int], batch_idx: int) -> int:
        made = 0
        for k in batch:
            if k % self.trainer.world_size != self.trainer.global_rank or self.store.done_path(k).exists():
                continue
            start = time.perf_counter()
            n = len(self.config.shard_range(k))
            samples = self.store.adapter.generate(
                self.model, self.config, n, shard_seed(self.config.seed, k), self.device
            )
            if len(samples) != n:
                raise RuntimeError(f"shard {k}: the {self.config.modality} generator returned {len(samples)} of {n}")
            try:
                self.store.write_shard(k, samples, time.perf_counter() - start, str(self.device))
            except OSError as err:  # full disk and the like: finished shards stay valid
                raise OSError(f"writing shard {k} to {self.store.root} failed: {err}") from err
            made += n
        return made


def _collate(items: list[int]) -> list[int]:
    return items


class SampleRateBar(TQDMProgressBar):
    """Lightning's bar over shards (with its ETA), plus samples/s: this rank's samples x world size / elapsed."""

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._made, self._start = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._made += int(outputs or 0)
        rate = self._made * trainer.world_size / max(time.perf_counter() - self._start, 1e-9)
        if self.predict_progress_bar is not None:
            self.predict_progress_bar.set_postfix_str(f"{rate:.1f} samples/s", refresh=False)


def run_generation(
    config: GenerationConfig,
    *,
    accelerator: str = "cpu",
    devices: int | str = 1,
    num_nodes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardStore:
    """Generate every pending shard of ``config`` with Lightning (DDP when devices x nodes > 1)."""
    store = ShardStore(config)
    store.prepare(overwrite=overwrite)
    pending = store.pending()
    if pending:
        distributed = num_nodes > 1 or (devices not in (1, "1"))
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes,
            strategy="ddp" if distributed else "auto", logger=False, enable_checkpointing=False,
            enable_progress_bar=progress, use_distributed_sampler=False, enable_model_summary=False,
            callbacks=[SampleRateBar()] if progress else None,
        )
        loader = DataLoader(pending, batch_size=1, collate_fn=_collate)
        trainer.predict(ShardGenerator(config), dataloaders=loader, return_predictions=False)
    return store


def iter_config_file(path: str | Path) -> Iterator[tuple[str, Any]]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a generation config must be a mapping of keys to values")
    yield from data.items()
