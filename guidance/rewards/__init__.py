"""Rewards: one batched interface, ``reward(samples) -> Tensor[B]`` (float64), never NaN silently.

A ``Reward`` scores a batch (a tensor with a leading batch dimension, or a sequence of objects such as
SMILES or nucleotide strings). Failures are per sample: an exception, a timeout or a non-finite value in
one sample's score gives that sample the reward's declared ``penalty`` and is counted in ``stats``; the
rest of the batch is unaffected. ``nan="raise"`` turns non-finite values into an error instead.
CPU-bound scorers can run in a process pool (``workers``), where ``timeout`` (seconds per sample) applies.

Rewards are built by name from the command line, ``NAME[:ARGS]`` with ARGS ``a,b`` (positional) or
``k=v`` pairs separated by commas, e.g. ``quadratic:c=1.0,tau=0.5``, ``rna_target:((((....))))``, and weighted
sums ``qed+0.5*sa`` (terms split on ``+``, so arguments cannot contain ``+``):

    reward = parse_reward("quadratic:c=1,tau=0.5")
    r = reward(x)               # Tensor[B]
    reward.stats                # {'samples': B, 'failures': 0, 'nonfinite': 0, 'timeouts': 0, ...}
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

NAN_POLICIES = ("penalty", "raise")


@dataclass
class RewardStats:
    """Counts since construction (or ``reset``): samples scored, batches, and per-sample failures."""

    samples: int = 0
    batches: int = 0
    failures: int = 0  # exceptions inside one sample's scoring
    invalid: int = 0  # samples the reward declares invalid (``InvalidSample``): scored the penalty, not a failure
    nonfinite: int = 0  # NaN / inf scores
    timeouts: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class InvalidSample(ValueError):
    """A sample the reward cannot score by its nature (an invalid molecule): it gets the penalty, counted as
    ``invalid``, not as a failure of the reward."""


class RewardFailures(ValueError):
    """Too many of a run's reward calls failed: the reward and the samples do not fit (see the message)."""


def failed_share(reward: Reward) -> float:
    """The largest share of failed samples (exceptions, non-finite scores, timeouts) of the reward or its parts."""
    shares = [(r.stats.failures + r.stats.nonfinite + r.stats.timeouts) / r.stats.samples
              for r in (reward, *getattr(reward, "parts", ())) if r.stats.samples]
    return max(shares, default=0.0)


def check_failures(reward: Reward, max_share: float) -> None:
    """Raise ``RewardFailures`` when more than ``max_share`` of the reward's samples so far failed."""
    share = failed_share(reward)
    if share > max_share:
        errors = [r.stats.last_error for r in (reward, *getattr(reward, "parts", ())) if r.stats.last_error]
        last = errors[-1] if errors else "the scores were NaN or infinite"
        raise RewardFailures(f"{share:.0%} of the samples scored by reward {reward.name!r} failed (more than "
                             f"{max_share:.0%}); last error: {last}")


def resolve_length(reward: Reward, length: int | None, option: str = "--length") -> int | None:
    """The sample length a run must use: ``length``, or the one the reward needs when none is given
    (``rna_target``'s target); a length the reward cannot score is refused before any sampling."""
    need = set().union(*(r.lengths() for r in (reward, *getattr(reward, "parts", ()))))
    if len(need) > 1:
        raise ValueError(f"the terms of reward {reward.name!r} need different lengths {sorted(need)}")
    if need and length is not None and length not in need:
        raise ValueError(f"{option} {length}, but reward {reward.name!r} scores only samples of length {min(need)}")
    return min(need) if need and length is None else length


@dataclass
class Reward:
    """Base class. Subclasses define ``score_one(sample) -> float`` (per sample; runs in a pool when
    ``workers > 0``) or override ``score_batch(samples) -> Tensor[B]`` (vectorised; on an exception the
    batch is re-scored sample by sample so that only the failing samples are penalised)."""

    name: str = "reward"
    penalty: float = -1.0
    nan: str = "penalty"
    workers: int = 0
    timeout: float | None = None
    differentiable: bool = False
    stats: RewardStats = field(default_factory=RewardStats, init=False, repr=False)
    memory: dict[str, float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.nan not in NAN_POLICIES:
            raise ValueError(f"reward {self.name!r}: nan policy must be one of {NAN_POLICIES}, got {self.nan!r}")
        if not math.isfinite(self.penalty):
            raise ValueError(f"reward {self.name!r}: the penalty must be a finite number, got {self.penalty}")
        if self.workers < 0:
            raise ValueError(f"reward {self.name!r}: workers must be >= 0, got {self.workers}")
        if self.timeout is not None and self.workers == 0:
            raise ValueError(f"reward {self.name!r}: a timeout needs workers >= 1 (a process pool)")
        self._pool: cf.ProcessPoolExecutor | None = None

    # ---- to implement -------------------------------------------------------------------------------------
    def score_one(self, sample: Any) -> float:
        raise NotImplementedError(f"reward {self.name!r} defines neither score_one nor score_batch")

    def score_batch(self, samples: Any) -> Tensor:
        """Default: ``score_one`` per sample (in the pool when configured), failures penalised and counted."""
        items = list(samples)
        if self.workers > 0:
            return self._pooled(items)
        out = torch.empty(len(items), dtype=torch.float64)
        for i, item in enumerate(items):
            out[i] = self._guarded(item)
        return out

    # ---- the interface ------------------------------------------------------------------------------------
    def __call__(self, samples: Any) -> Tensor:
        if self.memory is not None and all(isinstance(s, str) for s in samples):
            return self._recalled(list(samples))
        return self._scored(samples)

    def _scored(self, samples: Any) -> Tensor:
        """``score_batch`` on ``samples``, counted; a failing batch is re-scored sample by sample."""
        n = len(samples)
        self.stats.batches += 1
        self.stats.samples += n
        try:
            out = self.score_batch(samples)
        except Exception as err:  # noqa: BLE001 - isolate the failing samples
            if n == 1 or type(self).score_batch is Reward.score_batch:
                raise
            self.stats.last_error = f"{type(err).__name__}: {err}"
            out = torch.cat([self._batch_one(samples[i : i + 1]) for i in range(n)])
        return self._finite(out, n)

    def remember(self, known: Mapping[str, float] | None = None) -> Reward:
        """Ask this reward once per distinct sample from now on: a string sample (a sequence, a SMILES) scored
        before, or listed in ``known``, gets its earlier value without a call. Right for rewards that are functions
        of their input (an expensive oracle is not asked twice); other batches are scored as before."""
        self.memory = dict(known or {})
        return self

    def reset(self) -> None:
        self.stats = RewardStats()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None
        state["memory"] = None  # a worker scores what it is sent
        return state

    # ---- internals ----------------------------------------------------------------------------------------
    def _recalled(self, samples: list[str]) -> Tensor:
        """Values of ``samples`` from memory, the new ones (each once) scored and remembered."""
        assert self.memory is not None
        new = list(dict.fromkeys(s for s in samples if s not in self.memory))
        if new:
            self.memory.update(zip(new, self._scored(new).tolist()))
        return torch.tensor([self.memory[s] for s in samples], dtype=torch.float64)

    def _finite(self, out: Tensor, n: int) -> Tensor:
        if not isinstance(out, Tensor) or out.shape[:1] != (n,) or out.ndim != 1:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"reward {self.name!r} returned {got} for a batch of {n}; expected a tensor [{n}]")
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            if self.nan == "raise":
                raise FloatingPointError(f"reward {self.name!r} is not finite for sample {first} ({out[first]})")
            self.stats.nonfinite += int(bad.sum())
            out = torch.where(bad, torch.full_like(out, self.penalty), out)
        return out

    def _batch_one(self, one: Any) -> Tensor:
        try:
            return self.score_batch(one).reshape(1)
        except Exception as err:  # noqa: BLE001
            self._failed(err)
            return torch.tensor([self.penalty], dtype=torch.float64)

    def _guarded(self, item: Any) -> float:
        try:
            return float(self.score_one(item))
        except Exception as err:  # noqa: BLE001
            self._failed(err)
            return self.penalty

    def _failed(self, err: BaseException) -> None:
        if isinstance(err, InvalidSample):
            self.stats.invalid += 1
            return
        self.stats.failures += 1
        self.stats.last_error = f"{type(err).__name__}: {err}"

    def lengths(self) -> set[int]:
        """The sample lengths this reward can score (empty: any length)."""
        return set()

    def _pooled(self, items: list) -> Tensor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers)
        futures = [self._pool.submit(_score_one, self, item) for item in items]
        out = torch.empty(len(items), dtype=torch.float64)
        for i, fut in enumerate(futures):
            try:
                out[i] = float(fut.result(timeout=self.timeout))
            except cf.TimeoutError:
                fut.cancel()
                self.stats.timeouts += 1
                self.stats.last_error = f"timeout after {self.timeout} s"
                out[i] = self.penalty
            except Exception as err:  # noqa: BLE001
                self._failed(err)
                out[i] = self.penalty
        return out


def _score_one(reward: Reward, item: Any) -> float:
    return float(reward.score_one(item))


@dataclass
class TensorReward(Reward):
    """A vectorised reward on tensors ``fn(x) -> Tensor[B]`` (differentiable if ``fn`` is)."""

    fn: Callable[[Tensor], Tensor] | None = None

    def score_batch(self, samples: Tensor) -> Tensor:
        return self.fn(samples).to(torch.float64)

    def grad_fn(self, x: Tensor) -> Tensor:
        """The raw (differentiable, unguarded) reward for gradient guidance."""
        return self.fn(x)


def quadratic(c: float = 0.0, tau: float = 1.0) -> TensorReward:
    """r(x) = -|x - c|^2 / (2 tau^2): exp(lambda r) is a Gaussian likelihood, so a Gaussian prior tilts to a
    Gaussian posterior."""
    if not tau > 0:
        raise ValueError(f"quadratic: tau must be > 0, got {tau}")

    def fn(x: Tensor) -> Tensor:
        return -((x - c) ** 2).flatten(1).sum(1) / (2.0 * tau**2)

    return TensorReward(name=f"quadratic(c={c},tau={tau})", fn=fn, differentiable=True, penalty=-1e6)


def linear(a: float = 1.0) -> TensorReward:
    """r(x) = a * sum_j x_j."""

    def fn(x: Tensor) -> Tensor:
        return a * x.flatten(1).sum(1)

    return TensorReward(name=f"linear(a={a})", fn=fn, differentiable=True, penalty=-1e6)


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class RewardEntry:
    factory: Callable[..., Reward]
    modality: str
    help: str


REWARDS: dict[str, RewardEntry] = {}


def register(name: str, modality: str, help: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        REWARDS[name] = RewardEntry(factory, modality, help)
        return factory

    return deco


def check_modality(spec: str, modality: str) -> None:
    """Every term of the reward ``spec`` must score this modality's samples (``any`` rewards score raw tensor
    states, which only backbones hand to rewards; ``sequence`` rewards score RNA and DNA; a ``python`` reward
    scores whatever the modality hands it)."""
    for term in spec.split("+"):
        name = term.strip().rpartition("*")[2].partition(":")[0].strip()
        kind = REWARDS[name].modality
        if not (kind in (modality, "python") or (kind == "any" and modality == "backbones")
                or (kind == "sequence" and modality in ("rna", "dna"))):
            raise ValueError(f"reward {name!r} scores {kind}, not {modality}")


def python_reward(target: str, penalty: float = -1.0) -> Reward:
    """A user's own scorer, ``python:FILE.py:FUNCTION`` or ``python:package.module:FUNCTION``: FUNCTION takes a
    list of samples (sequences and SMILES as strings, backbones as a coordinate tensor) and returns one number
    per sample. It runs under the same protection as every reward (exceptions and non-finite scores ->
    ``penalty``, counted); a relative FILE is read from the working directory."""
    import importlib
    from pathlib import Path

    where, sep, func = str(target).rpartition(":")
    if not sep or not where or not func.isidentifier():
        raise ValueError(f"python reward: expected FILE.py:FUNCTION or module:FUNCTION, got {target!r}")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"python reward: no file {path}")
        module = _user_module(str(path), path.stat().st_mtime_ns)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"python reward: {where} defines no function {func!r}")
    return _CallableReward(name=f"python:{target}", penalty=float(penalty),
                           fn=lambda samples: [float(v) for v in fn(list(samples))])


register("quadratic", "any", "-|x - c|^2 / (2 tau^2) on the sample tensor (args c, tau)")(quadratic)
register("linear", "any", "a * sum(x) on the sample tensor (arg a)")(linear)
@functools.lru_cache(maxsize=32)
def _user_module(path: str, mtime_ns: int) -> Any:
    """A reward file run once per version (a campaign parses its rewards more than once; an oracle may load a
    model at import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"molgen_user_reward_{abs(hash((path, mtime_ns)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


register("python", "python", "your own function: python:FILE.py:FUNCTION (list of samples -> one number each)")(
    python_reward)


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_args(text: str) -> tuple[list[Any], dict[str, Any]]:
    """``a,b,k=v`` -> ([a, b], {k: v}); numbers are converted, everything else stays a string."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if not text:
        return args, kwargs
    for part in text.split(","):
        key, eq, val = part.partition("=")
        if eq and key.isidentifier():
            if key in kwargs:
                raise ValueError(f"argument {key!r} given twice in {text!r}")
            kwargs[key] = _value(val)
        else:
            if kwargs:
                raise ValueError(f"positional argument {part!r} after keyword arguments in {text!r}")
            args.append(_value(part))
    return args, kwargs


def get_reward(name: str, *args: Any, **kwargs: Any) -> Reward:
    """Build a registered reward; unknown names and bad arguments raise ValueError naming the choices."""
    _load_builtin()
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    entry = REWARDS[name]
    try:
        inspect.signature(entry.factory).bind(*args, **kwargs)
    except TypeError as err:
        sig = inspect.signature(entry.factory)
        raise ValueError(f"reward {name!r}: bad arguments ({err}); signature {name}{sig}: {entry.help}") from None
    return entry.factory(*args, **kwargs)


def parse_reward(spec: str) -> Reward:
    """``NAME[:ARGS]``, or a weighted sum ``W*NAME[:ARGS]+...`` (e.g. ``qed+0.5*sa``) -> a Reward."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty reward specification; expected NAME[:ARGS]")
    terms = spec.strip().split("+")
    if len(terms) == 1:
        name, _, arg_text = spec.strip().partition(":")
        args, kwargs = parse_args(arg_text)
        return get_reward(name, *args, **kwargs)
    parts, weights = [], []
    for term in terms:
        head, star, rest = term.strip().partition("*")
        weight, body = (head, rest) if star and _is_number(head) else ("1", term.strip())
        if not body:
            raise ValueError(f"empty term in reward sum {spec!r}")
        parts.append(parse_reward(body))
        weights.append(float(weight))
    return SumReward(name=spec.strip(), parts=parts, weights=weights, penalty=sum(
        w * p.penalty for w, p in zip(weights, parts)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class SumReward(Reward):
    """sum_k w_k r_k(x); each part keeps its own per-sample failure handling and counts."""

    parts: list[Reward] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def score_batch(self, samples: Any) -> Tensor:
        return sum(w * part(samples) for w, part in zip(self.weights, self.parts))


def as_reward(reward: Callable[[Any], Tensor] | Reward, penalty: float = -1e6) -> Reward:
    """A ``Reward`` as is; any other callable wrapped so that it gets the same per-sample protection
    (exceptions and non-finite values -> ``penalty``, counted)."""
    if isinstance(reward, Reward):
        return reward
    return _CallableReward(name=getattr(reward, "__name__", "reward"), penalty=penalty, fn=reward)


@dataclass
class _CallableReward(Reward):
    fn: Callable[[Any], Tensor] | None = None

    def score_batch(self, samples: Any) -> Tensor:
        return torch.as_tensor(self.fn(samples), dtype=torch.float64)


def _load_builtin() -> None:
    """Import the modality reward modules (they register themselves); missing optional packages only
    remove their rewards."""
    for module in (f"molgen.guidance.rewards.{name}" for name in ("chemistry", "nucleic", "structure")):
        try:
            __import__(module)
        except ImportError:
            pass

