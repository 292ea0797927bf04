"""Default ends and solver by call count, compensation, the noise carry, and plans fitted by ``tune``."""

import json

import pytest
import torch

from molgen.diffusion import GRIDS, Sampler, get_schedule, sample
from molgen.diffusion.analytic import GaussianMixtureDenoiser
from molgen.diffusion.defaults import COLD_ENDS, cold_ends, default_solver
from molgen.diffusion.tune import TunedPlan, meets, tune
from molgen.errors import InputError

F64 = torch.float64


def noise(n, d, seed=0, scale=1.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def mixture(sch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixtureDenoiser(1.5 * torch.randn(4, 2, generator=g, dtype=F64),
                                   torch.tensor([0.1, 0.2, 0.15, 0.3], dtype=F64), None, sch)


class Counting:
    def __init__(self, model):
        self.model, self.calls, self.prediction = model, 0, model.prediction

    def __call__(self, x, t):
        self.calls += 1
        return self.model(x, t)


@pytest.mark.parametrize("grid", sorted(COLD_ENDS))
def test_cold_ends_shorten_few_call_runs_and_span_the_schedule_for_many(grid):
    firsts, lasts = zip(*(cold_ends(n, grid) for n in range(1, 200)))
    assert all(a < b for a, b in zip(firsts, firsts[1:])) and all(a >= b for a, b in zip(lasts, lasts[1:]))
    sch = get_schedule("vp_linear")
    s = Sampler(mixture(sch), sch, "dpmpp_2m", steps=400, grid=grid)
    assert float(s.t_grid[0, 0]) == sch.t_max and float(s.t_grid[0, -1]) == pytest.approx(sch.t_min)
    few = Sampler(mixture(sch), sch, "dpmpp_2m", steps=3, grid=grid)
    assert float(sch.rho(few.t_grid[0, 0])) == pytest.approx(cold_ends(3, grid)[0])


def test_every_named_grid_has_its_default_ends():
    assert set(COLD_ENDS) == set(GRIDS)
    with pytest.raises(ValueError, match="unknown time grid"):
        cold_ends(5, "linear")


def test_sample_without_a_solver_uses_the_default_for_the_call_count():
    sch = get_schedule("vp_cosine")
    mix, x_T = mixture(sch), noise(8, 2, seed=1)
    for n in (3, 5, 8, 20):
        assert torch.equal(sample(mix, sch, x_T, steps=n), sample(mix, sch, x_T, solver=default_solver(n), steps=n))
    with pytest.raises(ValueError, match="nfe must be"):
        default_solver(0)
    with pytest.raises(ValueError, match="give steps= or nfe="):
        Sampler(mix, sch)
    grid = torch.tensor([0.9, 0.5, 0.1], dtype=F64)
    assert Sampler(mix, sch, grid=grid).solver == default_solver(3)


def test_the_rule_start_carries_noise_along_the_unit_gaussian_flow():
    """For unit Gaussian data the exact flow from t_max is x_t = s(t) / s(t_max) x_T (s^2 = alpha^2 + sigma^2):
    a rule-shortened run on the flow-matching path, whose s is not 1, must end at x_T / s(t_max)."""
    sch = get_schedule("linear_flow")
    unit = GaussianMixtureDenoiser(torch.zeros(1, 3, dtype=F64), 1.0, None, sch)
    x_T = noise(16, 3, seed=2, scale=sch.prior_std)
    exact = x_T / sch.prior_std
    s = Sampler(unit, sch, "dpmpp_3m", steps=40, grid_options={"t_min": sch.t_min})
    assert float(s.t_grid[0, 0]) < sch.t_max and s.carries
    carried = float((s.finish(s.run(s.init(x_T))) - exact).abs().max())
    given = Sampler(unit, sch, "dpmpp_3m", steps=40, grid_options={"t_max": float(s.t_grid[0, 0]), "t_min": sch.t_min})
    assert not given.carries  # an explicit first point: x_T is taken as the state there
    uncarried = float((given.finish(given.run(given.init(x_T))) - exact).abs().max())
    assert carried < 2e-3 and uncarried > 3 * carried, (carried, uncarried)
    vp = get_schedule("vp_linear")
    assert not Sampler(mixture(vp), vp, "dpmpp_2m", steps=5).carries  # the identity on VP schedules


def test_compensation_interpolates_between_first_order_and_the_solver():
    sch = get_schedule("vp_cosine")
    mix, x_T = mixture(sch), noise(32, 2, seed=3)
    plain = sample(mix, sch, x_T, solver="dpmpp_3m", steps=6)
    assert torch.equal(sample(mix, sch, x_T, solver="dpmpp_3m", steps=6, compensation=[1.0] * 5), plain)
    torch.testing.assert_close(sample(mix, sch, x_T, solver="dpmpp_2m", steps=6, compensation=[0.0] * 5),
                               sample(mix, sch, x_T, solver="ddim", steps=6), rtol=0, atol=1e-12)
    half = sample(mix, sch, x_T, solver="dpmpp_2m", steps=6, compensation=[0.5] * 5)
    assert not torch.allclose(half, plain)
    with pytest.raises(ValueError, match="5 transitions"):
        sample(mix, sch, x_T, solver="dpmpp_2m", steps=6, compensation=[1.0] * 4)
    with pytest.raises(ValueError, match="linear multistep"):
        sample(mix, sch, x_T, solver="unipc", steps=6, compensation=[1.0] * 5)


def test_meets_needs_one_step_of_the_solvers_order():
    assert meets("dpmpp_3m", 1) and meets("heun", 3) and not meets("heun", 2) and not meets("dpm_solver_3", 3)


@pytest.fixture(scope="module")
def tuned():
    sch = get_schedule("vp_linear")
    mix = mixture(sch)
    return sch, mix, tune(mix, sch, noise(256, 2, seed=10), nfe=4, budget_s=4.0)


def test_a_tuned_plan_beats_the_default_on_noise_it_never_saw(tuned):
    sch, mix, plan = tuned
    fresh = noise(512, 2, seed=11)
    whole = {"t_max": sch.t_max, "t_min": sch.t_min}
    reference = sample(mix, sch, fresh, solver="dpmpp_3m", steps=200, grid_options=whole)

    def rms(x):
        return float(((x - reference) ** 2).sum(1).mean().sqrt())

    counted = Counting(mix)
    got = sample(counted, sch, fresh, **plan.kwargs)
    assert counted.calls <= plan.nfe
    assert rms(got) < 0.8 * rms(sample(mix, sch, fresh, steps=4))
    assert plan.fit["heldout_error"] < plan.fit["heldout_default_error"]
    assert plan.fit["model_calls"] > 2 * plan.fit["reference_steps"] and plan.fit["seconds"] > 0


def test_plans_round_trip_and_refuse_what_they_were_not_fitted_on(tuned, tmp_path):
    sch, mix, plan = tuned
    path = plan.save(tmp_path / "plan.json")
    back = TunedPlan.load(path)
    assert back == plan
    back.check(mix, sch, noise(3, 2))
    with pytest.raises(InputError, match="schedule"):
        back.check(mix, get_schedule("vp_cosine"), noise(3, 2))
    with pytest.raises(InputError, match="state"):
        back.check(mix, sch, noise(3, 5))
    net = torch.nn.Linear(2, 2)
    net.prediction = "x0"
    with pytest.raises(InputError, match="model"):
        back.check(net, sch, noise(3, 2))
    bad = tmp_path / "bad.json"
    for text, match in (("{", "not JSON"), (json.dumps({"format": "x"}), "format"),
                        (json.dumps({**json.loads(path.read_text()), "times": [0.1, 0.5]}), "decreasing")):
        bad.write_text(text)
        with pytest.raises(InputError, match=match):
            TunedPlan.load(bad)


def test_tune_names_what_it_cannot_do():
    sch = get_schedule("vp_linear")
    mix = mixture(sch)
    with pytest.raises(ValueError, match="cannot make a step"):
        tune(mix, sch, noise(8, 2), nfe=2, solvers=("heun",), budget_s=1)
    with pytest.raises(ValueError, match="ODE solvers"):
        tune(mix, sch, noise(8, 2), nfe=4, solvers=("ddpm_ancestral",), budget_s=1)
    with pytest.raises(ValueError, match="at least 4"):
        tune(mix, sch, noise(2, 2), nfe=4, budget_s=1)


def test_a_plan_fitted_on_the_step_scaled_ode_keeps_the_scale_and_the_given_grid(tmp_path):
    sch = get_schedule("edm")
    mix = GaussianMixtureDenoiser(torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=F64), 0.5, None, sch)
    plan = tune(mix, sch, noise(16, 2, seed=4, scale=sch.prior_std), nfe=4, budget_s=1.0, step_scale=1.5)
    assert plan.kwargs["step_scale"] == 1.5
    smp = Sampler(mix, sch, **plan.kwargs)
    assert torch.equal(smp.grid_times[0], torch.tensor(plan.times, dtype=F64))
    assert not torch.equal(smp.t_grid[0], smp.grid_times[0])  # the state runs on the scaled times
    assert TunedPlan.load(plan.save(tmp_path / "p.json")).kwargs["step_scale"] == 1.5


# --------------------------------------------------------------------------------------------- masked samplers
@pytest.fixture(scope="module")
def masked_tuned():
    from molgen.diffusion.analytic import ProductMixtureLogits
    from molgen.diffusion.discrete import MaskedDiffusion
    from molgen.diffusion.tune import tune_masked

    # two components that each prefer one letter: unmasking many letters at once from the blank state mixes them
    model = ProductMixtureLogits(torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]]))
    process = MaskedDiffusion(4, 4)
    plan = tune_masked(model, process, torch.full((256, 12), 4), nfe=3, solver="ancestral", budget_s=6)
    return model, process, plan


def test_a_masked_plan_makes_likelier_samples_than_the_default_grid_on_draws_it_never_saw(masked_tuned):
    """Judged by the exact log-likelihood of the test bed, not the NELBO the fit used."""
    import math

    from molgen.diffusion.discrete import DiscreteSampler

    model, process, plan = masked_tuned
    x_T = torch.full((4096, 12), 4)

    def bits(**kw):
        out = DiscreteSampler(model, process, **kw).run(x_T, {}, torch.Generator().manual_seed(99)).x
        return float(-model.log_prob(out).mean()) / (12 * math.log(2))

    tuned, default, many = bits(**plan.kwargs), bits(solver="ancestral", steps=3), bits(solver="ancestral", steps=128)
    assert many < tuned < default - 0.03
    times = plan.kwargs["grid"]
    assert times[0] == 1.0 and times[-1] == 0.0 and bool((times[1:] < times[:-1]).all()) and len(times) == 4
    assert plan.fit["reference_bits"] < plan.fit["heldout_bits"] < plan.fit["heldout_default_bits"]


def test_masked_plans_round_trip_and_refuse_another_process_or_family(masked_tuned, tmp_path):
    from molgen.diffusion.discrete import MaskedDiffusion, MaskingSchedule
    from molgen.diffusion.tune import MaskedPlan

    model, process, plan = masked_tuned
    path = plan.save(tmp_path / "masked.json")
    back = MaskedPlan.load(path)
    assert back == plan
    back.check(model, process)
    with pytest.raises(InputError, match="schedule"):
        back.check(model, MaskedDiffusion(4, 4, schedule=MaskingSchedule("cosine")))
    with pytest.raises(InputError, match="letters"):
        back.check(model, MaskedDiffusion(5, 5))
    with pytest.raises(InputError, match="masked models, not for this continuous"):
        TunedPlan.load(path)
