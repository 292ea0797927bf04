"""The GPU-path contracts, checked on the CPU: no host synchronisation inside the loop, compiled == eager,
bfloat16 autocast with a float32 state."""

from __future__ import annotations

import contextlib

import pytest
import torch

from molgen.diffusion import SOLVERS, Sampler, get_schedule, sample


class MLPDenoiser(torch.nn.Module):
    """A small time-conditioned network (eps prediction) standing in for a real model."""

    prediction = "eps"

    def __init__(self, dim: int = 4, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


@contextlib.contextmanager
def forbid_host_sync():
    """Fail on any tensor -> Python conversion (.item(), bool(), float(), .tolist(), .cpu() of results):
    the CPU-side equivalent of torch.cuda.set_sync_debug_mode("error")."""
    names = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def trap(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host synchronisation inside the sampling loop: Tensor.{name}")
        return raise_

    for n in names:
        setattr(torch.Tensor, n, trap(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_no_host_synchronisation_inside_the_loop(solver):
    sch = get_schedule("edm" if solver == "af3" else "vp_cosine")
    model = MLPDenoiser()
    s = Sampler(model, sch, solver, nfe=7)
    mask = torch.ones(8, 4, dtype=torch.bool)
    state = s.init(torch.randn(8, 4) * sch.prior_std, mask=mask)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), forbid_host_sync():
        state = s.run(state, g)
    assert torch.isfinite(s.finish(state)).all()


def test_the_trap_catches_a_sync():
    with forbid_host_sync(), pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(1).item()


def test_bfloat16_autocast_keeps_a_float32_state():
    sch = get_schedule("vp_cosine")
    model = MLPDenoiser()
    x_T = torch.randn(64, 4)
    with torch.no_grad():
        full = sample(model, sch, x_T, solver="dpmpp_2m", steps=8)
        half = sample(model, sch, x_T, solver="dpmpp_2m", steps=8, autocast=torch.bfloat16)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.02 * full.abs().max() and not torch.equal(half, full)


def test_compiled_and_eager_models_give_the_same_samples():
    sch = get_schedule("vp_cosine")
    model = MLPDenoiser()
    x_T = torch.randn(16, 4)
    with torch.no_grad():
        eager = sample(model, sch, x_T, solver="unipc", steps=6)
        # aot_eager traces and partitions the graph like inductor but skips C++ code generation (CI time)
        compiled = sample(model, sch, x_T, solver="unipc", steps=6, compile="aot_eager")
    assert torch.allclose(eager, compiled, atol=1e-5)


def test_a_step_scaled_masked_loop_is_capturable():
    """init -> run -> final (what a CUDA graph holds) with ZeroCoM, a padding mask and AF3's step scale: no sync."""
    from molgen.diffusion import ZeroCoM

    class PointDenoiser(torch.nn.Module):
        prediction = "x0"

        def forward(self, x, t, mask):
            return torch.tanh(x / (1 + t[:, None, None] ** 2)) * mask[..., None]

    s = Sampler(PointDenoiser(), get_schedule("vp_cosine"), "dpmpp_2m", steps=8, space=ZeroCoM(3),
                step_scale=1.5, step_scale_below=3.0)
    mask = torch.arange(6) < torch.tensor([[6], [4], [3]])
    x_T = ZeroCoM(3).noise_like(torch.zeros(3, 6, 5), mask, torch.Generator().manual_seed(0))
    with torch.no_grad(), forbid_host_sync():
        state = s.final(s.run(s.init(x_T, mask=mask, cond={"mask": mask})))
    s.check_finite(state)
    assert torch.equal(state.x0, s.finish(s.run(s.init(x_T, mask=mask, cond={"mask": mask}))))
