"""Masked discrete diffusion: marginals, exact ELBO, samplers against known distributions, carry-over."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from molgen.diffusion.discrete import (
    DISCRETE_SAMPLERS,
    DiscreteSampler,
    MaskedDiffusion,
    MaskingSchedule,
    first_hitting_time,
    gumbel_argmax,
    sample_discrete,
)

K, MASK, PAD = 3, 4, 3  # letters 0..2, pad 3, mask 4


def process(kind: str = "loglinear") -> MaskedDiffusion:
    return MaskedDiffusion(K, MASK, PAD, MaskingSchedule(kind))


class Factorised(torch.nn.Module):
    """Denoiser whose x0 prediction ignores x_t: position i has fixed logits ``logits[i]``."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x_t, t):
        return self.logits[: x_t.shape[1]].expand(len(x_t), -1, -1)


class ExactPosterior(torch.nn.Module):
    """True conditional ``p(x0^i | visible tokens of x_t)`` of a joint over K^L sequences (by enumeration)."""

    def __init__(self, joint: dict[tuple[int, ...], float]):
        super().__init__()
        self.joint = joint

    def forward(self, x_t, t):
        B, L = x_t.shape
        out = torch.zeros(B, L, K, dtype=torch.float64)
        for b in range(B):
            row = x_t[b].tolist()
            for seq, p in self.joint.items():
                if all(r == MASK or r == s for r, s in zip(row, seq)):
                    for i in range(L):
                        out[b, i, seq[i]] += p
        return torch.log(out.clamp(min=1e-300)).float()


def random_joint(L: int, seed: int) -> dict[tuple[int, ...], float]:
    rng = np.random.default_rng(seed)
    w = rng.gamma(0.7, size=K**L)
    w /= w.sum()
    return dict(zip(itertools.product(range(K), repeat=L), w.tolist()))


@pytest.mark.parametrize("kind", ["loglinear", "cosine"])
def test_masking_marginals(kind):
    proc = process(kind)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (20000, 6), generator=gen)
    x0[:, -2:] = PAD
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((len(x0),), tv)
        xt = proc.corrupt(x0, t, gen)
        frac = (xt[:, :4] == MASK).double().mean().item()
        expect = 1.0 - proc.schedule.alpha(torch.tensor(tv, dtype=torch.float64)).item()
        assert abs(frac - expect) < 4 * math.sqrt(expect * (1 - expect) / xt[:, :4].numel()) + 1e-9
        assert (xt[:, -2:] == PAD).all()  # padding never masked
        keep = xt != MASK
        assert torch.equal(xt[keep], x0[keep])  # unmasked tokens are the data
    assert (proc.corrupt(x0, torch.ones(len(x0)), gen)[:, :4] == MASK).all()


@pytest.mark.parametrize("kind", ["loglinear", "cosine"])
def test_schedule_inverse_and_weight(kind):
    s = MaskingSchedule(kind)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert torch.allclose(s.t_of_alpha(s.alpha(t)), t, atol=1e-10)
    h = 1e-6
    assert torch.allclose(s.dalpha(t), (s.alpha(t + h) - s.alpha(t - h)) / (2 * h), atol=1e-6)


def exact_nelbo(proc: MaskedDiffusion, model, x0: torch.Tensor, n_quad: int = 64) -> float:
    """NELBO of one sequence: Gauss-Legendre over t, exact expectation over all 2^L mask patterns."""
    L = x0.shape[1]
    nodes, weights = np.polynomial.legendre.leggauss(n_quad)
    total = 0.0
    for u, w in zip(nodes, weights):
        t = torch.tensor(0.5 * (u + 1.0), dtype=torch.float64)
        a = proc.schedule.alpha(t).item()
        for pattern in itertools.product([False, True], repeat=L):
            m = torch.tensor(pattern)
            if not m.any():
                continue
            prob = a ** int((~m).sum()) * (1 - a) ** int(m.sum())
            xt = torch.where(m, torch.full_like(x0[0], MASK), x0[0])[None]
            logp = proc.log_probs(model(xt, t.float()[None]), xt)[0]
            nll = -logp[m, x0[0, m]].double().sum().item()
            total += 0.5 * w * prob * proc.schedule.weight(t).item() * nll
    return total


@pytest.mark.parametrize("kind", ["loglinear", "cosine"])
def test_elbo_is_exact_for_the_true_posterior(kind):
    """With the true conditionals, the continuous-time NELBO equals -log p(x0) (any-order identity)."""
    proc = process(kind)
    joint = random_joint(3, seed=1)
    model = ExactPosterior(joint)
    for seq in [(0, 1, 2), (2, 2, 0)]:
        x0 = torch.tensor([seq])
        assert exact_nelbo(proc, model, x0) == pytest.approx(-math.log(joint[seq]), rel=1e-5)
    # a wrong model (uniform) gives a strictly larger bound: 3 log 3
    uniform = Factorised(torch.zeros(3, K))
    assert exact_nelbo(proc, uniform, torch.tensor([[0, 1, 2]])) == pytest.approx(3 * math.log(3), rel=1e-5)


def test_monte_carlo_nelbo_is_unbiased():
    proc = process()
    joint = random_joint(2, seed=2)
    model = ExactPosterior(joint)
    seq = max(joint, key=joint.get)
    x0 = torch.tensor([seq] * 400)
    gen = torch.Generator().manual_seed(3)
    est = proc.nelbo(model, x0, n_t=8, generator=gen)
    se = est.std().item() / math.sqrt(len(est))
    assert abs(est.mean().item() + math.log(joint[seq])) < 4 * se + 1e-3


def test_subs_carry_over():
    proc = process()
    xt = torch.tensor([[0, MASK, 2, PAD]])
    logp = proc.log_probs(torch.randn(1, 4, K), xt)
    assert torch.equal(logp[0, 0].exp(), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(logp[0, 2].exp(), torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(logp[0, 1].exp().sum(), torch.tensor(1.0))


def test_gumbel_argmax_frequencies():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    draws = gumbel_argmax(p.log().expand(200000, 3), gen)
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    assert torch.allclose(freq, p, atol=4e-3)


@pytest.mark.parametrize("solver", sorted(DISCRETE_SAMPLERS))
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_samplers_reproduce_factorised_distribution(solver, steps):
    """A denoiser whose x0 prediction is a fixed product distribution must be reproduced exactly."""
    gen = torch.Generator().manual_seed(steps)
    probs = torch.distributions.Dirichlet(torch.ones(K)).sample((4,))
    model = Factorised(probs.log())
    n = 6000
    x_T = process().prior(torch.full((n,), 4))
    opts = {"eta": 0.5, "strategy": "rescale"} if solver == "remdm" else None
    x = sample_discrete(model, process(), x_T, solver, steps, gen, options=opts)
    freq = torch.stack([torch.bincount(x[:, i], minlength=K) for i in range(4)]).double() / n
    assert (freq - probs.double()).abs().max() < 4.5 * math.sqrt(0.25 / n)


def test_one_step_ancestral_is_product_of_marginals_and_first_hitting_is_exact():
    """Correlated joint over 2 tokens: 1 ancestral step gives p(x1) p(x2); L first-hitting steps: exact."""
    joint = {(0, 0): 0.45, (1, 1): 0.45, (0, 1): 0.05, (1, 0): 0.05}
    model = ExactPosterior({k: v for k, v in joint.items()})
    n = 3000
    x_T = process().prior(torch.full((n,), 2))
    one = sample_discrete(model, process(), x_T, "ancestral", 1, torch.Generator().manual_seed(0))
    fh = sample_discrete(model, process(), x_T, "first_hitting", 2, torch.Generator().manual_seed(1))
    same_one = (one[:, 0] == one[:, 1]).double().mean().item()
    same_fh = (fh[:, 0] == fh[:, 1]).double().mean().item()
    assert abs(same_one - 0.5) < 0.04  # independent marginals (0.5, 0.5)
    assert abs(same_fh - 0.9) < 0.02  # the joint's agreement probability


@pytest.mark.parametrize("solver", ["ancestral", "tau_leaping", "first_hitting", "cached_ancestral"])
def test_unmasked_tokens_never_change(solver):
    gen = torch.Generator().manual_seed(0)
    model = Factorised(torch.randn(8, K))
    lengths = torch.tensor([8, 5, 3, 8])
    sampler = DiscreteSampler(model, process(), solver, steps=6)
    st = sampler.init(process().prior(lengths, 8))
    prev = st.x
    for i in range(sampler.n_steps - 1):
        st = sampler.step(st, i, gen)
        was = prev != MASK
        assert torch.equal(st.x[was], prev[was])
        prev = st.x
    x = sampler.finish(st)
    assert ((x == PAD) == (torch.arange(8)[None] >= lengths[:, None])).all()


def test_remdm_remasks_and_still_finishes():
    gen = torch.Generator().manual_seed(0)
    model = Factorised(torch.randn(16, K))
    sampler = DiscreteSampler(
        model, process(), "remdm", steps=16, options={"eta": 0.5, "strategy": "rescale"}
    )
    st = sampler.init(process().prior(torch.full((64,), 16)))
    remasked = 0
    for i in range(sampler.n_steps - 1):
        new = sampler.step(st, i, gen)
        remasked += int(((st.x < K) & (new.x == MASK)).sum())
        st = new
    assert remasked > 0
    assert (sampler.finish(st) < K).all()


@pytest.mark.parametrize("solver", sorted(DISCRETE_SAMPLERS))
def test_determinism(solver):
    model = Factorised(torch.randn(10, K))
    x_T = process().prior(torch.tensor([10, 7, 9]), 10)
    a = sample_discrete(model, process(), x_T, solver, 5, torch.Generator().manual_seed(7))
    b = sample_discrete(model, process(), x_T, solver, 5, torch.Generator().manual_seed(7))
    c = sample_discrete(model, process(), x_T, solver, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


class Counting(torch.nn.Module):
    """Time-agnostic denoiser that depends on x_t (so caching matters) and counts rows it sees."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, K)
        self.rows = 0

    def forward(self, x_t, t):
        self.rows += len(x_t)
        return self.emb(x_t) + self.emb(x_t).mean(1, keepdim=True)


def test_cached_ancestral_equals_ancestral_with_fewer_rows():
    torch.manual_seed(0)
    model = Counting()
    x_T = process().prior(torch.full((32,), 6))
    st_a = DiscreteSampler(model, process(), "ancestral", 64).run(x_T, None, torch.Generator().manual_seed(1))
    st_c = DiscreteSampler(model, process(), "cached_ancestral", 64).run(
        x_T, None, torch.Generator().manual_seed(1)
    )
    assert torch.equal(st_a.x, st_c.x)
    assert st_a.rows_evaluated == 64 * 32
    assert st_c.rows_evaluated < st_a.rows_evaluated / 3


def test_first_hitting_time_law():
    """n = 1 masked token at t = 1 under log-linear masking: its unmasking time is U(0, 1)."""
    s = first_hitting_time(
        MaskingSchedule(),
        torch.ones(20000),
        torch.full((20000,), 2),
        torch.ones(20000, dtype=torch.long),
        torch.Generator().manual_seed(0),
    )
    # the first of 2 uniform times below 1 is the max of 2 uniforms: mean 2/3
    assert abs(s.double().mean().item() - 2 / 3) < 0.01


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown discrete sampler"):
        DiscreteSampler(Factorised(torch.zeros(2, K)), process(), "nope")
    with pytest.raises(ValueError, match="unknown masking schedule"):
        MaskingSchedule("linear")
    with pytest.raises(ValueError, match="lengths must lie"):
        process().prior(torch.tensor([0, 3]))


def test_the_step_protocol_caches_the_estimate_for_the_step():
    """init / estimate / step / select / finish (the continuous Sampler's protocol): a step after an estimate
    makes no model call, the last estimate (t = 0) none either, and the run equals the plain one."""
    from molgen.diffusion import Sampler, get_schedule
    from molgen.diffusion.plan import StepSampler

    model = Counting()
    sampler = DiscreteSampler(model, process(), "ancestral", 5)
    assert isinstance(sampler, StepSampler)
    assert isinstance(Sampler(lambda x, t: x, get_schedule("vp_cosine"), "ddim", steps=3, prediction="x0"), StepSampler)
    x_T = process().prior(torch.tensor([6, 4, 5]), 6)
    plain = sampler.run(x_T, None, torch.Generator().manual_seed(1)).x
    gen = torch.Generator().manual_seed(1)
    st = sampler.init(x_T)
    for i in range(sampler.n_steps - 1):
        rows = model.rows
        st, x0 = sampler.estimate(st, i)
        assert ((x0 < K) == (st.x != PAD)).all() and torch.equal(x0[st.x < K], st.x[st.x < K])
        st = sampler.step(st, i, gen)
        assert model.rows - rows == 3
    rows = model.rows
    st, x0 = sampler.estimate(st, sampler.n_steps - 1)
    assert model.rows == rows and torch.equal(x0, st.x) and torch.equal(sampler.finish(st), plain)
    picked = sampler.select(st, torch.tensor([2, 0]))
    assert torch.equal(picked.x, st.x[[2, 0]]) and torch.equal(picked.t, st.t[[2, 0]])


def test_guidance_uses_the_cache_of_cached_ancestral():
    """A time-agnostic model: guided cached_ancestral equals guided ancestral with fewer model rows."""
    from molgen.guidance.fk import Tilt, fk_sample
    from molgen.guidance.rewards import TensorReward

    torch.manual_seed(0)
    model = Counting()
    reward = TensorReward(name="zeros", fn=lambda x: (x == 0).double().sum(-1))
    x_T = process().prior(torch.full((24,), 6))
    runs = [fk_sample(DiscreteSampler(model, process(), solver, 6), x_T, particles=4, tilt=Tilt(reward),
                      generator=torch.Generator().manual_seed(2)) for solver in ("ancestral", "cached_ancestral")]
    assert torch.equal(runs[0].samples, runs[1].samples) and torch.equal(runs[0].log_weights, runs[1].log_weights)
    assert runs[1].model_calls < runs[0].model_calls
