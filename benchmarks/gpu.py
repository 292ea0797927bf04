"""GPU throughput of the shipped models, each figure beside the same run's baseline.

    python benchmarks/gpu.py --json results/gpu.json [--batch-sizes 64,256,1024,4096] [--compile-batches 1024]

Molecules (the shipped sampler: dpmpp_2m with the step-scaled ODE, QM9-size 19 atoms): molecules per second at
10 and 20 NFE and with 1000-step ancestral sampling (the reference, same batch), per batch size; eager vs the
whole loop as one CUDA graph, float32 vs bfloat16 autocast (state kept in float32), and torch.compile (alone
and under the graph) at ``--compile-batches`` (each compile costs tens of seconds); peak memory per row.
GPU utilisation (NVML, sampled every 10 ms) while the loop runs back to back. ``--batch-size auto``: the
largest batch that fits. Guided throughput on the same model: SVDD (M = 8) and FK (K = 8, ESS-triggered
resampling) against unguided sampling of the same outputs with the same stochastic sampler (a tensor reward on
the GPU, so the figure is the guidance machinery's, not a CPU reward's). RNA: 100-nt sequences per second at
32 model calls. On a CPU-only machine, ``--device cpu --batch-sizes 8 --compile-batches ''`` is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the guidance package, not benchmarks/guidance.py

from molgen.diffusion import GraphedSampler, Sampler, ZeroCoM  # noqa: E402

ATOMS = 19  # QM9's mean molecule size (heavy atoms and hydrogens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def utilisation(fn: Callable[[], object], device: torch.device, seconds: float = 2.0) -> float | None:
    """Mean NVML GPU utilisation (% of time a kernel ran) while ``fn`` runs back to back for ``seconds``."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    readings: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            readings.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            time.sleep(0.01)

    fn()
    sync(device)
    thread = threading.Thread(target=poll)
    thread.start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        sync(device)
    done.set()
    thread.join()
    return sum(readings[5:]) / max(1, len(readings[5:]))  # skip the counter's first window


def molecule_inputs(model, batch: int, device: torch.device, seed: int = 0):
    mask = torch.ones(batch, ATOMS, dtype=torch.bool, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    x_T = ZeroCoM(3).noise_like(torch.zeros(batch, ATOMS, model.n_features, device=device), mask, g)
    return x_T * model.schedule.prior_std, mask


def loop(sampler: Sampler, x_T: torch.Tensor, mask: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """The sampling loop as a callable: eager, or replayed from a CUDA graph."""
    cond = {"mask": mask}
    if "graph" in mode:
        graphed = GraphedSampler(sampler)
        return lambda: graphed(x_T, mask=mask, cond=cond)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return sampler.finish(sampler.run(sampler.init(x_T, mask=mask, cond=cond)))

    return run


def molecule_rows(model, device: torch.device, batch_sizes: list[int], compile_batches: list[int],
                  repeats: int) -> Iterator[dict]:
    from molgen.molecules.sampling import grid_ends, sampler_settings

    settings = sampler_settings("dpmpp_2m")
    ends = grid_ends(model.schedule, settings.pop("first_noise"), None)

    for batch in batch_sizes:
        x_T, mask = molecule_inputs(model, batch, device)
        reference = Sampler(model, model.schedule, "ddpm_ancestral", steps=1000, space=ZeroCoM(3))
        g = torch.Generator(device=device).manual_seed(1)

        def ancestral(s=reference, x_T=x_T, mask=mask, g=g) -> torch.Tensor:
            with torch.inference_mode():
                return s.finish(s.run(s.init(x_T, mask=mask, cond={"mask": mask}), g))

        ref_seconds = timed(ancestral, device, repeats=1)
        yield {"task": "molecules", "batch": batch, "solver": "ddpm_ancestral", "nfe": 1000, "mode": "eager",
               "dtype": "float32", "seconds": ref_seconds, "per_molecule_ms": 1e3 * ref_seconds / batch,
               "molecules_per_s": batch / ref_seconds}
        modes = ["eager", "graph"] + (["compiled", "compiled+graph"] if batch in compile_batches else [])
        if device.type != "cuda":
            modes = [m for m in modes if "graph" not in m]
        for nfe in (10, 20):
            for mode in modes:
                for autocast in (None, torch.bfloat16):
                    sampler = Sampler(model, model.schedule, "dpmpp_2m", steps=nfe, space=ZeroCoM(3),
                                      autocast=autocast, compile="compiled" in mode, grid_options=ends,
                                      **settings)
                    fn = loop(sampler, x_T, mask, mode)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    seconds = timed(fn, device, repeats)
                    row = {
                        "task": "molecules", "batch": batch, "solver": "dpmpp_2m", "nfe": nfe, "mode": mode,
                        "dtype": "bfloat16" if autocast else "float32", "seconds": seconds,
                        "per_molecule_ms": 1e3 * seconds / batch, "molecules_per_s": batch / seconds,
                        "speedup_vs_1000_steps": ref_seconds / seconds,
                        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                    }
                    if nfe == 10 and batch == max(batch_sizes):
                        row["gpu_utilisation"] = utilisation(fn, device)
                    yield row


def guided_rows(model, device: torch.device, n: int, steps: int, width: int) -> Iterator[dict]:
    """Unguided vs SVDD (M = width) vs FK (K = width) for n outputs, same stochastic sampler and reward."""
    from molgen.guidance.fk import Tilt, fk_sample
    from molgen.guidance.rewards import parse_reward
    from molgen.guidance.smc import ResamplePolicy
    from molgen.guidance.svdd import svdd_sample

    sampler = Sampler(model, model.schedule, "dpmpp_2m_sde", steps=steps, space=ZeroCoM(3))
    reward = parse_reward("quadratic:c=0,tau=3")  # compact molecules: a reward computed on the GPU
    x_T, mask = molecule_inputs(model, n, device)
    many_x, many_mask = molecule_inputs(model, n * width, device, seed=1)
    g = torch.Generator(device=device).manual_seed(0)
    runs = {
        "unguided": lambda: sampler.finish(sampler.run(sampler.init(x_T, mask=mask, cond={"mask": mask}), g)),
        "svdd": lambda: svdd_sample(sampler, x_T, reward, candidates=width, generator=g, mask=mask,
                                    cond={"mask": mask}),
        "fk": lambda: fk_sample(sampler, many_x, particles=width, tilt=Tilt(reward, lam=1.0),
                                policy=ResamplePolicy("systematic", 1, 0.5), generator=g, mask=many_mask,
                                cond={"mask": many_mask}, final="best"),
    }
    with torch.inference_mode():
        base = timed(runs["unguided"], device)
        for method, fn in runs.items():
            seconds = base if method == "unguided" else timed(fn, device)
            factor = 1 if method == "unguided" else width
            yield {"task": "molecules_guided", "method": method, "n": n, "width": factor, "nfe": steps,
                   "seconds": seconds, "ratio_vs_unguided": seconds / base, "limit": 1.2 * factor,
                   "within_limit": seconds / base <= 1.2 * factor}


def auto_batch_row(model, device: torch.device) -> dict:
    from molgen.batching import largest_batch
    from molgen.molecules.sampling import one_call

    start = time.perf_counter()
    with torch.inference_mode():
        b = largest_batch(lambda k: one_call(model, model, k, 29, None, device), device)
    return {"task": "batch_size_auto", "atoms": 29, "batch": b, "seconds": time.perf_counter() - start}


def rna_rows(device: torch.device, batch: int, repeats: int) -> Iterator[dict]:
    from molgen.sequences.pretrained import default_checkpoint, load_pretrained
    from molgen.sequences.sampling import generate

    pre = load_pretrained(default_checkpoint("rna"), device)
    seconds = timed(lambda: generate(pre, batch, solver="cached_ancestral", steps=32, length=100, device=device,
                                     batch_size=batch), device, repeats)
    yield {"task": "rna", "batch": batch, "nfe": 32, "seconds": seconds, "sequences_per_s": batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="64,256,1024,4096")
    parser.add_argument("--compile-batches", default="1024", help="batch sizes that also get compiled rows")
    parser.add_argument("--guided-n", type=int, default=512, help="outputs of the guided rows (x 8 rows for FK)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from molgen.molecules.sampling import load_model

    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    compile_batches = [int(b) for b in args.compile_batches.split(",") if b]
    model = load_model(None)[0].to(device).eval().requires_grad_(False)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": []}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")

    sections = [
        lambda: [auto_batch_row(model, device)],
        lambda: guided_rows(model, device, args.guided_n, 10, 8),
        lambda: rna_rows(device, max(batch_sizes), args.repeats),
        lambda: molecule_rows(model, device, batch_sizes, compile_batches, args.repeats),
    ]
    for section in sections:
        for row in section():  # saved row by row: a run stopped at its time limit keeps what it measured
            print(row, flush=True)
            result["rows"].append(row)
            save()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
