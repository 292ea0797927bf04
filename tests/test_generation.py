"""Batch generation: shards are deterministic, resumable after SIGKILL, and independent of the process count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molgen.generation import GenerationConfig, ShardStore, run_generation, sample_id, shard_seed
from molgen.sequences.io import read_sequences

N, SHARD = 48, 3  # many small shards, so that a kill after the first lands before the last (shards take ms)
ARGS = ["--modality", "rna", "--n", str(N), "--shard-size", str(SHARD), "--steps", "4", "--length", "24", "--seed", "7"]


def molgen(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "molgen.cli", "generate", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def fasta(folder: Path) -> dict[str, str]:
    """All records of all shards: id -> sequence (fails on a duplicate id)."""
    records: dict[str, str] = {}
    for f in sorted(folder.glob("shard-*.fasta")):
        for r in read_sequences(f):
            name = r.name.split()[0]
            assert name not in records, f"duplicate sample {name}"
            records[name] = r.seq
    return records


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['shards'\]"):
        GenerationConfig.from_mapping({"modality": "rna", "n": 4, "shards": 2}, "job.yaml")
    with pytest.raises(ValueError, match="unknown modality 'protein'"):
        GenerationConfig(modality="protein", n=4)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        GenerationConfig(modality="rna", n=4, shard_size=0)


def test_shard_seeds_and_ids_depend_on_seed_and_shard_only():
    assert shard_seed(7, 3) == shard_seed(7, 3) != shard_seed(7, 4) != shard_seed(8, 3)
    assert shard_seed(7, 3) == 8787886232071257102  # pinned: a job's shards keep their seeds across releases
    assert sample_id(7, 3, 10) == "7-00003-00010"


def test_resume_redoes_partial_shards_and_refuses_another_config(tmp_path):
    cfg = GenerationConfig(modality="rna", n=6, shard_size=2, steps=4, length=16, seed=1, out=str(tmp_path / "a"))
    store = run_generation(cfg, progress=False)
    full = fasta(store.root)
    assert len(full) == 6 and len(store.table()) == 6
    # a crash mid-shard: marker gone, a stale temporary file left behind
    store.done_path(1).unlink()
    (store.root / "shard-00001.fasta.tmp999").write_text(">junk\nAC\n")
    assert ShardStore(cfg).pending() == [1]
    run_generation(cfg, progress=False)
    assert fasta(store.root) == full
    # a finished shard deleted or emptied afterwards fails its checksum and is redone; a finished job writes nothing
    (store.root / "shard-00002.fasta").write_text("")
    (store.root / "shard-00000.parquet").unlink()
    assert ShardStore(cfg).pending() == [0, 2]
    run_generation(cfg, progress=False)
    assert fasta(store.root) == full and len(store.table()) == 6
    stamps = {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file() and p.name != ".lock"}
    run_generation(cfg, progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file() and p.name != ".lock"}
    other = GenerationConfig(modality="rna", n=6, shard_size=2, steps=5, length=16, seed=1, out=cfg.out)
    with pytest.raises(ValueError, match=r"different configuration \(differs in \['steps'\]\)"):
        run_generation(other, progress=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, str]:
    """The uninterrupted single-process run the others are compared with."""
    out = tmp_path_factory.mktemp("one")
    job = molgen(*ARGS, "--out", str(out))
    assert job.wait(timeout=600) == 0, job.stdout.read()
    records = fasta(out)
    assert len(records) == N
    return records


def test_two_processes_write_what_one_process_writes(tmp_path, one_process):
    two = molgen(*ARGS, "--out", str(tmp_path), "--devices", "2", "--accelerator", "cpu")
    assert two.wait(timeout=600) == 0, two.stdout.read()
    assert fasta(tmp_path) == one_process


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, one_process):
    def finished() -> int:
        return len(list((tmp_path / "done").glob("*.json"))) if (tmp_path / "done").exists() else 0

    job = molgen(*ARGS, "--out", str(tmp_path), start_new_session=True)
    deadline = time.time() + 600
    while finished() < 1:
        assert time.time() < deadline and job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert finished() < N // SHARD, "the kill came too late to interrupt anything"
    resumed = molgen(*ARGS, "--out", str(tmp_path))
    assert resumed.wait(timeout=600) == 0
    assert fasta(tmp_path) == one_process


def test_guided_shards_carry_their_reward_and_beat_unguided(tmp_path):
    """--reward runs guidance.tasks per shard: records keep the sample IDs, each row's reward is the reward of
    the written sequence, and SVDD (M = 4) raises the mean GC content over the same shards unguided."""
    from molgen.guidance.rewards import parse_reward

    common = dict(modality="rna", n=8, shard_size=4, steps=6, length=24, seed=3)
    guided = run_generation(GenerationConfig(**common, reward="gc", guide="svdd", out=str(tmp_path / "g")),
                            progress=False)
    plain = run_generation(GenerationConfig(**common, reward="gc", guide="unguided", out=str(tmp_path / "u")),
                           progress=False)
    seqs, table = fasta(guided.root), guided.table()
    assert list(seqs) == [sample_id(3, k, i) for k in range(2) for i in range(4 * k, 4 * k + 4)]
    recomputed = parse_reward("gc")([seqs[i] for i in table["id"]]).double().numpy()
    assert table["reward"].to_numpy() == pytest.approx(recomputed, abs=1e-6)
    assert (table["guidance"] == "svdd:gc").all() and (table["model_calls"] == 1 + 5 * 4).all()
    assert table["reward"].mean() > plain.table()["reward"].mean()
    with pytest.raises(ValueError, match="unknown guidance method 'svd'"):
        GenerationConfig(**common, reward="gc", guide="svd")


def test_a_bad_solver_creates_nothing_and_a_busy_folder_is_refused(tmp_path):
    from molgen.cli import main
    from molgen.locks import FolderInUse, FolderLock

    out = tmp_path / "job"
    assert main(["generate", "--modality", "rna", "--n", "2", "--solver", "nope", "--out", str(out)]) == 2
    assert not out.exists()  # the corrected re-run is not refused as "another configuration"
    cfg = GenerationConfig(modality="rna", n=2, shard_size=2, steps=2, length=8, out=str(out))
    out.mkdir()
    with FolderLock(out):  # another process writing the folder
        with pytest.raises(FolderInUse, match="in use by another molgen process"):
            run_generation(cfg, progress=False)
    assert len(fasta(run_generation(cfg, progress=False).root)) == 2


def test_a_config_file_with_a_wrong_type_is_named(tmp_path, capsys):
    from molgen.cli import main

    config = tmp_path / "job.yaml"
    config.write_text("modality: rna\nn: ten\n")
    assert main(["generate", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert f"{config}: n must be int, got 'ten'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
