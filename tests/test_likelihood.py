"""Predictor-corrector sampling and probability-flow likelihoods against closed-form answers."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import counting

from molgen.diffusion import (
    Euclidean,
    Sampler,
    ZeroCoM,
    bits_per_dim,
    get_schedule,
    log_likelihood,
    naturalness,
    sample,
)
from molgen.diffusion.analytic import GaussianMixtureDenoiser
from molgen.diffusion.corrector import Langevin, langevin
from molgen.diffusion.sampling import BoundModel

F64 = torch.float64


class Gaussian:
    """Data N(mu, s^2 I) (on the space's subspace):
    E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)."""

    prediction = "x0"

    def __init__(self, schedule, mu: float = 0.5, s: float = 0.3) -> None:
        self.schedule, self.mu, self.s = schedule, mu, s

    def __call__(self, x, t, **cond):
        a = self.schedule.alpha(t.to(F64)).reshape(-1, *[1] * (x.ndim - 1))
        sig = self.schedule.sigma(t.to(F64)).reshape(-1, *[1] * (x.ndim - 1))
        return (self.mu + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * self.mu)).to(x.dtype)

    def var_y(self, t: float) -> float:
        """Variance per coordinate of y = x / alpha at t: s^2 + rho^2."""
        return self.s**2 + float(self.schedule.rho(torch.tensor(t, dtype=F64))) ** 2

    def computed(self, x0, t_min: float, t_max: float, dims: int):
        """The exact value of what ``log_likelihood`` integrates: the flow keeps (y - mu) / sqrt(s^2 + rho^2)
        fixed, so log p_{t_min}(x0) - log p_{t_max}(y_T) + log prior(y_T) in closed form."""
        v0, v1 = self.var_y(t_min), self.var_y(t_max)
        y_T = self.mu + (x0 - self.mu) * math.sqrt(v1 / v0)
        prior_var = self.schedule.prior_std**2 / float(self.schedule.alpha(torch.tensor(t_max, dtype=F64))) ** 2

        def log_normal(y, mean, var):
            return -0.5 * ((y - mean) ** 2).flatten(1).sum(1) / var - 0.5 * dims * math.log(2 * math.pi * var)

        return log_normal(x0, self.mu, v0) - log_normal(y_T, self.mu, v1) + log_normal(y_T, 0.0, prior_var)


def noise(n: int, d: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixture_log_density(mix: GaussianMixtureDenoiser, x) -> torch.Tensor:
    """log sum_k w_k N(x; mu_k, s_k^2 I), the closed form."""
    sq = ((x[:, None, :] - mix.means[None]) ** 2).sum(-1)
    var = mix.stds**2
    return torch.logsumexp(mix.log_w - 0.5 * sq / var - 0.5 * mix.dim * torch.log(2 * math.pi * var), dim=1)


def energy_distance(a, b):
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


# ---------------------------------------------------------------------------------------------- corrector
def corrector_at(sch, t_from: float, t: float, x, snr: float, steps: int, seed: int):
    """``steps`` Langevin steps at t from x (a two-point grid t_from > t: the corrector of its transition)."""
    sampler = Sampler(Gaussian(sch), sch, "ddim", grid=torch.tensor([t_from, t], dtype=F64))
    state = sampler.init(x)
    draw = functools.partial(sampler.space.noise_like, x, None, gen(seed))
    return langevin(Langevin(snr, steps), state.plan.row(0), x, None, None, BoundModel(sampler, state, 0), draw)


@pytest.mark.parametrize("schedule,t", [("vp_cosine", 0.5), ("edm", 0.3)])
def test_langevin_step_from_the_exact_marginal(schedule, t):
    """x ~ p_t = N(m, v I) in d dimensions: one step with the exact score keeps the mean, and its variance is
    the closed form of the per-sample step e = 2 a r^2 v w / q (w = |z|^2, q = |x - m|^2 / v, both chi^2_d):
    E|x' - m|^2 / (d v) = 1 + 16 a r^2 / (d - 2) + 4 a^2 r^4 (d + 2) / (d - 2), the marginal up to O(r^2 / d)."""
    sch = get_schedule(schedule)
    n, d, r, t_from = 40000, 16, 0.16, t + 0.05
    a, s_t = (float(f(torch.tensor(t, dtype=F64))) for f in (sch.alpha, sch.sigma))
    kept = (float(sch.alpha(torch.tensor(t_from, dtype=F64))) / a) ** 2
    m, var = a * 0.5, a**2 * 0.3**2 + s_t**2
    x = m + math.sqrt(var) * noise(n, d, seed=1)
    out = corrector_at(sch, t_from, t, x, snr=r, steps=1, seed=3)
    predicted = 1 + 16 * kept * r**2 / (d - 2) + 4 * kept**2 * r**4 * (d + 2) / (d - 2)
    assert abs(float(out.mean()) - m) < 5 * math.sqrt(var / (n * d))
    assert abs(float(((out - m) ** 2).mean()) / var - predicted) < 5 * math.sqrt(2.0 / (n * d))
    assert predicted - 1 < 0.04 and not torch.allclose(out, x)


def test_langevin_pulls_a_wrong_law_to_its_stationary_law():
    """Started at twice the variance, many corrector steps reach the stationary law of the per-sample rule: mean m,
    variance c v with c = (1 + a r^2)(d + 2) / (d - 2) in the Gaussian closure of the step above (-> 1 + a r^2 in
    high dimension: the unadjusted steps' bias)."""
    sch = get_schedule("edm")
    t, n, d = 0.3, 4000, 16
    var = 0.3**2 + float(sch.sigma(torch.tensor(t, dtype=F64))) ** 2
    x = 0.5 + math.sqrt(2 * var) * noise(n, d, seed=2)
    out = corrector_at(sch, 0.35, t, x, snr=0.16, steps=300, seed=4)
    assert abs(float(out.mean()) - 0.5) < 5 * math.sqrt(var / (n * d))
    assert abs(float(out.var()) / var - (1 + 0.16**2) * (d + 2) / (d - 2)) < 0.03


def test_predictor_corrector_beats_the_predictor_alone_on_a_mixture():
    """Few ancestral steps on an 8-D four-component mixture: PC is closer to exact samples (energy distance)."""
    sch = get_schedule("vp_cosine")
    mix = GaussianMixtureDenoiser(noise(4, 8, seed=4) * 1.5, torch.tensor([0.3, 0.5, 0.4, 0.6]), None, sch)
    n = 2000
    target = mix.sample_data(n, gen(9))
    x_T = noise(n, 8, seed=5, scale=sch.prior_std)

    def run(corrector):
        return sample(mix, sch, x_T, solver="ddpm_ancestral", steps=10, generator=gen(2), corrector=corrector,
                      grid_options={"t_max": sch.t_max, "t_min": sch.t_min},
                      corrector_options={"snr": 0.16, "steps": 2} if corrector else None)

    alone, pc = energy_distance(run(None), target), energy_distance(run("langevin"), target)
    assert pc < 0.75 * alone


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc", "heun", "ddpm_ancestral", "af3"])
def test_corrector_calls_are_counted(solver):
    sch = get_schedule("edm" if solver == "af3" else "vp_cosine")
    model, calls = counting(Gaussian(sch))
    s = Sampler(model, sch, solver, steps=5, corrector="langevin", corrector_options={"steps": 3})
    plain = Sampler(model, sch, solver, steps=5)
    s.finish(s.run(s.init(noise(4, 2, scale=sch.prior_std)), gen(0)))
    assert calls[0] == s.model_calls == plain.model_calls + 3 * 4


def test_corrector_is_seeded_and_keeps_masks_and_the_zero_com_subspace():
    sch = get_schedule("vp_cosine")
    model = Gaussian(sch, mu=0.0)
    x_T = torch.randn(3, 5, 3, generator=gen(0), dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)

    def run(seed):
        return sample(model, sch, x_T, solver="dpmpp_2m", steps=6, mask=mask, space=ZeroCoM(3), generator=gen(seed),
                      corrector="langevin")

    x = run(1)
    assert torch.equal(x, run(1)) and not torch.equal(x, run(2))
    assert torch.equal(x[~mask], x_T[~mask])
    com = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert com.abs().max() < 1e-12


def test_corrector_errors_are_named():
    sch = get_schedule("vp_cosine")
    with pytest.raises(ValueError, match="unknown corrector"):
        Sampler(Gaussian(sch), sch, "ddim", steps=3, corrector="hmc")
    with pytest.raises(ValueError, match="no option"):
        Sampler(Gaussian(sch), sch, "ddim", steps=3, corrector="langevin", corrector_options={"eps": 1})
    with pytest.raises(ValueError, match="snr"):
        Sampler(Gaussian(sch), sch, "ddim", steps=3, corrector="langevin", corrector_options={"snr": 0})
    with pytest.raises(ValueError, match="step_scale"):
        Sampler(Gaussian(sch), sch, "ddim", steps=3, corrector="langevin", step_scale=1.5)


# ---------------------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("schedule", ["vp_linear", "vp_cosine", "edm"])
@pytest.mark.parametrize("prediction", ["x0", "eps", "velocity"])
def test_gaussian_log_likelihood_is_the_closed_form(schedule, prediction):
    """N(mu, s^2 I) under VP and VE: the integral equals its closed form (flow and prior included) to 1e-4, and
    the data's log-density to the prior's mismatch at t_max (E[x_T] = alpha mu is not 0)."""
    from molgen.diffusion.parameterization import from_x0

    sch = get_schedule(schedule)
    base = Gaussian(sch)

    def model(x, t):
        a, s = (f(t.to(F64)).reshape(-1, 1) for f in (sch.alpha, sch.sigma))
        da, ds = (v.reshape(-1, 1) for v in sch.d_alpha_sigma(t.to(F64)))
        x0 = base(x, t)
        return from_x0(prediction, x0, (x - a * x0) / s, a, s, da, ds)

    x0 = 0.5 + 0.3 * noise(6, 3, seed=1)
    ll = log_likelihood(model, sch, x0, steps=128, prediction=prediction)
    assert (ll - base.computed(x0, sch.t_min, sch.t_max, 3)).abs().max() < 1e-4
    data = (-0.5 * ((x0 - 0.5) / 0.3) ** 2 - math.log(0.3) - 0.5 * math.log(2 * math.pi)).sum(1)
    assert (ll - data).abs().max() < 0.03


@pytest.mark.parametrize("method,order", [("heun", 2), ("rk4", 4)])
def test_likelihood_converges_in_the_number_of_ode_steps(method, order):
    sch = get_schedule("vp_cosine")
    model = Gaussian(sch)
    x0 = 0.5 + 0.3 * noise(4, 2, seed=2)
    exact = model.computed(x0, sch.t_min, sch.t_max, 2)
    errors = [float((log_likelihood(model, sch, x0, steps=n, method=method) - exact).abs().max())
              for n in (16, 32, 64)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[1] / errors[2] > 2 ** (order - 0.8)


def test_mixture_log_likelihood_is_the_closed_form():
    """A 3-component 2-D mixture centred at 0 (the VP prior then matches p_{t_max} to O(alpha_T)): the exact
    denoiser's likelihood is the mixture's log-density, at points near and far from the modes."""
    sch = get_schedule("vp_linear")
    means = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]], dtype=F64)
    mix = GaussianMixtureDenoiser(means, torch.tensor([0.3, 0.5, 0.4]), torch.tensor([0.5, 0.3, 0.2], dtype=F64), sch)
    x0 = torch.cat([mix.sample_data(6, gen(3)), torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=F64)])
    exact = mixture_log_density(mix, x0)
    coarse, fine = (log_likelihood(mix, sch, x0, steps=n) for n in (24, 96))
    assert (fine - exact).abs().max() < 5e-3
    assert (coarse - exact).abs().max() > (fine - exact).abs().max()


def test_hutchinson_mean_is_the_exact_divergence():
    """On a 4-D mixture (a non-diagonal Jacobian) the Hutchinson likelihood of one point, replicated 400 times
    with one probe each, averages to the exact-divergence likelihood within 4 standard errors; more probes cut
    the spread."""
    sch = get_schedule("vp_cosine")
    mix = GaussianMixtureDenoiser(noise(3, 4, seed=6), torch.tensor([0.4, 0.6, 0.5]), None, sch)
    x0 = mix.sample_data(1, gen(7))
    exact = log_likelihood(mix, sch, x0, steps=6, exact_divergence=True)
    reps = x0.expand(400, -1)
    one = log_likelihood(mix, sch, reps, steps=6, exact_divergence=False, generator=gen(8))
    four = log_likelihood(mix, sch, reps, steps=6, exact_divergence=False, hutchinson_samples=4, generator=gen(9))
    se = float(one.std()) / math.sqrt(400)
    assert float(one.std()) > 0
    assert abs(float(one.mean() - exact)) < 4 * se
    assert float(four.std()) < 0.7 * float(one.std())


def test_zero_com_likelihood_lives_on_the_subspace():
    """x0 ~ N(0, s^2 P) on zero-CoM positions and free features [B, N, 4] with padding: log p is the Gaussian's
    on the subspace of dimension 4 n - 3 (the prior's too), and bits/dim divide by that dimension."""
    sch = get_schedule("vp_linear")
    s, space = 0.3, ZeroCoM(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    x0 = space.project(s * torch.randn(3, 4, 4, generator=gen(0), dtype=F64) * mask[..., None], mask)
    model = Gaussian(sch, mu=0.0, s=s)
    dims = space.dim(x0, mask)
    assert dims.tolist() == [13, 9, 5]
    ll = log_likelihood(model, sch, x0, steps=96, mask=mask, space=space)
    assert (ll - model.computed(x0, sch.t_min, sch.t_max, dims)).abs().max() < 2e-4
    closed = -0.5 * (x0**2).flatten(1).sum(1) / s**2 - 0.5 * dims * math.log(2 * math.pi * s**2)
    assert (ll - closed).abs().max() < 0.01  # p_0 itself, to the O(rho(t_min)^2) of the start
    bpd = bits_per_dim(model, sch, x0, steps=96, mask=mask, space=space)
    assert torch.allclose(bpd, -ll / (dims.to(F64) * math.log(2)), rtol=1e-12)
    # the subspace's Rademacher probes have |u|^2 = d: an isotropic Jacobian's trace costs no variance
    hutchinson = log_likelihood(model, sch, x0, steps=8, mask=mask, space=space, exact_divergence=False,
                                generator=gen(1))
    assert torch.allclose(hutchinson, log_likelihood(model, sch, x0, steps=8, mask=mask, space=space), atol=1e-9)


@pytest.mark.parametrize("space", [Euclidean(), ZeroCoM(3)])
def test_rademacher_probes_are_orthonormal_coordinates_of_the_space(space):
    """u lies in the space (zero at padding), |u|^2 is its dimension and E[u u^T] its projection P."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    x = torch.zeros(3, 5, 4, dtype=F64)
    g, n = gen(0), 6000
    draws = torch.stack([space.rademacher(x, mask, g) for _ in range(n)])  # [n, 3, 5, 4]
    assert torch.allclose(draws.flatten(2).pow(2).sum(-1), space.dim(x, mask).to(F64).expand(n, -1), atol=1e-12)
    assert torch.allclose(space.project(draws[0], mask), draws[0], atol=1e-12)
    assert draws[:, ~mask].abs().max() == 0
    eye = torch.eye(20, dtype=F64).reshape(20, 5, 4)
    for b in range(3):
        proj = torch.stack([space.project(e[None] * mask[b, None, :, None], mask[b : b + 1])[0].flatten() for e in eye])
        u = draws[:, b].flatten(1)
        assert (u.T @ u / n - proj).abs().max() < 6 / math.sqrt(n)


def test_zero_com_hutchinson_is_unbiased_on_a_nonisotropic_field():
    """A linear denoiser with a random (non-symmetric) matrix on zero-CoM states: projected Rademacher probes
    average to the exact subspace trace tr(P J P)."""
    sch = get_schedule("edm")
    space = ZeroCoM(3)
    mat = 0.3 * torch.randn(12, 12, generator=gen(2), dtype=F64)

    class Linear:
        prediction = "x0"

        def __call__(self, x, t, **cond):
            return space.project((x.flatten(1) @ mat).reshape(x.shape), None)

    x0 = space.project(torch.randn(1, 4, 3, generator=gen(3), dtype=F64), None)
    exact = log_likelihood(Linear(), sch, x0, steps=2, space=space, exact_divergence=True)
    est = log_likelihood(Linear(), sch, x0.expand(600, -1, -1), steps=2, space=space, exact_divergence=False,
                         generator=gen(4))
    assert abs(float(est.mean() - exact)) < 4 * float(est.std()) / math.sqrt(600)


def test_naturalness_calls_the_model_with_its_mask_and_schedule():
    sch = get_schedule("vp_linear")

    class Model(Gaussian):
        def __init__(self):
            super().__init__(sch, mu=0.0, s=0.3)
            self.masks = []

        def __call__(self, x, t, mask=None):
            self.masks.append(mask)
            return super().__call__(x, t)

    model = Model()
    model.schedule = sch
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    x0 = ZeroCoM(3).project(0.3 * torch.randn(2, 4, 3, generator=gen(5), dtype=F64) * mask[..., None], mask)
    bpd = naturalness(model, x0, mask, steps=16, hutchinson_samples=4, generator=gen(6))
    ref = bits_per_dim(model, sch, x0, steps=16, mask=mask, cond={"mask": mask}, space=ZeroCoM(3),
                       exact_divergence=True)
    assert all(m is mask for m in model.masks)
    assert (bpd - ref).abs().max() < 0.05


def test_likelihood_errors_are_named():
    sch = get_schedule("vp_cosine")
    x0 = noise(2, 2)
    with pytest.raises(ValueError, match="steps"):
        log_likelihood(Gaussian(sch), sch, x0, steps=0)
    with pytest.raises(ValueError, match="method"):
        log_likelihood(Gaussian(sch), sch, x0, method="rk45")
    with pytest.raises(ValueError, match="prediction"):
        log_likelihood(lambda x, t: x, sch, x0)
    with pytest.raises(ValueError, match="t_min"):
        log_likelihood(Gaussian(sch), get_schedule("vp_linear"), x0, t_min=0.0)
    with pytest.raises(ValueError, match="hutchinson"):
        log_likelihood(Gaussian(sch), sch, x0, exact_divergence=False, hutchinson_samples=0)
