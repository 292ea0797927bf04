"""The whole sampling loop as a CUDA graph: replay == eager, one graph per shape, NaN still reported.
The CUDA cases run where a GPU is present (the device check in the README); on a CPU the class refuses clearly."""

from __future__ import annotations

import pytest
import torch

from molgen.diffusion import GraphedSampler, Sampler, ZeroCoM, get_schedule

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class PairDenoiser(torch.nn.Module):
    """A small permutation-equivariant x0 network over [B, N, F] point sets, with a padding mask."""

    prediction = "x0"

    def __init__(self, features: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2 * features + 1, 32), torch.nn.SiLU(),
                                       torch.nn.Linear(32, features))

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        tt = t.to(x.dtype)[:, None, None].expand(*x.shape[:2], 1)
        return self.net(torch.cat([x, mean.expand_as(x), tt], -1)) * m


def inputs(batch: int, atoms: int, device: str = "cuda", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    mask = torch.arange(atoms, device=device) < torch.randint(2, atoms + 1, (batch, 1), device=device, generator=g)
    x_T = ZeroCoM(3).noise_like(torch.zeros(batch, atoms, 5, device=device), mask, g) * 80.0
    return x_T, mask


def eager(s: Sampler, x_T, mask) -> torch.Tensor:
    with torch.inference_mode():
        return s.finish(s.run(s.init(x_T, mask=mask, cond={"mask": mask})))


def test_graphs_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    s = Sampler(PairDenoiser(), get_schedule("edm"), "dpmpp_2m", steps=4, space=ZeroCoM(3))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        GraphedSampler(s)


@cuda
@pytest.mark.parametrize("options", [{"solver": "dpmpp_2m"}, {"solver": "unipc"},
                                     {"solver": "dpmpp_2m", "step_scale": 1.5, "step_scale_below": 3.0}])
def test_replay_matches_eager_for_new_inputs_and_shapes(options):
    model = PairDenoiser().cuda()
    s = Sampler(model, get_schedule("edm"), steps=8, space=ZeroCoM(3), **options)
    loop = GraphedSampler(s)
    for batch, atoms, seed in [(16, 9, 0), (16, 9, 1), (4, 12, 2)]:
        x_T, mask = inputs(batch, atoms, seed=seed)
        got = loop(x_T, mask=mask, cond={"mask": mask})
        assert torch.allclose(got, eager(s, x_T, mask), atol=1e-5, rtol=1e-5)
    assert len(loop.graphs) == 2  # one per input shape


@cuda
def test_stochastic_replays_draw_fresh_noise():
    s = Sampler(PairDenoiser().cuda(), get_schedule("edm"), "dpmpp_2m_sde", steps=8, space=ZeroCoM(3))
    loop = GraphedSampler(s)
    x_T, mask = inputs(8, 9)
    a, b = (loop(x_T, mask=mask, cond={"mask": mask}) for _ in range(2))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


@cuda
def test_nan_is_reported_after_the_replay():
    class Broken(PairDenoiser):
        def forward(self, x, t, mask):
            return super().forward(x, t, mask) * torch.where(t < 1.0, torch.nan, 1.0)[:, None, None]

    loop = GraphedSampler(Sampler(Broken().cuda(), get_schedule("edm"), "dpmpp_2m", steps=6, space=ZeroCoM(3)))
    x_T, mask = inputs(4, 6)
    with pytest.raises(FloatingPointError, match="NaN/inf for 4 of 4"):
        loop(x_T, mask=mask, cond={"mask": mask})
