"""GPU throughput of the shipped models, each figure beside the same run's baseline.

    python benchmarks/gpu.py --json results/gpu.json [--device cuda] [--batch-sizes 64,256,1024,4096]

Molecules: QM9-size (19 atoms) molecules per second at 10 and 20 NFE (dpmpp_2m) and with 1000-step ancestral
sampling, for each batch size, eager vs torch.compile, float32 vs bfloat16 autocast (state kept in float32);
peak memory. RNA: 100-nt sequences per second at 32 model calls. (Guided SVDD / FK throughput and CUDA-graph
capture of the whole loop are still to be added.) On a CPU-only machine run it with
``--device cpu --batch-sizes 16`` as a smoke test; the figures the issue asks for need CUDA.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from molgen.diffusion import Sampler, ZeroCoM


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call (synchronising CUDA around each call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def molecule_rows(device: torch.device, batch_sizes: list[int], repeats: int) -> list[dict]:
    from molgen.molecules.sampling import load_model

    model, _ = load_model(None)
    model = model.to(device).eval()
    rows = []
    for batch in batch_sizes:
        mask = torch.ones(batch, 19, dtype=torch.bool, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        x_T = ZeroCoM(3).noise_like(torch.zeros(batch, 19, model.n_features, device=device), mask, g)
        x_T = x_T * model.schedule.prior_std
        configs = [("dpmpp_2m", 10), ("dpmpp_2m", 20), ("ddpm_ancestral", 1000)]
        for solver, steps in configs:
            for compiled in (False, True):
                for autocast in (None, torch.bfloat16):
                    if steps == 1000 and (compiled or autocast is not None):
                        continue  # the reference runs eager in float32 only
                    sampler = Sampler(model, model.schedule, solver, steps=steps, space=ZeroCoM(3),
                                      autocast=autocast, compile=compiled)

                    def run(s=sampler, x_T=x_T, mask=mask, g=g) -> torch.Tensor:
                        with torch.inference_mode():
                            return s.finish(s.run(s.init(x_T, mask=mask, cond={"mask": mask}), g))

                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    seconds = timed(run, device, repeats)
                    rows.append({
                        "task": "molecules", "batch": batch, "solver": solver, "nfe": steps, "compiled": compiled,
                        "dtype": "bfloat16" if autocast else "float32", "seconds": seconds,
                        "per_molecule_ms": 1e3 * seconds / batch, "molecules_per_s": batch / seconds,
                        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                    })
                    print(rows[-1])
    return rows


def rna_rows(device: torch.device, batch: int, repeats: int) -> list[dict]:
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained
    from molgen.sequences.sampling import generate

    pre = load_pretrained(default_checkpoint("rna"), device)
    seconds = timed(lambda: generate(pre, batch, solver="cached_ancestral", steps=32, length=100, device=device),
                    device, repeats)
    return [{"task": "rna", "batch": batch, "nfe": 32, "seconds": seconds, "sequences_per_s": batch / seconds}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="64,256,1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = molecule_rows(device, batch_sizes, args.repeats) + rna_rows(device, max(batch_sizes), args.repeats)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
