"""Guidance against exact answers: SMC resampling, FK tilting and correctors, SVDD, baselines, rewards.

Targets are closed-form or 1-D quadrature; for reward tilting the reference is the exact output law of the
discrete sampler chain itself (linear-Gaussian for Gaussian data), so that only Monte-Carlo error remains.
Monte-Carlo error is measured across independent particle groups (z-scores), not guessed.
"""

from __future__ import annotations

import math

import pytest
import torch

from molgen.diffusion import Sampler, get_schedule
from molgen.diffusion.analytic import GaussianMixtureDenoiser
from molgen.guidance.baselines import best_of_n, dps_sample, equal_call_candidates
from molgen.guidance.core import prior
from molgen.guidance.fk import Composition, Expert, Tilt, anneal, cfg, fk_sample, product
from molgen.guidance.rewards import REWARDS, Reward, TensorReward, linear, parse_reward, quadratic
from molgen.guidance.smc import RESAMPLERS, Particles, ResamplePolicy, ess, resample
from molgen.guidance.svdd import choose, svdd_calls, svdd_sample

F64 = torch.float64
SCHED = get_schedule("vp_cosine")
GRID = torch.linspace(-8.0, 8.0, 32001, dtype=F64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(mu: float, s: float) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(torch.tensor([[mu]]), s, None, SCHED)


def chain_law(sampler: Sampler, mu: float, s: float) -> tuple[float, float]:
    """Exact mean and variance of the output of a stochastic linear sampler (x_{i+1} = a x + w D + c z) on data
    N(mu, s^2) in 1-D, where D(x) = mu + g (x - alpha mu), g = alpha s^2 / (alpha^2 s^2 + sigma^2)."""
    tab = sampler.tables
    alpha, sigma = tab["alpha"][0], tab["sigma"][0]
    gain = alpha * s**2 / (alpha**2 * s**2 + sigma**2)
    m, v = 0.0, SCHED.prior_std**2
    for i in range(sampler.n_steps - 1):
        a, w, c = tab["a"][0, i], tab["w"][0, i, 0], tab["c"][0, i]
        m = a * m + w * (mu + gain[i] * (m - alpha[i] * mu))
        v = (a + w * gain[i]) ** 2 * v + c**2
    j = sampler.n_steps - 1
    return float(mu + gain[j] * (m - alpha[j] * mu)), float(gain[j] ** 2 * v)


def quadrature(density: torch.Tensor) -> dict[str, float]:
    p = density / density.sum()
    m = float((p * GRID).sum())
    return {"mean": m, "var": float((p * (GRID - m) ** 2).sum()), "pos": float(p[GRID > 0].sum())}


def group_stats(particles: torch.Tensor, log_w: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Weighted per-group estimates of mean, variance and P(x > 0): (average over groups, standard error)."""
    g, k = log_w.shape
    w = torch.softmax(log_w, -1)
    x = particles.reshape(g, k).double()
    mean = (w * x).sum(-1)
    est = {"mean": mean, "var": (w * (x - mean[:, None]) ** 2).sum(-1), "pos": (w * (x > 0)).sum(-1)}
    return {n: (float(v.mean()), float(v.std() / math.sqrt(g))) for n, v in est.items()}


def assert_matches(stats: dict, target: dict, z: float = 4.5, slack: float = 0.0) -> None:
    for name, want in target.items():
        got, se = stats[name]
        assert abs(got - want) <= z * se + slack, f"{name}: got {got:.4f} +- {se:.4f}, want {want:.4f}"


# ---------------------------------------------------------------------------------------------- SMC core
@pytest.mark.parametrize("method", sorted(RESAMPLERS))
def test_resamplers_are_unbiased(method):
    log_w = torch.log(torch.tensor([[0.05, 0.45, 0.1, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=F64))
    reps = 4000
    idx = resample(log_w.repeat(reps, 1), ResamplePolicy(method, 1, None), gen(0))[0].reshape(reps, 2, 4) % 4
    counts = torch.stack([(idx == j).double().sum(-1).mean(0) for j in range(4)], -1)  # [2, 4]
    expected = 4 * log_w.exp()
    assert torch.allclose(counts, expected, atol=0.06), (counts, expected)
    if method != "multinomial":  # low-variance schemes: equal weights -> every particle exactly once
        assert (torch.sort(idx[:, 1], -1).values == torch.arange(4)).all()
    if method in ("systematic", "residual"):  # at least floor(K w) copies
        assert ((idx[:, 0] == 1).sum(-1) >= 1).all() and ((idx[:, 0] == 3).sum(-1) >= 1).all()


def test_ess_and_adaptive_policy_accumulate_weights():
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -30.0, -30.0, -30.0]], dtype=F64)
    assert torch.allclose(ess(log_w), torch.tensor([4.0, 1.0], dtype=F64), atol=1e-9)
    index, new_w, done = resample(log_w, ResamplePolicy("systematic", 1, 0.5), gen(0))
    assert done.tolist() == [False, True]
    assert index[:4].tolist() == [0, 1, 2, 3] and index[4:].tolist() == [4, 4, 4, 4]
    assert torch.equal(new_w[0], log_w[0]) and torch.equal(new_w[1], torch.zeros(4, dtype=F64))
    policy = ResamplePolicy("residual", every=3, ess_threshold=None)
    assert [policy.due(i) for i in range(6)] == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="unknown resampling"):
        ResamplePolicy("bogus")
    with pytest.raises(ValueError, match="ess_threshold"):
        ResamplePolicy("systematic", 1, 1.5)


def test_particles_move_their_state_and_log_evidence():
    smp = Sampler(gaussian(0.0, 1.0), SCHED, "ddpm_ancestral", steps=4)
    x = torch.arange(6, dtype=F64)[:, None]
    pop = Particles.start(smp.init(x), groups=2)
    pop.carry = {"r": torch.arange(6, dtype=F64)}
    pop.reweight(torch.tensor([0.0, -50.0, -50.0, -50.0, 0.0, -50.0], dtype=F64))
    pop.resample(ResamplePolicy("systematic", 1, None), gen(1))
    assert pop.state.x[:, 0].tolist() == [0.0, 0.0, 0.0, 4.0, 4.0, 4.0]
    assert pop.carry["r"].tolist() == [0.0, 0.0, 0.0, 4.0, 4.0, 4.0]
    assert torch.allclose(pop.log_evidence(), torch.tensor([-math.log(3.0)] * 2, dtype=F64), atol=1e-12)


# ---------------------------------------------------------------------------------------------- FK tilting
@pytest.mark.parametrize("potential,every", [("difference", 1), ("difference", 5), ("max", 10), ("sum", 10)])
def test_fk_tilted_gaussian_posterior(potential, every):
    """Prior N(mu, s^2) (as produced by the sampler chain), reward -(x - c)^2 / (2 tau^2), lambda = 1: the
    posterior is Gaussian with precision 1/v + 1/tau^2."""
    mu, s, c, tau = 0.5, 0.6, 1.5, 0.5
    smp = Sampler(gaussian(mu, s), SCHED, "ddpm_ancestral", steps=40)
    m0, v0 = chain_law(smp, mu, s)
    v = 1.0 / (1.0 / v0 + 1.0 / tau**2)
    target = {"mean": v * (m0 / v0 + c / tau**2), "var": v}
    groups, k = 48, 64
    x = prior(smp, groups * k, (1,), gen(0), F64)
    res = fk_sample(smp, x, particles=k, tilt=Tilt(quadratic(c, tau), potential=potential, every=every),
                    generator=gen(1))
    assert_matches(group_stats(res.particles, res.log_weights), target, slack=0.03 * v)
    assert res.samples.shape == (groups, 1) and res.rewards.shape == (groups,)
    assert res.model_calls == groups * k * smp.n_steps
    assert res.reward_calls == groups * k * (1 + (smp.n_steps - 1) // every)


def test_fk_is_deterministic_and_guards_rewards():
    smp = Sampler(gaussian(0.0, 1.0), SCHED, "euler_maruyama", steps=8)
    x = prior(smp, 32, (1,), gen(0), F64)

    def flaky(x: torch.Tensor) -> torch.Tensor:
        r = -x[:, 0] ** 2
        return torch.where(x[:, 0] > 1.0, torch.full_like(r, float("nan")), r)

    reward = TensorReward(name="flaky", fn=flaky, penalty=-100.0)
    runs = [fk_sample(smp, x, particles=8, tilt=Tilt(reward), generator=gen(3)) for _ in range(2)]
    assert torch.equal(runs[0].particles, runs[1].particles) and torch.equal(runs[0].samples, runs[1].samples)
    assert torch.isfinite(runs[0].log_weights).all()
    assert reward.stats.nonfinite > 0 and reward.stats.samples == 2 * runs[0].reward_calls
    assert (runs[0].particle_rewards[runs[0].particles[:, 0] > 1.0] == -100.0).all()


# ---------------------------------------------------------------------------------------------- FK correctors
MIX_MEANS, MIX_S, MIX_W = torch.tensor([[-1.5], [1.5]]), 0.5, torch.tensor([0.3, 0.7])


def mixture_density(means=MIX_MEANS, s=MIX_S, w=MIX_W) -> torch.Tensor:
    return sum(wk * torch.exp(-((GRID - mk) ** 2) / (2 * s * s)) for wk, mk in zip(w.tolist(), means[:, 0].tolist()))


def run_corrector(model, groups=32, k=128, steps=100, seed=0) -> dict:
    smp = Sampler(model, SCHED, "euler_maruyama", steps=steps)
    x = prior(smp, groups * k, (1,), gen(seed), F64)
    res = fk_sample(smp, x, particles=k, generator=gen(seed + 1))
    assert res.model_calls == groups * k * smp.n_steps * len(model.experts)
    return group_stats(res.particles, res.log_weights)


@pytest.mark.parametrize("beta", [2.0, 0.5])
def test_fk_annealed_mixture(beta):
    model = GaussianMixtureDenoiser(MIX_MEANS, MIX_S, MIX_W, SCHED)
    target = quadrature(mixture_density() ** beta)
    assert_matches(run_corrector(anneal(model, beta, SCHED)), target, slack=0.02)


@pytest.mark.parametrize("beta", [2.0, 0.5])
def test_fk_annealed_gaussian(beta):
    """N(mu, s^2)^beta = N(mu, s^2 / beta); without the corrector weights the variance misses by ~30 %."""
    mu, s = 0.5, 0.6
    target = {"mean": mu, "var": s**2 / beta}
    assert_matches(run_corrector(anneal(gaussian(mu, s), beta, SCHED), seed=3), target, slack=0.01)


def test_fk_product_of_two_gaussians():
    (m1, s1), (m2, s2) = (-0.5, 0.8), (1.0, 0.6)
    v = 1.0 / (1 / s1**2 + 1 / s2**2)
    model = product(gaussian(m1, s1), gaussian(m2, s2), SCHED)
    assert_matches(run_corrector(model), {"mean": v * (m1 / s1**2 + m2 / s2**2), "var": v}, slack=0.02)


class Conditional:
    """Label 1: N(1.5, 0.5^2); label 0 (null): the mixture 0.3 N(-1.5, 0.5^2) + 0.7 N(1.5, 0.5^2)."""

    prediction = "x0"

    def __init__(self) -> None:
        self.cond = gaussian(1.5, MIX_S)
        self.uncond = GaussianMixtureDenoiser(MIX_MEANS, MIX_S, MIX_W, SCHED)

    def __call__(self, x, t, labels):
        return torch.where(labels[:, None] == 1, self.cond(x, t), self.uncond(x, t))


def test_fk_classifier_free_guidance_mixture():
    w = 1.5
    model = cfg(Conditional(), w, SCHED)
    smp = Sampler(model, SCHED, "euler_maruyama", steps=100)
    groups, k = 32, 128
    x = prior(smp, groups * k, (1,), gen(4), F64)
    labels = torch.ones(groups * k, dtype=torch.long)
    res = fk_sample(smp, x, particles=k, generator=gen(5), cond={"labels": labels})
    cond_density = torch.exp(-((GRID - 1.5) ** 2) / (2 * MIX_S**2))
    target = quadrature(cond_density**w * mixture_density() ** (1 - w))
    assert_matches(group_stats(res.particles, res.log_weights), target, slack=0.02)


def test_composition_checks():
    with pytest.raises(ValueError, match="at least one expert"):
        Composition([], SCHED)
    with pytest.raises(ValueError, match="stochastic"):
        fk_sample(Sampler(gaussian(0, 1), SCHED, "dpmpp_2m", steps=5), torch.zeros(4, 1), particles=2)
    with pytest.raises(ValueError, match="multiple of particles"):
        fk_sample(Sampler(gaussian(0, 1), SCHED, "ddpm_ancestral", steps=5), torch.zeros(5, 1), particles=2)
    with pytest.raises(ValueError, match="prediction"):
        Expert(lambda x, t: x)


# ---------------------------------------------------------------------------------------------- SVDD
def test_svdd_alpha_infinity_is_unguided_and_costs_m_calls_per_step():
    mu, s, m = 0.5, 0.6, 3
    model = gaussian(mu, s)
    rows = []

    def counting(x, t):
        rows.append(x.shape[0])
        return model(x, t)

    counting.prediction = "x0"
    smp = Sampler(counting, SCHED, "ddpm_ancestral", steps=20)
    n = 3000
    res = svdd_sample(smp, prior(smp, n, (1,), gen(0), F64), quadratic(2.0, 0.3), candidates=m,
                      alpha=float("inf"), generator=gen(1))
    assert sum(rows) == res.model_calls == n * svdd_calls(smp.n_steps, m) == n * (1 + m * (smp.n_steps - 1))
    mean, var = chain_law(smp, mu, s)
    x = res.samples[:, 0]
    assert abs(float(x.mean()) - mean) < 4.5 * math.sqrt(var / n)
    assert abs(float(x.var()) - var) < 4.5 * var * math.sqrt(2.0 / n)
    assert torch.allclose(res.rewards, quadratic(2.0, 0.3)(res.samples))


def test_svdd_argmax_beats_best_of_n_at_equal_calls_and_is_deterministic():
    smp = Sampler(gaussian(0.5, 0.6), SCHED, "ddpm_ancestral", steps=10)
    reward = quadratic(2.0, 0.3)
    x = prior(smp, 64, (1,), gen(0), F64)
    a = svdd_sample(smp, x, reward, candidates=4, alpha=0.0, generator=gen(1))
    b = svdd_sample(smp, x, reward, candidates=4, alpha=0.0, generator=gen(1))
    assert torch.equal(a.samples, b.samples)
    n = equal_call_candidates(smp.n_steps, svdd_calls(smp.n_steps, 4))
    bon = best_of_n(smp, prior(smp, 64 * n, (1,), gen(2), F64), reward, candidates=n, generator=gen(3))
    assert bon.model_calls <= a.model_calls
    assert float(a.rewards.median()) > float(bon.rewards.median())
    assert float(bon.rewards.median()) > float(reward(smp.finish(smp.run(smp.init(x), gen(4)))).median())


def test_svdd_late_branching_counts_calls_and_keeps_the_unguided_law_above_the_threshold():
    """branch_below = t*: one child per particle (no value, no reward call) above t*, M below; alpha = inf
    still gives the unguided chain's law."""
    from molgen.guidance.svdd import branch_schedule

    mu, s, m = 0.5, 0.6, 3
    smp = Sampler(gaussian(mu, s), SCHED, "ddpm_ancestral", steps=12)
    times = smp.t_grid[0]
    cut = float(times[6])
    schedule = branch_schedule(times, m, cut)
    assert schedule == [1] * 5 + [m] * 6 and branch_schedule(times, m) == [m] * 11
    n = 2000
    res = svdd_sample(smp, prior(smp, n, (1,), gen(0), F64), quadratic(2.0, 0.3), candidates=m,
                      alpha=float("inf"), generator=gen(1), branch_below=cut)
    assert res.model_calls == n * (1 + sum(schedule)) and res.reward_calls == n * m * 6
    mean, var = chain_law(smp, mu, s)
    x = res.samples[:, 0]
    assert abs(float(x.mean()) - mean) < 4.5 * math.sqrt(var / n)
    assert abs(float(x.var()) - var) < 4.5 * var * math.sqrt(2.0 / n)
    greedy = svdd_sample(smp, prior(smp, 200, (1,), gen(2), F64), quadratic(2.0, 0.3), candidates=m,
                         generator=gen(3), branch_below=cut)
    assert float(greedy.rewards.mean()) > float(quadratic(2.0, 0.3)(res.samples[:200]).mean()) + 0.5


def test_svdd_selection_law_and_checks():
    values = torch.tensor([[0.0, math.log(3.0)]], dtype=F64).repeat(20000, 1)
    picks = choose(values, 1.0, gen(0))
    assert abs(float(picks.double().mean()) - 0.75) < 0.015
    assert (choose(values, 0.0) == 1).all()
    smp = Sampler(gaussian(0, 1), SCHED, "ddpm_ancestral", steps=4)
    with pytest.raises(ValueError, match="candidates"):
        svdd_sample(smp, torch.zeros(2, 1), quadratic(), candidates=0)
    with pytest.raises(ValueError, match="alpha"):
        svdd_sample(smp, torch.zeros(2, 1), quadratic(), candidates=2, alpha=-1.0)


def test_svdd_reward_exception_costs_one_sample():
    class Picky(Reward):
        def score_one(self, sample):
            if float(sample[0]) < -1.0:
                raise RuntimeError("cannot score")
            return -float(sample[0]) ** 2

    reward = Picky(name="picky", penalty=-50.0)
    smp = Sampler(gaussian(0, 1), SCHED, "ddpm_ancestral", steps=5)
    res = svdd_sample(smp, prior(smp, 40, (1,), gen(0), F64), reward, candidates=2, alpha=1.0, generator=gen(1))
    assert reward.stats.failures > 0 and "cannot score" in reward.stats.last_error
    assert torch.isfinite(res.rewards).all()
    assert ((res.rewards == -50.0) == (res.samples[:, 0] < -1.0)).all()


# ---------------------------------------------------------------------------------------------- DPS
def test_dps_linear_reward_on_gaussian_is_exact():
    """Tilting N(mu, s^2) by exp(lambda a x) gives N(mu + lambda a s^2, s^2), and the guided ODE flow is the
    exact flow of the tilted data: x_0 = mu' + s (x_T - alpha mu') / sqrt(alpha^2 s^2 + sigma^2)."""
    mu, s, a, lam = 0.5, 0.6, 0.7, 1.0
    smp = Sampler(gaussian(mu, s), SCHED, "dpmpp_3m", steps=40)
    x = prior(smp, 16, (1,), gen(0), F64)
    res = dps_sample(smp, x, linear(a), scale=lam)
    t = torch.tensor(SCHED.t_max, dtype=F64)
    mu_t = mu + lam * a * s**2
    want = mu_t + s * (x - SCHED.alpha(t) * mu_t) / torch.sqrt(SCHED.alpha(t) ** 2 * s**2 + SCHED.sigma(t) ** 2)
    assert torch.allclose(res.samples, want, atol=2e-3)
    assert res.model_calls == 16 * smp.n_steps and res.info["bad_gradients"] == 0


# ---------------------------------------------------------------------------------------------- rewards
def test_reward_registry_and_errors():
    r = parse_reward("quadratic:c=1,tau=0.5")
    assert torch.allclose(r(torch.tensor([[1.0], [2.0]])), torch.tensor([0.0, -2.0], dtype=F64))
    assert "quadratic" in REWARDS and "linear" in REWARDS
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        parse_reward("nope:1")
    with pytest.raises(ValueError, match="bad arguments"):
        parse_reward("quadratic:width=3")
    with pytest.raises(ValueError, match="tau must be > 0"):
        parse_reward("quadratic:tau=0")
    with pytest.raises(ValueError, match="empty reward"):
        parse_reward(" ")


def test_reward_nan_policy_and_shape_checks():
    strict = TensorReward(name="strict", fn=lambda x: x[:, 0] / 0.0 * 0.0, nan="raise")
    with pytest.raises(FloatingPointError, match="sample 0"):
        strict(torch.ones(3, 1))
    wrong = TensorReward(name="wrong", fn=lambda x: x)
    with pytest.raises(ValueError, match="expected a tensor"):
        wrong(torch.ones(3, 2))
    with pytest.raises(ValueError, match="timeout needs workers"):
        TensorReward(name="t", fn=lambda x: x, timeout=1.0)

    def half_broken(x):
        if x.shape[0] > 1 or float(x[0, 0]) > 0:
            raise ValueError("boom")
        return x[:, 0]

    r = TensorReward(name="half", fn=half_broken, penalty=-7.0)
    out = r(torch.tensor([[-1.0], [2.0], [-3.0]]))
    assert out.tolist() == [-1.0, -7.0, -3.0] and r.stats.failures == 1


# ---------------------------------------------------------------------------------------------- masked discrete
class IndependentLetters:
    """Exact denoiser of L i.i.d. positions with letter probabilities pi: p(x0^i | x_t) = pi where masked."""

    def __init__(self, pi: list[float]) -> None:
        self.log_pi = torch.log(torch.tensor(pi))

    def __call__(self, x, t):
        return self.log_pi.expand(*x.shape, -1).clone()


def discrete_setup(steps: int = 6):
    from molgen.diffusion.discrete import DiscreteSampler, MaskedDiffusion

    pi = [0.2, 0.5, 0.3]
    proc = MaskedDiffusion(n_tokens=3, mask_id=3)
    return pi, proc, DiscreteSampler(IndependentLetters(pi), proc, "ancestral", steps=steps)


def test_discrete_fk_tilt_is_exact():
    """Reward lambda * #(letter 0) over i.i.d. positions tilts each position to pi_k e^{lambda [k = 0]} / Z."""
    pi, proc, smp = discrete_setup()
    lam, length, groups, k = 1.0, 6, 48, 64
    reward = TensorReward(name="zeros", fn=lambda x: (x == 0).double().sum(-1))
    x_T = torch.full((groups * k, length), proc.mask_id)
    res = fk_sample(smp, x_T, particles=k, tilt=Tilt(reward, lam=lam), generator=gen(0))
    w = torch.softmax(res.log_weights, -1)
    freq = (w * (res.particles == 0).double().mean(-1).reshape(groups, k)).sum(-1)
    want = pi[0] * math.e**lam / (pi[0] * math.e**lam + 1 - pi[0])
    assert abs(float(freq.mean()) - want) < 4.5 * float(freq.std()) / math.sqrt(groups) + 0.005
    assert res.model_calls == groups * k * (smp.n_steps - 1)  # t = 0 needs no call


def test_discrete_svdd_unguided_limit_and_calls():
    pi, proc, smp = discrete_setup()
    n, m, length = 600, 3, 8
    x_T = torch.full((n, length), proc.mask_id)
    reward = TensorReward(name="zeros", fn=lambda x: (x == 0).double().sum(-1))
    res = svdd_sample(smp, x_T, reward, candidates=m, alpha=float("inf"), generator=gen(0))
    freq = torch.stack([(res.samples == j).double().mean() for j in range(3)])
    assert torch.allclose(freq, torch.tensor(pi, dtype=F64), atol=4.5 * math.sqrt(0.25 / (n * length)))
    assert res.model_calls == n * (1 + m * (smp.n_steps - 2))  # the last children are already letters
    greedy = svdd_sample(smp, x_T[:50], reward, candidates=m, alpha=0.0, generator=gen(1))
    assert float(greedy.rewards.mean()) > float(res.rewards.mean()) + 1.0
    bon = best_of_n(smp, x_T[:60], reward, candidates=3, generator=gen(2))
    assert bon.model_calls == 60 * (smp.n_steps - 1) and bon.reward_calls == 60 and bon.samples.shape == (20, length)
    assert (bon.rewards == bon.particle_rewards.reshape(20, 3).max(-1).values).all()


# ---------------------------------------------------------------------------------------------- CLI
def guide_args(tmp_path, *extra: str):
    import argparse

    from molgen.guidance.cli import add_guide

    parser = argparse.ArgumentParser()
    add_guide(parser, "rna")
    args = parser.parse_args(["--out", str(tmp_path / "g.fasta"), "--json", str(tmp_path / "s.json"), *extra])
    args.modality = "rna"
    return args


def test_guide_cli_rna_and_bad_input(tmp_path):
    import json

    from molgen.guidance.cli import run_guide

    with pytest.raises(ValueError, match="unknown reward"):
        run_guide(guide_args(tmp_path, "--reward", "nope"))
    with pytest.raises(ValueError, match="--candidates must be >= 1"):
        run_guide(guide_args(tmp_path, "--reward", "gc", "--candidates", "0"))
    with pytest.raises(ValueError, match="unmatched"):
        run_guide(guide_args(tmp_path, "--reward", "rna_target:((.."))
    from molgen.sequences.pretrained import default_checkpoint

    if not default_checkpoint("rna").exists():
        pytest.skip("no shipped RNA checkpoint")
    args = guide_args(tmp_path, "--reward", "gc", "--method", "svdd", "--candidates", "2", "--steps", "3",
                      "--n", "3", "--length", "20")
    assert run_guide(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["model_calls"] == 3 * (1 + 2 * 2)  # 1 + M (n_steps - 2): the last children need no call
    assert summary["reward_calls"] == 3 * 2 * 3 and math.isfinite(summary["nll_bits_per_token"])
    lines = (tmp_path / "g.fasta").read_text().split()
    assert len(lines) == 6 + 3 and all(len(s) == 20 for s in lines[2::3])
    args = guide_args(tmp_path, "--reward", "gc", "--method", "svdd", "--candidates", "2", "--steps", "3",
                      "--n", "3", "--length", "20", "--value", "completions:2:2")
    assert run_guide(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    # grid points 0..3: children at point 1 complete over {1, 2, 3} (one call per copy), at point 2 over {2, 3}
    assert summary["model_calls"] == 3 * (1 + 2 * 2 + 2 * 2 * 1) and summary["value"] == "completions:2:2"


# ---------------------------------------------------------------------------------------------- SVDD-MC
def test_value_network_regresses_the_soft_value_and_guides():
    """For N(mu, s^2) data and r = -(x - c)^2 / (2 tau^2): E[r | x_t] = -((m_t - c)^2 + v_t) / (2 tau^2) with the
    Gaussian posterior mean m_t and variance v_t = s^2 sigma^2 / (alpha^2 s^2 + sigma^2)."""
    from molgen.guidance.value import VectorValueNet, as_value, fit_value, gaussian_noise

    torch.manual_seed(0)
    mu, s, c, tau = 0.5, 0.6, 1.5, 1.0
    x0 = mu + s * torch.randn(4000, 1, generator=gen(0), dtype=F64)
    reward = quadratic(c, tau)
    net = VectorValueNet(1, hidden=32)
    fit_value(net, x0, reward(x0), gaussian_noise(SCHED), steps=400, batch=128, lr=3e-3, generator=gen(1))
    t = torch.full((5,), 0.4, dtype=F64)
    xt = torch.linspace(-0.5, 1.5, 5, dtype=F64)[:, None]
    a, sig = SCHED.alpha(t[0]), SCHED.sigma(t[0])
    m_t = mu + a * s**2 / (a**2 * s**2 + sig**2) * (xt[:, 0] - a * mu)
    v_t = s**2 * sig**2 / (a**2 * s**2 + sig**2)
    want = -((m_t - c) ** 2 + v_t) / (2 * tau**2)
    got = as_value(net)(xt, t, xt)
    assert torch.allclose(got, want, atol=0.1), (got, want)
    smp = Sampler(gaussian(mu, s), SCHED, "ddpm_ancestral", steps=10)
    x_T = prior(smp, 200, (1,), gen(2), F64)
    guided = svdd_sample(smp, x_T, reward, candidates=4, value=as_value(net), generator=gen(3))
    plain = best_of_n(smp, x_T, reward, candidates=1, generator=gen(3))
    assert guided.info["value_calls"] == 200 * 4 * (smp.n_steps - 1) and guided.reward_calls == 200
    assert float(guided.rewards.mean()) > float(plain.rewards.mean()) + 0.1


# ---------------------------------------------------------------------------------------------- molgen guide
def molgen_guide(capsys, tmp_path, *argv: str, out: str = "o"):
    from molgen.cli import main

    code = main(["guide", *argv, "--out", str(tmp_path / out), "--json", str(tmp_path / "s.json")])
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["rna", "--reward", "nope"], "unknown reward 'nope'"),
    (["rna", "--reward", "rna_target:((.."], "unmatched '('"),
    (["rna", "--reward", "rna_target:(x)"], "position 2"),
    (["dna", "--reward", "jaspar:MA9999.9"], "unknown JASPAR matrix ID 'MA9999.9'"),
    (["dna", "--reward", "jaspar"], "bad arguments"),
    (["dna", "--reward", "gc", "--candidates", "0"], "--candidates must be >= 1"),
    (["dna", "--reward", "gc", "--method", "fk", "--particles", "0"], "--particles must be >= 1"),
    (["dna", "--reward", "gc", "--alpha", "nan"], "--alpha must be >= 0"),
    (["molecules", "--reward", "rna_mfe"], "reward 'rna_mfe' scores rna, not molecules"),
    (["dna", "--reward", "gc", "--method", "fk", "--value", "v.pt"], "needs --method svdd"),
    (["dna", "--reward", "gc", "--method", "bon", "--value", "completions:2"], "steers svdd or fk"),
    (["dna", "--reward", "gc", "--value", "completions:0"], "completion copies must be an integer >= 1"),
    (["dna", "--reward", "gc", "--value", "completions:2:x"], "bad value spec"),
    (["dna", "--reward", "gc", "--method", "fk", "--branch-below", "0.5"], "--branch-below is a time in [0, 1]"),
    (["dna", "--reward", "gc", "--method", "dps", "--n", "1", "--steps", "2"], "dps needs a differentiable reward"),
    (["dna", "--reward", "gc", "--length", "999"], "--length must lie in 1..200"),
    (["molecules", "--reward", "qed", "--checkpoint", "missing.pt"], "no molecules checkpoint at missing.pt"),
])
def test_molgen_guide_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    code, cap = molgen_guide(capsys, tmp_path, *argv)
    assert code == 2 and message in cap.err, cap.err
    assert not (tmp_path / "s.json").exists()


def test_molgen_guide_nan_rewards_cost_a_counted_penalty(tmp_path, capsys):
    import json

    args = ["--reward", "gc:target=nan", "--method", "bon", "--candidates", "2", "--n", "3", "--steps", "2",
            "--length", "12"]
    code, err = molgen_guide(capsys, tmp_path, "dna", *args, out="g.fasta")  # every call fails: a named stop
    assert code == 2 and "100% of the samples scored by reward 'gc' failed" in err.err
    code, _ = molgen_guide(capsys, tmp_path, "dna", *args, "--max-failed", "1", out="g.fasta")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and summary["reward_stats"]["nonfinite"] == 6 and summary["reward_stats"]["samples"] == 6
    assert summary["reward_median"] == -1.0  # gc's declared penalty, not NaN
    assert len((tmp_path / "g.fasta").read_text().split()) == 3 * 3  # the batch is kept


def test_molgen_guide_molecules_svdd_and_fk_account_model_calls(tmp_path, capsys):
    import json

    from molgen.molecules.io import read_molecules

    code, _ = molgen_guide(capsys, tmp_path, "molecules", "--reward", "qed", "--method", "svdd", "--candidates",
                           "2", "--steps", "3", "--n", "3", out="g.sdf")
    s = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and s["model_calls"] == 3 * (1 + 2 * 2) and s["reward_calls"] == 3 * 2 * 2
    assert 0.0 <= s["validity"] <= 1.0 and 0.0 <= s["atom_stability"] <= 1.0 and len(s["model_sha256"]) == 64
    assert len(read_molecules(tmp_path / "g.sdf")[0]) == 3
    code, _ = molgen_guide(capsys, tmp_path, "molecules", "--reward", "qed", "--method", "fk", "--particles", "2",
                           "--steps", "3", "--n", "2", out="f.sdf")
    s = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and s["model_calls"] == 2 * 2 * 3 and s["reward_calls"] == 2 * 2 * 3


def test_molecule_problem_chunks_pair_sizes_across_methods():
    """Outputs are drawn per seed only (same atom counts for every method), chunked by size, merged in order."""
    from molgen.guidance.tasks import get_problem, guide

    problem = get_problem("molecules", steps=3, chunk=2)
    reward = parse_reward("qed")
    plain = guide(problem, "unguided", reward, 5, seed=3)
    bon = guide(problem, "bon", reward, 5, candidates=2, seed=3)
    sizes = plain.mask.sum(1)
    assert plain.samples.shape[0] == 5 and (sizes == bon.mask.sum(1)).all() and (sizes.diff() >= 0).all()
    assert plain.model_calls == 5 * 3 and bon.model_calls == 5 * 2 * 3 and plain.model_batches == 3 * 3
    pad = ~plain.mask
    assert (plain.samples[pad] == 0).all()  # padding stays exactly zero through chunking and merging
    with pytest.raises(ValueError, match="dps needs a differentiable reward"):
        guide(problem, "dps", reward, 2)
    with pytest.raises(ValueError, match="svdd_mc needs a value network"):
        guide(problem, "svdd_mc", reward, 2)


# ---------------------------------------------------------------------------------------------- value nets
def test_point_value_net_is_invariant_and_ignores_padding():
    from molgen.guidance.value import PointValueNet
    from molgen.testing import assert_equivariant

    torch.manual_seed(0)
    net = PointValueNet(3, SCHED, sigma_data=1.5)
    x = torch.randn(4, 7, 6)
    mask = torch.arange(7)[None] < torch.tensor([7, 5, 3, 6])[:, None]
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    base = net(x, t, mask)
    assert_equivariant(lambda a, m: net(a, t, m), x, mask=mask, output="invariant", permute=True, generator=gen(0),
                       atol=1e-4, rtol=0)
    junk = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    assert torch.allclose(net(junk, t, mask), base, atol=1e-5)


def test_train_value_records_its_recipe_and_refuses_other_models(tmp_path):
    from molgen.guidance.tasks import get_problem, guide
    from molgen.guidance.train_value import load_value, main

    out = tmp_path / "v.pt"
    assert main(["dna", "--reward", "gc", "--steps", "2", "--length", "16", "--samples", "4", "--fit-steps", "3",
                 "--batch", "4", "--out", str(out)]) == 0
    problem = get_problem("dna", steps=2, length=16)
    value, card = load_value(out, problem, "gc")
    prov = card["provenance"]
    assert prov["command"].startswith("python -m molgen.guidance.train_value dna --reward gc")
    assert prov["model_calls"] == 4 * 2 and prov["samples"] == 4 and prov["model_sha256"] == problem.sha256
    res = guide(problem, "svdd_mc", parse_reward("gc"), 3, candidates=2, value=value)
    assert res.info["value_calls"] == 3 * 2 * 2 and res.reward_calls == 3  # no reward inside the loop
    with pytest.raises(ValueError, match="trained for dna / 'gc'"):
        load_value(out, problem, "gc:target=0.5")
    problem.sha256 = "0" * 64
    with pytest.raises(ValueError, match="another version"):
        load_value(out, problem, "gc")


def test_molgen_guide_backbones_dps_and_svdd(tmp_path, capsys):
    import json

    code, _ = molgen_guide(capsys, tmp_path, "backbones", "--reward", "rg", "--method", "dps", "--n", "2", "--steps",
                           "3", "--length", "40", out="dps")
    s = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and s["model_calls"] == 2 * 3 and s["backward_calls"] == 2 * 3 and s["bad_gradients"] == 0
    assert 0.0 <= s["ca_ca_valid"] <= 1.0 and len(list((tmp_path / "dps").glob("*.pdb"))) == 2
    code, _ = molgen_guide(capsys, tmp_path, "backbones", "--reward", "rg+helix", "--method", "svdd", "--candidates",
                           "2", "--n", "2", "--steps", "3", "--length", "40", out="svdd")
    s = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and s["model_calls"] == 2 * (1 + 2 * 2) and s["reward_stats"]["failures"] == 0


# ---------------------------------------------------------------------------------------------- completion values
def walk_to(engine, x_T, i, generator):
    """The engine's state at grid point i (estimate cached), reached by its own steps from x_T."""
    st = engine.init(x_T)
    for j in range(i):
        st, _ = engine.estimate(st, j)
        st = engine.step(st, j, generator)
    return engine.estimate(st, i)


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_completion_value_matches_the_samplers_closed_form(steps):
    """Data N(mu, s^2) with the exact denoiser: from x_i the completion chain is linear-Gaussian, so its output
    law is N(m, v) in closed form (the ``chain_law`` recursion started at the point mass x_i on the completion's
    grid) and E[r] = -((m - c)^2 + v) / (2 tau^2) for r = -(x - c)^2 / (2 tau^2). The Monte-Carlo estimate must
    match it; the reward of the denoised estimate misses v (a one-jump completion adds only the last point's
    noise: it is the denoised estimate refined by one call)."""
    from molgen.guidance.completions import Completions
    from molgen.guidance.core import Scorer
    from molgen.guidance.engine import as_engine, completion_points

    mu, s, c, tau, copies, i = 1.0, 0.5, 1.0, 0.5, 4000, 3
    smp = Sampler(gaussian(mu, s), SCHED, "ddpm_ancestral", steps=8)
    engine = as_engine(smp)
    st, x0 = walk_to(engine, torch.tensor([[0.3], [-1.0], [2.0]], dtype=F64), i, gen(0))
    rows = engine.rows
    scorer = Scorer.of(quadratic(c, tau))
    got = Completions(copies, steps).estimate(engine, st, i, scorer, gen(1))
    idx = completion_points(i, smp.n_steps, steps)
    assert engine.rows - rows == 3 * copies * (len(idx) - 1) and scorer.calls == 3 * copies
    sub = Sampler(gaussian(mu, s), SCHED, "ddpm_ancestral", grid=smp.t_grid[0, idx])
    tab = sub.tables
    alpha, sigma = tab["alpha"][0], tab["sigma"][0]
    gain = alpha * s**2 / (alpha**2 * s**2 + sigma**2)
    m, v = st.x[:, 0].clone(), torch.zeros(3, dtype=F64)
    for j in range(sub.n_steps - 1):
        a, w, cc = tab["a"][0, j], tab["w"][0, j, 0], tab["c"][0, j]
        m = a * m + w * (mu + gain[j] * (m - alpha[j] * mu))
        v = (a + w * gain[j]) ** 2 * v + cc**2
    j = sub.n_steps - 1
    m, v = mu + gain[j] * (m - alpha[j] * mu), gain[j] ** 2 * v
    want = -((m - c) ** 2 + v) / (2 * tau**2)
    se = torch.sqrt(2 * v**2 + 4 * v * (m - c) ** 2) / (2 * tau**2) / math.sqrt(copies)
    assert ((got - want).abs() <= 4.5 * se).all(), (got, want, se)
    if steps > 1:  # the denoised estimate's reward is a different (biased) value
        assert ((scorer(x0) - want).abs() > 10 * se).all()


def test_completion_value_of_masked_diffusion_is_exact_and_counts_calls():
    """I.i.d. letters with probabilities pi: E[#zeros(x_0) | x_t] = #zeros unmasked + #masked * pi_0, whatever
    the completion's steps; steps = 1 draws from the cached p(x0 | x_t) without a model call."""
    from molgen.guidance.completions import Completions, reduce
    from molgen.guidance.core import Scorer
    from molgen.guidance.engine import as_engine, completion_points

    pi, proc, smp = discrete_setup(steps=8)
    engine = as_engine(smp)
    st, _ = walk_to(engine, torch.full((4, 10), proc.mask_id), 3, gen(0))
    zeros = TensorReward(name="zeros", fn=lambda x: (x == 0).double().sum(-1))
    want = (st.x == 0).double().sum(-1) + (st.x == proc.mask_id).double().sum(-1) * pi[0]
    assert (st.x == proc.mask_id).any(-1).all()
    copies = 3000
    for steps in (1, 3):
        rows, scorer = engine.rows, Scorer.of(zeros)
        got = Completions(copies, steps).estimate(engine, st, 3, scorer, gen(steps))
        n_masked = (st.x == proc.mask_id).double().sum(-1)
        se = torch.sqrt(n_masked * pi[0] * (1 - pi[0]) / copies)
        assert ((got - want).abs() <= 4.5 * se).all(), (steps, got, want)
        assert engine.rows - rows == 4 * copies * (len(completion_points(3, smp.n_steps, steps)) - 2)
    r = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64)
    assert torch.allclose(reduce(r, 0.0), torch.tensor([1.0], dtype=F64))
    assert torch.allclose(reduce(r, 0.5), 0.5 * torch.log(torch.exp(r / 0.5).mean(-1)))
    assert float(reduce(r, 1e-3)) == pytest.approx(2.0 - 1e-3 * math.log(3), abs=1e-9)  # alpha -> 0: the max


def test_completion_guided_svdd_and_fk_count_every_call_and_are_deterministic():
    from molgen.guidance.completions import Completions, parse_value
    from molgen.guidance.engine import completion_points

    smp = Sampler(gaussian(0.0, 1.0), SCHED, "ddpm_ancestral", steps=8)
    n, m, k, steps = 20, 3, 2, 2
    x_T = prior(smp, n, (1,), gen(0), F64)
    reward = quadratic(c=1.5, tau=0.5)
    value = Completions(k, steps)
    per_copy = [len(completion_points(p, smp.n_steps, steps)) - 1 for p in range(1, smp.n_steps - 1)]
    a = svdd_sample(smp, x_T, reward, candidates=m, value=value, generator=gen(1))
    b = svdd_sample(smp, x_T, reward, candidates=m, value=value, generator=gen(1))
    assert a.model_calls == n * (1 + m * (smp.n_steps - 1) + m * k * sum(per_copy))
    assert a.reward_calls == n * m * (k * (smp.n_steps - 2) + 1)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.rewards, reward(a.samples))
    assert not torch.equal(a.samples, svdd_sample(smp, x_T, reward, candidates=m, value=value,
                                                  generator=gen(2)).samples)
    plain = best_of_n(smp, x_T, reward, candidates=1, generator=gen(1))
    assert float(a.rewards.mean()) > float(plain.rewards.mean()) + 0.3
    particles = 4
    fk = fk_sample(smp, prior(smp, n * particles, (1,), gen(3), F64), particles=particles,
                   tilt=Tilt(reward, lam=1.0, value=value), generator=gen(4), final="best")
    first = [len(completion_points(p, smp.n_steps, steps)) - 1 for p in range(smp.n_steps - 1)]
    assert fk.model_calls == n * particles * (smp.n_steps + k * sum(first))
    pi, proc, dsmp = discrete_setup(steps=6)
    zeros = TensorReward(name="zeros", fn=lambda x: (x == 0).double().sum(-1))
    d = svdd_sample(dsmp, torch.full((10, 6), proc.mask_id), zeros, candidates=2, value=parse_value("completions:2:2"),
                    generator=gen(5))
    per_copy = [len(completion_points(p, dsmp.n_steps, 2)) - 2 for p in range(1, dsmp.n_steps - 1)]
    assert d.model_calls == 10 * (1 + 2 * (dsmp.n_steps - 2) + 2 * 2 * sum(per_copy))
    assert parse_value("completions:4") == Completions(4, 1, 0.0)
    assert parse_value("completions:4:3:0.5") == Completions(4, 3, 0.5) == parse_value(Completions(4, 3, 0.5).spec)
    assert a.info["value"] == "completions:2:2:0" and fk.info["value"] == "completions:2:2:0"
    for bad, message in [("completions", "expected completions:K"), ("completions:x", "integers"),
                         ("completions:0", "copies must be an integer >= 1"), ("completions:2:1:-1", "alpha"),
                         ("rollouts:2", "expected completions:K")]:
        with pytest.raises(ValueError, match=message):
            parse_value(bad)
