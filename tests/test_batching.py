"""``--batch-size auto``: argument parsing, the halving search, and the wiring into molecules and sequences."""

from __future__ import annotations

import argparse

import pytest
import torch

from molgen.batching import CPU_BATCH, batch_size_arg, halve_until_fits, largest_batch


def test_batch_size_argument():
    assert batch_size_arg("auto") == "auto" and batch_size_arg("12") == 12
    for bad in ("0", "-3", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'auto'"):
            batch_size_arg(bad)


def test_halving_returns_the_first_batch_that_fits():
    asked = []

    def fits(b: int) -> bool:
        asked.append(b)
        return b <= 100

    assert halve_until_fits(fits, 1000) == 62 and asked == [1000, 500, 250, 125, 62]
    assert halve_until_fits(lambda b: False, 8) == 1  # a batch of one is never refused by the search


def test_cpu_means_the_default_batch():
    assert largest_batch(lambda b: None, "cpu") == CPU_BATCH
    assert largest_batch(lambda b: None, "cpu", limit=10) == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_fits_and_is_larger_than_the_probe():
    layer = torch.nn.Linear(1024, 1024).cuda()
    b = largest_batch(lambda k: layer(torch.zeros(k, 64, 1024, device="cuda")), "cuda", limit=1 << 20)
    assert b > 16
    with torch.no_grad():
        layer(torch.zeros(b, 64, 1024, device="cuda"))


def test_auto_batch_samples_like_an_explicit_one():
    from molgen.molecules.sampling import load_model, sample_molecules

    model, config = load_model()
    auto = sample_molecules(model, config, 3, steps=4, seed=2, batch_size="auto")
    fixed = sample_molecules(model, config, 3, steps=4, seed=2, batch_size=CPU_BATCH)
    assert all((a.positions == f.positions).all() and a.symbols == f.symbols for a, f in zip(auto, fixed))
