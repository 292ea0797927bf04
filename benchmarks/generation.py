"""Batch generation throughput: 1 vs 2 processes, the cost of sharding and writing, and resuming a finished job.

    python benchmarks/generation.py --json results/generation.json [--modality rna --n 256 --shard-size 32]

All figures come from one run on this machine. "bare" generates the same shards (same seeds) in an in-memory
loop without Lightning or files; "sharded" is `run_generation` in this process (model loaded once, Lightning
predict loop, atomic writes, parquet tables); the 2-process figure runs the CLI with ``--devices 2`` (DDP over
gloo), process start-up included, against the same CLI with one device. On a loaded machine the bare-vs-sharded
ratio drifts with the load, so the overhead is also given within the sharded run itself: its wall time against
the generation seconds its done markers record (Lightning set-up, model loading, writing and bookkeeping count as
overhead). Resuming a finished job is timed at N and N/4
(it lists done markers only, so it should not grow with N).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from molgen.generation import GenerationConfig, adapter_for, run_generation, shard_seed


def bare_loop(config: GenerationConfig) -> float:
    adapter, device = adapter_for(config), torch.device("cpu")
    model = adapter.load(config, device)
    with torch.inference_mode():  # warm-up (first-call costs are not per-sample work)
        adapter.generate(model, config, 2, 0, device)
    start = time.perf_counter()
    with torch.inference_mode():
        for k in range(config.n_shards):
            adapter.generate(model, config, len(config.shard_range(k)), shard_seed(config.seed, k), device)
    return time.perf_counter() - start


def sharded(config: GenerationConfig) -> float:
    start = time.perf_counter()
    run_generation(config, progress=False)
    return time.perf_counter() - start


def generating_seconds(out: str) -> float:
    """Sum of the per-shard generation times recorded in the done markers (model calls and decoding only)."""
    return sum(json.loads(f.read_text())["seconds"] for f in Path(out).glob("done/*.json"))


def cli(config: GenerationConfig, devices: int) -> float:
    args = [sys.executable, "-m", "molgen.cli", "generate", "--modality", config.modality, "--n", str(config.n),
            "--shard-size", str(config.shard_size), "--seed", str(config.seed), "--out", config.out,
            "--devices", str(devices), "--accelerator", "cpu"]
    for key in ("steps", "length"):
        if getattr(config, key) is not None:
            args += [f"--{key}", str(getattr(config, key))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(args, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--modality", default="rna")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--length", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        def config(name: str) -> GenerationConfig:
            return GenerationConfig(modality=args.modality, n=args.n, shard_size=args.shard_size, steps=args.steps,
                                    length=args.length, seed=0, out=str(Path(tmp) / name))

        bare = bare_loop(config("bare"))
        in_process = sharded(config("sharded"))
        generating = generating_seconds(config("sharded").out)
        resume = sharded(config("sharded"))  # everything is done: only the folder check and the listing remain
        small = dataclasses.replace(config("small"), n=max(args.n // 4, 1))
        sharded(small)
        resume_small = sharded(small)
        one = cli(config("cli1"), 1)
        two = cli(config("cli2"), 2)
    result = {
        "modality": args.modality, "n": args.n, "shard_size": args.shard_size, "steps": args.steps,
        "bare_samples_per_s": args.n / bare,
        "sharded_samples_per_s": args.n / in_process,
        "sharding_overhead": in_process / bare - 1.0,
        "sharding_overhead_same_run": in_process / generating - 1.0,
        "resume_finished_s": resume,
        "resume_finished_quarter_n_s": resume_small,
        "cli_1_process_samples_per_s": args.n / one,
        "cli_2_processes_samples_per_s": args.n / two,
        "speedup_2_vs_1": one / two,
        "cpu_cores": os.cpu_count(), "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
