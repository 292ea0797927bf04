"""Reward fine-tuning (``molgen.finetune``): an adapter at init is exact, the objective's limits, NaN scores,
roll-back bit for bit, checkpoints with cards, that fine-tuning raises the likelihood of the rewarded designs;
GRPO's advantages, clipped ratio and per-step likelihoods, failing rewards, and that it raises the reward;
continuous models: the weighted denoising loss's minimiser and the KL bound; MixGRPO's DDIM steps (marginals
kept for any eta), its window, its ratio on the rollout's own policy, and that it raises the reward."""

from __future__ import annotations

import math

import pytest
import torch

from molgen.finetune import (
    CALLS_PER_ROW,
    FinetuneSettings,
    GRPOSettings,
    adapter_state,
    clipped_surrogate,
    design_weights,
    finetune,
    group_advantages,
    grpo,
    load_adapter,
    objective,
    restore,
    rollout,
    safe_rewards,
    save_adapter,
    unmasked_logp,
    with_adapter,
)
from molgen.sequences.model import DenoiserConfig, SequenceDenoiser
from molgen.sequences.training import build_process, sequence_bits

PROCESS = build_process(4, 4, 5)  # RNA's alphabet: 4 letters, pad 4, mask 5


def tiny_model(seed: int = 0) -> SequenceDenoiser:
    torch.manual_seed(seed)
    cfg = DenoiserConfig(n_tokens=4, vocab_size=6, pad_id=4, max_length=16, d_model=16, n_layers=1, n_heads=2,
                         d_ff=32, conv_dilations=(1, 2))
    return SequenceDenoiser(cfg).eval().requires_grad_(False)


def tokens(n: int, length: int = 10, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, 4, (n, length), generator=torch.Generator().manual_seed(seed))
    x[0, 7:] = 4  # one shorter design, padded
    return x


def test_adapter_at_init_leaves_outputs_unchanged_exactly():
    base = tiny_model()
    model = with_adapter(base, rank=4, seed=1)
    x_t = PROCESS.corrupt(tokens(8), torch.full((8,), 0.6), torch.Generator().manual_seed(2))
    t = torch.full((8,), 0.6)
    with torch.no_grad():  # as sampling runs (with grad on, the base's frozen transformer takes the fused path)
        assert torch.equal(model(x_t, t), base(x_t, t))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in trainable)
    assert not any(p.requires_grad for p in base.parameters())  # the base (the KL reference) is not touched


def test_zero_beta_and_kl_weight_give_the_plain_nelbo():
    base = tiny_model()
    x0 = tokens(8)
    w = design_weights(torch.arange(8.0), beta=0.0)
    assert torch.allclose(w, torch.full((8,), 1 / 8, dtype=w.dtype))
    t = PROCESS.sample_t(8, torch.Generator().manual_seed(3))
    model = with_adapter(base, rank=2)
    loss, nelbo, kl = objective(model, base, PROCESS, x0, w, t, torch.Generator().manual_seed(4), kl_weight=0.0)
    plain = PROCESS.loss(base, x0, t, torch.Generator().manual_seed(4)) / PROCESS.is_data(x0).sum(-1)
    assert torch.allclose(loss, plain.mean(), rtol=1e-6) and torch.equal(loss, nelbo)
    assert abs(float(kl.detach())) < 1e-6  # the adapter at init is the reference (up to the fused path's rounding)
    # beta > 0: softmax of the standardised scores
    s = torch.tensor([0.0, 1.0, 2.0])
    z = (s - 1.0) / math.sqrt(2 / 3)
    assert torch.allclose(design_weights(s, 2.0), torch.softmax(2.0 * z.double(), 0))


def test_nan_scores_are_a_penalty_and_the_gradient_stays_finite():
    s = torch.tensor([1.0, float("nan"), 0.5, float("inf"), 2.0])
    w = design_weights(s, beta=2.0)
    assert torch.isfinite(w).all() and math.isclose(float(w.sum()), 1.0)
    assert w[1] == w[3] == w[2]  # both count as the worst finite score
    assert torch.allclose(design_weights(torch.full((3,), float("nan")), 5.0), torch.full((3,), 1 / 3).double())
    assert float(design_weights(s, 2.0, penalty=-10.0)[1]) < float(w[1])
    base = tiny_model()
    model = with_adapter(base, rank=2)
    x0 = tokens(5)
    loss, _, _ = objective(model, base, PROCESS, x0, w, PROCESS.sample_t(5), None, kl_weight=0.1)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    tuned, report = finetune(base, PROCESS, x0, s, FinetuneSettings(steps=3, batch=4))
    assert report.steps == 3 and not report.rolled_back
    assert all(torch.isfinite(p).all() for p in tuned.parameters())


def test_a_diverging_step_is_rolled_back_bit_for_bit():
    base = tiny_model()
    model = with_adapter(base, rank=2, seed=5)
    before = adapter_state(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    restore(model, before)
    assert all(torch.equal(v, adapter_state(model)[k]) for k, v in before.items())
    # every step pushes the KL above a tiny bound: all are rolled back, the adapter stays at its init
    x0, s = tokens(6), torch.arange(6.0)
    settings = FinetuneSettings(steps=4, lr=0.5, kl_bound=1e-9, rank=2, batch=6, seed=5)
    tuned, report = finetune(base, PROCESS, x0, s, settings)
    assert report.steps == 0 and [i for i, _ in report.rolled_back] == [0, 1, 2, 3]
    assert all("above bound" in why for _, why in report.rolled_back)
    init = adapter_state(with_adapter(base, rank=2, seed=5))
    assert all(torch.equal(v, dict(tuned.named_parameters())[k]) for k, v in init.items())


def test_finetuning_raises_the_likelihood_of_the_rewarded_designs():
    base = tiny_model()
    good, bad = tokens(8, seed=1), tokens(8, seed=2)
    x0 = torch.cat([good, bad])
    scores = torch.cat([torch.ones(8), torch.zeros(8)])
    tuned, report = finetune(base, PROCESS, x0, scores,
                             FinetuneSettings(steps=40, lr=1e-2, beta=3.0, kl_weight=0.0, kl_bound=10.0, batch=16))
    assert report.steps == 40 and report.kl > 0 and report.data_size == 16 and report.model_calls == 40 * 16 * 6
    gain = sequence_bits(base, PROCESS, x0, n_t=16) - sequence_bits(tuned, PROCESS, x0, n_t=16)  # bits saved
    assert float(gain[:8].mean()) > float(gain[8:].mean()) + 0.05


def test_adapter_checkpoint_round_trips_with_its_card(tmp_path):
    base = tiny_model()
    x0 = tokens(6)
    settings = FinetuneSettings(steps=3, batch=6, rank=3)
    tuned, report = finetune(base, PROCESS, x0, torch.arange(6.0), settings)
    path = save_adapter(tmp_path / "ft.pt", tuned, report, base_sha256="ab" * 32, settings=settings, reward="r")
    loaded, card = load_adapter(path, base, base_sha256="ab" * 32)
    x_t = PROCESS.corrupt(x0, torch.full((6,), 0.5))
    t = torch.full((6,), 0.5)
    assert torch.equal(loaded(x_t, t), tuned(x_t, t))
    prov = card["provenance"]
    assert prov["base_sha256"] == "ab" * 32 and prov["reward"] == "r" and prov["steps"] == 3
    assert prov["data_size"] == 6 and math.isfinite(prov["kl"]) and card["config"]["adapter"]["rank"] == 3
    with pytest.raises(ValueError, match="fine-tuned from base weights"):
        load_adapter(path, base, base_sha256="cd" * 32)
    # a later fine-tuning starts from this adapter: with no step it is this adapter exactly
    again, _ = finetune(base, PROCESS, x0, torch.arange(6.0), FinetuneSettings(steps=0, rank=3, seed=9), start=loaded)
    assert torch.equal(again(x_t, t), tuned(x_t, t))


# ------------------------------------------------------------------------------------------------ GRPO
def test_group_advantages_and_failing_rewards():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 3)
    assert torch.allclose(a[:3], torch.tensor([-1.0, 0.0, 1.0]).double() / math.sqrt(2 / 3))
    assert torch.equal(a[3:], torch.zeros(3, dtype=a.dtype))  # a group of equal rewards teaches nothing

    def raises(samples):
        raise RuntimeError("folding failed")

    assert torch.equal(safe_rewards(raises, ["A", "C"], -1.0), torch.full((2,), -1.0, dtype=torch.float64))
    assert safe_rewards(lambda s: [1.0, float("nan")], ["A", "C"], -2.0).tolist() == [1.0, -2.0]


def test_clipped_surrogate_is_the_policy_gradient_at_ratio_one_and_flat_beyond_the_clip():
    adv = torch.tensor([1.0, -1.0, 2.0])
    old = torch.tensor([-1.0, -2.0, -0.5])
    logp = old.clone().requires_grad_(True)
    loss = clipped_surrogate(logp, old, adv, 0.2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-float(adv.mean()))
    assert torch.allclose(logp.grad, -adv / 3)  # d/dlogp of -mean(rho A) at rho = 1
    far = (old + torch.tensor([1.0, -1.0, 1.0])).requires_grad_(True)  # rho past the clip on the side A favours
    clipped_surrogate(far, old, adv, 0.2).backward()
    assert torch.equal(far.grad, torch.zeros(3))


def test_rollout_records_the_unmasked_tokens_likelihood():
    base = tiny_model()
    x_T = PROCESS.prior(torch.tensor([10, 10, 7]), 10)
    ro = rollout(base, PROCESS, x_T, 5, torch.Generator().manual_seed(0))
    assert ro.states.shape == (6, 3, 10) and ro.old_logp.shape == (5, 3)
    assert not (ro.states[-1] == PROCESS.mask_id).any() and (ro.states[-1][2, 7:] == PROCESS.pad_id).all()
    k = 2
    x_t, x_s = ro.states[k], ro.states[k + 1]
    with torch.no_grad():
        logp0 = torch.log_softmax(base(x_t, ro.times[k].expand(3)), -1)
    new = (x_t == PROCESS.mask_id) & (x_s != PROCESS.mask_id)
    by_hand = torch.stack([logp0[i, new[i]].gather(-1, x_s[i, new[i]][:, None]).sum() for i in range(3)])
    assert torch.allclose(ro.old_logp[k], by_hand, atol=1e-5)
    assert torch.allclose(unmasked_logp(logp0, x_t, x_s, PROCESS.mask_id), by_hand, atol=1e-5)
    # the whole path's policy log-likelihood covers each data token exactly once
    assert int(sum(((ro.states[k] == PROCESS.mask_id) & (ro.states[k + 1] != PROCESS.mask_id)).sum()
                   for k in range(5))) == 27


def test_grpo_raises_the_reward_and_survives_a_failing_reward():
    base = tiny_model()
    prior = lambda n, g: PROCESS.prior(torch.full((n,), 8))  # noqa: E731
    decode = lambda x: x.tolist()  # noqa: E731
    calls = []

    def share_of_letter_0(samples):  # NaN for one sample in the first batch, raises in the second
        calls.append(len(samples))
        if len(calls) == 2:
            raise RuntimeError("reward crashed")
        r = torch.tensor([sum(v == 0 for v in row) / len(row) for row in samples], dtype=torch.float64)
        if len(calls) == 1:
            r[0] = float("nan")
        return r

    settings = GRPOSettings(iterations=8, groups=2, group_size=8, epochs=2, steps=4, lr=3e-2, kl_weight=0.0,
                            kl_bound=10.0, rank=4)
    tuned, report = grpo(base, PROCESS, prior, share_of_letter_0, decode, settings, penalty=0.0)
    assert len(report.reward_means) == 8 and report.steps + len(report.rolled_back) == 16
    assert all(torch.isfinite(p).all() for p in tuned.parameters())
    assert report.model_calls == 8 * 16 * 4 * (1 + 2 * 6) and report.data_size == 128
    assert sum(report.reward_means[-2:]) / 2 > sum(report.reward_means[2:4]) / 2 + 0.1


class _AffineX0(torch.nn.Module):
    """x0_hat = W [x_t, t, 1]: with W = 0 it predicts the origin; a rank-2 adapter can make it any constant."""

    prediction = "x0"

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2, bias=False)
        torch.nn.init.zeros_(self.lin.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([x, t[:, None].to(x.dtype), torch.ones_like(x[:, :1])], -1))


def test_continuous_finetuning_moves_the_denoiser_to_the_rewarded_design():
    from molgen.diffusion.sampling import Sampler
    from molgen.finetune import finetune_continuous, finetune_on

    base = _AffineX0()
    sampler = Sampler(base, "vp_cosine", "ddim", steps=4)
    designs = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.5, -0.5]])
    scores = torch.tensor([3.0, 0.0, float("nan")])  # the NaN design counts as the penalty
    settings = FinetuneSettings(steps=300, lr=0.05, beta=50.0, kl_weight=0.0, kl_bound=1e6, rank=2, batch=16)
    model, report = finetune_on(sampler, designs, None, scores, settings, penalty=-1.0)
    assert report.steps == 300 and not report.rolled_back and report.model_calls == 300 * 16 * CALLS_PER_ROW
    x_t, t = torch.randn(64, 2), torch.rand(64)
    # the weighted denoising loss is minimised by predicting the (all but only) rewarded design everywhere
    assert torch.allclose(model(x_t, t), designs[0].expand(64, 2), atol=0.05)
    assert torch.equal(base(x_t, t), torch.zeros(64, 2))  # the base is the frozen reference
    # the KL to the base: 0.5 |x0_theta - x0_ref|^2 / var(designs) per coordinate, here large
    assert report.kl == pytest.approx(0.5 * float((designs[0] ** 2).mean()) / float(designs.var()), rel=0.1)
    # a bound below any move rolls every step back and leaves the model exactly the base
    held, report = finetune_continuous(base, sampler, designs, None, scores, FinetuneSettings(
        steps=5, lr=0.05, kl_bound=1e-12, rank=2, batch=4))
    assert report.steps == 0 and len(report.rolled_back) == 5 and "above bound" in report.rolled_back[0][1]
    assert torch.equal(held(x_t, t), base(x_t, t))


# --------------------------------------------------------------------------------------------- MixGRPO
class _MixtureWithHead(torch.nn.Module):
    """The exact x0 predictor of a two-mode mixture at (+-2, 0) plus a zero-initialised linear head on
    [x_t, t, 1], which an adapter can train."""

    prediction = "x0"

    def __init__(self, stds: float = 0.3) -> None:
        super().__init__()
        from molgen.diffusion.analytic import GaussianMixtureDenoiser
        from molgen.diffusion.schedules import get_schedule

        means = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
        self.exact = GaussianMixtureDenoiser(means, stds, None, get_schedule("vp_cosine"))
        self.head = torch.nn.Linear(4, 2, bias=False)
        torch.nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.exact(x, t) + self.head(torch.cat([x, t[:, None].to(x.dtype), torch.ones_like(x[:, :1])], -1))


def _sampler(model: torch.nn.Module, steps: int = 6):
    from molgen.diffusion.sampling import Sampler

    return Sampler(model, "vp_cosine", "ddim", steps=steps, grid="time_uniform")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_transition_keeps_the_marginals_of_point_data(eta):
    """For data at one point m the exact x0 is m, and a DDIM step of any eta maps N(alpha_t m, sigma_t^2) to
    N(alpha_s m, sigma_s^2): the noise scale c and the kept share sqrt(sigma_s^2 - c^2) of eps are right."""
    from molgen.diffusion.analytic import GaussianMixtureDenoiser
    from molgen.diffusion.schedules import get_schedule
    from molgen.finetune import ddim_transition

    schedule = get_schedule("vp_cosine")
    m = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    model = GaussianMixtureDenoiser(m, 1e-9, None, schedule)
    sampler = _sampler(model)
    t, s = 0.7, 0.3
    a_t, s_t, a_s, s_s = (float(f(torch.tensor(v, dtype=torch.float64))) for v in (t, s)
                          for f in (schedule.alpha, schedule.sigma))
    g = torch.Generator().manual_seed(0)
    x_t = a_t * m + s_t * torch.randn(40_000, 2, generator=g, dtype=torch.float64)
    mean, c = ddim_transition(model, sampler, x_t, None, {}, t, s, eta)
    x_s = mean + c * torch.randn(x_t.shape, generator=g, dtype=torch.float64)
    assert c == pytest.approx(eta * s_s * math.sqrt(1 - (a_t * s_s / (a_s * s_t)) ** 2))
    assert torch.allclose(x_s.mean(0), a_s * m[0], atol=4 * s_s / 200)
    assert torch.allclose(x_s.var(0), torch.full((2,), s_s**2, dtype=torch.float64), rtol=0.03)


def test_a_rollout_without_a_window_is_the_engines_ode_and_its_ratio_starts_at_one():
    from molgen.finetune import mixgrpo_loss, ode_segment, rollout_continuous

    base = _MixtureWithHead()
    sampler = _sampler(base)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    plain = rollout_continuous(base, sampler, x_T, None, {}, [], 1.0, torch.Generator(), solver="ddim")
    engine = sampler.finish(sampler.run(sampler.init(x_T)))  # the engine's ddim on the same grid
    assert torch.allclose(plain.x0, engine, atol=1e-5) and plain.old_logp.shape == (0, 16)
    ro = rollout_continuous(base, sampler, x_T, None, {}, [1, 2], 1.0, torch.Generator().manual_seed(2))
    assert ro.old_logp.shape == (2, 16) and ro.states.shape == (3, 16, 2)
    times = ro.times
    assert torch.equal(ro.states[0], ode_segment(base, sampler, "dpmpp_2m", x_T, None, {}, times[:2]))
    with pytest.raises(ValueError, match="contiguous"):
        rollout_continuous(base, sampler, x_T, None, {}, [0, 2], 1.0, torch.Generator())
    model = with_adapter(base, rank=2)
    adv = torch.linspace(-1, 1, 16)
    loss, kl = mixgrpo_loss(model, base, sampler, ro, adv, clip=0.2, kl_weight=0.1)
    # on the rollout's own policy every ratio is 1: the clipped surrogate is -mean(A), the KL 0
    assert float(kl.detach()) == 0.0 and float(loss.detach()) == pytest.approx(-float(adv.mean()), abs=1e-6)


def test_the_window_slides_toward_the_data_and_wraps():
    from molgen.finetune import window_start

    s = GRPOSettings(window=2, shift_every=2, stride=1)
    assert [window_start(it, 5, s) for it in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    with pytest.raises(ValueError, match="does not fit"):
        window_start(0, 1, s)


def test_mixgrpo_raises_the_reward_and_survives_a_failing_reward():
    from molgen.finetune import mixgrpo
    from molgen.guidance.tasks import Draw

    base = _MixtureWithHead()
    sampler = _sampler(base)
    draw = lambda groups, size, g: [Draw(torch.randn(groups, 2, generator=g).repeat_interleave(size, 0))]  # noqa: E731
    calls = []

    def right_mode(samples):  # the first coordinate; NaN for one sample of the first batch, raises in the second
        calls.append(len(samples))
        if len(calls) == 2:
            raise RuntimeError("reward crashed")
        r = samples[:, 0].double().clone()
        if len(calls) == 1:
            r[0] = float("nan")
        return r

    settings = GRPOSettings(iterations=12, groups=4, group_size=8, epochs=2, window=2, shift_every=4,
                               lr=0.05, kl_weight=0.0, kl_bound=50.0, rank=2)
    tuned, report = mixgrpo(sampler, draw, right_mode, lambda x: x, settings, penalty=-2.0)
    assert len(report.reward_means) == 12 and report.steps + len(report.rolled_back) == 24
    assert report.model_calls == 12 * 32 * (6 + 2 * 2 * CALLS_PER_ROW)
    assert all(torch.isfinite(p).all() for p in tuned.parameters())
    assert min(report.reward_means[-2:]) > 1.0  # the base's mean reward is 0 (the modes are symmetric)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(5))

    def right_share(s) -> float:
        return float((s.finish(s.run(s.init(x_T)))[:, 0] > 0).float().mean())

    assert right_share(sampler) < 0.65 and right_share(_sampler(tuned)) > 0.9
