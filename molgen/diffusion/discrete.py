"""Masked (absorbing-state) discrete diffusion: process, ELBO and few-step samplers.

Forward process (MDLM, Sahoo et al. 2024): every data token of ``x0`` stays itself with probability
``alpha(t)`` and becomes the mask token ``m`` otherwise, independently, ``q(x_t^i | x0^i) = Cat(alpha_t x0^i +
(1 - alpha_t) m)``, with ``alpha(0) = 1`` and ``alpha(1) = 0`` (all masked). Padding tokens never change.

Denoiser contract: ``model(x_t, t, **cond) -> logits [B, L, K]`` over the K data letters; ``t`` is a float
tensor [B]. The SUBS parameterisation turns logits into ``log p(x0 | x_t)``: masked positions get a
softmax over the letters, unmasked positions carry their token over (probability one).

Continuous-time NELBO per sequence::

    L(x0) = int_0^1 (-alpha'(t)) / (1 - alpha(t)) * E_q[ sum_{i: x_t^i = m} -log p(x0^i | x_t) ] dt

which equals ``-log p(x0)`` exactly when ``p`` is the true conditional of the data (the any-order
autoregressive identity), and upper-bounds it otherwise.

Samplers (registry ``DISCRETE_SAMPLERS``) run on a time grid ``1 = t_0 > ... > t_K = 0``; each step asks the
model once (cached ancestral: only for rows that changed) and moves masked positions with float64 Gumbel
draws.
``DiscreteSampler`` has the continuous ``Sampler``'s step protocol (``init``, ``estimate``, ``step``, ``select``,
``finish``), so guidance acts between the steps of either without an adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

Cond = Mapping[str, Any]


# --------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class MaskingSchedule:
    """``alpha(t)``: probability that a token is still unmasked at time t.

    ``loglinear``: alpha = 1 - t (MDLM's log-linear noise sigma(t) = -log(1 - t)); ``cosine``:
    alpha = cos(pi t / 2).
    """

    kind: str = "loglinear"

    def __post_init__(self):
        if self.kind not in ("loglinear", "cosine"):
            raise ValueError(f"unknown masking schedule {self.kind!r}; choose loglinear or cosine")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "loglinear":
            return 1.0 - t
        return torch.cos(0.5 * math.pi * t).clamp(min=0.0)

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "loglinear":
            return -torch.ones_like(t)
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def t_of_alpha(self, a: torch.Tensor) -> torch.Tensor:
        if self.kind == "loglinear":
            return 1.0 - a
        return torch.arccos(a.clamp(0.0, 1.0)) * (2.0 / math.pi)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight ``-alpha'(t) / (1 - alpha(t))`` (1/t for log-linear)."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))


# --------------------------------------------------------------------------------------------- process
@dataclass(frozen=True)
class MaskedDiffusion:
    """Absorbing-state process over K letters with ``mask_id`` and optional ``pad_id`` (never corrupted)."""

    n_tokens: int
    mask_id: int
    pad_id: int | None = None
    schedule: MaskingSchedule = field(default_factory=MaskingSchedule)
    t_min: float = 1e-4

    def is_data(self, x: torch.Tensor) -> torch.Tensor:
        """Positions that hold a letter or a mask (not padding)."""
        return x != self.pad_id if self.pad_id is not None else torch.ones_like(x, dtype=torch.bool)

    def prior(self, lengths: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
        """All-mask state ``[B, max_length]`` with padding after each row's length."""
        max_length = int(lengths.max()) if max_length is None else max_length
        if int(lengths.max()) > max_length or int(lengths.min()) < 1:
            raise ValueError(f"lengths must lie in [1, {max_length}], got {lengths.min()}..{lengths.max()}")
        pos = torch.arange(max_length, device=lengths.device)
        if self.pad_id is None and int(lengths.min()) < max_length:
            raise ValueError("variable lengths need a process with a pad_id")
        x = torch.full((len(lengths), max_length), self.mask_id, dtype=torch.long, device=lengths.device)
        if self.pad_id is not None:
            x[pos[None, :] >= lengths[:, None]] = self.pad_id
        return x

    def corrupt(
        self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x0)``: mask each data token independently with probability 1 - alpha(t)."""
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        a = self.schedule.alpha(t.to(torch.float64))[:, None]
        masked = (u >= a) & self.is_data(x0)
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0)

    def log_probs(self, logits: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """SUBS parameterisation: ``log p(x0 | x_t)`` [B, L, K]; unmasked letters carry over (log one-hot)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        letter = x_t < self.n_tokens
        carried = torch.full_like(logp, -math.inf).scatter(
            -1, x_t.clamp(max=self.n_tokens - 1)[..., None], 0.0
        )
        return torch.where(letter[..., None], carried, logp)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Low-discrepancy times ``t_i = t_min + (1 - t_min) * ((u + i / n) mod 1)`` (antithetic strata)."""
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        strata = (u + torch.arange(n, device=device, dtype=torch.float64) / n) % 1.0
        return (self.t_min + (1.0 - self.t_min) * strata).float()

    def loss(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        cond: Cond | None = None,
    ) -> torch.Tensor:
        """Monte-Carlo NELBO per sequence (nats), ``weight(t) * sum_{masked i} -log p(x0^i | x_t)``, [B]."""
        t = self.sample_t(len(x0), generator, x0.device) if t is None else t
        x_t = self.corrupt(x0, t, generator)
        logp = self.log_probs(model(x_t, t, **(cond or {})), x_t)
        masked = x_t == self.mask_id
        nll = -logp.gather(-1, x0.clamp(max=self.n_tokens - 1)[..., None]).squeeze(-1)
        nll = torch.where(masked, nll, torch.zeros_like(nll))
        return self.schedule.weight(t.to(torch.float64)).float() * nll.sum(-1)

    @torch.no_grad()
    def nelbo(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        n_t: int = 16,
        generator: torch.Generator | None = None,
        cond: Cond | None = None,
    ) -> torch.Tensor:
        """NELBO per sequence averaged over ``n_t`` stratified times (same strata for every row), [B]."""
        total = torch.zeros(len(x0), device=x0.device)
        for t in self.sample_t(n_t, generator, x0.device):
            total += self.loss(model, x0, t.expand(len(x0)), generator, cond)
        return total / n_t


# --------------------------------------------------------------------------------------------- draws
def gumbel_argmax(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Categorical draw ``argmax(log w + G)`` with float64 Gumbel noise G (float32 lowers the temperature)."""
    u = torch.rand(log_weights.shape, generator=generator, device=log_weights.device, dtype=torch.float64)
    g = -torch.log(-torch.log(u.clamp(min=1e-300)))
    return torch.argmax(log_weights.double() + g, dim=-1)


def _log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.clamp(min=0.0))


# --------------------------------------------------------------------------------------------- pairs
def pair_tokens(
    log_p0: torch.Tensor,
    x: torch.Tensor,
    partners: torch.Tensor,
    allowed: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A letter for every position, drawn by ``pick`` (argmax over the last axis, or a Gumbel draw) so that
    paired positions always hold an allowed pair.

    For a pair (i, j) with both ends masked, ``(a, b) ~ p_i(a) p_j(b) 1[allowed(a, b)]`` is drawn once (at the
    lower index) and both ends take their letter; an end whose mate is already the letter m draws from
    ``p_i(a) 1[allowed(a, m)]``; an unpaired position (``partners < 0``) draws from ``p_i``. ``allowed`` [K, K] is
    symmetric.
    """
    k = allowed.shape[0]
    lp = log_p0.double()
    log_allowed = torch.zeros(k, k, dtype=torch.float64, device=lp.device).masked_fill(~allowed, -math.inf)
    paired = partners >= 0
    mate_idx = partners.clamp(min=0)
    mate = x.gather(1, mate_idx)
    joint = lp[..., :, None] + lp.gather(1, mate_idx[..., None].expand_as(lp))[..., None, :] + log_allowed
    ab = pick(joint.flatten(-2))
    lead = partners > torch.arange(x.shape[1], device=x.device)[None, :]
    both = torch.where(lead, ab // k, (ab % k).gather(1, mate_idx))
    one = pick(lp + log_allowed.t()[mate.clamp(max=k - 1)])
    free = pick(lp)
    return torch.where(paired & (mate >= k), both, torch.where(paired, one, free))


# --------------------------------------------------------------------------------------------- sampler
@dataclass
class DiscreteState:
    """Sampler state: tokens, per-row time, last ``log p(x0 | x_t)`` and bookkeeping."""

    x: torch.Tensor
    t: torch.Tensor
    cond: dict[str, Any]
    log_p0: torch.Tensor | None = None
    stale: torch.Tensor | None = None  # rows whose tokens changed since log_p0 was computed
    at: int | None = None  # the grid point log_p0 was computed at
    nfe: int = 0  # model calls
    rows_evaluated: int = 0  # rows sent through the model (cached sampling sends fewer)


def _take(cond: Mapping[str, Any], rows: torch.Tensor, batch: int) -> dict[str, Any]:
    return {
        k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (batch,) else v)
        for k, v in cond.items()
    }


@dataclass(frozen=True)
class SamplerSpec:
    """Registry entry: the transition, model calls per step (upper bound) and a one-line description."""

    transition: Callable[..., torch.Tensor]
    calls_per_step: float
    cached: bool
    description: str


def _ancestral(proc: MaskedDiffusion, st: DiscreteState, s: torch.Tensor, gen, opts) -> torch.Tensor:
    """Exact reverse posterior: a masked token unmasks with prob (alpha_s - alpha_t) / (1 - alpha_t)."""
    a_t, a_s = proc.schedule.alpha(st.t.double()), proc.schedule.alpha(s.double())
    p_unmask = ((a_s - a_t) / (1.0 - a_t).clamp(min=1e-300)).clamp(0.0, 1.0)
    return _unmask(proc, st.x, st.log_p0, p_unmask, gen)


def _tau_leaping(proc: MaskedDiffusion, st: DiscreteState, s: torch.Tensor, gen, opts) -> torch.Tensor:
    """Euler / tau-leaping: jump probability ``-alpha'(t) / (1 - alpha_t) * (t - s)``, capped at 1.

    For the log-linear schedule this coincides with the exact ancestral step; the last step forces a jump.
    """
    t = st.t.double()
    p_jump = (proc.schedule.weight(t) * (t - s.double())).clamp(0.0, 1.0)
    p_jump = torch.where(s <= 0, torch.ones_like(p_jump), p_jump)
    return _unmask(proc, st.x, st.log_p0, p_jump, gen)


def _unmask(proc, x, log_p0, p_unmask, gen) -> torch.Tensor:
    """Masked positions draw from ``[p_unmask * p(x0), 1 - p_unmask]`` over (K letters, stay masked)."""
    lw = torch.cat(
        [
            log_p0.double() + _log(p_unmask)[:, None, None],
            _log(1.0 - p_unmask)[:, None, None].expand(*x.shape, 1),
        ],
        dim=-1,
    )
    draw = gumbel_argmax(lw, gen)
    draw = torch.where(draw == proc.n_tokens, torch.full_like(draw, proc.mask_id), draw)
    return torch.where(x == proc.mask_id, draw, x)


def _remdm(proc: MaskedDiffusion, st: DiscreteState, s: torch.Tensor, gen, opts) -> torch.Tensor:
    """ReMDM remasking posterior (Wang et al. 2025) with remasking probability sigma_t:

    unmasked token: stays with prob 1 - sigma, is remasked with prob sigma; masked token: unmasks to
    ``x0 ~ p`` with prob ``(alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t)``. ``sigma_max = min(1, (1 -
    alpha_s) / alpha_t)``; strategy ``cap`` uses ``min(eta, sigma_max)``, ``rescale`` ``eta * sigma_max``;
    remasking is on only while ``t <= t_on``. sigma = 0 recovers the ancestral step.
    """
    eta, strategy, t_on = (
        float(opts.get("eta", 0.02)),
        opts.get("strategy", "cap"),
        float(opts.get("t_on", 1.0)),
    )
    a_t, a_s = proc.schedule.alpha(st.t.double()), proc.schedule.alpha(s.double())
    sigma_max = torch.where(
        a_t > 0, ((1.0 - a_s) / a_t.clamp(min=1e-300)).clamp(max=1.0), torch.ones_like(a_t)
    )
    if strategy == "cap":
        sigma = sigma_max.clamp(max=eta)
    elif strategy == "rescale":
        sigma = eta * sigma_max
    else:
        raise ValueError(f"unknown ReMDM strategy {strategy!r}; choose cap or rescale")
    sigma = torch.where(st.t.double() <= t_on, sigma, torch.zeros_like(sigma))
    p_unmask = ((a_s - (1.0 - sigma) * a_t) / (1.0 - a_t).clamp(min=1e-300)).clamp(0.0, 1.0)
    x = _unmask(proc, st.x, st.log_p0, p_unmask, gen)
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float64)
    remask = (st.x < proc.n_tokens) & (u < sigma[:, None])
    return torch.where(remask, torch.full_like(x, proc.mask_id), x)


def _first_hitting(proc: MaskedDiffusion, st: DiscreteState, s: torch.Tensor, gen, opts) -> torch.Tensor:
    """First-hitting sampler (Zheng et al. 2024): unmask ``k = ceil(n_masked / steps_left)`` uniformly chosen
    masked positions per row (k = 1 is exact); tokens come from ``p(x0 | x_t)``. ``s`` here holds the steps
    left per row (see ``DiscreteSampler``); the per-row time is advanced by the first-hitting law.
    """
    masked = st.x == proc.mask_id
    n = masked.sum(-1)
    k = torch.where(n > 0, torch.div(n + s - 1, s, rounding_mode="floor"), torch.zeros_like(n))
    keys = torch.rand(st.x.shape, generator=gen, device=st.x.device, dtype=torch.float64)
    keys = torch.where(masked, keys, torch.full_like(keys, -1.0))
    rank = keys.argsort(dim=-1, descending=True).argsort(dim=-1)
    chosen = masked & (rank < k[:, None])
    draw = gumbel_argmax(st.log_p0, gen)
    return torch.where(chosen, draw, st.x)


def first_hitting_time(
    schedule: MaskingSchedule, t: torch.Tensor, n: torch.Tensor, k: torch.Tensor, generator=None
) -> torch.Tensor:
    """Time s of the k-th of n masked tokens to unmask below t.

    ``1 - alpha_s = (1 - alpha_t) prod_{j<k} u_j^(1/(n-j))`` with ``u_j ~ U(0, 1)``.
    """
    kmax = int(k.max()) if len(k) else 0
    u = torch.rand((len(t), max(kmax, 1)), generator=generator, device=t.device, dtype=torch.float64)
    j = torch.arange(max(kmax, 1), device=t.device)
    expo = 1.0 / (n[:, None] - j[None, :]).clamp(min=1).double()
    logf = torch.where(
        j[None, :] < k[:, None], expo * torch.log(u.clamp(min=1e-300)), torch.zeros_like(u)
    ).sum(-1)
    one_minus = (1.0 - schedule.alpha(t.double())) * torch.exp(logf)
    s = schedule.t_of_alpha(1.0 - one_minus)
    return torch.where(n - k <= 0, torch.zeros_like(s), s).to(t.dtype)


DISCRETE_SAMPLERS: dict[str, SamplerSpec] = {
    "ancestral": SamplerSpec(_ancestral, 1.0, False, "D3PM/MDLM exact reverse posterior on the time grid"),
    "cached_ancestral": SamplerSpec(
        _ancestral, 1.0, True, "ancestral; the model runs only on rows that changed since its last call"
    ),
    "tau_leaping": SamplerSpec(_tau_leaping, 1.0, False, "Euler/tau-leaping jump probabilities"),
    "first_hitting": SamplerSpec(
        _first_hitting, 1.0, False, "first-hitting: unmask ceil(n/steps_left) tokens"
    ),
    "remdm": SamplerSpec(
        _remdm, 1.0, False, "ReMDM remasking predictor-corrector (options eta, strategy, t_on)"
    ),
}


def time_grid(steps: int, schedule: MaskingSchedule, grid: str = "time_uniform") -> torch.Tensor:
    """``steps + 1`` times from 1 to 0: uniform in t, or uniform in alpha (equal expected unmasking)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if grid == "time_uniform":
        return u
    if grid == "alpha_uniform":
        return schedule.t_of_alpha(1.0 - u)
    raise ValueError(f"unknown discrete time grid {grid!r}; choose time_uniform or alpha_uniform")


@dataclass(eq=False)
class DiscreteSampler:
    """Step-level masked-diffusion sampler: ``st = init(x_T, cond)``; ``st, x0 = estimate(st, i)`` (optional,
    cached for the step); ``st = step(st, i, gen)`` for ``i in range(n_steps - 1)``; ``select(st, index)``;
    ``x0 = finish(st)``. Each step calls the model at most once. ``grid``: a name (``time_grid``) or the
    times themselves, from 1 to 0.

    Pair-aware sampling (``pairing``: [K, K] allowed letter pairs, with ``cond["partners"]`` [B, L], ``-1`` where
    unpaired): an unmasking step opens both ends of a pair together and draws them from ``pair_tokens``, so
    every sample holds an allowed pair at every paired position.
    """

    model: Callable[..., torch.Tensor]
    process: MaskedDiffusion
    solver: str = "ancestral"
    steps: int = 32
    grid: str | torch.Tensor = "time_uniform"
    options: Mapping[str, Any] | None = None
    pairing: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.pairing is not None and not torch.equal(self.pairing, self.pairing.t()):
            raise ValueError("pairing must be a symmetric [K, K] table of allowed letter pairs")
        if self.solver not in DISCRETE_SAMPLERS:
            raise ValueError(
                f"unknown discrete sampler {self.solver!r}; choose one of {sorted(DISCRETE_SAMPLERS)}"
            )
        self.spec = DISCRETE_SAMPLERS[self.solver]
        if isinstance(self.grid, str):
            self.grid = time_grid(self.steps, self.process.schedule, self.grid)
        self.options = dict(self.options or {})

    @property
    def n_steps(self) -> int:
        """Grid points (``steps + 1``); ``n_steps - 1`` transitions, one model call each at most."""
        return len(self.grid)

    def init(self, x_T: torch.Tensor, cond: Cond | None = None, mask: None = None) -> DiscreteState:
        if mask is not None:
            raise ValueError("masked diffusion marks padding with pad tokens, not a mask")
        t = torch.full((len(x_T),), float(self.grid[0]), device=x_T.device)
        return DiscreteState(x_T.clone(), t, dict(cond or {}))

    def _refresh(self, st: DiscreteState, i: int) -> DiscreteState:
        """``log p(x0 | x_t)`` at grid point i: every row, or (cached) only stale rows."""
        batch = len(st.x)
        if self.spec.cached and st.log_p0 is not None:
            rows = st.stale.nonzero().squeeze(-1)
            if len(rows) == 0:
                return replace(st, at=i)
            logits = self.model(st.x[rows], st.t[rows], **_take(st.cond, rows, batch))
            log_p0 = st.log_p0.clone()
            log_p0[rows] = self.process.log_probs(logits, st.x[rows])
            n_rows = len(rows)
        else:
            log_p0 = self.process.log_probs(self.model(st.x, st.t, **st.cond), st.x)
            n_rows = batch
        stale = torch.zeros(batch, dtype=torch.bool, device=st.x.device)
        return replace(st, log_p0=log_p0, stale=stale, at=i, nfe=st.nfe + 1,
                       rows_evaluated=st.rows_evaluated + n_rows)

    def estimate(self, st: DiscreteState, i: int) -> tuple[DiscreteState, torch.Tensor]:
        """The state with ``log p(x0 | x_t)`` at grid point i (cached for the step) and the denoised tokens:
        the most likely letter at masked positions. At the last point (t = 0) every token is a letter: the
        estimate is the state itself, with no model call."""
        if i == self.n_steps - 1:
            return st, st.x
        if st.at != i:
            st = self._refresh(st, i)
        if self.pairing is None:
            best = st.log_p0.argmax(-1)
        else:
            best = pair_tokens(st.log_p0, st.x, self._partners(st), self.pairing, lambda w: w.argmax(-1))
        return st, torch.where(st.x == self.process.mask_id, best, st.x)

    def _partners(self, st: DiscreteState) -> torch.Tensor:
        partners = st.cond.get("partners")
        if partners is None or partners.shape != st.x.shape:
            raise ValueError("pair-aware sampling needs cond['partners'] with the shape of the tokens")
        return partners

    def _couple(self, st: DiscreteState, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Pair-aware unmasking: positions the transition opened, and their masked mates, take ``pair_tokens``."""
        if self.pairing is None:
            return x
        partners = self._partners(st)
        mask = self.process.mask_id
        opened = (st.x == mask) & (x != mask)
        mate_opened = opened.gather(1, partners.clamp(min=0)) & (partners >= 0) & (st.x == mask)
        tokens = pair_tokens(st.log_p0, st.x, partners, self.pairing, lambda w: gumbel_argmax(w, generator))
        return torch.where(opened | mate_opened, tokens, x)

    def move(self, st: DiscreteState, s: torch.Tensor, generator: torch.Generator | None = None) -> DiscreteState:
        """The registered transition from the state's times to ``s`` [B], from its ``log p(x0 | x_t)``."""
        x = self._couple(st, self.spec.transition(self.process, st, s, generator, self.options), generator)
        return replace(st, x=x, t=s, stale=st.stale | (x != st.x).any(-1))

    def step(self, st: DiscreteState, i: int, generator: torch.Generator | None = None) -> DiscreteState:
        if st.at != i:
            st = self._refresh(st, i)
        if self.solver != "first_hitting":
            return self.move(st, torch.full_like(st.t, float(self.grid[i + 1])), generator)
        steps_left = torch.full_like(st.t, self.n_steps - 1 - i, dtype=torch.long)
        n = (st.x == self.process.mask_id).sum(-1)
        x = self._couple(st, _first_hitting(self.process, st, steps_left, generator, self.options), generator)
        k = n - (x == self.process.mask_id).sum(-1)
        s = first_hitting_time(self.process.schedule, st.t, n, k, generator)
        return replace(st, x=x, t=s, stale=st.stale | (x != st.x).any(-1))

    @staticmethod
    def select(st: DiscreteState, index: torch.Tensor) -> DiscreteState:
        """Rows ``index`` (resampling, replication)."""
        batch = st.x.shape[0]

        def pick(v: Any) -> Any:
            return v.index_select(0, index) if isinstance(v, torch.Tensor) and v.shape[:1] == (batch,) else v

        return replace(st, x=pick(st.x), t=pick(st.t), log_p0=pick(st.log_p0), stale=pick(st.stale),
                       cond={k: pick(v) for k, v in st.cond.items()})

    def finish(self, st: DiscreteState) -> torch.Tensor:
        left = int((st.x == self.process.mask_id).sum())
        if left:
            raise RuntimeError(f"{left} tokens still masked after the last step (sampler {self.solver})")
        return st.x

    def run(self, x_T: torch.Tensor, cond: Cond | None = None, generator=None) -> DiscreteState:
        st = self.init(x_T, cond)
        for i in range(self.n_steps - 1):
            st = self.step(st, i, generator)
        self.finish(st)
        return st


def sample_discrete(
    model: Callable[..., torch.Tensor],
    process: MaskedDiffusion,
    x_T: torch.Tensor,
    solver: str = "ancestral",
    steps: int = 32,
    generator: torch.Generator | None = None,
    cond: Cond | None = None,
    grid: str = "time_uniform",
    options: Mapping[str, Any] | None = None,
    pairing: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a registered sampler from ``x_T`` (mask tokens where to generate) and return the tokens."""
    return DiscreteSampler(model, process, solver, steps, grid, options, pairing).run(x_T, cond, generator).x


class ClassifierFreeGuidance(torch.nn.Module):
    """``log p_w = (1 + w) log p(x0 | x_t, c) - w log p(x0 | x_t, null)`` for a label-conditioned denoiser."""

    def __init__(self, model: torch.nn.Module, scale: float, null_label: int, key: str = "labels"):
        super().__init__()
        self.model, self.scale, self.null_label, self.key = model, scale, null_label, key

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        lc = torch.log_softmax(self.model(x_t, t, **cond).float(), -1)
        if self.scale == 0:
            return lc
        null = {**cond, self.key: torch.full_like(cond[self.key], self.null_label)}
        lu = torch.log_softmax(self.model(x_t, t, **null).float(), -1)
        return (1.0 + self.scale) * lc - self.scale * lu
