"""Reward fine-tuning of denoisers: reward-weighted likelihood (masked diffusion) or denoising error (continuous
diffusion) on scored designs, through a low-rank adapter, with a KL leash to the frozen pretrained model.

Adapter (LoRA, Hu et al. 2021): every ``nn.Linear`` the denoiser calls as a module outside its transformer
layers (the sequence denoiser's dilated-conv output projections and the output head; PyTorch's fused
transformer path reads those layers' weights directly, so they stay frozen) becomes

    y = W x + b + B A x,    A [r, d_in] ~ N(0, 1 / d_in),  B [d_out, r] = 0,

so an adapter at initialisation leaves every output unchanged exactly; only A and B train.

Objective on designs x_i with scores s_i (a NaN or infinite score counts as ``penalty``, the worst finite score
when none is given):

    z_i = (s_i - mean s) / std s,        w_i = softmax(beta z)_i
    L(theta) = sum_i w_i NELBO_theta(x_i) / n_i  +  lambda KL

with n_i the design's data tokens and, on the same corrupted batches x_t ~ q(x_t | x_i) used for the NELBO,

    KL = mean over masked positions j of  sum_k p_theta(k | x_t) [log p_theta(k | x_t) - log p_ref(k | x_t)]

(nats per masked token, p_ref the frozen model). Each step draws ``batch`` designs from w (importance
resampling: the plain mean over the draw is an unbiased estimate of the weighted sum) and stratified times.
beta = 0 and lambda = 0 give the plain per-token NELBO of the designs. A step whose loss or gradient is not
finite, or after which the KL on its batch exceeds ``kl_bound``, is rolled back (adapter and optimiser state
restored bit for bit) and reported.

Continuous models (molecules, backbones; ``finetune_continuous``): the same adapter, weights, batches and
roll-back, with the reward-weighted denoising error in place of the NELBO, on x_t = alpha(t) x_i + sigma(t) eps
(eps in the state's space, t uniform on the schedule's range):

    L(theta) = sum_i w_i |x0_theta(x_t) - x_i|^2 / (d_i v)  +  lambda KL,
    KL = 1/2 mean_i |x0_theta(x_t) - x0_ref(x_t)|^2 / (d_i v),

d_i the design's real coordinates and v the designs' variance per coordinate: the KL per coordinate between
N(x0_theta, v) and N(x0_ref, v), the two denoisers' posteriors on x0 taken as Gaussians of the data's width.

GRPO (``grpo``, Shao et al. 2024) on the sampler's own steps: G samples per prior state (a group) are drawn
with the ancestral sampler, recording every state x_{t_k}; rewards r_i (a raising reward or a NaN value counts
as ``penalty``) give advantages A_i = (r_i - mean_group r) / std_group r; each update minimises

    -mean_{k,i} min(rho_ki A_i, clip(rho_ki, 1 - eps, 1 + eps) A_i) + lambda mean_k KL_k,
    rho_ki = exp(log p_theta(step k of i) - log p_old(step k of i)),

where a masked step's policy log-likelihood is that of the tokens it unmasked, sum over j with
x_{t_k}^j = m != x_{t_{k+1}}^j of log p_theta(x_{t_{k+1}}^j | x_{t_k}) (which positions unmask does not depend
on the model), and KL_k is the KL above on the masked positions of x_{t_k}. Roll-back as above.

MixGRPO (``mixgrpo``, Li et al. 2025) is GRPO for the continuous models: a rollout integrates the
probability-flow ODE with the engine's deterministic solver except on a window of W consecutive grid
transitions, which are DDIM steps with noise (eta > 0),

    x_s ~ N(mu_theta, c^2),  mu_theta = alpha_s x0_theta + sqrt(sigma_s^2 - c^2) eps_theta,
    c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2),

so the policy's log-likelihood of a rollout is the sum over the window of -|x_s - mu_theta|^2 / (2 c^2); the
clipped objective above runs on the window's steps only, with KL_k = |mu_theta - mu_ref|^2 / (2 c^2). The window
moves toward the data as training goes and starts again at the noise end, so every part of the grid is trained
while each update costs W steps of gradients, not the whole grid.

    model, report = finetune(base, process, tokens, scores, FinetuneSettings(steps=32))
    model, report = finetune_continuous(base, sampler, x0, mask, scores, FinetuneSettings(steps=32))
    save_adapter("ft.pt", model, report, base_sha256=digest, settings=FinetuneSettings(steps=32))
    model, card = load_adapter("ft.pt", base, base_sha256=digest)
    model, report = grpo(base, process, prior, reward, decode, GRPOSettings(iterations=8))
    model, report = mixgrpo(problem.sampler, problem.draw, reward, problem.decode, GRPOSettings(iterations=16, lr=3e-3))
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from molgen.checkpoints import load_checkpoint, save_checkpoint
from molgen.diffusion.discrete import DiscreteSampler, MaskedDiffusion

CALLS_PER_ROW = 6  # model calls a fine-tuning row costs: adapted forward, backward (2), reference forward, check (2)


@dataclass(frozen=True)
class FinetuneSettings:
    """Reward-weighted fine-tuning: ``steps`` Adam steps at ``lr`` on ``batch`` designs drawn from
    softmax(beta z), KL weight ``kl_weight`` (lambda), roll-back bound ``kl_bound`` (nats per masked token),
    adapter rank ``rank``."""

    steps: int = 32
    lr: float = 1e-2
    beta: float = 4.0
    kl_weight: float = 0.1
    kl_bound: float = 1.0
    rank: int = 8
    batch: int = 64
    seed: int = 0


@dataclass
class FinetuneReport:
    """What a fine-tuning run did: steps kept, steps rolled back (step index and reason), the last kept step's
    loss, NELBO and KL, the designs it saw and its model calls (rows x ``CALLS_PER_ROW``)."""

    steps: int
    rolled_back: list[tuple[int, str]] = field(default_factory=list)
    loss: float = math.nan
    nelbo: float = math.nan
    kl: float = 0.0
    data_size: int = 0
    model_calls: int = 0
    seconds: float = 0.0
    reward_means: list[float] = field(default_factory=list)  # GRPO: mean reward of each iteration's rollouts

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rolled_back": [list(r) for r in self.rolled_back]}


# --------------------------------------------------------------------------------------------- adapter
class LoRALinear(nn.Module):
    """``y = base(x) + (x A^T) B^T`` with the base layer frozen; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        d_out, d_in = base.weight.shape
        self.lora_a = nn.Parameter(torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in))
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def adapter_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers an adapter wraps: every ``nn.Linear`` outside transformer layers."""
    inside = [name for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    return [name for name, m in model.named_modules() if type(m) is nn.Linear
            and not any(name.startswith(p + ".") for p in inside)]


def with_adapter(base: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """A copy of ``base`` with every frozen parameter and a rank-``rank`` LoRA on ``adapter_targets``."""
    if rank < 1:
        raise ValueError(f"adapter rank must be >= 1, got {rank}")
    model = copy.deepcopy(base).requires_grad_(False)
    targets = adapter_targets(model)
    if not targets:
        raise ValueError(f"{type(base).__name__} has no linear layer an adapter can wrap")
    g = torch.Generator().manual_seed(seed)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, g))
    return model


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's trainable tensors (cloned), by parameter name."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def restore(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (``adapter_state``) back into the model's adapter, bit for bit."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def start_adapter(base: nn.Module, rank: int, lr: float, seed: int, start: nn.Module | None
                  ) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    """What every fine-tuning starts from: ``with_adapter(base, rank, seed)`` in eval mode (no dropout, so the
    KL check is deterministic) holding the adapter of ``start`` when given, Adam at ``lr`` on the adapter, and a
    generator seeded with ``seed``."""
    model = with_adapter(base, rank, seed).eval()
    if start is not None:
        restore(model, lora_state(start))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, opt, torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- objective
def design_weights(scores: Tensor, beta: float, penalty: float | None = None) -> Tensor:
    """w = softmax(beta z), z the standardised scores; a non-finite score counts as ``penalty`` (default: the
    worst finite score, 0 when none is finite); equal scores give equal weights."""
    s = scores.double()
    finite = torch.isfinite(s)
    if penalty is None:
        penalty = float(s[finite].min()) if bool(finite.any()) else 0.0
    s = torch.where(finite, s, torch.full_like(s, penalty))
    std = s.std(unbiased=False) if len(s) > 1 else torch.zeros((), dtype=s.dtype)
    z = (s - s.mean()) / std if float(std) > 0 else torch.zeros_like(s)
    return torch.softmax(beta * z, 0)


def objective(model: nn.Module, ref: nn.Module, process: MaskedDiffusion, x0: Tensor, weights: Tensor,
              t: Tensor, generator: torch.Generator | None, kl_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, weighted NELBO per token, KL per masked token) on one corrupted batch x_t ~ q(x_t | x0) at times t
    (the module docstring's L); the reference sees the same x_t."""
    x_t = process.corrupt(x0, t, generator)
    masked = x_t == process.mask_id
    logp = torch.log_softmax(model(x_t, t).float(), -1)
    nll = -logp.gather(-1, x0.clamp(max=process.n_tokens - 1)[..., None]).squeeze(-1)
    nll = torch.where(masked, nll, torch.zeros_like(nll)).sum(-1)
    per_token = process.schedule.weight(t.to(torch.float64)).float() * nll / process.is_data(x0).sum(-1).clamp_min(1)
    nelbo = (weights.to(per_token.dtype) * per_token).sum()
    kl = masked_kl(logp, ref, x_t, t, masked)
    return nelbo + kl_weight * kl, nelbo, kl


def masked_kl(logp: Tensor, ref: nn.Module, x_t: Tensor, t: Tensor, masked: Tensor) -> Tensor:
    """Mean over masked positions of KL(p_theta || p_ref) per position (0 when nothing is masked)."""
    with torch.no_grad():
        logr = torch.log_softmax(ref(x_t, t).float(), -1)
    kl = (logp.exp() * (logp - logr)).sum(-1)
    n = masked.sum()
    return torch.where(masked, kl, torch.zeros_like(kl)).sum() / n.clamp_min(1)


def guarded_step(model: nn.Module, opt: torch.optim.Optimizer, terms: Callable[[], tuple[Tensor, ...]],
                 kl_bound: float) -> tuple[tuple[Tensor, ...], str | None]:
    """One optimiser step on ``terms()[0]`` (``terms`` returns the loss, the KL and anything else to report),
    kept only when the loss and gradient are finite and, re-evaluated after the step, the loss is finite and the
    KL at most ``kl_bound``; otherwise the adapter and optimiser state are restored bit for bit. Returns the
    terms after the step and None, or the reason of the rollback."""
    saved, saved_opt = adapter_state(model), copy.deepcopy(opt.state_dict())
    with torch.enable_grad():
        loss = terms()[0]
        if not bool(torch.isfinite(loss)):
            return (), "non-finite loss"
        opt.zero_grad(set_to_none=True)
        loss.backward()
    if not _finite_grads(model):
        return (), "non-finite gradient"
    opt.step()
    with torch.no_grad():
        after = terms()
    if bool(torch.isfinite(after[0])) and float(after[1]) <= kl_bound:
        return after, None
    restore(model, saved)
    opt.load_state_dict(saved_opt)
    why = f"KL {float(after[1]):.4g} above bound {kl_bound:g}" if bool(torch.isfinite(after[0])) else \
        "non-finite loss after step"
    return (), why


def _finite_grads(model: nn.Module) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- training
StepTerms = Callable[[nn.Module, Tensor, torch.Generator], Callable[[], tuple[Tensor, ...]]]


def fit_adapter(base: nn.Module, n_designs: int, scores: Tensor, settings: FinetuneSettings, penalty: float | None,
                start: nn.Module | None, step_terms: StepTerms) -> tuple[nn.Module, FinetuneReport]:
    """The loop every fine-tuning shares: a rank-``settings.rank`` adapter on ``base`` (left untouched, the KL
    reference), from the adapter of ``start`` or from zero; each step draws ``batch`` design indices from
    softmax(beta z) and takes a ``guarded_step`` on ``step_terms(model, idx, generator)()`` (loss, KL, fit
    term). Returns the adapted model (eval mode) and its report."""
    if len(scores) != n_designs or not n_designs:
        raise ValueError(f"fine-tuning needs one score per design, got {n_designs} designs, {len(scores)} scores")
    t0, s = time.perf_counter(), settings
    model, opt, g = start_adapter(base, s.rank, s.lr, s.seed, start)
    w = design_weights(scores, s.beta, penalty)
    report = FinetuneReport(steps=0, data_size=n_designs)
    for step in range(s.steps):
        idx = torch.multinomial(w, s.batch, replacement=True, generator=g)
        after, why = guarded_step(model, opt, step_terms(model, idx, g), s.kl_bound)
        if why:
            report.rolled_back.append((step, why))
            continue
        report.steps += 1
        report.loss, report.kl, report.nelbo = (float(v) for v in after)
    report.model_calls = s.steps * s.batch * CALLS_PER_ROW
    report.seconds = time.perf_counter() - t0
    return model.requires_grad_(False), report


def finetune(base: nn.Module, process: MaskedDiffusion, tokens: Tensor, scores: Tensor,
             settings: FinetuneSettings = FinetuneSettings(), penalty: float | None = None,
             start: nn.Module | None = None) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune an adapter (``fit_adapter``) toward the designs ``tokens`` [N, L] with ``scores`` [N] on the
    objective above, the corrupted batch drawn once per step so that the roll-back check sees the same x_t."""

    def step_terms(model: nn.Module, idx: Tensor, g: torch.Generator) -> Callable[[], tuple[Tensor, ...]]:
        x0 = tokens[idx]
        t = process.sample_t(len(x0), g)
        uniform = torch.full((len(x0),), 1.0 / len(x0))
        seed = int(torch.randint(0, 2**62, (), generator=g))

        def terms() -> tuple[Tensor, ...]:
            loss, nelbo, kl = objective(model, base, process, x0, uniform, t, torch.Generator().manual_seed(seed),
                                        settings.kl_weight)
            return loss, kl, nelbo

        return terms

    return fit_adapter(base, len(tokens), scores, settings, penalty, start, step_terms)


def x0_at(model: nn.Module, sampler: Any, x: Tensor, t: Tensor | float, cond: dict[str, Tensor]) -> Tensor:
    """The model's x0 estimate of every row of ``x`` at its time (``t``: [B], or one time for all), on the
    sampler's schedule and prediction."""
    from molgen.diffusion.parameterization import to_x0
    from molgen.diffusion.schedules import get_schedule

    schedule = get_schedule(sampler.schedule)
    t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha, sigma = (f(t).to(x.dtype).view(shape) for f in (schedule.alpha, schedule.sigma))
    out = model(x, t.to(x.dtype), **cond).to(x.dtype)
    return to_x0(sampler.prediction or model.prediction, out, x, alpha, sigma)


def continuous_terms(model: nn.Module, ref: nn.Module, sampler: Any, x0: Tensor, mask: Tensor | None, t: Tensor,
                     eps: Tensor, scale: float, kl_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, denoising error, KL) of a continuous model on x_t = alpha(t) x0 + sigma(t) eps: the mean over the
    batch of ``|x0_hat - x0|^2 / (d scale)`` (d the design's real coordinates, ``scale`` the data's variance)
    plus ``kl_weight`` times the KL of N(x0_hat_theta, scale) from N(x0_hat_ref, scale) per coordinate."""
    from molgen.diffusion.schedules import get_schedule
    from molgen.diffusion.spaces import expand_mask

    schedule = get_schedule(sampler.schedule)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha, sigma = (f(t.double()).to(x0.dtype).view(shape) for f in (schedule.alpha, schedule.sigma))
    x_t = sampler.space.project(alpha * x0 + sigma * eps, mask)
    cond = {} if mask is None else {"mask": mask}
    x0_hat = x0_at(model, sampler, x_t, t, cond)
    with torch.no_grad():
        x0_ref = x0_at(ref, sampler, x_t, t, cond)
    m = expand_mask(mask, x0)
    real = torch.ones_like(x0) if m is None else m.expand_as(x0).to(x0.dtype)
    per_row = real.flatten(1).sum(1).clamp_min(1) * scale
    err = (((x0_hat - x0) ** 2 * real).flatten(1).sum(1) / per_row).mean()
    kl = 0.5 * (((x0_hat - x0_ref) ** 2 * real).flatten(1).sum(1) / per_row).mean()
    return err + kl_weight * kl, err, kl


def finetune_continuous(base: nn.Module, sampler: Any, x0: Tensor, mask: Tensor | None, scores: Tensor,
                        settings: FinetuneSettings = FinetuneSettings(), penalty: float | None = None,
                        start: nn.Module | None = None) -> tuple[nn.Module, FinetuneReport]:
    """Reward-weighted denoising fine-tuning of a continuous model (molecules, backbones): ``fit_adapter`` with
    the denoising error of ``continuous_terms`` at times uniform on the schedule's range in place of the NELBO;
    ``sampler`` (an engine ``Sampler``) gives the schedule, the state's space and the prediction; ``x0`` [N, ...]
    the designs as model states, ``mask`` their real entries (None: all). The report's ``nelbo`` holds the last
    kept step's denoising error."""
    from molgen.diffusion.schedules import get_schedule

    schedule = get_schedule(sampler.schedule)
    real = x0 if mask is None else x0[mask.bool()]
    scale = float(real.var()) if real.numel() > 1 else 1.0

    def step_terms(model: nn.Module, idx: Tensor, g: torch.Generator) -> Callable[[], tuple[Tensor, ...]]:
        xb, mb = x0[idx], None if mask is None else mask[idx]
        u = torch.rand(len(xb), generator=g, dtype=torch.float64)
        t = (schedule.t_min + (schedule.t_max - schedule.t_min) * u).to(xb.dtype)
        eps = sampler.space.noise_like(xb, mb, g)

        def terms() -> tuple[Tensor, ...]:
            loss, err, kl = continuous_terms(model, base, sampler, xb, mb, t, eps, scale, settings.kl_weight)
            return loss, kl, err

        return terms

    return fit_adapter(base, len(x0), scores, settings, penalty, start, step_terms)


def finetune_on(sampler: Any, x0: Tensor, mask: Tensor | None, scores: Tensor, settings: FinetuneSettings,
                penalty: float | None = None, start: nn.Module | None = None) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune the model of a campaign's sampler: ``finetune`` for a masked-diffusion ``DiscreteSampler``
    (``x0`` tokens), ``finetune_continuous`` for an engine ``Sampler``."""
    if isinstance(sampler, DiscreteSampler):
        return finetune(sampler.model, sampler.process, x0, scores, settings, penalty=penalty, start=start)
    return finetune_continuous(sampler.model, sampler, x0, mask, scores, settings, penalty=penalty, start=start)


# --------------------------------------------------------------------------------------------- checkpoints
def save_adapter(path: str | Path, model: nn.Module, report: FinetuneReport, *, base_sha256: str,
                 settings: FinetuneSettings | GRPOSettings, reward: str = "", base_checkpoint: str = "") -> Path:
    """Write the adapter's tensors to ``path`` and its card (base model SHA-256, reward, settings, steps, KL,
    data size, roll-backs, model calls) beside it (``molgen.checkpoints.save_checkpoint``)."""
    state = lora_state(model)
    config = {"adapter": {"kind": "lora", "rank": settings.rank, "targets": adapter_targets_of(model)},
              "settings": asdict(settings)}
    provenance = {"base_sha256": base_sha256, "base_checkpoint": base_checkpoint, "reward": reward,
                  **report.as_dict()}
    return save_checkpoint(path, state, config, provenance=provenance)


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of a model built by ``with_adapter`` (trainable or frozen), by name."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def adapter_targets_of(model: nn.Module) -> list[str]:
    """Names of the adapted layers of a model built by ``with_adapter``."""
    return [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def load_adapter(path: str | Path, base: nn.Module, base_sha256: str | None = None) -> tuple[nn.Module, dict]:
    """``base`` with the adapter saved at ``path`` and its card; a card made for other base weights
    (``base_sha256`` given and different) is refused."""
    state, card = load_checkpoint(path)
    made_for = card["provenance"]["base_sha256"]
    if base_sha256 is not None and made_for != base_sha256:
        raise ValueError(f"adapter {path} was fine-tuned from base weights {made_for[:12]}..., not "
                         f"{base_sha256[:12]}...")
    model = with_adapter(base, int(card["config"]["adapter"]["rank"])).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    lora_missing = [k for k in missing if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")]
    if lora_missing or unexpected:
        raise ValueError(f"adapter {path} does not fit this model (missing {lora_missing}, unexpected {unexpected})")
    return model.requires_grad_(False), card


# --------------------------------------------------------------------------------------------- GRPO
@dataclass(frozen=True)
class GRPOSettings:
    """GRPO on a sampler's own steps: ``iterations`` rollouts of ``groups`` x ``group_size`` samples, each
    followed by ``epochs`` clipped policy updates (ratio clip ``clip``, Adam at ``lr``) with KL weight
    ``kl_weight``, roll-back bound ``kl_bound``, adapter rank ``rank``. Masked models (``grpo``): ``steps``
    ancestral steps. Continuous models (``mixgrpo``, on the sampler's own grid): stochastic DDIM steps (``eta``)
    only on ``window`` transitions, moving ``stride`` transitions toward the data every ``shift_every``
    iterations (and starting again at the noise end), the deterministic ``solver`` elsewhere; there 3e-3 is the
    rate measured best on the molecule model."""

    iterations: int = 4
    groups: int = 4
    group_size: int = 8
    epochs: int = 2
    steps: int = 16
    clip: float = 0.2
    kl_weight: float = 0.1
    kl_bound: float = 1.0
    lr: float = 1e-2
    rank: int = 8
    window: int = 2
    shift_every: int = 2
    stride: int = 1
    eta: float = 1.0
    solver: str = "dpmpp_2m"
    seed: int = 0


@dataclass
class Rollout:
    """The sampler's states x_{t_0}, ..., x_{t_K} ([K + 1, B, L]), the grid times [K + 1] and, per step k,
    the sampling policy's log-likelihood of the tokens it unmasked ([K, B])."""

    states: Tensor
    times: Tensor
    old_logp: Tensor


def unmasked_logp(log_p0: Tensor, x_t: Tensor, x_s: Tensor, mask_id: int) -> Tensor:
    """log-likelihood of a transition's unmasked tokens, sum over j with x_t^j = m != x_s^j of
    log p(x_s^j | x_t), [B]. The rest of the ancestral transition (which positions unmask) does not depend on
    the model, so this is the policy's part of the step's log-likelihood."""
    new = (x_t == mask_id) & (x_s != mask_id)
    lp = log_p0.gather(-1, torch.where(new, x_s, torch.zeros_like(x_s))[..., None]).squeeze(-1)
    return torch.where(new, lp, torch.zeros_like(lp)).sum(-1)


@torch.no_grad()
def rollout(model: nn.Module, process: MaskedDiffusion, x_T: Tensor, steps: int, generator: torch.Generator
            ) -> Rollout:
    """Ancestral sampling from x_T with every state and the per-step log-likelihoods recorded."""
    smp = DiscreteSampler(model, process, "ancestral", steps)
    st = smp.init(x_T)
    states, logps = [st.x], []
    for i in range(smp.n_steps - 1):
        st = smp.step(st, i, generator)  # st.log_p0 stays the one the step drew from
        logps.append(unmasked_logp(st.log_p0, states[-1], st.x, process.mask_id))
        states.append(st.x)
    smp.finish(st)
    return Rollout(torch.stack(states), smp.grid.float(), torch.stack(logps))


def safe_rewards(reward: Callable[[Any], Any], samples: Sequence[Any], penalty: float) -> Tensor:
    """The reward of each sample, [N] float64; a reward that raises scores every sample ``penalty``, a NaN or
    infinite value scores that sample ``penalty``."""
    try:
        r = torch.as_tensor(reward(samples), dtype=torch.float64).reshape(len(samples))
    except Exception:  # noqa: BLE001 - a failing reward is a penalty, never a NaN gradient
        r = torch.full((len(samples),), float(penalty), dtype=torch.float64)
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float(penalty)))


def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = (r_i - mean_g r) / std_g r within each group of ``group_size`` consecutive samples (0 where the
    group's rewards are all equal)."""
    r = rewards.double().reshape(-1, group_size)
    std = r.std(-1, unbiased=False, keepdim=True)
    a = (r - r.mean(-1, keepdim=True)) / std.clamp_min(1e-12)
    return torch.where(std > 0, a, torch.zeros_like(a)).reshape(-1)


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """PPO's clipped objective as a loss: -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages.to(ratio.dtype)
    return -torch.minimum(ratio * a, ratio.clamp(1.0 - clip, 1.0 + clip) * a).mean()


def grpo_loss(model: nn.Module, ref: nn.Module, process: MaskedDiffusion, ro: Rollout, advantages: Tensor,
              clip: float, kl_weight: float) -> tuple[Tensor, Tensor]:
    """(loss, KL): the clipped surrogate over every step k and sample, plus kl_weight times the mean over
    steps of KL(p_theta || p_ref) on the masked positions of x_{t_k}."""
    surrogate, kl = torch.zeros(()), torch.zeros(())
    n = len(ro.old_logp)
    for k in range(n):
        x_t = ro.states[k]
        t = ro.times[k].expand(len(x_t))
        logp0 = torch.log_softmax(model(x_t, t).float(), -1)
        logp = unmasked_logp(logp0, x_t, ro.states[k + 1], process.mask_id)
        surrogate = surrogate + clipped_surrogate(logp, ro.old_logp[k], advantages, clip) / n
        kl = kl + masked_kl(logp0, ref, x_t, t, x_t == process.mask_id) / n
    return surrogate + kl_weight * kl, kl


def grpo(base: nn.Module, process: MaskedDiffusion, prior: Callable[[int, torch.Generator], Tensor],
         reward: Callable[[Any], Any], decode: Callable[[Tensor], Sequence[Any]],
         settings: GRPOSettings = GRPOSettings(), penalty: float = -1.0, start: nn.Module | None = None
         ) -> tuple[nn.Module, FinetuneReport]:
    """GRPO (Shao et al. 2024) of a rank-``settings.rank`` adapter on ``base`` (the frozen KL reference):
    ``prior(groups, g)`` gives one prior state per group, each repeated ``group_size`` times; the rewards
    ``reward(decode(tokens))`` (failures: ``penalty``) give group-relative advantages; each update minimises
    ``grpo_loss``. Model calls: rollout rows x steps, plus six per row and step of each update. ``start``: a
    model whose adapter to continue (default: a new one)."""
    s = settings
    t0 = time.perf_counter()
    model, opt, g = start_adapter(base, s.rank, s.lr, s.seed, start)
    report = FinetuneReport(steps=0)
    calls = 0
    for it in range(s.iterations):
        x_T = prior(s.groups, g).repeat_interleave(s.group_size, 0)
        ro = rollout(model, process, x_T, s.steps, g)
        rewards = safe_rewards(reward, decode(ro.states[-1]), penalty)
        adv = group_advantages(rewards, s.group_size)
        report.reward_means.append(float(rewards.mean()))
        report.data_size += len(x_T)
        calls += len(x_T) * s.steps
        for epoch in range(s.epochs):
            step = it * s.epochs + epoch
            calls += len(x_T) * s.steps * CALLS_PER_ROW
            def terms(ro=ro, adv=adv) -> tuple[Tensor, ...]:
                return grpo_loss(model, base, process, ro, adv, s.clip, s.kl_weight)

            after, why = guarded_step(model, opt, terms, s.kl_bound)
            if why:
                report.rolled_back.append((step, why))
                continue
            report.steps += 1
            report.loss, report.kl = float(after[0]), float(after[1])
    report.model_calls = calls
    report.seconds = time.perf_counter() - t0
    return model.requires_grad_(False), report


# --------------------------------------------------------------------------------------------- MixGRPO
def window_start(iteration: int, transitions: int, s: GRPOSettings) -> int:
    """First transition of the window at ``iteration``: ``stride * (iteration // shift_every)``, wrapped over
    the ``transitions - window + 1`` places a window fits."""
    if not 1 <= s.window <= transitions:
        raise ValueError(f"window of {s.window} transitions does not fit a grid of {transitions}")
    return (s.stride * (iteration // s.shift_every)) % (transitions - s.window + 1)


def ddim_transition(model: nn.Module, sampler: Any, x_t: Tensor, mask: Tensor | None, cond: dict[str, Tensor],
                    t: float, s: float, eta: float) -> tuple[Tensor, float]:
    """Mean and standard deviation of DDIM's step from t to s < t (Song et al. 2021) on the sampler's schedule:

        x0 = x0_theta(x_t),  eps = (x_t - alpha_t x0) / sigma_t,
        c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2),
        x_s ~ N(alpha_s x0 + sqrt(sigma_s^2 - c^2) eps, c^2)

    (eta = 0: the deterministic ODE step; eta = 1: the posterior q(x_s | x_t, x0), which keeps the marginals);
    the mean is projected onto the state's space."""
    from molgen.diffusion.schedules import get_schedule

    schedule = get_schedule(sampler.schedule)
    (a_t, s_t), (a_s, s_s) = ((float(schedule.alpha(torch.tensor(v, dtype=torch.float64))),
                               float(schedule.sigma(torch.tensor(v, dtype=torch.float64)))) for v in (t, s))
    x0 = x0_at(model, sampler, x_t, t, cond)
    eps = (x_t - a_t * x0) / s_t
    c = eta * s_s * math.sqrt(max(0.0, 1.0 - (a_t * s_s / (a_s * s_t)) ** 2))
    return sampler.space.project(a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps, mask), c


def gaussian_logp(x: Tensor, mean: Tensor, std: float, mask: Tensor | None) -> Tensor:
    """log N(x; mean, std^2) per row over the real entries, without the constant (it cancels in ratios), [B]."""
    from molgen.diffusion.spaces import expand_mask

    m = expand_mask(mask, x)
    sq = (x - mean) ** 2 if m is None else (x - mean) ** 2 * m.to(x.dtype)
    return -sq.flatten(1).sum(1) / (2 * std**2)


@dataclass
class ContinuousRollout:
    """A rollout on the grid ``times``: the states at the window's points [W + 1, B, ...] (the window's
    transitions ``window`` k -> k + 1 are DDIM steps with ``eta``), the sampling policy's log-likelihood of each
    window step [W, B] and the final x0 estimate."""

    states: Tensor
    times: list[float]
    x0: Tensor
    mask: Tensor | None
    cond: dict[str, Tensor]
    window: list[int]
    eta: float
    old_logp: Tensor


def ode_segment(model: nn.Module, sampler: Any, solver: str, x: Tensor, mask: Tensor | None,
                cond: dict[str, Tensor], times: Sequence[float], finish: bool = False) -> Tensor:
    """The engine's ``solver`` from x at ``times[0]`` over the grid ``times``: the state at the last point, or
    (``finish``) the x0 estimate there. One model call per point but the last (``finish``: per point)."""
    from molgen.diffusion.sampling import Sampler

    if len(times) == 1:
        return sampler.space.project(x0_at(model, sampler, x, times[0], cond), mask) if finish else x
    seg = Sampler(model, sampler.schedule, solver, grid=torch.tensor(list(times), dtype=torch.float64),
                  space=sampler.space, prediction=sampler.prediction, noise_at_t_max=False)
    state = seg.run(seg.init(x, mask, cond))
    return seg.finish(state) if finish else state.x


@torch.no_grad()
def rollout_continuous(model: nn.Module, sampler: Any, x_T: Tensor, mask: Tensor | None, cond: dict[str, Tensor],
                       window: list[int], eta: float, generator: torch.Generator, solver: str = "dpmpp_2m"
                       ) -> ContinuousRollout:
    """One MixGRPO rollout on the sampler's grid (the noise levels its model is told) from ``x_T``: the
    deterministic ``solver`` (the probability-flow ODE) up to the window, DDIM steps with ``eta`` on the window's
    contiguous transitions (each step's log-likelihood recorded), the ODE again to the end, whose x0 estimate
    is the sample. One model call per grid point, as the sampler."""
    times = [float(v) for v in sampler.grid_times[0]]
    x = sampler.init(x_T, mask, cond).x
    first, end = (window[0], window[-1] + 1) if window else (len(times) - 1, len(times) - 1)
    if list(window) != list(range(first, end)):
        raise ValueError(f"the window must be contiguous transitions, got {window}")
    x = ode_segment(model, sampler, solver, x, mask, cond, times[: first + 1])
    states, logps = [x], []
    for k in window:
        mean, c = ddim_transition(model, sampler, x, mask, cond, times[k], times[k + 1], eta)
        x = sampler.space.project(mean + c * sampler.space.noise_like(mean, mask, generator), mask)
        logps.append(gaussian_logp(x, mean, c, mask))
        states.append(x)
    x0 = ode_segment(model, sampler, solver, x, mask, cond, times[end:], finish=True)
    old = torch.stack(logps) if logps else x.new_zeros(0, len(x))
    return ContinuousRollout(torch.stack(states), times, x0, mask, cond, list(window), eta, old)


def mixgrpo_loss(model: nn.Module, ref: nn.Module, sampler: Any, ro: ContinuousRollout, advantages: Tensor,
                 clip: float, kl_weight: float) -> tuple[Tensor, Tensor]:
    """(loss, KL): the clipped surrogate over the window's steps and the samples, plus ``kl_weight`` times the
    mean over them of KL(N(mu_theta, c^2) || N(mu_ref, c^2)) = |mu_theta - mu_ref|^2 / (2 c^2) (nats per sample)."""
    surrogate, kl = torch.zeros(()), torch.zeros(())
    n = len(ro.window)
    for w, k in enumerate(ro.window):
        step = (sampler, ro.states[w], ro.mask, ro.cond, ro.times[k], ro.times[k + 1], ro.eta)
        mean, c = ddim_transition(model, *step)
        with torch.no_grad():
            ref_mean, _ = ddim_transition(ref, *step)
        logp = gaussian_logp(ro.states[w + 1], mean, c, ro.mask)
        surrogate = surrogate + clipped_surrogate(logp, ro.old_logp[w], advantages, clip) / n
        kl = kl - gaussian_logp(mean, ref_mean, c, ro.mask).mean() / n
    return surrogate + kl_weight * kl, kl


def mixgrpo(sampler: Any, draw: Callable[[int, int, torch.Generator], Sequence[Any]],
            reward: Callable[[Any], Any], decode: Callable[..., Sequence[Any]],
            settings: GRPOSettings = GRPOSettings(), penalty: float = -1.0, start: nn.Module | None = None
            ) -> tuple[nn.Module, FinetuneReport]:
    """MixGRPO (Li et al. 2025; GRPO, Shao et al. 2024) of a rank-``settings.rank`` adapter on the continuous
    ``sampler``'s model (the frozen KL reference). ``draw(groups, group_size, g)`` gives prior chunks (objects
    with ``x_T``, ``mask`` and ``cond``, rows of a group consecutive, as ``molgen.guidance.tasks.Draw``); each
    chunk is rolled out (``rollout_continuous``) with the window of ``window_start``, its samples
    ``decode(x0[, mask])`` scored by ``reward`` (a raising reward or a NaN value counts as ``penalty``), and
    the group-relative advantages drive ``epochs`` guarded updates of ``mixgrpo_loss`` per chunk. Gradients and
    the policy ratio live only in the window, so an update costs ``window`` steps, not the whole grid. Model
    calls: rollout rows x grid points, plus ``CALLS_PER_ROW`` per row and window step of each update. ``start``:
    a model whose adapter to continue (default: a new one)."""
    s = settings
    if not s.eta > 0:
        raise ValueError(f"MixGRPO needs stochastic window steps: eta must be > 0, got {s.eta}")
    t0 = time.perf_counter()
    base = sampler.model
    model, opt, g = start_adapter(base, s.rank, s.lr, s.seed, start)
    report = FinetuneReport(steps=0)
    transitions = len(sampler.grid_times[0]) - 1
    calls, step = 0, 0
    for it in range(s.iterations):
        first = window_start(it, transitions, s)
        window = list(range(first, first + s.window))
        rewards_seen = []
        for chunk in draw(s.groups, s.group_size, g):
            cond = dict(chunk.cond or {})
            ro = rollout_continuous(model, sampler, chunk.x_T, chunk.mask, cond, window, s.eta, g, s.solver)
            samples = decode(ro.x0) if chunk.mask is None else decode(ro.x0, chunk.mask)
            rewards = safe_rewards(reward, samples, penalty)
            adv = group_advantages(rewards, s.group_size)
            rewards_seen.append(rewards)
            calls += len(ro.x0) * (transitions + 1)
            for _ in range(s.epochs):
                calls += len(ro.x0) * s.window * CALLS_PER_ROW

                def terms(ro=ro, adv=adv) -> tuple[Tensor, ...]:
                    return mixgrpo_loss(model, base, sampler, ro, adv, s.clip, s.kl_weight)

                after, why = guarded_step(model, opt, terms, s.kl_bound)
                if why:
                    report.rolled_back.append((step, why))
                else:
                    report.steps += 1
                    report.loss, report.kl = float(after[0]), float(after[1])
                step += 1
        seen = torch.cat(rewards_seen)
        report.reward_means.append(float(seen.mean()))
        report.data_size += len(seen)
    report.model_calls = calls
    report.seconds = time.perf_counter() - t0
    return model.requires_grad_(False), report


def grpo_on(problem: Any, reward: Any, settings: GRPOSettings, start: nn.Module | None = None
            ) -> tuple[nn.Module, FinetuneReport]:
    """GRPO of the model of a guidance ``Problem`` (a campaign's): ``grpo`` on a masked ``DiscreteSampler``
    (its step count), ``mixgrpo`` on an engine ``Sampler`` (its grid), with the problem's prior draws and
    decoder and the reward's penalty for failures."""
    penalty = getattr(reward, "penalty", -1.0)
    sampler = problem.sampler
    if isinstance(sampler, DiscreteSampler):
        def prior(n: int, g: torch.Generator) -> Tensor:
            return torch.cat([chunk.x_T for chunk in problem.draw(n, 1, g)])

        steps = dataclasses.replace(settings, steps=sampler.steps)
        return grpo(sampler.model, sampler.process, prior, reward, problem.decode, steps, penalty, start)
    return mixgrpo(sampler, problem.draw, reward, problem.decode, settings, penalty, start)
